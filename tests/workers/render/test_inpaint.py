"""Label-preserving inpainting: the source kept outside the mask, any input size back at its size,
`padding_mask_crop` and `mask_blur` exactly as diffusers does them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image, ImageDraw, ImageFilter

from farm.errors import InvalidJob
from farm.jobs.specs import Img2Img, Inpaint, parse_spec
from workers.render.render import render

ODD = (100, 75)  # (width, height): not a multiple of 8 either way; renders at 96x72


@pytest.fixture
def odd_photo() -> Image.Image:
    y, x = np.mgrid[0 : ODD[1], 0 : ODD[0]]
    rgb = np.stack([x * 2, y * 3, (x + y) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, mode="RGB")
    ImageDraw.Draw(image).ellipse((20, 10, 70, 60), fill=(250, 200, 40))
    return image


@pytest.fixture
def odd_mask() -> Image.Image:
    mask = Image.new("L", ODD, 0)
    ImageDraw.Draw(mask).rectangle((30, 20, 61, 47), fill=255)
    return mask


def inpaint(**update) -> Inpaint:
    spec = Inpaint(
        model="tiny-inpaint",
        prompt="a cat",
        image="in.png",
        mask_image="m.png",
        seed=3,
        num_inference_steps=3,
    )
    return spec.model_copy(update=update)


def test_preserve_unmasked_keeps_every_pixel_outside_the_mask(cache, odd_photo, odd_mask):
    spec = inpaint(preserve_unmasked=True, mask_dilate=2, mask_blur=3, num_images_per_prompt=2)

    result = render(cache.get(spec.model, spec.kind), spec, odd_photo, odd_mask)

    shaped = odd_mask.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.GaussianBlur(3))
    outside = np.asarray(shaped) == 0
    assert 0.3 < outside.mean() < 0.9  # the dilated, blurred mask still leaves a border to keep
    source = np.asarray(odd_photo)
    for image in result.images:
        assert image.size == ODD
        assert np.array_equal(np.asarray(image)[outside], source[outside])
        assert not np.array_equal(np.asarray(image)[~outside], source[~outside])
    assert (result.width, result.height) == (96, 72) and result.mask_used.size == (96, 72)


def test_without_preserve_unmasked_the_pixels_are_diffusers_own(
    cache, oracle, tiny_folders, odd_photo, odd_mask, max_diff
):
    spec = inpaint()

    farm = render(cache.get(spec.model, spec.kind), spec, odd_photo, odd_mask)

    pipe = oracle(StableDiffusionInpaintPipeline, tiny_folders["tiny-inpaint"])
    direct = pipe(
        prompt="a cat",
        image=odd_photo,
        mask_image=odd_mask,
        height=72,
        width=96,
        num_inference_steps=3,
        generator=[torch.Generator("cpu").manual_seed(3)],
    ).images[0]
    assert farm.images[0].size == ODD  # back at the input's size...
    assert max_diff(farm.images[0], direct.resize(ODD, Image.Resampling.LANCZOS)) <= 1
    outside = np.asarray(odd_mask) == 0  # ...and, without preserve_unmasked, repainted outside too
    assert not np.array_equal(np.asarray(farm.images[0])[outside], np.asarray(odd_photo)[outside])


def test_padding_mask_crop_equals_diffusers(
    cache, oracle, tiny_folders, odd_photo, odd_mask, max_diff
):
    spec = inpaint(padding_mask_crop=6)

    farm = render(cache.get(spec.model, spec.kind), spec, odd_photo, odd_mask)

    pipe = oracle(StableDiffusionInpaintPipeline, tiny_folders["tiny-inpaint"])
    direct = pipe(
        prompt="a cat",
        image=odd_photo,
        mask_image=odd_mask,
        height=72,
        width=96,
        padding_mask_crop=6,
        num_inference_steps=3,
        generator=[torch.Generator("cpu").manual_seed(3)],
    ).images[0]
    assert farm.images[0].size == direct.size == ODD
    assert max_diff(farm.images[0], direct) <= 1
    outside = np.asarray(odd_mask) == 0  # diffusers pastes the crop back over the source
    assert np.array_equal(np.asarray(farm.images[0])[outside], np.asarray(odd_photo)[outside])


def test_mask_blur_equals_diffusers_with_the_mask_blurred_alike(
    cache, oracle, tiny_folders, photo, mask, max_diff
):
    spec = inpaint(mask_blur=6, model="tiny", strength=0.9)

    farm = render(cache.get(spec.model, spec.kind), spec, photo, mask)
    plain = render(
        cache.get(spec.model, spec.kind), spec.model_copy(update={"mask_blur": 0}), photo, mask
    )

    pipe = oracle(StableDiffusionInpaintPipeline, tiny_folders["tiny"])
    blurred = pipe.mask_processor.blur(mask, blur_factor=6)
    direct = pipe(
        prompt="a cat",
        image=photo,
        mask_image=blurred,
        strength=0.9,
        num_inference_steps=3,
        generator=[torch.Generator("cpu").manual_seed(3)],
    ).images[0]
    assert max_diff(farm.images[0], direct) <= 1
    assert max_diff(farm.images[0], plain.images[0]) > 10  # the blur did change the result
    expected = pipe.mask_processor.preprocess(blurred, height=64, width=64)[0, 0]
    assert np.array_equal(np.asarray(farm.mask_used) / 255, expected.numpy())


def test_mask_dilate_grows_the_mask_the_model_uses(cache, photo, mask):
    spec = inpaint(mask_dilate=4)

    result = render(cache.get(spec.model, spec.kind), spec, photo, mask)

    used = np.asarray(result.mask_used) > 0
    original = np.asarray(mask) > 0
    assert used[original].all() and used.sum() == (32 + 8) * (32 + 8)  # 32x32 square, +4 each side


def test_img2img_of_any_size_comes_back_at_its_size(
    cache, oracle, tiny_folders, odd_photo, max_diff
):
    spec = Img2Img(model="tiny", prompt="a fox", image="in.png", num_inference_steps=4, seed=2)

    farm = render(cache.get("tiny", "img2img"), spec, odd_photo)

    pipe = oracle(StableDiffusionImg2ImgPipeline, tiny_folders["tiny"])
    direct = pipe(
        prompt="a fox",
        image=odd_photo.resize((96, 72), Image.Resampling.LANCZOS),
        num_inference_steps=4,
        generator=[torch.Generator("cpu").manual_seed(2)],
    ).images[0]
    assert farm.images[0].size == ODD and (farm.width, farm.height) == (96, 72)
    assert max_diff(farm.images[0], direct.resize(ODD, Image.Resampling.LANCZOS)) <= 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("mask_blur", 65), ("mask_blur", -1), ("mask_dilate", 100), ("padding_mask_crop", -4)],
)
def test_mask_options_out_of_range_are_named(field, value):
    data = inpaint().model_dump() | {field: value}
    with pytest.raises(InvalidJob) as err:
        parse_spec(data)
    assert err.value.field == field and str(value) in str(err.value)
