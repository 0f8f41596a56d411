"""The components of `tiny-sd3`: Stable Diffusion 3 at diffusers' fast-test size.

SD3 replaces the UNet with an MMDiT (`SD3Transformer2DModel`) that attends jointly over image
patches and text tokens, and conditions on three text encoders: two CLIPs with projections,
whose hidden states are concatenated (32 + 32) and zero-padded to the T5's width (64, the
transformer's `joint_attention_dim`) then stacked with the T5's tokens, and whose pooled outputs
are concatenated (32 + 32 = `pooled_projection_dim` 64). The transformer is the one-layer,
four-head, 32-wide one of diffusers' tests/pipelines/stable_diffusion_3, but on 16 latent
channels with SD3's 2×2 patches; the VAE has SD3's 16 channels and latent normalisation
(shift 0.0609, scale 1.5035), 2× down, so 32×32 latents (16×16 patches) make a 64×64 image by
default. The scheduler is stable-diffusion-3-medium's: flow-matching Euler with a fixed shift 3.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from workers.builtin.components import (
    CLIP_WIDTH,
    T5_WIDTH,
    clip_text_encoder_with_projection,
    clip_tokenizer,
    explicit,
    t5_encoder,
    t5_tokenizer,
    vae_16_channels,
)
from workers.builtin.tiny import SEED


def components(name: str) -> dict[str, Any]:
    """Fresh components for `tiny-sd3` (seeded, float32, CPU)."""
    if name != "tiny-sd3":
        raise ValueError(f"not an SD3 built-in: {name!r}")
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        # 1. The MMDiT: 16×16 patches of 2×2 latents, joint attention with the text tokens.
        torch.manual_seed(SEED)
        transformer = SD3Transformer2DModel(
            sample_size=32,  # latents 32×32 → images 64×64 through the 2× VAE
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=T5_WIDTH,
            caption_projection_dim=32,
            pooled_projection_dim=2 * CLIP_WIDTH,
            pos_embed_max_size=96,
        ).eval()
        # 2. The VAE: 16 latent channels, SD3's shift and scale.
        torch.manual_seed(SEED)
        vae = vae_16_channels(shift_factor=0.0609, scaling_factor=1.5035)
        # 3. The text encoders: two CLIPs with projections, then T5.
        torch.manual_seed(SEED)
        text_encoder = clip_text_encoder_with_projection(tokenizer)
        torch.manual_seed(SEED)
        text_encoder_2 = clip_text_encoder_with_projection(tokenizer_2)
        torch.manual_seed(SEED)
        text_encoder_3 = t5_encoder(tokenizer_3)
    # 4. stable-diffusion-3-medium's scheduler: a fixed shift of 3 towards the noisy end.
    scheduler = explicit(
        FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
        )
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        "scheduler": scheduler,
    }


def pipeline_options(name: str) -> dict[str, Any]:
    """The pipeline's own arguments: no IP-Adapter image encoder."""
    return {"image_encoder": None, "feature_extractor": None}
