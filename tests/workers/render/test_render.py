"""render(): the farm's pixels are diffusers' own pixels, seeded per image, cancellable."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from farm.errors import InvalidJob
from farm.jobs.specs import SCHEDULERS, Img2Img, Inpaint, Txt2Img
from workers.render.render import render

# The central oracle: each case is rendered by the farm (a warm pipeline from the cache) and by
# diffusers itself (the exported folder loaded with its own pipeline class, called by hand).
CASES = {
    "txt2img": (
        StableDiffusionPipeline,
        Txt2Img(model="tiny", prompt="a red fox", seed=7, num_inference_steps=3),
    ),
    "txt2img-euler_a-2-images": (
        StableDiffusionPipeline,
        Txt2Img(
            model="tiny",
            prompt="a red fox in the snow",
            negative_prompt="blurry",
            seed=11,
            num_inference_steps=3,
            num_images_per_prompt=2,
            scheduler="euler_a",
        ),
    ),
    "txt2img-48x64-dpmpp_2m": (
        StableDiffusionPipeline,
        Txt2Img(
            model="tiny",
            prompt="a lighthouse",
            seed=3,
            num_inference_steps=4,
            scheduler="dpmpp_2m",
            height=48,
            width=64,
            guidance_scale=5.0,
        ),
    ),
    "img2img-dpmpp_2m-2-images": (
        StableDiffusionImg2ImgPipeline,
        Img2Img(
            model="tiny",
            prompt="an oil painting",
            image="in.png",
            strength=0.75,
            seed=5,
            num_inference_steps=4,
            num_images_per_prompt=2,
            scheduler="dpmpp_2m",
        ),
    ),
    "inpaint-9-channel": (
        StableDiffusionInpaintPipeline,
        Inpaint(
            model="tiny-inpaint",
            prompt="a cat",
            image="in.png",
            mask_image="m.png",
            seed=1,
            num_inference_steps=3,
        ),
    ),
    "inpaint-9-channel-euler_a-2-images": (
        StableDiffusionInpaintPipeline,
        Inpaint(
            model="tiny-inpaint",
            prompt="a cat",
            image="in.png",
            mask_image="m.png",
            seed=2,
            num_inference_steps=3,
            num_images_per_prompt=2,
            scheduler="euler_a",
        ),
    ),
    "inpaint-4-channel-2-images": (
        StableDiffusionInpaintPipeline,
        Inpaint(
            model="tiny",
            prompt="a dog",
            image="in.png",
            mask_image="m.png",
            strength=0.8,
            seed=9,
            num_inference_steps=4,
            num_images_per_prompt=2,
        ),
    ),
}


def diffusers_call(pipe, spec, image, mask):
    """What a diffusers user writes by hand for this spec."""
    if spec.scheduler is not None:
        class_name, extra = SCHEDULERS[spec.scheduler]
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)
    kwargs = {}
    if spec.kind != "img2img":
        kwargs.update(height=spec.height, width=spec.width)
    if spec.kind != "txt2img":
        kwargs.update(image=image, strength=spec.strength)
    if spec.kind == "inpaint":
        kwargs.update(mask_image=mask)
    return pipe(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        num_images_per_prompt=spec.num_images_per_prompt,
        generator=[
            torch.Generator("cpu").manual_seed(spec.seed + i)
            for i in range(spec.num_images_per_prompt)
        ],
        output_type="pil",
        **kwargs,
    ).images


@pytest.mark.parametrize("case", CASES)
def test_farm_pixels_equal_diffusers_pixels(
    case, cache, oracle, tiny_folders, photo, mask, max_diff
):
    pipeline_class, spec = CASES[case]

    farm = render(cache.get(spec.model, spec.kind), spec, photo, mask)
    expected = diffusers_call(oracle(pipeline_class, tiny_folders[spec.model]), spec, photo, mask)

    assert len(farm.images) == len(expected) == spec.num_images_per_prompt
    for ours, theirs in zip(farm.images, expected, strict=True):
        assert ours.size == (spec.width or 64, spec.height or 64)
        assert max_diff(ours, theirs) <= 1
    if spec.num_images_per_prompt > 1:  # the images are not trivially alike
        assert max_diff(farm.images[0], farm.images[1]) > 10
    assert (farm.width, farm.height) == farm.images[0].size
    assert not farm.interrupted


def test_an_image_does_not_depend_on_the_rest_of_its_batch(cache, max_diff):
    pipe = cache.get("tiny", "txt2img")
    spec = Txt2Img(model="tiny", prompt="a fox", num_inference_steps=2, seed=5)

    pair = render(pipe, spec.model_copy(update={"num_images_per_prompt": 2}))
    alone = render(pipe, spec.model_copy(update={"seed": 6}))

    assert max_diff(pair.images[1], alone.images[0]) <= 1


def test_no_seed_means_seed_zero(cache, max_diff):
    pipe = cache.get("tiny", "txt2img")
    spec = Txt2Img(model="tiny", prompt="a fox", num_inference_steps=2)

    assert (
        max_diff(
            render(pipe, spec).images[0],
            render(pipe, spec.model_copy(update={"seed": 0})).images[0],
        )
        == 0
    )


def test_a_jobs_scheduler_does_not_leak_into_the_next_job(cache, max_diff):
    spec = Txt2Img(model="tiny", prompt="a fox", num_inference_steps=3, seed=4)
    before = render(cache.get("tiny", "txt2img"), spec).images[0]

    euler = render(cache.get("tiny", "txt2img"), spec.model_copy(update={"scheduler": "euler_a"}))
    render(cache.get("tiny", "img2img"), _img2img(scheduler="dpmpp_2m"), euler.images[0])
    after = render(cache.get("tiny", "txt2img"), spec).images[0]

    assert max_diff(euler.images[0], before) > 10  # the other scheduler did make a difference
    assert max_diff(after, before) == 0
    assert type(cache.get("tiny", "txt2img").scheduler).__name__ == "DDIMScheduler"


def test_on_step_returning_true_interrupts_the_pipeline(cache):
    calls = []

    def on_step(step: int, total: int) -> bool:
        calls.append((step, total))
        return step == 2

    pipe = cache.get("tiny", "txt2img")
    spec = Txt2Img(model="tiny", prompt="a fox", num_inference_steps=4, seed=1)
    result = render(pipe, spec, on_step=on_step)

    assert result.interrupted and result.steps == 2
    assert calls == [(1, 4), (2, 4)]
    again = render(pipe, spec)  # the next job on the same pipeline runs in full
    assert not again.interrupted and again.steps == 4


def test_total_is_the_number_of_steps_actually_run(cache, photo):
    calls = []
    spec = _img2img(num_inference_steps=4, strength=0.5)

    result = render(
        cache.get("tiny", "img2img"), spec, photo, on_step=lambda s, t: calls.append((s, t))
    )

    assert calls == [(1, 2), (2, 2)] and result.steps == 2 and not result.interrupted


def test_mask_used_is_the_mask_the_model_saw(cache, photo):
    small = photo.resize((32, 32)).convert("L")  # grey levels, half the size of the render
    spec = Inpaint(
        model="tiny-inpaint",
        prompt="a cat",
        image="in.png",
        mask_image="m.png",
        num_inference_steps=2,
        height=64,
        width=64,
    )
    pipe = cache.get("tiny-inpaint", "inpaint")

    result = render(pipe, spec, photo, small)

    expected = pipe.mask_processor.preprocess(small, height=64, width=64)[0, 0]
    assert result.mask_used.mode == "L" and result.mask_used.size == (64, 64)
    used = torch.from_numpy(np.asarray(result.mask_used, dtype=np.float32) / 255)
    assert torch.equal(used, expected)
    assert set(result.mask_used.getdata()) == {0, 255}  # binarised, as diffusers does


def test_img2img_size_follows_the_spec(cache, photo):
    spec = _img2img(height=48, width=32)

    result = render(cache.get("tiny", "img2img"), spec, photo)

    assert (result.width, result.height) == (32, 48) and result.images[0].size == (32, 48)


def test_missing_inputs_are_invalid_jobs(cache, photo):
    with pytest.raises(InvalidJob, match="needs an image") as e:
        render(cache.get("tiny", "img2img"), _img2img())
    assert e.value.field == "image"
    spec = Inpaint(model="tiny-inpaint", prompt="", image="a.png", mask_image="m.png")
    with pytest.raises(InvalidJob, match="mask_image"):
        render(cache.get("tiny-inpaint", "inpaint"), spec, photo)


def _img2img(**update) -> Img2Img:
    spec = Img2Img(model="tiny", prompt="a fox", image="in.png", num_inference_steps=2, seed=3)
    return spec.model_copy(update=update)
