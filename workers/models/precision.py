"""Precision and memory per worker: the dtype a model loads in, CPU offload, VAE tiling.

    FARM_DTYPE=auto|fp16|bf16|fp32        auto: bf16 for SD3 and FLUX.1, fp16 for SD and SDXL
                                          on CUDA; fp32 on CPU
    FARM_OFFLOAD=none|model|sequential    diffusers' enable_model_cpu_offload /
                                          enable_sequential_cpu_offload
    FARM_VAE_TILING=1                     the VAE decodes (and encodes) large images in tiles

SD3 and FLUX.1 were trained in bf16, and their activations overflow fp16's range (diffusers'
docs load them with `torch_dtype=torch.bfloat16`); SD 1.x/2.x and SDXL are published and run in
fp16. A CPU has no fast half precision, so a CPU worker stays in fp32 unless told otherwise.

Offload trades speed for memory on a GPU too small for the model: `model` keeps each
component on the CPU and moves it to the GPU while it runs (a few percent slower);
`sequential` moves each layer (much slower; for the largest models on the smallest cards).
Sequential offload needs a GPU (accelerate's hooks), so a CPU worker refuses it at start.
VAE tiling changes nothing below the VAE's own tile size (its `sample_size`: 512 or 1024 px);
above it, it bounds the decoder's memory at the cost of faint seams, so it is off by default.
"""

from __future__ import annotations

from typing import Any

import torch

from farm.errors import InvalidJob

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BF16_FAMILIES = ("sd3", "flux")
OFFLOADS = ("none", "model", "sequential")


def choose_dtype(setting: str, device: torch.device | str, family: str | None) -> torch.dtype:
    """The dtype a model of `family` loads in on `device` under `FARM_DTYPE=setting`."""
    if setting != "auto":
        if setting not in DTYPES:
            raise ValueError(f"FARM_DTYPE must be auto, {', '.join(DTYPES)}; got {setting!r}")
        return DTYPES[setting]
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if family in BF16_FAMILIES else torch.float16


def check_offload(offload: str, device: torch.device | str) -> None:
    """Refuse an offload a worker on `device` cannot do, at start rather than at the first job."""
    if offload not in OFFLOADS:
        raise InvalidJob(
            f"FARM_OFFLOAD must be one of {', '.join(OFFLOADS)}; got {offload!r}", field="offload"
        )
    if offload == "sequential" and torch.device(device).type != "cuda":
        raise InvalidJob(
            "FARM_OFFLOAD=sequential needs a CUDA device (accelerate's hooks)", field="offload"
        )


def place(pipe: Any, device: torch.device, offload: str = "none", vae_tiling: bool = False) -> Any:
    """Put a freshly loaded pipeline on `device`: moved there whole, or offloaded to the CPU
    and brought to `device` one component (`model`) or one layer (`sequential`) at a time."""
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    if vae_tiling and hasattr(getattr(pipe, "vae", None), "enable_tiling"):
        pipe.vae.enable_tiling()
    return pipe
