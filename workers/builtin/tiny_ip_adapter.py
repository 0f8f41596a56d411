"""The built-in `tiny-ip-adapter`: an IP-Adapter for the built-in `tiny`, for demos and tests.

An IP-Adapter is two parts (Ye et al., 2023; diffusers' `load_ip_adapter`): a CLIP image
encoder that turns the reference image into one embedding, and adapter weights in the original
layout diffusers converts on load — `image_proj.*` (the projection of that embedding to four
extra cross-attention tokens) and `ip_adapter.<n>.to_k_ip/to_v_ip.weight` (a key and value
projection for those tokens in every cross-attention layer of the UNet, numbered as diffusers
numbers them: 1, 3, 5, … over `unet.attn_processors`). Here both are sized for the tiny UNet
(cross-attention 32, blocks 32/64) and drawn from seeded random weights, offline:

    >>> weights, encoder = build_tiny_ip_adapter()         # the original-layout dict, the encoder
    >>> export_tiny_ip_adapter("out/tiny-ip-adapter")      # ip-adapter.safetensors + image_encoder/

The exported folder loads with diffusers directly:
`pipe.load_ip_adapter(folder, subfolder="", weight_name="ip-adapter.safetensors")`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from workers.builtin.tiny import SEED, build_tiny

NAME = "tiny-ip-adapter"
WEIGHT_NAME = "ip-adapter.safetensors"
"""The weights file of an exported adapter folder; its image encoder is `image_encoder/`."""
NUM_TOKENS = 4
"""Image tokens an IP-Adapter adds to the text tokens (diffusers' `ImageProjection`)."""

_built: dict[str, Any] = {}


def build_tiny_ip_adapter() -> tuple[
    dict[str, dict[str, torch.Tensor]], CLIPVisionModelWithProjection
]:
    """({"image_proj": …, "ip_adapter": …}, image encoder): fresh float32 CPU copies."""
    if not _built:
        _built.update(_build())
    weights = {part: {k: v.clone() for k, v in d.items()} for part, d in _built["weights"].items()}
    return weights, copy.deepcopy(_built["image_encoder"])


def export_tiny_ip_adapter(out_dir: str | Path) -> Path:
    """Write `tiny-ip-adapter` as diffusers loads IP-Adapters from a folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    weights, encoder = build_tiny_ip_adapter()
    out.mkdir(parents=True, exist_ok=True)
    flat = {f"{part}.{k}": v.contiguous() for part, d in weights.items() for k, v in d.items()}
    save_file(flat, str(out / WEIGHT_NAME), metadata={"format": "pt", "farm_builtin": NAME})
    encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    return out


def _build() -> dict[str, Any]:
    unet = build_tiny("tiny").unet
    cross_dim = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(SEED)
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                image_size=32,
                patch_size=4,
            )
        ).eval()
        embed_dim = encoder.config.projection_dim
        torch.manual_seed(SEED)
        proj = torch.nn.Linear(embed_dim, cross_dim * NUM_TOKENS)
        norm = torch.nn.LayerNorm(cross_dim)
        image_proj = {
            "proj.weight": proj.weight.detach().clone(),
            "proj.bias": proj.bias.detach().clone(),
            "norm.weight": norm.weight.detach().clone(),
            "norm.bias": norm.bias.detach().clone(),
        }
        ip_adapter = {}
        key_id = 1  # diffusers counts every attention processor, self and cross: 1, 3, 5, …
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            hidden = _hidden_size(unet.config, name)
            for kv in ("to_k_ip", "to_v_ip"):
                layer = torch.nn.Linear(cross_dim, hidden, bias=False)
                ip_adapter[f"{key_id}.{kv}.weight"] = layer.weight.detach().clone()
            key_id += 2
    return {
        "weights": {"image_proj": image_proj, "ip_adapter": ip_adapter},
        "image_encoder": encoder,
    }


def _hidden_size(config: Any, name: str) -> int:
    """The width of the UNet block an attention processor sits in (as diffusers reads it)."""
    if name.startswith("mid_block"):
        return config.block_out_channels[-1]
    block_id = int(name.split(".")[1])
    if name.startswith("up_blocks"):
        return list(reversed(config.block_out_channels))[block_id]
    return config.block_out_channels[block_id]
