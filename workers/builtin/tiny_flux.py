"""The components of `tiny-flux` and `tiny-flux-fill`: FLUX.1 at diffusers' fast-test size.

FLUX.1's transformer takes its latents "packed": each 2×2 patch of the 16-channel latents is one
token of 64 channels, so its `in_channels` is 64 and a 64×64 image (32×32 latents through the
2× VAE) is 256 tokens. It conditions on T5's tokens (`joint_attention_dim` = the T5's width 64)
and on CLIP's pooled output (`pooled_projection_dim` 32), with FLUX.1-dev's guidance embedding
(the guidance scale is an input, not a second pass). Positions are 3-axis rotary embeddings
whose axes (4 + 4 + 8) add up to the 16 of each attention head. The transformer is the one of
diffusers' tests/pipelines/flux (one double-stream block, one single-stream block, two heads);
the VAE has FLUX.1's 16 channels and latent normalisation (shift 0.1159, scale 0.3611). The
scheduler is FLUX.1-dev's flow-matching Euler with dynamic shifting: its shift grows with the
number of image tokens, from 0.5 at 256 tokens to 1.15 at 4096.

`tiny-flux-fill` is FLUX.1-Fill-dev's layout: the same model, but every token also carries the
packed latents of the masked image (64 channels) and the mask, folded from pixels into
`vae_scale_factor`² = 4 channels per latent and packed 2×2 (16): `in_channels` 64 + 64 + 16 = 144,
`out_channels` 64. (diffusers' own test has 2 latent channels and a 1× VAE: 8 + 8 + 4 = 20.)

diffusers' Flux pipelines fix `default_sample_size = 128` in their `__init__`, not in any
config, so without `height`/`width` they render 128 × `vae_scale_factor` = 256 pixels square:
the farm always passes the size.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from workers.builtin.components import (
    CLIP_WIDTH,
    T5_WIDTH,
    clip_text_encoder,
    clip_tokenizer,
    explicit,
    t5_encoder,
    t5_tokenizer,
    vae_16_channels,
)
from workers.builtin.tiny import SEED

LATENT_CHANNELS = 16
VAE_SCALE_FACTOR = 2
PACKED = 4 * LATENT_CHANNELS  # a 2×2 patch of latents per token
IN_CHANNELS = {
    "tiny-flux": PACKED,
    "tiny-flux-fill": PACKED + PACKED + 4 * VAE_SCALE_FACTOR**2,  # latents, masked image, mask
}


def components(name: str) -> dict[str, Any]:
    """Fresh components for `tiny-flux` or `tiny-flux-fill` (seeded, float32, CPU)."""
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        # 1. The transformer, on packed latents (and, for Fill, the packed mask and image).
        torch.manual_seed(SEED)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=IN_CHANNELS[name],
            out_channels=PACKED,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=CLIP_WIDTH,
            guidance_embeds=True,  # FLUX.1-dev and -Fill-dev are guidance-distilled
            axes_dims_rope=(4, 4, 8),
        ).eval()
        # 2. The VAE: 16 latent channels, FLUX.1's shift and scale.
        torch.manual_seed(SEED)
        vae = vae_16_channels(shift_factor=0.1159, scaling_factor=0.3611)
        # 3. The text encoders: CLIP (its pooled output only) and T5 (its tokens).
        torch.manual_seed(SEED)
        text_encoder = clip_text_encoder(tokenizer)
        torch.manual_seed(SEED)
        text_encoder_2 = t5_encoder(tokenizer_2)
    # 4. FLUX.1-dev's scheduler: the shift follows the image's token count.
    scheduler = explicit(
        FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def pipeline_options(name: str) -> dict[str, Any]:
    """The pipeline's own arguments: FluxPipeline takes an (absent) IP-Adapter image encoder."""
    if name == "tiny-flux-fill":
        return {}
    return {"image_encoder": None, "feature_extractor": None}
