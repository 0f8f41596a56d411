"""Built-in tiny models with seeded random weights, built offline: for demos and tests.

tiny.py             `tiny` and `tiny-inpaint` (Stable Diffusion 1.x-shaped)
tiny_lora.py        tiny LoRA adapters for them
tiny_ip_adapter.py  `tiny-ip-adapter`, an IP-Adapter for `tiny`
"""
