"""The built-in `tiny-sdxl-ip-adapter`: an IP-Adapter for `tiny-sdxl`, for demos and tests.

The same two parts as `workers.builtin.tiny_ip_adapter`'s adapter for `tiny`, in the same original
layout (that of h94/IP-Adapter's ip-adapter_sdxl.safetensors), which diffusers' `load_ip_adapter`
converts on load: a CLIP image encoder, `image_proj.*` (its embedding projected to four extra
tokens of the UNet's `cross_attention_dim`, which for SDXL is both text encoders' widths
together: 64 here) and `ip_adapter.<n>.to_k_ip/to_v_ip.weight` for every cross-attention layer of
the UNet, numbered 1, 3, 5, … over `unet.attn_processors` as diffusers numbers them. SDXL has
more of those than SD 1.5 for its size, since a cross-attention block holds several transformer
layers (`transformer_layers_per_block`). Seeded random weights, offline:

    >>> weights, encoder = build_sdxl_ip_adapter()
    >>> export_sdxl_ip_adapter("out/tiny-sdxl-ip-adapter")  # ip-adapter.safetensors + image_encoder/

The folder loads with diffusers directly:
`pipe.load_ip_adapter(folder, subfolder="", weight_name="ip-adapter.safetensors")`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from workers.builtin.families import build_family_tiny
from workers.builtin.tiny import SEED
from workers.builtin.tiny_ip_adapter import NUM_TOKENS, WEIGHT_NAME, _hidden_size

NAME = "tiny-sdxl-ip-adapter"
MODEL = "tiny-sdxl"
"""The built-in this adapter is for."""

_built: dict[str, Any] = {}


def build_sdxl_ip_adapter() -> tuple[
    dict[str, dict[str, torch.Tensor]], CLIPVisionModelWithProjection
]:
    """({"image_proj": …, "ip_adapter": …}, image encoder): fresh float32 CPU copies."""
    if not _built:
        _built.update(_build())
    weights = {part: {k: v.clone() for k, v in d.items()} for part, d in _built["weights"].items()}
    return weights, copy.deepcopy(_built["image_encoder"])


def export_sdxl_ip_adapter(out_dir: str | Path) -> Path:
    """Write `tiny-sdxl-ip-adapter` as diffusers loads IP-Adapters from a folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    weights, encoder = build_sdxl_ip_adapter()
    out.mkdir(parents=True, exist_ok=True)
    flat = {f"{part}.{k}": v.contiguous() for part, d in weights.items() for k, v in d.items()}
    save_file(flat, str(out / WEIGHT_NAME), metadata={"format": "pt", "farm_builtin": NAME})
    encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    return out


def _build() -> dict[str, Any]:
    unet = build_family_tiny(MODEL).unet
    cross_dim = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        # 1. The image encoder: a two-layer CLIP vision model on 32×32 images, 4×4 patches.
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
        # 2. The image projection: one embedding → NUM_TOKENS tokens of the UNet's context width.
        torch.manual_seed(SEED)
        proj = torch.nn.Linear(encoder.config.projection_dim, cross_dim * NUM_TOKENS)
        norm = torch.nn.LayerNorm(cross_dim)
        image_proj = {
            "proj.weight": proj.weight.detach().clone(),
            "proj.bias": proj.bias.detach().clone(),
            "norm.weight": norm.weight.detach().clone(),
            "norm.bias": norm.bias.detach().clone(),
        }
        # 3. A key and value projection for those tokens in every cross-attention layer.
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
