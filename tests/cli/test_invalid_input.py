"""Bad input is refused at the edge: exit 2, one line naming the field, nothing written."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import pytest
import redis
from PIL import Image

from farm import Farm, InvalidJob, Txt2Img
from farm.settings import FarmSettings, settings_env


@pytest.fixture
def files(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    Image.new("L", (32, 32)).save(tmp_path / "small-mask.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    # Model folders a worker must refuse: one ships code, one has only pickle weights.
    for name, index, weights in [
        ("custom-model", {"_class_name": ["pipeline", "MyPipeline"]}, "unet/model.safetensors"),
        ("pickled-model", {"_class_name": "StableDiffusionPipeline"}, "unet/model.bin"),
    ]:
        folder = tmp_path / name
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / weights).write_bytes(b"\0")
    (tmp_path / "custom-model" / "pipeline.py").write_text("import os\n")
    # An inpainting model as the client sees it: its class and its UNet's 9 input channels.
    inpaint = tmp_path / "inpaint-model"
    (inpaint / "unet").mkdir(parents=True)
    index = {"_class_name": "StableDiffusionInpaintPipeline"}
    (inpaint / "model_index.json").write_text(json.dumps(index))
    (inpaint / "unet" / "config.json").write_text(json.dumps({"in_channels": 9}))
    (tmp_path / "bomb.png").write_bytes(png_header(30_000, 30_000))  # 900 Mpx declared
    (tmp_path / "zero.png").write_bytes(png_header(0, 64))
    Image.new("RGB", (9000, 8)).save(tmp_path / "wide.png")
    return tmp_path


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and carries (almost) no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def nothing_written(settings: FarmSettings) -> bool:
    r = redis.Redis.from_url(settings.redis_url)
    keys = list(r.scan_iter(f"{settings.key_prefix}*"))
    r.close()
    store = settings.storage_url().removeprefix("file://")
    from pathlib import Path

    stored = [p for p in Path(store).rglob("*") if p.is_file()] if Path(store).exists() else []
    return not keys and not stored


CASES = {
    "steps": (["txt2img", "--steps", "0"], "num_inference_steps"),
    "width": (["txt2img", "--width", "100"], "width"),
    "scheduler": (["txt2img", "--scheduler", "warp"], "scheduler"),
    "guidance": (["txt2img", "--guidance-scale", "nan"], "guidance_scale"),
    "pickle": (["txt2img", "--model", "model.ckpt"], "model"),
    "no-image": (["img2img"], "image"),
    "missing-file": (["img2img", "--image", "{d}/nope.png"], "image"),
    "truncated": (["img2img", "--image", "{d}/truncated.png"], "image"),
    "not-image": (["img2img", "--image", "{d}/notes.txt"], "image"),
    "http": (["img2img", "--image", "http://169.254.169.254/x.png"], "image"),
    "mask-size": (
        ["inpaint", "--image", "{d}/ok.png", "--mask", "{d}/small-mask.png"],
        "mask_image",
    ),
    "strength": (["img2img", "--image", "{d}/ok.png", "--strength", "1.5"], "strength"),
    "bomb": (["img2img", "--image", "{d}/bomb.png"], "image"),
    "zero-pixels": (["img2img", "--image", "{d}/zero.png"], "image"),
    "oversize": (["img2img", "--image", "{d}/wide.png"], "image"),
    "model-escape": (["txt2img", "--model", "../models/sd"], "model"),
    "pickle-bin": (["txt2img", "--model", "models/unet.bin"], "model"),
    "file-uri": (["img2img", "--image", "file:///etc/passwd"], "image"),
    "empty-prompt": (["txt2img", "--prompt", ""], "prompt"),
    "nan-strength": (["img2img", "--image", "{d}/ok.png", "--strength", "nan"], "strength"),
    "remote-code": (["txt2img", "--model", "{d}/custom-model"], "model"),
    "pickle-folder": (["txt2img", "--model", "{d}/pickled-model"], "model"),
    # What the client can see of a model's kind: refused here, not failed later by a worker.
    "inpaint-model": (["txt2img", "--model", "tiny-inpaint"], "model"),
    "inpaint-img2img": (["img2img", "--model", "tiny-flux-fill", "--image", "{d}/ok.png"], "model"),
    "inpaint-folder": (["txt2img", "--model", "{d}/inpaint-model"], "model"),
    "inpaint-style": (
        ["style", "--model", "tiny-inpaint", "--ip-adapter", "tiny-ip-adapter"]
        + ["--image", "{d}/ok.png", "--style-image", "{d}/ok.png"],
        "inpainting model",
    ),
    # A flag of another kind, and a generator's name misspelt, are named as such.
    "txt2img-image": (["txt2img", "--image", "{d}/ok.png"], "--image"),
    "txt2img-strength": (["txt2img", "--strength", "0.5"], "--strength"),
    "mask-typo": (["inpaint", "--image", "{d}/ok.png", "--mask", "stroke"], "strokes"),
}


@pytest.mark.parametrize("case", CASES)
def test_cli_refuses_bad_input(empty_farm, files, case):
    args, field = CASES[case]
    args = [a.format(d=files) for a in args]
    if "--model" not in args:
        args += ["--model", "tiny"]
    if "--prompt" not in args:
        args += ["--prompt", "a fox"]
    res = subprocess.run(
        [sys.executable, "-m", "farm", "submit", *args],
        env=settings_env(empty_farm),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], res.stderr
    assert nothing_written(empty_farm)


def test_sdk_batch_with_one_bad_spec_writes_nothing(empty_farm, files):
    good = Txt2Img(model="tiny", prompt="x")
    bad = {
        "kind": "inpaint",
        "model": "tiny-inpaint",
        "prompt": "x",
        "image": str(files / "ok.png"),
        "mask_image": str(files / "small-mask.png"),
    }
    with Farm(empty_farm) as farm, pytest.raises(InvalidJob) as err:
        farm.submit_many([good, bad])
    assert err.value.field == "mask_image" and "64x64" in str(err.value)
    assert nothing_written(empty_farm)
