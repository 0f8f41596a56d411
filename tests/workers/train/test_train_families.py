"""LoRA fine-tunes on SDXL, FLUX.1 and SD3, as diffusers' DreamBooth LoRA scripts for them
train: the loss falls, the adapter loads with that family's own `load_lora_weights` and renders
what the trainer rendered with its layers attached, the warm pipeline comes back untouched, and
a resumed run ends bit for bit where an unbroken one does. SDXL's size and crop conditioning
and both text encoders, FLUX.1's and SD3's flow-matching objectives, each checked where it can
fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load as load_tensors

from farm.errors import InvalidJob
from farm.jobs.families import ModelInfo
from farm.keys import ADAPTER_FILE
from tests.workers.train.test_train_lora import never, spec, training_images
from tests.workers.train.test_train_lora import render as render_64
from workers.train.flow import Flux, Sd3
from workers.train.recipe import prepare
from workers.train.train_lora import LoraTrainer, recipe_for
from workers.train.unet import Sdxl

FAMILIES = ["tiny-sdxl", "tiny-flux", "tiny-sd3"]
TRAINING = {
    "tiny-sdxl": (1e-2, 40, 0.99),
    "tiny-flux": (3e-2, 20, 0.97),
    "tiny-sd3": (3e-2, 20, 0.97),
}
"""Per built-in: learning rate, steps, and how far the training loss must fall. The built-in
SDXL UNet has 15k weights (blocks of 2 and 4 channels): its LoRA learns, but little."""
DENOISER = {"tiny-sdxl": "unet", "tiny-flux": "transformer", "tiny-sd3": "transformer"}
TEXT_ENCODERS = {
    "tiny-sdxl": {"text_encoder", "text_encoder_2"},  # both CLIPs, as the SDXL script
    "tiny-flux": {"text_encoder"},  # CLIP only, never T5
    "tiny-sd3": {"text_encoder", "text_encoder_2"},  # both CLIPs, never T5
}


def render(pipe) -> np.ndarray:
    return render_64(pipe, size=32)


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request):
    """One fine-tune per family (denoiser and CLIP text encoders, alpha ≠ rank), its loss on
    fixed draws before and after, and a render made while its LoRA layers were attached."""
    from workers.models.pipelines import PipelineCache

    torch.set_num_threads(1)
    model = request.param
    pipe = PipelineCache("cpu").get(model, "txt2img")
    before = render(pipe)
    lr, steps, _ = TRAINING[model]
    job = spec(
        model=model, lora_alpha=16, train_text_encoder=True, learning_rate=lr, max_train_steps=steps
    )
    with LoraTrainer(pipe, job, training_images(), ["sks disc"] * 4) as trainer:
        first = np.mean([trainer.validation_loss(seed) for seed in range(8)])
        trainer.run(never, lambda ckpt: None)
        last = np.mean([trainer.validation_loss(seed) for seed in range(8)])
        for name in trainer.modules:
            getattr(pipe, name).eval()
        with_lora = render(pipe)
        adapter = trainer.adapter_bytes()
    return {
        "model": model,
        "pipe": pipe,
        "before": before,
        "validation": (first, last),
        "losses": trainer.losses,
        "adapter": adapter,
        "with_lora": with_lora,
    }


def test_the_loss_goes_down(trained):
    losses, fall = trained["losses"], TRAINING[trained["model"]][2]
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < first * fall, (first, last)
    before, after = trained["validation"]  # on the same draws (latents, noise, timesteps)
    assert after < before, (before, after)


def test_adapter_loads_with_the_familys_load_lora_weights(trained, family_folders, tmp_path):
    model = trained["model"]
    (tmp_path / ADAPTER_FILE).write_bytes(trained["adapter"])
    layers = load_tensors(trained["adapter"])
    assert {k.split(".")[0] for k in layers} == {DENOISER[model], *TEXT_ENCODERS[model]}

    pipe = DiffusionPipeline.from_pretrained(family_folders[model], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    without = render(pipe)
    assert np.abs(without - trained["before"]).max() < 1e-5  # the same model
    pipe.load_lora_weights(tmp_path, weight_name=ADAPTER_FILE)
    with_adapter = render(pipe)
    assert np.abs(with_adapter - without).max() > 0.02
    # The file holds what was trained, alpha included: diffusers renders what the trainer did.
    assert np.abs(with_adapter - trained["with_lora"]).max() < 1e-4


def test_the_warm_pipeline_renders_as_before_after_a_finetune(trained):
    pipe = trained["pipe"]
    for name in (DENOISER[trained["model"]], *TEXT_ENCODERS[trained["model"]]):
        module = getattr(pipe, name)
        assert getattr(module, "peft_config", None) is None and not module.training
    assert np.array_equal(render(pipe), trained["before"])


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_a_resumed_run_ends_with_the_same_adapter(model, cache):
    pipe = cache.get(model, "txt2img")
    job = spec(model=model, max_train_steps=6, checkpointing_steps=3, train_text_encoder=True)
    images, captions = training_images(), ["sks disc", "a disc", "sks", "disc"]
    with LoraTrainer(pipe, job, images, captions) as trainer:
        trainer.run(never, lambda ckpt: None)
        unbroken, unbroken_losses = trainer.adapter_bytes(), trainer.losses
    saved = []
    with LoraTrainer(pipe, job, images, captions) as trainer:
        assert not trainer.run(lambda step, total, loss: step == 4, saved.append)
    with LoraTrainer(pipe, job, images, captions) as trainer:
        trainer.resume(saved[-1])
        assert trainer.resumed_from == 3 and trainer.run(never, lambda ckpt: None)
        resumed, resumed_losses = trainer.adapter_bytes(), trainer.losses
    assert resumed_losses == unbroken_losses
    a, b = load_tensors(unbroken), load_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_conditions_on_each_pictures_size_and_crop(cache):
    """`time_ids` are the SDXL script's `compute_time_ids`: (original height, width, crop top,
    left, target height, width), per picture; and the prompt runs through both text encoders,
    the second's projection as `text_embeds`."""
    pipe = cache.get("tiny-sdxl", "txt2img")
    wide, tall = Image.new("RGB", (96, 48), "red"), Image.new("RGB", (40, 80), "blue")
    examples = [prepare(wide, 32), prepare(tall, 32)]
    assert [(e.original_size, e.crop_top_left) for e in examples] == [
        ((48, 96), (0, 16)),
        ((80, 40), (16, 0)),
    ]
    recipe = Sdxl(pipe, spec(model="tiny-sdxl"), examples, ["a", "b"])
    assert recipe.time_ids([1, 0]).tolist() == [[80, 40, 16, 0, 32, 32], [48, 96, 0, 16, 32, 32]]
    context, added = recipe.condition([0, 1])
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        ["a", "b"], do_classifier_free_guidance=False, device="cpu"
    )
    assert torch.allclose(context, prompt_embeds, atol=1e-6)  # both encoders, as the pipeline
    assert torch.allclose(added["text_embeds"], pooled, atol=1e-6)


@pytest.mark.parametrize("model,recipe", [("tiny-flux", Flux), ("tiny-sd3", Sd3)])
def test_flow_recipes_encode_prompts_as_their_pipelines_do(cache, model, recipe):
    pipe = cache.get(model, "txt2img")
    job = spec(model=model)
    ours = recipe(pipe, job, [prepare(Image.new("RGB", (32, 32)), 32)] * 2, ["a fox", "sks"])
    text = ours.condition([0, 1])
    length = recipe.max_sequence_length
    theirs = pipe.encode_prompt(
        ["a fox", "sks"], None, *([None] if model == "tiny-sd3" else []),
        device="cpu", max_sequence_length=length,
        **({"do_classifier_free_guidance": False} if model == "tiny-sd3" else {}),
    )  # fmt: skip
    # (T5 with gradients on may take another attention kernel: last digits only)
    assert torch.allclose(text["encoder_hidden_states"], theirs[0], atol=1e-4)
    pooled = theirs[1] if model == "tiny-flux" else theirs[2]
    assert torch.allclose(text["pooled_projections"], pooled, atol=1e-4)


def test_a_model_that_cannot_train_is_refused_before_anything_attaches(cache):
    pipe = cache.get("tiny-sdxl-inpaint", "inpaint")
    with pytest.raises(InvalidJob, match="inpainting model") as err:
        recipe_for(pipe, spec(model="tiny-sdxl-inpaint"))
    assert err.value.field == "model"
    # A released FLUX.1 (VAE scale 8, 2×2 patches) trains at multiples of 16 only.
    flux = ModelInfo("flux", "FluxPipeline", 64, 1024, vae_scale=8)
    flux.check_finetune(512, "org/flux")
    with pytest.raises(InvalidJob, match="resolution: must be a multiple of 16") as err:
        flux.check_finetune(520, "org/flux")
    assert err.value.field == "resolution"
