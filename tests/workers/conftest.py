"""Fixtures for the heavy side: tiny models exported once, inputs, a fresh pipeline cache.

tiny_folders   {"tiny": Path, "tiny-inpaint": Path}: diffusers folders written by `export_tiny`
family_folders {"tiny-sdxl": Path, …}: the SDXL, SD3 and FLUX.1 built-ins as diffusers folders
photo          a 64×64 RGB test image (a smooth gradient with a disc)
mask           a 64×64 L mask: a white square to repaint
cache          a fresh CPU `PipelineCache`
oracle         loads a folder with diffusers' own pipeline class, as a user would
max_diff       the largest per-pixel difference of two images, in uint8 steps

Torch runs on one thread here (see `one_torch_thread`).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from workers.builtin.families import FAMILY_MODELS, export_family_tiny
from workers.builtin.tiny import TINY_MODELS, export_tiny
from workers.models.pipelines import PipelineCache


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads; and on two cores shared with other test processes,
    OpenMP pools that spin-wait for each other slow renders down a hundredfold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: export_tiny(name, root / name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-models")
    return {name: export_family_tiny(name, root / name) for name in FAMILY_MODELS}


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test sees an empty Hugging Face cache of its own, never the developer's."""
    import huggingface_hub.constants

    hub = tmp_path / "hf-cache"
    hub.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


@pytest.fixture
def photo() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, mode="RGB")
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(250, 200, 40))
    return image


@pytest.fixture
def mask() -> Image.Image:
    image = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(image).rectangle((20, 12, 51, 43), fill=255)
    return image


@pytest.fixture
def cache() -> PipelineCache:
    return PipelineCache(device="cpu")


@pytest.fixture
def oracle():
    """`oracle(cls, folder)`: diffusers' own pipeline, loaded the way its docs show."""

    def load(cls, folder: Path):
        pipe = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


@pytest.fixture
def max_diff():
    """`max_diff(a, b)`: the largest per-pixel difference of two same-size images, in uint8 steps."""

    def diff(a: Image.Image, b: Image.Image) -> int:
        assert a.size == b.size and a.mode == b.mode
        return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())

    return diff
