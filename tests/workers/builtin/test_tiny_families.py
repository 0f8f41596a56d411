"""The SDXL, SD3 and FLUX.1 built-ins: offline, the same bytes in every process, loadable by
diffusers' own pipeline classes, renderable through its AutoPipelines, with tiny adapters."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    FluxFillPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from PIL import Image

from farm.jobs.refs import BUILTIN_SIZES
from workers.builtin.components import t5_tokenizer
from workers.builtin.defaults import family_defaults
from workers.builtin.families import (
    FAMILY_KINDS,
    FAMILY_MODELS,
    build_components,
    build_family_tiny,
    export_family_tiny,
)
from workers.builtin.lora import save_family_lora
from workers.builtin.sdxl_ip_adapter import (
    WEIGHT_NAME,
    build_sdxl_ip_adapter,
    export_sdxl_ip_adapter,
)

ROOT = Path(__file__).resolve().parents[3]
STEPS = 2
AUTO = {
    "txt2img": AutoPipelineForText2Image,
    "img2img": AutoPipelineForImage2Image,
    "inpaint": AutoPipelineForInpainting,
}

SUBPROCESS = """
import runpy, sys

digest = runpy.run_path(sys.argv[1])["digest_of"]  # this very module's
from workers.builtin.families import build_family_tiny

for name in sys.argv[2:]:
    print(name, digest(build_family_tiny(name).components))
"""


def digest_of(components: dict) -> str:
    """Weights (parameters and buffers), vocabularies and scheduler settings, hashed."""
    h = hashlib.sha256()
    for name, part in sorted(components.items()):
        h.update(name.encode())
        if isinstance(part, torch.nn.Module):
            for key, tensor in sorted(part.state_dict().items()):
                h.update(key.encode())
                h.update(tensor.contiguous().numpy().tobytes())
        elif hasattr(part, "get_vocab"):
            h.update(repr(sorted(part.get_vocab().items())).encode())
        elif hasattr(part, "config"):
            settings = {k: v for k, v in part.config.items() if not k.startswith("_")}
            h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-families")
    return {name: export_family_tiny(name, root / name) for name in FAMILY_MODELS}


def inputs(kind: str, width: int, height: int, seed: int = 0) -> dict:
    """A 2-step call of `kind` at width×height: a gradient with a square to repaint."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    kwargs = {
        "prompt": "a red fox in the snow",
        "num_inference_steps": STEPS,
        "generator": torch.Generator("cpu").manual_seed(seed),
    }
    if kind != "txt2img":
        kwargs["image"] = Image.fromarray(rgb, mode="RGB")
        kwargs["strength"] = 0.9 if kind == "img2img" else 1.0
    if kind == "inpaint":
        kwargs["mask_image"] = Image.fromarray(mask, mode="L")
    return kwargs


def render(pipe, kind: str, width: int = 64, height: int = 64, **extra) -> Image.Image:
    pipe.set_progress_bar_config(disable=True)
    kwargs = inputs(kind, width, height) | extra
    if kind != "img2img" or "height" in _call_parameters(pipe):
        kwargs.update(height=height, width=width)  # SDXL img2img takes the input's size
    return pipe(**kwargs).images[0]


def _call_parameters(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def first_kind(name: str) -> str:
    return FAMILY_KINDS[name][0]


# --------------------------------------------------------------------------- building


def test_another_process_builds_the_same_bytes():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, __file__, *FAMILY_MODELS],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=180,
        check=True,
    )

    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(FAMILY_MODELS)
    for line in lines:
        name, theirs = line.split()
        assert theirs == digest_of(build_family_tiny(name).components), name


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_building_twice_gives_the_same_bytes(name):
    assert digest_of(build_components(name)) == digest_of(build_components(name))


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    for name in FAMILY_MODELS:
        build_components(name)
    assert torch.equal(torch.rand(3), expected)


def test_each_build_is_a_fresh_copy():
    first = build_family_tiny("tiny-flux")
    with torch.no_grad():
        first.transformer.x_embedder.weight.zero_()
    second = build_family_tiny("tiny-flux")

    assert second.transformer.x_embedder.weight.abs().sum() > 0
    assert second.tokenizer_2 is not first.tokenizer_2


def test_unknown_names_are_a_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown built-in model 'tiny'.*tiny-sdxl, "):
        build_family_tiny("tiny")


def test_shapes_and_defaults():
    sdxl, sdxl_inpaint = build_family_tiny("tiny-sdxl"), build_family_tiny("tiny-sdxl-inpaint")
    sd3, flux, fill = (build_family_tiny(n) for n in ("tiny-sd3", "tiny-flux", "tiny-flux-fill"))

    for name, pipe in zip(FAMILY_MODELS, (sdxl, sdxl_inpaint, sd3, flux, fill), strict=True):
        assert type(pipe) is FAMILY_MODELS[name][0]
        assert all(p.dtype == torch.float32 for p in pipe.vae.parameters())
    # SDXL: text_time conditioning on both encoders; 64×64 by default; the 9-channel inpainter.
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.unet.config.cross_attention_dim == 64 and sdxl.unet.config.in_channels == 4
    assert sdxl_inpaint.unet.config.in_channels == 9
    assert sdxl.config.force_zeros_for_empty_prompt is True
    assert sdxl_inpaint.config.requires_aesthetics_score is False
    assert sdxl.default_sample_size * sdxl.vae_scale_factor == 64
    assert sdxl.scheduler.config.timestep_spacing == "leading"
    # SD3: 16 latent channels with its shift and scale; 64×64 by default; a fixed shift of 3.
    assert sd3.vae.config.latent_channels == 16 and sd3.vae.config.shift_factor == 0.0609
    assert sd3.default_sample_size * sd3.vae_scale_factor == 64
    assert sd3.scheduler.config.shift == 3.0 and not sd3.scheduler.config.use_dynamic_shifting
    # FLUX.1: packed latents, guidance-distilled, dynamic shifting; Fill takes 64 + 64 + 16.
    assert flux.transformer.config.in_channels == 64 and flux.transformer.config.guidance_embeds
    assert fill.transformer.config.in_channels == 144
    assert fill.transformer.config.out_channels == 64
    assert flux.vae.config.scaling_factor == 0.3611 and flux.vae.config.shift_factor == 0.1159
    assert flux.scheduler.config.use_dynamic_shifting and flux.scheduler.config.max_shift == 1.15
    # diffusers' Flux pipelines fix default_sample_size = 128 in __init__ (no config holds it).
    assert flux.default_sample_size * flux.vae_scale_factor == 256


def test_t5_tokenizer_is_t5_shaped_and_round_trips(tmp_path):
    tokenizer = t5_tokenizer()
    ids = tokenizer("A red fox!").input_ids

    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A red fox!"
    tokenizer.save_pretrained(tmp_path)
    again = type(tokenizer).from_pretrained(tmp_path, local_files_only=True)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again("é, a fox").input_ids == tokenizer("é, a fox").input_ids


def test_sizes_are_what_the_builders_build():
    built = {
        name: sum(
            nbytes(part.state_dict())
            for part in build_family_tiny(name).components.values()
            if isinstance(part, torch.nn.Module)
        )
        for name in FAMILY_MODELS
    }
    weights, encoder = build_sdxl_ip_adapter()
    built["tiny-sdxl-ip-adapter"] = sum(map(nbytes, weights.values())) + nbytes(
        encoder.state_dict()
    )
    assert built == {name: BUILTIN_SIZES[name] for name in built}


# --------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_exported_folders_load_in_diffusers_with_the_same_pixels(name, family_folders, max_diff):
    pipeline_class, _ = FAMILY_MODELS[name]
    kind = first_kind(name)

    loaded = pipeline_class.from_pretrained(family_folders[name], local_files_only=True)
    built = build_family_tiny(name)

    assert type(loaded) is pipeline_class
    assert digest_of(loaded.components) == digest_of(built.components)  # bit for bit
    ours = render(built, kind, output_type="np")
    theirs = render(loaded, kind, output_type="np")
    # Not bit for bit: the loaded weights sit in safetensors' buffer, unaligned, and the SIMD
    # kernels round differently there (cloning them gives 0.0). Far below one uint8 step.
    assert np.abs(ours - theirs).max() < 1e-5
    assert max_diff(render(built, kind), render(loaded, kind)) <= 1


CASES = [
    (name, kind, size)
    for name in FAMILY_MODELS
    for kind in FAMILY_KINDS[name]
    for size in ((64, 64), (48, 64))
]
CASE_IDS = [f"{name}-{kind}-{w}x{h}" for name, kind, (w, h) in CASES]


@pytest.mark.parametrize(("name", "kind", "size"), CASES, ids=CASE_IDS)
def test_each_kind_runs_through_the_autopipeline(name, kind, size):
    base = build_family_tiny(name)
    family = FAMILY_MODELS[name][1]
    if name == "tiny-flux-fill":
        # diffusers' AutoPipelines map no task to FluxFillPipeline: it is its own inpainter.
        with pytest.raises(ValueError, match="can't find a pipeline linked to FluxFillPipeline"):
            AUTO[kind].from_pipe(base)
        pipe, expected = base, family_defaults()[family]["inpaint-fill"]["pipeline"]
    else:
        pipe, expected = AUTO[kind].from_pipe(base), family_defaults()[family][kind]["pipeline"]

    image = render(pipe, kind, *size)

    assert type(pipe).__name__ == expected
    assert image.size == size and image.mode == "RGB"


def test_sd3_and_flux_img2img_render_at_the_default_size_unless_told():
    """They take height/width, and without them resize the input to the default size."""
    for name, default in (("tiny-sd3", 64), ("tiny-flux", 256)):
        pipe = AutoPipelineForImage2Image.from_pipe(build_family_tiny(name))
        pipe.set_progress_bar_config(disable=True)
        assert pipe(**inputs("img2img", 48, 64)).images[0].size == (default, default)


# --------------------------------------------------------------------------- adapters

LORA_CASES = [
    ("tiny-sdxl", False),
    ("tiny-sdxl", True),
    ("tiny-sd3", False),
    ("tiny-flux", False),
    ("tiny-flux", True),
    ("tiny-flux-fill", False),
]


@pytest.mark.parametrize(("name", "text_encoder"), LORA_CASES)
def test_lora_adapters_load_and_change_the_output(name, text_encoder, tmp_path, max_diff):
    path = save_family_lora(tmp_path / "style.safetensors", name, seed=1, text_encoder=text_encoder)
    pipe = build_family_tiny(name)
    kind = first_kind(name)
    base = render(pipe, kind)

    pipe.load_lora_weights(tmp_path, weight_name=path.name, adapter_name="style")
    styled = render(pipe, kind)
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    off = render(pipe, kind)

    assert max_diff(base, styled) > 4
    assert max_diff(base, off) <= 1


def test_lora_refusals(tmp_path):
    with pytest.raises(ValueError, match="unknown built-in model 'tiny'"):
        save_family_lora(tmp_path / "a.safetensors", "tiny")
    with pytest.raises(ValueError, match="no text-encoder LoRA for the sd3 family"):
        save_family_lora(tmp_path / "a.safetensors", "tiny-sd3", text_encoder=True)


def test_sdxl_ip_adapter_loads_in_diffusers(tmp_path, max_diff):
    folder = export_sdxl_ip_adapter(tmp_path / "tiny-sdxl-ip-adapter")
    weights, encoder = build_sdxl_ip_adapter()
    base = build_family_tiny("tiny-sdxl")
    style = Image.new("RGB", (40, 48), (20, 180, 60))
    plain = render(StableDiffusionXLImg2ImgPipeline.from_pipe(base), "img2img")

    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(base, image_encoder=encoder)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHT_NAME)
    pipe.set_ip_adapter_scale(0.0)
    at_zero = render(pipe, "img2img", ip_adapter_image=style)
    pipe.set_ip_adapter_scale(1.0)
    at_one = render(pipe, "img2img", ip_adapter_image=style)

    cross_attention = [n for n in base.unet.attn_processors if n.endswith("attn2.processor")]
    assert len(weights["ip_adapter"]) == 2 * len(cross_attention)
    assert max_diff(plain, at_zero) <= 1
    assert max_diff(plain, at_one) > 4
    # The folder alone (its image_encoder/ too) loads the same adapter.
    again = StableDiffusionXLImg2ImgPipeline.from_pipe(build_family_tiny("tiny-sdxl"))
    again.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHT_NAME)
    again.set_ip_adapter_scale(1.0)
    assert max_diff(render(again, "img2img", ip_adapter_image=style), at_one) <= 1


# --------------------------------------------------------------------------- defaults


def test_family_defaults_are_read_from_diffusers():
    table = family_defaults()

    assert set(table) == {"sd15", "sdxl", "sd3", "flux"}
    assert table["sd15"]["img2img"]["pipeline"] == "StableDiffusionImg2ImgPipeline"
    assert table["sdxl"]["txt2img"]["defaults"]["guidance_scale"] == 5.0
    assert "prompt_2" in table["sdxl"]["img2img"]["family_args"]
    assert "prompt_3" in table["sd3"]["txt2img"]["family_args"]
    assert table["flux"]["txt2img"]["family_args"]["max_sequence_length"] == 512
    assert not table["sdxl"]["img2img"]["takes_size"] and table["sd3"]["img2img"]["takes_size"]
    assert table["flux"]["scheduler"]["compatibles"] == ["FlowMatchEulerDiscreteScheduler"]
    assert "DPMSolverMultistepScheduler" in table["sdxl"]["scheduler"]["compatibles"]
    assert "strength" not in table["flux"]["txt2img"]["defaults"]
    assert FluxFillPipeline.__name__ == table["flux"]["inpaint-fill"]["pipeline"]
