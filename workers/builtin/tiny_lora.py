"""Tiny LoRA adapters for the built-in tiny models: for tests, demos and benchmarks (offline).

An adapter is made the way a fine-tune makes one: peft's `LoraConfig` added to the tiny UNet
(and, if asked, its text encoder) with `add_adapter`, then saved by diffusers'
`StableDiffusionPipeline.save_lora_weights`, so diffusers' `load_lora_weights` reads it as it
reads any trained adapter. The LoRA up-projections (`lora_B`) are drawn from a seeded
generator: peft's default initialisation zeroes them, and an adapter that does nothing would
prove nothing.

    >>> path = save_tiny_lora("out/style.safetensors", seed=1)
    >>> pipe.load_lora_weights("out", weight_name="style.safetensors", adapter_name="style")
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The UNet's attention projections, where diffusers' LoRA training scripts put adapters."""
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def tiny_lora_layers(
    model: str = "tiny",
    *,
    seed: int = 0,
    rank: int = 4,
    std: float = 0.5,
    unet_targets: tuple[str, ...] = UNET_TARGETS,
    text_encoder: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """`save_lora_weights`' keyword arguments: `unet_lora_layers` (and `text_encoder_lora_layers`)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from workers.builtin.tiny import build_tiny

    pipe = build_tiny(model)
    generator = torch.Generator().manual_seed(seed)
    parts = {"unet_lora_layers": (pipe.unet, unet_targets)}
    if text_encoder:
        parts["text_encoder_lora_layers"] = (pipe.text_encoder, TEXT_ENCODER_TARGETS)
    layers = {}
    for name, (module, targets) in parts.items():
        # peft itself rather than `add_adapter`: transformers' wants a newer peft than
        # diffusers does, and the adapter is the same either way.
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
        inject_adapter_in_model(config, module)
        with torch.no_grad():
            for param_name, param in sorted(module.named_parameters()):
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        state = get_peft_model_state_dict(module, module.state_dict())
        layers[name] = convert_state_dict_to_diffusers(state)
    return layers


def save_tiny_lora(path: str | Path, model: str = "tiny", **kwargs: object) -> Path:
    """Write a tiny adapter as one `.safetensors` file, as `save_lora_weights` writes it."""
    from diffusers import StableDiffusionPipeline

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=out.parent,
        weight_name=out.name,
        safe_serialization=True,
        **tiny_lora_layers(model, **kwargs),  # type: ignore[arg-type]
    )
    return out
