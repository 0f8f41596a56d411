"""Built-in tiny models with seeded random weights, built offline: for demos and tests.

tiny.py             `tiny` and `tiny-inpaint` (Stable Diffusion 1.x-shaped)
tiny_sdxl.py        `tiny-sdxl`, `tiny-sdxl-inpaint`: SDXL's two text encoders and size conditioning
tiny_sd3.py         `tiny-sd3`: an MMDiT transformer, three text encoders, flow matching
tiny_flux.py        `tiny-flux`, `tiny-flux-fill`: FLUX.1's transformer, CLIP + T5, flow matching
components.py       what the families share: tokenizers (CLIP, T5) built locally, the 16-channel VAE
families.py         name → pipeline class and family; build and export any built-in
defaults.py         each family's pipeline defaults, read from diffusers itself
tiny_lora.py        tiny LoRA adapters for `tiny`
lora.py             tiny LoRA adapters for the SDXL, SD3 and Flux built-ins
tiny_ip_adapter.py  `tiny-ip-adapter`, an IP-Adapter for `tiny`
sdxl_ip_adapter.py  `tiny-sdxl-ip-adapter`, an IP-Adapter for `tiny-sdxl`

Every builder seeds each component from `torch.manual_seed(SEED)` inside `fork_rng`, so every
process on the same torch version builds the same bytes and callers' RNGs are left alone.
"""
