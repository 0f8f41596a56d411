"""Every family, every kind it runs: the farm's pixels are those of the diffusers pipeline called
directly with the same arguments and seed, once with every argument given (family arguments and
a scheduler of the family's own included) and once with everything left to the pipeline's
defaults. The oracle is written as a diffusers user writes it: the exported folder loaded with
its own class, the kind's pipeline by name, the scheduler configured by hand."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image, ImageDraw

from farm.jobs.specs import parse_spec
from workers.render.render import render

PIPELINES = {
    "tiny": {
        "txt2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    },
    "tiny-inpaint": {"inpaint": StableDiffusionInpaintPipeline},
    "tiny-sdxl": {
        "txt2img": StableDiffusionXLPipeline,
        "img2img": StableDiffusionXLImg2ImgPipeline,
        "inpaint": StableDiffusionXLInpaintPipeline,
    },
    "tiny-sdxl-inpaint": {"inpaint": StableDiffusionXLInpaintPipeline},
    "tiny-sd3": {
        "txt2img": StableDiffusion3Pipeline,
        "img2img": StableDiffusion3Img2ImgPipeline,
        "inpaint": StableDiffusion3InpaintPipeline,
    },
    "tiny-flux": {
        "txt2img": FluxPipeline,
        "img2img": FluxImg2ImgPipeline,
        "inpaint": FluxInpaintPipeline,
    },
    "tiny-flux-fill": {"inpaint": FluxFillPipeline},
}
"""What a diffusers user picks for each model and kind (the model's own class first)."""

SDXL = {
    "negative_prompt": "blurry",
    "prompt_2": "an oil painting",
    "negative_prompt_2": "dark",
    "original_size": (96, 96),
    "target_size": (64, 64),
    "crops_coords_top_left": (4, 8),
    "scheduler": "euler_a",
}
SD3 = {
    "negative_prompt": "blurry",
    "prompt_2": "an oil painting",
    "negative_prompt_2": "dark",
    "prompt_3": "a photograph",
    "negative_prompt_3": "grain",
    "max_sequence_length": 16,
    "scheduler": "heun",
}
FLUX = {"prompt_2": "an oil painting", "negative_prompt": "blurry", "true_cfg_scale": 2.0}
FLUX |= {"max_sequence_length": 16}
EXPLICIT = {
    "tiny": {"negative_prompt": "blurry", "scheduler": "euler_a"},
    "tiny-inpaint": {"negative_prompt": "blurry", "scheduler": "euler_a"},
    "tiny-sdxl": SDXL,
    "tiny-sdxl-inpaint": SDXL,
    "tiny-sd3": SD3,
    "tiny-flux": FLUX,
    "tiny-flux-fill": {"prompt_2": "an oil painting", "max_sequence_length": 16},
}
"""Every argument each family takes, set to something other than its default."""

SCHEDULERS = {
    "euler_a": lambda config: EulerAncestralDiscreteScheduler.from_config(config),
    "heun": lambda config: FlowMatchHeunDiscreteScheduler.from_config(config),
    "dpmpp_2m-flow": lambda config: DPMSolverMultistepScheduler.from_config(
        config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config["shift"]
    ),
}
CASES = [(model, kind) for model, kinds in PIPELINES.items() for kind in kinds]
IDS = [f"{m}-{k}" for m, k in CASES]
STEPS = 3


@pytest.fixture(scope="module")
def source() -> tuple[Image.Image, Image.Image]:
    """A 64×48 picture (rendered at 48×64, height × width) and a mask to repaint."""
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, mode="RGB")
    ImageDraw.Draw(image).ellipse((12, 8, 44, 40), fill=(250, 200, 40))
    mask = Image.new("L", (64, 48), 0)
    ImageDraw.Draw(mask).rectangle((16, 10, 47, 37), fill=255)
    return image, mask


def spec_for(model: str, kind: str, **fields):
    data = {"kind": kind, "model": model, "prompt": "a red fox in the snow", "seed": 11, **fields}
    if kind != "txt2img":
        data["image"] = "in.png"
    if kind == "inpaint":
        data["mask_image"] = "m.png"
    return parse_spec(data)


def explicit(model: str, kind: str) -> dict:
    fields = dict(EXPLICIT[model]) | {"num_inference_steps": STEPS, "guidance_scale": 4.0}
    if kind != "txt2img":
        fields["strength"] = 0.7
    if kind == "txt2img":
        fields |= {"height": 48, "width": 64}
    if model == "tiny-flux" and kind == "txt2img":
        fields["scheduler"] = "dpmpp_2m"  # FLUX.1's img2img and inpaint run Euler only
    if model.startswith("tiny-sdxl") and kind != "txt2img":
        fields |= {"aesthetic_score": 5.0, "negative_aesthetic_score": 2.0}
    return fields


def direct(oracle, folder, model, kind, fields, image, mask, size):
    """The call a diffusers user writes for these fields."""
    cls = PIPELINES[model][kind]
    loaded = oracle(next(iter(PIPELINES[model].values())), folder)  # the model's own class
    pipe = loaded if type(loaded) is cls else cls.from_pipe(loaded)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in fields.items() if k != "scheduler"}
    name = fields.get("scheduler")
    if name is not None:
        key = "dpmpp_2m-flow" if name == "dpmpp_2m" else name
        pipe.scheduler = SCHEDULERS[key](pipe.scheduler.config)
    if kind != "txt2img":
        kwargs["image"] = image
        if "height" in _params(cls):  # the farm renders at the input's size
            kwargs |= {"height": size[1], "width": size[0]}
    if kind == "inpaint":
        kwargs["mask_image"] = mask
    return pipe(
        prompt="a red fox in the snow",
        generator=[torch.Generator("cpu").manual_seed(11)],
        **kwargs,
    ).images[0]


def _params(cls) -> set[str]:
    return set(inspect.signature(cls.__call__).parameters)


def folders_of(tiny_folders, family_folders) -> dict:
    return {**tiny_folders, **family_folders}


@pytest.mark.parametrize(("model", "kind"), CASES, ids=IDS)
def test_every_argument_given_equals_diffusers(
    model, kind, cache, oracle, tiny_folders, family_folders, source, max_diff
):
    image, mask = source
    fields = explicit(model, kind)
    spec = spec_for(model, kind, **fields)

    farm = render(cache.get(model, kind), spec, image, mask)
    folder = folders_of(tiny_folders, family_folders)[model]
    expected = direct(oracle, folder, model, kind, fields, image, mask, (64, 48))

    assert farm.images[0].size == expected.size == (64, 48)
    assert max_diff(farm.images[0], expected) <= 1
    assert farm.spec.guidance_scale == 4.0 and farm.spec.num_inference_steps == STEPS


@pytest.mark.parametrize(("model", "kind"), CASES, ids=IDS)
def test_arguments_left_out_take_the_pipelines_defaults(
    model, kind, cache, oracle, tiny_folders, family_folders, source, max_diff
):
    image, mask = source
    spec = spec_for(model, kind)

    farm = render(cache.get(model, kind), spec, image, mask)
    folder = folders_of(tiny_folders, family_folders)[model]
    expected = direct(oracle, folder, model, kind, {}, image, mask, (64, 48))

    assert farm.images[0].size == expected.size
    assert max_diff(farm.images[0], expected) <= 1
    # The values used are written into the spec the record and meta.json keep.
    params = inspect.signature(PIPELINES[model][kind].__call__).parameters
    assert farm.spec.num_inference_steps == params["num_inference_steps"].default
    assert farm.spec.guidance_scale == params["guidance_scale"].default
    if kind != "txt2img":
        assert farm.spec.strength == params["strength"].default
    else:
        assert (farm.spec.width, farm.spec.height) == expected.size
