"""Precision and memory per worker (`workers.models.precision`): FARM_DTYPE per family and
device, FARM_OFFLOAD, FARM_VAE_TILING; and channels_last / torch.compile on every family's
denoiser and VAE (`workers.models.optimize`), never a crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from farm.errors import InvalidJob
from farm.jobs.specs import Img2Img, Inpaint, Txt2Img
from farm.settings import FarmSettings
from tests.support.cli import run_cli
from workers.models.optimize import from_settings
from workers.models.pipelines import PipelineCache
from workers.models.precision import check_offload, choose_dtype
from workers.render.render import render

FAMILY_TXT2IMG = ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"]


def small(model: str, **fields) -> Txt2Img:
    return Txt2Img(
        model=model, prompt="a fox", seed=3, num_inference_steps=2, height=32, width=32, **fields
    )


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=int)


def test_auto_is_bf16_for_flow_models_and_fp16_for_stable_diffusion_on_cuda_fp32_on_cpu():
    assert choose_dtype("auto", "cuda:0", "sd3") == choose_dtype("auto", "cuda", "flux")
    assert choose_dtype("auto", "cuda:0", "flux") == torch.bfloat16
    assert choose_dtype("auto", "cuda:1", "sdxl") == choose_dtype("auto", "cuda", "sd")
    assert choose_dtype("auto", "cuda:1", "sd") == torch.float16
    assert {choose_dtype("auto", "cpu", f) for f in ("sd", "sdxl", "sd3", "flux")} == {
        torch.float32
    }
    assert choose_dtype("bf16", "cpu", "sd") == torch.bfloat16  # asked for: given
    assert choose_dtype("fp16", "cuda", "flux") == torch.float16


def test_a_cache_loads_each_model_in_the_dtype_its_setting_gives(cache):
    auto = PipelineCache(dtype="auto")
    assert auto.get("tiny-flux", "txt2img").transformer.dtype == torch.float32  # on a CPU
    bf16 = PipelineCache(dtype="bf16")
    pipe = bf16.get("tiny-flux", "txt2img")
    assert pipe.transformer.dtype == pipe.vae.dtype == torch.bfloat16
    image = render(pipe, small("tiny-flux")).images[0]
    assert image.size == (32, 32)


def test_model_offload_keeps_the_pixels_on_every_kind():
    plain, offloaded = PipelineCache(), PipelineCache(offload="model")
    spec = small("tiny-sdxl")
    i2i = Img2Img(model="tiny-sdxl", prompt="a fox", image="x", seed=3, num_inference_steps=4)
    source = render(plain.get("tiny-sdxl", "txt2img"), spec).images[0]

    assert np.array_equal(
        pixels(render(offloaded.get("tiny-sdxl", "txt2img"), spec)),
        pixels(render(plain.get("tiny-sdxl", "txt2img"), spec)),
    )
    assert np.array_equal(  # a pipeline derived from an offloaded one is offloaded too
        pixels(render(offloaded.get("tiny-sdxl", "img2img"), i2i, source)),
        pixels(render(plain.get("tiny-sdxl", "img2img"), i2i, source)),
    )
    assert offloaded.get("tiny-sdxl", "txt2img")._all_hooks  # accelerate's hooks are on


def test_vae_tiling_is_diffusers_own_and_changes_nothing_below_the_tile_size():
    tiled = PipelineCache(vae_tiling=True).get("tiny-flux", "txt2img")
    assert tiled.vae.use_tiling
    plain = PipelineCache().get("tiny-flux", "txt2img")
    assert np.array_equal(
        pixels(render(tiled, small("tiny-flux"))), pixels(render(plain, small("tiny-flux")))
    )


def test_sequential_offload_needs_a_gpu_and_a_cpu_worker_refuses_it_at_start(redis_url, tmp_path):
    with pytest.raises(InvalidJob, match="FARM_OFFLOAD=sequential needs a CUDA device"):
        check_offload("sequential", "cpu")
    check_offload("model", "cpu")
    check_offload("sequential", "cuda:0")

    settings = FarmSettings(redis_url=redis_url, storage=(tmp_path / "s").as_uri(), home=tmp_path)
    res = run_cli(settings, "worker", "--device", "cpu", FARM_OFFLOAD="sequential", timeout=120)
    assert res.returncode == 2, res.stderr
    # the farm's word is one line, and nothing else is said (not transformers' torchvision note)
    assert res.stderr.splitlines() == [
        "farm: error: FARM_OFFLOAD=sequential needs a CUDA device (accelerate's hooks)"
    ]


@pytest.mark.parametrize("model", FAMILY_TXT2IMG + ["tiny-flux-fill"])
def test_channels_last_applies_to_every_family_and_keeps_the_pixels(model, photo, mask):
    kind = "inpaint" if model == "tiny-flux-fill" else "txt2img"
    spec = (
        small(model)
        if kind == "txt2img"
        else Inpaint(
            model=model, prompt="a fox", image="x", mask_image="m", seed=3, num_inference_steps=2
        )
    )
    plain = pixels(render(PipelineCache().get(model, kind), spec, photo, mask))
    cache = PipelineCache()
    cache.prepare = from_settings(FarmSettings(channels_last=True))
    pipe = cache.get(model, kind)

    conv = pipe.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert np.abs(pixels(render(pipe, spec, photo, mask)) - plain).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux"])
def test_compile_applies_to_the_transformer_and_vae_and_keeps_the_pixels(model):
    """torch.compile on CPU (inductor) takes about a minute here: one family, the one that
    crashed before (no UNet)."""
    plain = pixels(render(PipelineCache().get(model, "txt2img"), small(model)))
    cache = PipelineCache()
    cache.prepare = from_settings(FarmSettings(compile=True))
    pipe = cache.get(model, "txt2img")

    got = pixels(render(pipe, small(model)))
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"  # compiled in place
    assert pipe.transformer._compiled_call_impl is not None
    assert np.abs(got - plain).max() <= 1
