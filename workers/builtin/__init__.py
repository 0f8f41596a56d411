"""Built-in tiny models of the families people render with, for demos and tests.

`workers.tiny` builds `tiny` and `tiny-inpaint`, Stable Diffusion 1.5-shaped; this package adds
the same for SDXL, SD3 and FLUX.1 (`families`), with tiny LoRA adapters for them (`lora`) and an
IP-Adapter for `tiny-sdxl` (`sdxl_ip_adapter`). Every one is a real diffusers pipeline at the
size of diffusers' own fast-test components, built offline from seeded random weights, so a
worker and a test get the same bytes with no files and no network; `defaults` reads each
family's pipeline defaults from diffusers itself, for the light side's table.
"""
