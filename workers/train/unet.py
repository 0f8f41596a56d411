"""UNet families: SD 1.x/2.x and SDXL, trained on DDPM noise prediction.

Both follow diffusers' DreamBooth LoRA scripts (`train_dreambooth_lora.py`,
`train_dreambooth_lora_sdxl.py`): noise and a timestep drawn per example, the latents noised by
the DDPM schedule of the model's own scheduler config, and the MSE between the UNet's
prediction and the noise (the velocity for v-prediction models). SDXL conditions its UNet on
more than the prompt, and so does its training:

- the prompt goes through both text encoders, the first's and the second's penultimate hidden
  states concatenated, and the second's projected embedding is the pooled `text_embeds`;
- `time_ids` per example are (original height, width, crop top, left, target height, width):
  the picture's size before it was resized, where the square was cut from it, and the
  training resolution, as the SDXL script's `compute_time_ids` builds them.

With `train_text_encoder`, SDXL trains LoRA layers in both CLIP encoders, as its script does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from workers.train.recipe import Recipe, tokenize

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
"""UNet attention projections that get LoRA layers (as diffusers' scripts choose)."""


class NoisePrediction(Recipe):
    """SD 1.x/2.x: one CLIP text encoder, its last hidden states as the UNet's context."""

    family = "sd"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_targets = UNET_TARGETS

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        # The noise schedule the model was trained with: DDPM from its scheduler's config.
        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"text_encoder": tokenize(self.pipe.tokenizer, captions)}

    def condition(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The UNet's `encoder_hidden_states` and `added_cond_kwargs` for these examples."""
        with self.grad("text_encoder"):
            states = self.pipe.text_encoder(self.ids("text_encoder", indices), return_dict=False)
        return states[0], {}

    def loss(
        self, latents: torch.Tensor, indices: list[int], generator: torch.Generator
    ) -> torch.Tensor:
        """Noise-prediction MSE (the scripts' loss, SNR weighting off)."""
        unet = self.pipe.unet
        noise = self.noise(latents, generator)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator)
        timesteps = timesteps.to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        context, added = self.condition(indices)
        pred = unet(
            noisy.to(unet.dtype),
            timesteps,
            context.to(unet.dtype),
            added_cond_kwargs={k: v.to(unet.dtype) for k, v in added.items()} or None,
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), target.float(), reduction="mean")


class Sdxl(NoisePrediction):
    """SDXL: two CLIP text encoders, and size and crop conditioning (see the module
    docstring)."""

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {
            "text_encoder": tokenize(self.pipe.tokenizer, captions),
            "text_encoder_2": tokenize(self.pipe.tokenizer_2, captions),
        }

    def condition(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        first, _ = self.clip_states("text_encoder", indices)
        second, pooled = self.clip_states("text_encoder_2", indices)
        return torch.cat([first, second], dim=-1), {
            "text_embeds": pooled,
            "time_ids": self.time_ids(indices),
        }

    def time_ids(self, indices: list[int]) -> torch.Tensor:
        """(original size, crop top-left, target size) per example: `compute_time_ids`."""
        target = (self.spec.resolution, self.spec.resolution)
        rows = [
            [*self.examples[i].original_size, *self.examples[i].crop_top_left, *target]
            for i in indices
        ]
        return torch.tensor(rows, device=self.device, dtype=self.pipe.unet.dtype)
