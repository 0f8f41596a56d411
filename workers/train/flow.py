"""Transformer families: SD3/3.5 and FLUX.1, trained on flow matching.

Both follow diffusers' DreamBooth LoRA scripts (`train_dreambooth_lora_sd3.py`,
`train_dreambooth_lora_flux.py`) with their defaults:

- a timestep per example, drawn by `compute_density_for_timestep_sampling` with the script's
  `weighting_scheme` (SD3: `logit_normal`, mean 0, std 1; FLUX.1: `none`, uniform) and looked
  up in the model's own flow-matching Euler schedule (`FlowMatchEulerDiscreteScheduler` from
  its scheduler config, with that config's shift), and its sigma σ;
- the latents noised along the straight path, (1 − σ) · x + σ · noise, after the VAE's shift
  and scale;
- the loss, weighted by `compute_loss_weighting_for_sd3` (1 for both defaults): FLUX.1 predicts
  the velocity, noise − x; SD3's output is preconditioned (`precondition_outputs`, on by
  default: σ-scaled back to a prediction of x, x the target).

FLUX.1's transformer takes its latents packed, 2×2 patches as tokens, with position ids for the
image tokens (`img_ids`) and zeros for the text tokens (`txt_ids`); a guidance-distilled model
(`guidance_embeds`, FLUX.1-dev) gets the script's `guidance_scale` 3.5 as an input; its
conditioning is T5's tokens (512 by default, as the script) and CLIP's pooled output. SD3
conditions on both CLIPs' penultimate hidden states (concatenated, zero-padded to T5's width)
stacked with T5's tokens (77 by default, as the script), and both CLIPs' pooled outputs.

With `train_text_encoder`, the CLIP encoders train (FLUX.1: its one CLIP; SD3: both), never T5,
as the scripts do.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from workers.train.recipe import Recipe, tokenize

ATTENTION = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0")
TEXT_ATTENTION = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out")
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


class FlowMatching(Recipe):
    """What SD3 and FLUX.1 share: the noising, the timestep draw and the weighted loss."""

    denoiser = "transformer"
    diffusers_keys = False
    weighting_scheme: ClassVar[str]
    max_sequence_length: ClassVar[int]
    """T5's tokens per caption (the script's `--max_sequence_length` default)."""
    precondition_outputs: ClassVar[bool] = False

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        # The schedule the model was trained with, at its full number of training timesteps.
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)

    def loss(
        self, latents: torch.Tensor, indices: list[int], generator: torch.Generator
    ) -> torch.Tensor:
        noise = self.noise(latents, generator)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=latents.shape[0],
            logit_mean=0.0,
            logit_std=1.0,
            mode_scale=1.29,
            generator=generator,
        )
        index = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[index].to(self.device)
        sigmas = self.scheduler.sigmas[index].to(self.device, latents.dtype)
        sigmas = sigmas.reshape(-1, *[1] * (latents.ndim - 1))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        pred = self.predict(noisy, timesteps, indices).float()
        if self.precondition_outputs:
            pred = pred * (-sigmas) + noisy
            target = latents
        else:
            target = noise - latents
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        per_example = (weighting.float() * (pred - target.float()) ** 2).reshape(len(indices), -1)
        return per_example.mean(1).mean()

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, indices: list[int]
    ) -> torch.Tensor:
        """The transformer's output for `noisy` latents at `timesteps`, as latents."""
        raise NotImplementedError


class Sd3(FlowMatching):
    """SD3/3.5: three text encoders, patches embedded by the transformer itself."""

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_targets = TEXT_ATTENTION + ATTENTION
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    weighting_scheme = "logit_normal"
    max_sequence_length = 77
    precondition_outputs = True

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = {
            "text_encoder": tokenize(self.pipe.tokenizer, captions, 77),
            "text_encoder_2": tokenize(self.pipe.tokenizer_2, captions, 77),
        }
        if self.pipe.text_encoder_3 is not None:
            tokens["text_encoder_3"] = tokenize(
                self.pipe.tokenizer_3, captions, self.max_sequence_length
            )
        return tokens

    def condition(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The transformer's text inputs for these examples, as the SD3 pipeline's
        `encode_prompt` builds them (one image per prompt, no guidance)."""
        first, pooled_1 = self.clip_states("text_encoder", indices)
        second, pooled_2 = self.clip_states("text_encoder_2", indices)
        clip = torch.cat([first, second], dim=-1)
        if self.pipe.text_encoder_3 is not None:
            with torch.no_grad():
                t5 = self.pipe.text_encoder_3(self.ids("text_encoder_3", indices))[0]
        else:  # SD3 without T5, as its pipeline runs it: zeros in T5's place
            width = self.pipe.transformer.config.joint_attention_dim
            t5 = torch.zeros(len(indices), self.max_sequence_length, width, device=self.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_projections": torch.cat([pooled_1, pooled_2], dim=-1),
        }

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, indices: list[int]
    ) -> torch.Tensor:
        transformer = self.pipe.transformer
        dtype = transformer.dtype
        text = {k: v.to(dtype) for k, v in self.condition(indices).items()}
        return transformer(
            hidden_states=noisy.to(dtype), timestep=timesteps, **text, return_dict=False
        )[0]


class Flux(FlowMatching):
    """FLUX.1: CLIP's pooled output and T5's tokens, packed latents, a guidance input."""

    family = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_targets = ATTENTION + TEXT_ATTENTION + FEED_FORWARD
    weighting_scheme = "none"
    max_sequence_length = 512
    guidance_scale: ClassVar[float] = 3.5
    """The script's `--guidance_scale` for guidance-distilled models (FLUX.1-dev)."""

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {
            "text_encoder": tokenize(self.pipe.tokenizer, captions, 77),
            "text_encoder_2": tokenize(self.pipe.tokenizer_2, captions, self.max_sequence_length),
        }

    def condition(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The transformer's text inputs for these examples, as the FLUX.1 pipeline's
        `encode_prompt` builds them: CLIP's pooled output, T5's tokens, zeros as text ids."""
        with self.grad("text_encoder"):
            pooled = self.pipe.text_encoder(
                self.ids("text_encoder", indices), output_hidden_states=False
            ).pooler_output
        with torch.no_grad():
            tokens = self.pipe.text_encoder_2(
                self.ids("text_encoder_2", indices), output_hidden_states=False
            )[0]
        return {
            "pooled_projections": pooled,
            "encoder_hidden_states": tokens,
            "txt_ids": torch.zeros(tokens.shape[1], 3, device=self.device, dtype=tokens.dtype),
        }

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, indices: list[int]
    ) -> torch.Tensor:
        pipe, transformer = self.pipe, self.pipe.transformer
        dtype = transformer.dtype
        # 1. Conditioning (see `condition`).
        text = {k: v.to(dtype) for k, v in self.condition(indices).items()}
        # 2. The latents as tokens: 2×2 patches packed, and their positions.
        batch, channels, height, width = noisy.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, self.device, dtype
        )
        packed = FluxPipeline._pack_latents(noisy.to(dtype), batch, channels, height, width)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_scale, device=self.device)
        pred = transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            **text,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        # 3. Back to latents.
        scale = pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(
            pred, height=height * scale, width=width * scale, vae_scale_factor=scale
        )
