"""Style jobs: the farm's IP-Adapter render is diffusers' own, and leaves the shared UNet as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from farm.errors import InvalidJob
from farm.jobs.specs import Img2Img, Style, Txt2Img
from workers.builtin.tiny_ip_adapter import WEIGHT_NAME, export_tiny_ip_adapter
from workers.render.ip_adapter import load_for, resolve_ip_adapter
from workers.render.render import render, render_batch


def put_in_hf_cache(hub, repo_id, folder):
    """Lay `folder` out as a cached snapshot of `repo_id` (refs/main → the commit)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    return export_tiny_ip_adapter(tmp_path_factory.mktemp("ip") / "tiny-ip-adapter")


def style(**update) -> Style:
    spec = Style(
        model="tiny",
        prompt="a cat",
        image="content.png",
        ip_adapter_image="style.png",
        seed=3,
        num_inference_steps=3,
        strength=0.8,
        ip_adapter_scale=1.0,
    )
    return spec.model_copy(update=update)


def run_style(cache, spec, photo, style_image):
    adapter = load_for(cache, spec)
    return render_batch(
        adapter.pipe, [spec], [photo], [None], ip_adapter=adapter, ip_adapter_image=style_image
    )[0]


def test_style_equals_diffusers_load_ip_adapter(
    cache, oracle, tiny_folders, adapter_folder, photo, style_image, max_diff
):
    spec = style(ip_adapter=str(adapter_folder))
    ours = run_style(cache, spec, photo, style_image).images[0]

    pipe = oracle(StableDiffusionImg2ImgPipeline, tiny_folders["tiny"])
    pipe.load_ip_adapter(str(adapter_folder), subfolder="", weight_name=WEIGHT_NAME)
    pipe.set_ip_adapter_scale(spec.ip_adapter_scale)
    theirs = pipe(
        prompt=spec.prompt,
        image=photo,
        ip_adapter_image=style_image,
        strength=spec.strength,
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(spec.seed)],
    ).images[0]
    assert max_diff(ours, theirs) <= 1
    # the built-in adapter is the exported one, and the adapter does change the picture
    builtin = run_style(cache, style(), photo, style_image).images[0]
    assert max_diff(builtin, ours) == 0
    plain = render(
        cache.get("tiny", "img2img"),
        Img2Img(
            **style().model_dump(
                include={"model", "prompt", "image", "seed", "num_inference_steps", "strength"}
            )
        ),
        photo,
    )
    assert max_diff(plain.images[0], ours) > 10


def test_scale_zero_is_plain_img2img_and_plain_renders_are_untouched(
    cache, photo, style_image, max_diff
):
    fields = {"model", "prompt", "image", "seed", "num_inference_steps", "strength"}
    plain_spec = Img2Img(**style().model_dump(include=fields))
    txt = Txt2Img(model="tiny", prompt="a dog", seed=1, num_inference_steps=2, height=32, width=32)
    before = render(cache.get("tiny", "img2img"), plain_spec, photo).images[0]
    txt_before = render(cache.get("tiny", "txt2img"), txt).images[0]

    zero = run_style(cache, style(ip_adapter_scale=0.0), photo, style_image).images[0]
    assert max_diff(zero, before) == 0
    run_style(cache, style(ip_adapter_scale=1.0), photo, style_image)

    unet = cache.get("tiny", "img2img").unet
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert not any("IPAdapter" in type(p).__name__ for p in unet.attn_processors.values())
    after = render(cache.get("tiny", "img2img"), plain_spec, photo).images[0]
    assert max_diff(after, before) == 0
    assert max_diff(render(cache.get("tiny", "txt2img"), txt).images[0], txt_before) == 0
    assert cache.loads == 1  # one model load; the adapter was loaded once beside it
    assert load_for(cache, style()) is load_for(cache, style(ip_adapter_scale=0.3))


def test_a_batch_sharing_a_style_image_is_each_job_alone(cache, photo, style_image, max_diff):
    other = Image.fromarray(255 - np.asarray(photo))
    specs = [style(prompt="a cat"), style(prompt="a red house", seed=9)]
    adapter = load_for(cache, specs[0])
    pair = render_batch(
        adapter.pipe,
        specs,
        [photo, other],
        [None, None],
        ip_adapter=adapter,
        ip_adapter_image=style_image,
    )
    for spec, image, result in zip(specs, [photo, other], pair, strict=True):
        alone = run_style(cache, spec, image, style_image)
        assert max_diff(result.images[0], alone.images[0]) <= 1


def test_adapter_refs_resolve_or_name_what_is_missing(adapter_folder, tmp_path, empty_hf_cache):
    assert resolve_ip_adapter("tiny-ip-adapter").weights is None
    put_in_hf_cache(empty_hf_cache, "org/adapter", adapter_folder)
    cached = resolve_ip_adapter("org/adapter")
    assert cached.weights is not None and cached.weights.endswith(f"/{WEIGHT_NAME}")
    assert Path(cached.image_encoder, "config.json").is_file()
    source = resolve_ip_adapter(str(adapter_folder))
    assert source.weights == str(adapter_folder / WEIGHT_NAME)
    assert resolve_ip_adapter(str(adapter_folder / WEIGHT_NAME)) == source
    broken = tmp_path / "broken"
    shutil.copytree(adapter_folder, broken)
    shutil.rmtree(broken / "image_encoder")
    with pytest.raises(InvalidJob, match="no image encoder") as err:
        resolve_ip_adapter(str(broken))
    assert err.value.field == "ip_adapter"
    shutil.copy(broken / WEIGHT_NAME, broken / "other.safetensors")
    with pytest.raises(InvalidJob, match="2 top-level .safetensors"):
        resolve_ip_adapter(str(broken))
    with pytest.raises(InvalidJob, match="not in the local Hugging Face cache"):
        resolve_ip_adapter("nobody/adapter")
