"""Style jobs on SDXL: the farm's IP-Adapter render is diffusers' own `load_ip_adapter` on
`StableDiffusionXLImg2ImgPipeline` (every argument given, and left to SDXL's defaults), a mixed
batch is each job alone, and the shared UNet is plain again after."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image

from farm.jobs.specs import Img2Img, Style
from workers.builtin.sdxl_ip_adapter import export_sdxl_ip_adapter
from workers.builtin.tiny_ip_adapter import WEIGHT_NAME
from workers.render.ip_adapter import load_for
from workers.render.render import render, render_batch


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    return export_sdxl_ip_adapter(tmp_path_factory.mktemp("ip") / "tiny-sdxl-ip-adapter")


def style(**update) -> Style:
    fields = {
        "model": "tiny-sdxl",
        "prompt": "a cat",
        "image": "content.png",
        "ip_adapter_image": "style.png",
        "seed": 3,
        "num_inference_steps": 4,
        "strength": 0.8,
        "guidance_scale": 6.0,
        "ip_adapter_scale": 1.0,
        **update,
    }
    return Style(**{k: v for k, v in fields.items() if v is not None})


def run_style(cache, spec, photo, style_image):
    adapter = load_for(cache, spec)
    return render_batch(
        adapter.pipe,
        [spec],
        [photo],
        [None],
        ip_adapter=adapter,
        ip_adapter_image=style_image,
        info=cache.info(spec.model),
    )[0]


def diffusers_style(folder, adapter_folder, photo, style_image, spec, **given):
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        folder, local_files_only=True, use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapter_folder), subfolder="", weight_name=WEIGHT_NAME)
    pipe.set_ip_adapter_scale(spec.ip_adapter_scale)
    return pipe(
        prompt=spec.prompt,
        image=photo,
        ip_adapter_image=style_image,
        generator=[torch.Generator("cpu").manual_seed(spec.seed)],
        **given,
    ).images[0]


def test_sdxl_style_equals_diffusers_load_ip_adapter(
    cache, family_folders, adapter_folder, photo, style_image, max_diff
):
    spec = style(ip_adapter=str(adapter_folder))
    ours = run_style(cache, spec, photo, style_image)
    theirs = diffusers_style(
        family_folders["tiny-sdxl"], adapter_folder, photo, style_image, spec,
        strength=0.8, num_inference_steps=4, guidance_scale=6.0,
    )  # fmt: skip
    assert ours.images[0].size == photo.size
    assert max_diff(ours.images[0], theirs) <= 1
    # The built-in adapter is the exported one, and the adapter changes the picture.
    assert max_diff(run_style(cache, style(), photo, style_image).images[0], ours.images[0]) <= 1
    fields = {"model", "prompt", "image", "seed", "num_inference_steps", "strength"}
    plain = render(
        cache.get("tiny-sdxl", "img2img"), Img2Img(**spec.model_dump(include=fields)), photo
    )
    assert max_diff(plain.images[0], ours.images[0]) > 10


def test_sdxl_style_left_to_defaults_equals_the_pipeline_called_without_them(
    cache, family_folders, adapter_folder, photo, style_image, max_diff
):
    """SDXL img2img's own strength (0.3), guidance (5.0) and steps (50), not SD 1.5's."""
    spec = style(strength=None, guidance_scale=None, num_inference_steps=None)
    ours = run_style(cache, spec, photo, style_image)
    theirs = diffusers_style(family_folders["tiny-sdxl"], adapter_folder, photo, style_image, spec)
    assert max_diff(ours.images[0], theirs) <= 1


def test_a_mixed_sdxl_style_batch_is_each_job_alone_and_the_unet_is_plain_after(
    cache, photo, style_image, max_diff
):
    plain_spec = Img2Img(
        model="tiny-sdxl", prompt="a cat", image="c.png", seed=3, num_inference_steps=4
    )
    before = render(cache.get("tiny-sdxl", "img2img"), plain_spec, photo).images[0]
    other = Image.fromarray(255 - np.asarray(photo))
    specs = [style(prompt="a cat"), style(prompt="a red house", seed=9)]
    adapter = load_for(cache, specs[0])
    pair = render_batch(
        adapter.pipe, specs, [photo, other], [None, None], ip_adapter=adapter,
        ip_adapter_image=style_image, info=cache.info("tiny-sdxl"),
    )  # fmt: skip
    for spec, image, result in zip(specs, [photo, other], pair, strict=True):
        assert max_diff(result.images[0], run_style(cache, spec, image, style_image).images[0]) <= 1

    unet = cache.get("tiny-sdxl", "img2img").unet
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert not any("IPAdapter" in type(p).__name__ for p in unet.attn_processors.values())
    after = render(cache.get("tiny-sdxl", "img2img"), plain_spec, photo).images[0]
    assert max_diff(after, before) == 0
    assert cache.loads == 1
