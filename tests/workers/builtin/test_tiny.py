"""The built-in tiny models: offline, the same bytes in every process, loadable by diffusers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

from workers.builtin.tiny import TINY_MODELS, build_tiny, export_single_file

ROOT = Path(__file__).resolve().parents[3]

SUBPROCESS = """
import runpy, sys, time

digest = runpy.run_path(sys.argv[1])["digest"]  # this very module's
from workers.builtin.tiny import build_tiny

for name in sys.argv[2:]:
    start = time.perf_counter()
    pipe = build_tiny(name)
    print(name, digest(pipe), time.perf_counter() - start)
"""


def digest(pipe) -> str:
    """Weights, vocabulary and scheduler settings, hashed."""
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder"):
        for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
            h.update(key.encode())
            h.update(tensor.contiguous().numpy().tobytes())
    h.update(repr(sorted(pipe.tokenizer.get_vocab().items())).encode())
    settings = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


def same_weights(a, b) -> bool:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def test_another_process_builds_the_same_bytes_quickly():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, __file__, *TINY_MODELS],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=True,
    )

    lines = out.stdout.splitlines()
    assert len(lines) == len(TINY_MODELS)
    for line in lines:
        name, theirs, seconds = line.split()
        assert theirs == digest(build_tiny(name)), name
        assert float(seconds) < 2.0  # a cold build, in a fresh process


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny("tiny")
    assert torch.equal(torch.rand(3), expected)


def test_each_build_is_a_fresh_copy():
    first = build_tiny("tiny")
    with torch.no_grad():
        first.unet.conv_in.weight.zero_()
    second = build_tiny("tiny")

    assert second.unet.conv_in.weight.abs().sum() > 0
    assert second.tokenizer is not first.tokenizer


def test_shapes_and_defaults():
    tiny, inpaint = build_tiny("tiny"), build_tiny("tiny-inpaint")

    assert isinstance(tiny, StableDiffusionPipeline) and tiny.unet.config.in_channels == 4
    assert isinstance(inpaint, StableDiffusionInpaintPipeline)
    assert inpaint.unet.config.in_channels == 9
    assert tiny.unet.config.sample_size * tiny.vae_scale_factor == 64  # 64×64 by default
    assert tiny.safety_checker is None and tiny.unet.dtype == torch.float32
    assert tiny.tokenizer("A red fox!").input_ids[0] == tiny.tokenizer.bos_token_id


def test_unknown_names_are_a_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown built-in model 'huge'.*tiny, tiny-inpaint"):
        build_tiny("huge")


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_exported_folders_load_in_diffusers_with_identical_weights(name, tiny_folders):
    pipeline_class, _ = TINY_MODELS[name]

    loaded = pipeline_class.from_pretrained(tiny_folders[name], local_files_only=True)

    assert type(loaded) is pipeline_class
    assert same_weights(loaded, build_tiny(name))
    assert digest(loaded) == digest(build_tiny(name))  # tokenizer and scheduler too


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_single_file_loads_in_diffusers_with_identical_weights(name, tiny_folders, tmp_path):
    pipeline_class, _ = TINY_MODELS[name]
    path = export_single_file(name, tmp_path / f"{name}.safetensors")

    loaded = pipeline_class.from_single_file(
        str(path), config=str(tiny_folders[name]), local_files_only=True
    )

    assert same_weights(loaded, build_tiny(name))


def test_single_file_is_original_layout_and_safetensors_only(tmp_path):
    from safetensors import safe_open

    path = export_single_file("tiny-inpaint", tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        conv_in = f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape()

    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert conv_in[1] == 9  # how diffusers tells an inpainting checkpoint
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_single_file("tiny", tmp_path / "m.ckpt")


def test_building_is_fast_once_warm():
    build_tiny("tiny")
    start = time.perf_counter()
    build_tiny("tiny")
    assert time.perf_counter() - start < 0.5


def test_builtin_sizes_are_what_the_builders_build():
    from farm.jobs.refs import BUILTIN_SIZES
    from workers.builtin.tiny_ip_adapter import build_tiny_ip_adapter

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors.values())

    built = {
        name: sum(
            nbytes(part.state_dict())
            for part in build_tiny(name).components.values()
            if isinstance(part, torch.nn.Module)
        )
        for name in ("tiny", "tiny-inpaint")
    }
    weights, encoder = build_tiny_ip_adapter()
    built["tiny-ip-adapter"] = sum(map(nbytes, weights.values())) + nbytes(encoder.state_dict())
    assert built == {name: BUILTIN_SIZES[name] for name in built}  # the families: their own test
