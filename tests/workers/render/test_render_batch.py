"""render_batch(): one pipeline call for compatible jobs, each image's pixels as when it runs alone."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from farm.jobs.specs import Img2Img, Inpaint, Txt2Img
from workers.render.render import render, render_batch


def picture(seed: int, size=(100, 75)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def box(x0: int, y0: int, x1: int, y1: int, size=(100, 75)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((x0, y0, x1, y1), fill=255)
    return mask


def assert_each_as_alone(pipe, specs, images, masks, max_diff):
    batch = render_batch(pipe, specs, images, masks)
    assert len(batch) == len(specs)
    for spec, image, mask, got in zip(specs, images, masks, batch, strict=True):
        alone = render(pipe, spec, image, mask)
        assert len(got.images) == len(alone.images) == spec.num_images_per_prompt
        for a, b in zip(got.images, alone.images, strict=True):
            assert a.size == b.size
            assert max_diff(a, b) <= 1
        if mask is not None:
            assert np.array_equal(np.asarray(got.mask_used), np.asarray(alone.mask_used))
    first, second = batch[0].images[0], batch[1].images[0]
    assert max_diff(first, second) > 10  # the jobs did differ


def test_txt2img_batch_equals_each_job_alone(cache, max_diff):
    specs = [
        Txt2Img(model="tiny", prompt="a red fox", seed=1, num_inference_steps=3),
        Txt2Img(
            model="tiny",
            prompt="a lighthouse",
            negative_prompt="fog",
            seed=8,
            num_inference_steps=3,
        ),
        Txt2Img(model="tiny", prompt="a boat", seed=1, num_inference_steps=3),
    ]
    assert_each_as_alone(cache.get("tiny", "txt2img"), specs, [None] * 3, [None] * 3, max_diff)


def test_two_images_per_job_batch_equals_each_job_alone(cache, max_diff):
    specs = [
        Txt2Img(model="tiny", prompt=p, seed=s, num_inference_steps=2, num_images_per_prompt=2)
        for p, s in [("a fox", 4), ("a hen", 9)]
    ]
    assert_each_as_alone(cache.get("tiny", "txt2img"), specs, [None] * 2, [None] * 2, max_diff)


@pytest.mark.parametrize("model", ["tiny-inpaint", "tiny"])
def test_inpaint_batch_equals_each_job_alone(cache, max_diff, model):
    # Different prompts, seeds, sources, masks, and one input of another size with the same
    # working size (96x72); the source kept outside each mask.
    common = dict(model=model, image="i.png", mask_image="m.png", num_inference_steps=3)
    specs = [
        Inpaint(prompt="a cat", seed=1, preserve_unmasked=True, **common),
        Inpaint(prompt="a dog", negative_prompt="blur", seed=5, preserve_unmasked=True, **common),
        Inpaint(prompt="a bird on a branch", seed=1, preserve_unmasked=True, **common),
    ]
    images = [picture(1), picture(2), picture(3, size=(97, 79))]
    masks = [box(10, 10, 50, 40), box(40, 20, 90, 70), box(0, 0, 30, 79, size=(97, 79))]
    assert_each_as_alone(cache.get(model, "inpaint"), specs, images, masks, max_diff)


def test_img2img_batch_equals_each_job_alone(cache, max_diff):
    common = dict(model="tiny", image="i.png", num_inference_steps=4, strength=0.7)
    specs = [Img2Img(prompt="oil", seed=3, **common), Img2Img(prompt="ink", seed=4, **common)]
    images = [picture(5), picture(6)]
    assert_each_as_alone(cache.get("tiny", "img2img"), specs, images, [None] * 2, max_diff)


def test_one_cancel_callback_for_the_whole_batch(cache):
    specs = [Txt2Img(model="tiny", prompt=p, seed=1, num_inference_steps=4) for p in "ab"]
    calls = []

    results = render_batch(
        cache.get("tiny", "txt2img"), specs, on_step=lambda s, t: calls.append(s) or s == 2
    )

    assert calls == [1, 2] and all(r.interrupted and r.steps == 2 for r in results)


def test_incompatible_jobs_are_refused(cache):
    specs = [
        Txt2Img(model="tiny", prompt="a", num_inference_steps=2),
        Txt2Img(model="tiny", prompt="b", num_inference_steps=3),
    ]
    with pytest.raises(ValueError, match="one batch signature"):
        render_batch(cache.get("tiny", "txt2img"), specs)
