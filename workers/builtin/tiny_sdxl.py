"""The components of `tiny-sdxl` and `tiny-sdxl-inpaint`: SDXL at diffusers' fast-test size.

SDXL differs from SD 1.5 in what conditions its UNet, so that is what these keep at full
shape while every width shrinks: two CLIP text encoders whose hidden states are concatenated
(32 + 32 = the UNet's `cross_attention_dim` 64), the second with a projection whose pooled output
joins six "micro-conditioning" numbers (original size, crop corner, target size; 8 sinusoidal
features each) in the UNet's `text_time` added embedding, so its
`projection_class_embeddings_input_dim` is 6 × 8 + 32 = 80. The UNet (blocks of 2 and 4
channels, one group per norm, two transformer layers in the cross-attention block) and the
two-block VAE are those of diffusers' tests/pipelines/stable_diffusion_xl; latents are 32×32,
so images are 64×64 by default. The VAE has SDXL's `scaling_factor` 0.13025 and the scheduler is
stabilityai/stable-diffusion-xl-base-1.0's Euler, every value written out.

`tiny-sdxl-inpaint` has the 9-channel UNet (noise, mask, masked-image latents) of
diffusers/stable-diffusion-xl-1.0-inpainting-0.1, with the same encoders, VAE and scheduler, and,
as that model, no aesthetic score among its time ids.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from workers.builtin.components import (
    CLIP_WIDTH,
    clip_text_encoder,
    clip_text_encoder_with_projection,
    clip_tokenizer,
    explicit,
)
from workers.builtin.tiny import SEED

TIME_EMBED_DIM = 8
"""Sinusoidal features per SDXL time id (original h, w; crop top, left; target h, w)."""
IN_CHANNELS = {"tiny-sdxl": 4, "tiny-sdxl-inpaint": 9}


def components(name: str) -> dict[str, Any]:
    """Fresh components for `tiny-sdxl` or `tiny-sdxl-inpaint` (seeded, float32, CPU)."""
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        # 1. The UNet, conditioned on both encoders' hidden states and on the time ids.
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            block_out_channels=(2, 4),
            layers_per_block=2,
            sample_size=32,  # latents 32×32 → images 64×64 through the 2× VAE
            in_channels=IN_CHANNELS[name],
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + CLIP_WIDTH,
            cross_attention_dim=2 * CLIP_WIDTH,
            norm_num_groups=1,
        )
        # 2. The VAE: 2× down, 4 latent channels, SDXL's scaling factor.
        torch.manual_seed(SEED)
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            sample_size=64,
            scaling_factor=0.13025,
            force_upcast=True,
        )
        # 3. The text encoders: CLIP (hidden states) and CLIP with projection (pooled too).
        torch.manual_seed(SEED)
        text_encoder = clip_text_encoder(tokenizer)
        torch.manual_seed(SEED)
        text_encoder_2 = clip_text_encoder_with_projection(tokenizer_2)
    # 4. stable-diffusion-xl-base-1.0's scheduler.
    scheduler = explicit(
        EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            interpolation_type="linear",
            use_karras_sigmas=False,
            timestep_spacing="leading",
            steps_offset=1,
        )
    )
    for module in (unet, vae):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def pipeline_options(name: str) -> dict[str, Any]:
    """The pipeline's own arguments, as the real model's `model_index.json` has them."""
    options: dict[str, Any] = {
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,  # not saved: a loaded copy asks whether invisible-watermark is in
    }
    if name == "tiny-sdxl-inpaint":
        options["requires_aesthetics_score"] = False
    return options
