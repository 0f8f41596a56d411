"""`workers.models.optimize`: channels_last and torch.compile as a worker applies them on load, and
`bench/gpu.py --small`, the full-size GPU bench at tiny shapes on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from farm.jobs.specs import Txt2Img
from farm.settings import FarmSettings
from workers.models.optimize import from_settings
from workers.render.render import render

ROOT = Path(__file__).resolve().parents[3]


def channels_last(module: torch.nn.Module) -> bool:
    weight = module.conv_in.weight
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_channels_last_on_load_keeps_the_pixels(cache):
    spec = Txt2Img(model="tiny", prompt="a fox", seed=3, num_inference_steps=3, width=32, height=32)
    plain = np.asarray(render(cache.get("tiny", "txt2img"), spec).images[0], dtype=int)
    assert not channels_last(cache.get("tiny", "txt2img").unet)

    cache.clear()
    assert from_settings(FarmSettings()) is None  # off by default: nothing done on load
    cache.prepare = from_settings(FarmSettings(channels_last=True))
    pipe = cache.get("tiny", "txt2img")
    assert channels_last(pipe.unet) and channels_last(pipe.vae.decoder)
    fast = np.asarray(render(pipe, spec).images[0], dtype=int)
    assert np.abs(fast - plain).max() <= 1  # a memory layout, not a different model


def test_gpu_bench_small_prints_its_table_and_json(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu.py"),
            "--small",
            "--arch",
            "sd15-inpaint",
            "--compile",
            "off",
            "--rounds",
            "1",
            "--batch",
            "2",
            "--steps",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    header = lines.index(
        "batch  channels_last  compile  direct img/s  farm img/s  farm/direct  direct/base"
    )
    table = [line.split() for line in lines[header + 1 : header + 5]]
    assert [(t[0], t[1], t[2]) for t in table] == [
        ("1", "False", "False"),
        ("2", "False", "False"),
        ("1", "True", "False"),
        ("2", "True", "False"),
    ]
    report = json.loads(out.read_text())
    assert report["meta"] | {"small": True, "steps": 2, "size": 32} == report["meta"]
    rows = report["rows"]
    assert len(rows) == 4 and rows[0]["direct_over_base"] == 1.0
    for row in rows:
        assert row["direct_images_per_s"] > 0 and row["farm_images_per_s"] > 0
        ratio = row["farm_images_per_s"] / row["direct_images_per_s"]
        assert abs(ratio - row["farm_over_direct"]) < 1e-9  # one round: the ratio of the two


def test_gpu_bench_small_runs_sdxl_and_flux_through_the_farms_path(tmp_path):
    """The SDXL and FLUX.1 architectures (the built-ins' shapes with --small), fp32 on CPU."""
    out = tmp_path / "gpu.json"
    args = ["--small", "--arch", "sdxl,flux", "--compile", "off", "--channels-last", "off"]
    args += ["--rounds", "1", "--batch", "2", "--steps", "2", "--dtype", "fp32", "--json", out]
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["arch"], r["batch"]) for r in rows] == [
        ("sdxl", 1),
        ("sdxl", 2),
        ("flux", 1),
        ("flux", 2),
    ]
    assert {r["dtype"] for r in rows} == {"torch.float32"}
    assert all(r["direct_images_per_s"] > 0 and r["farm_images_per_s"] > 0 for r in rows)
    assert res.stdout.count("batch  channels_last  compile  direct img/s") == 2  # a table each
