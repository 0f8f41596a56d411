"""Tiny LoRA adapters for the SDXL, SD3 and FLUX.1 built-ins: for tests, demos and benchmarks.

As `workers.builtin.tiny_lora` does for `tiny`: peft's `LoraConfig` is injected into the built-in's
denoiser (and, if asked, its CLIP text encoders) and the adapter saved by the family pipeline's
own `save_lora_weights`, in the layout diffusers' training script for that family writes
(train_dreambooth_lora_sdxl converts peft's keys to diffusers' `lora.down/up` names; the SD3 and
FLUX.1 scripts save peft's `lora_A/lora_B` as they are). diffusers' `load_lora_weights` then
reads it as it reads any trained adapter. The up-projections (`lora_B`) are drawn from a seeded
generator: peft's initialisation zeroes them, and an adapter that does nothing proves nothing;
the down-projections peft draws are seeded too, so the same seed writes the same adapter.

    >>> path = save_family_lora("out/style.safetensors", "tiny-flux", seed=1)
    >>> pipe.load_lora_weights("out", weight_name="style.safetensors", adapter_name="style")
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers.builtin.families import FAMILY_MODELS, build_family_tiny

DENOISER_TARGETS: dict[str, tuple[str, ...]] = {
    "sdxl": ("to_q", "to_k", "to_v", "to_out.0"),
    "sd3": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"),
    "flux": (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    ),
}
"""The attention projections (image and text streams) that diffusers' LoRA scripts adapt."""
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_CLIP_ENCODERS = {"sdxl": ("text_encoder", "text_encoder_2"), "sd3": (), "flux": ("text_encoder",)}


def family_lora_layers(
    model: str,
    *,
    seed: int = 0,
    rank: int = 4,
    std: float = 0.5,
    text_encoder: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """`save_lora_weights`' keyword arguments for a built-in: `unet_lora_layers` (SDXL) or
    `transformer_lora_layers` (SD3, FLUX.1), and with `text_encoder` the CLIP encoders' too."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    family = _family(model)
    if text_encoder and not _CLIP_ENCODERS[family]:
        raise ValueError(f"{model!r}: no text-encoder LoRA for the {family} family here")
    pipe = build_family_tiny(model)
    generator = torch.Generator().manual_seed(seed)
    denoiser = "unet" if family == "sdxl" else "transformer"
    parts = {f"{denoiser}_lora_layers": (getattr(pipe, denoiser), DENOISER_TARGETS[family])}
    if text_encoder:
        for name in _CLIP_ENCODERS[family]:
            parts[f"{name}_lora_layers"] = (getattr(pipe, name), TEXT_ENCODER_TARGETS)
    layers = {}
    for name, (module, targets) in parts.items():
        # peft itself rather than `add_adapter` (transformers' wants a newer peft than
        # diffusers does); the adapter is the same either way.
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global RNG
            torch.manual_seed(seed)
            inject_adapter_in_model(config, module)
        with torch.no_grad():
            for param_name, param in sorted(module.named_parameters()):
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        state = get_peft_model_state_dict(module, module.state_dict())
        if family == "sdxl":
            state = convert_state_dict_to_diffusers(state)
        layers[name] = {k: v.detach().clone().contiguous() for k, v in state.items()}
    return layers


def save_family_lora(path: str | Path, model: str, **kwargs: object) -> Path:
    """Write a built-in's tiny adapter as one `.safetensors` file, as `save_lora_weights` does."""
    _family(model)
    pipeline_class, _ = FAMILY_MODELS[model]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(
        save_directory=out.parent,
        weight_name=out.name,
        safe_serialization=True,
        **family_lora_layers(model, **kwargs),  # type: ignore[arg-type]
    )
    return out


def _family(model: str) -> str:
    if model not in FAMILY_MODELS:
        choices = ", ".join(FAMILY_MODELS)
        raise ValueError(f"unknown built-in model {model!r}; choose one of {choices}")
    return FAMILY_MODELS[model][1]
