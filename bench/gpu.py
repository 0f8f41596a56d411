"""Full-size SD 1.5 inpainting on one GPU: images/s of diffusers called directly vs the farm's
worker path, at batch 1 and at FARM_MAX_BATCH, with and without channels_last and torch.compile.

On a GPU machine (one prepared command; an estimate, not yet run: about 6-8 minutes on an
H100, of which the four torch.compile compilations take about half):

    python bench/gpu.py --json gpu.json

Where one command may run 10 minutes at most, the halves fit safely on their own:

    python bench/gpu.py --compile off --json gpu-eager.json       # about 3 minutes
    python bench/gpu.py --compile on --json gpu-compiled.json     # about 5 minutes

On CPU, tiny shapes, seconds (what the test runs):

    python bench/gpu.py --small --compile off --rounds 1 --batch 2

The model is SD 1.5 inpainting's architecture built from its config with seeded random weights
(nothing is downloaded): UNet in_channels 9, block_out_channels (320, 640, 1280, 1280),
layers_per_block 2, cross_attention_dim 768, attention_head_dim 8; VAE (128, 256, 512, 512),
latent 4; CLIP text model hidden 768, 12 layers, 12 heads, 77 positions; the offline tokenizer
of `workers.builtin.tiny`; SD 1.5's PNDM scheduler. fp16 on CUDA (fp32 on CPU), 512×512, 30 steps.
Random weights give noise, not pictures, but the same FLOPs as the real model: the UNet has
859,535,364 parameters, the VAE 83,653,863, the text encoder 123,060,480, as SD 1.5 inpainting.
`--size 64 --steps 2` runs the full-size model on CPU in about a minute (a check of the build).

"direct" is `StableDiffusionInpaintPipeline.__call__` with a batch of prompts, images, masks and
one generator per image, as a diffusers user would write it. "farm" is the worker's render
path on the same pipeline object: `workers.render.render_batch` with `farm.jobs.Inpaint` specs
(its input checks, mask shaping, scheduler copy, per-image generators, step callback, results
at the input's size), after `workers.optimize.optimize` (what FARM_CHANNELS_LAST / FARM_COMPILE
do in a worker). Redis, storage and PNG encoding are not in it (bench/overhead.py measures the
whole farm on CPU). Each configuration gets one warm-up call of each (compiles happen there),
then `--rounds` alternating rounds; the table shows medians and the ratios farm/direct and
direct / (direct at batch 1, no options).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.jobs.specs import Inpaint
from farm.settings import FarmSettings  # noqa: E402

FULL = {
    "size": 512,
    "steps": 30,
    "unet": {
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "sample_size": 64,
    },
    "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 512},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "layers": 12, "heads": 12},
}
"""SD 1.5 (inpainting) as its configs on the Hub describe it."""

SMALL = {
    "size": 32,
    "steps": 4,
    "unet": {
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "sample_size": 8,
    },
    "vae": {"block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 64},
    "text": {"hidden_size": 32, "intermediate_size": 37, "layers": 2, "heads": 4},
}
"""The same architecture at the size of diffusers' test components: runs on CPU in seconds."""


def build_pipeline(shapes: dict[str, Any], device: str, dtype: Any) -> Any:
    """SD 1.5 inpainting from configs, seeded random weights, on `device` in `dtype`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from workers.builtin.tiny import _tokenizer

    torch.manual_seed(0)
    with torch.device(device):  # weights created where they run: no 4 GB copy
        unet = UNet2DConditionModel(in_channels=9, out_channels=4, **shapes["unet"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(shapes["vae"]["block_out_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(shapes["vae"]["block_out_channels"]),
            latent_channels=4,
            **shapes["vae"],
        )
        t = shapes["text"]
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=t["hidden_size"],
                intermediate_size=t["intermediate_size"],
                num_hidden_layers=t["layers"],
                num_attention_heads=t["heads"],
                max_position_embeddings=77,
                vocab_size=49408,
                hidden_act="quick_gelu",
                projection_dim=t["hidden_size"],
            )
        )
    scheduler = PNDMScheduler(  # SD 1.5's scheduler_config.json
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype) if dtype != torch.float32 else pipe


def inputs(size: int, n: int) -> tuple[list[Any], list[Any]]:
    """`n` different source pictures and box masks at `size`×`size`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images, masks = [], []
    for _ in range(n):
        images.append(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
        masks.append(Image.fromarray(mask, "L"))
    return images, masks


def direct(pipe: Any, batch: int, size: int, steps: int, images: list, masks: list) -> None:
    import torch

    pipe(
        prompt=[f"a red house, variation {i}" for i in range(batch)],
        image=images[:batch] if batch > 1 else images[0],
        mask_image=masks[:batch] if batch > 1 else masks[0],
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=7.5,
        strength=1.0,
        generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
        output_type="pil",
    )


def farm_path(pipe: Any, batch: int, size: int, steps: int, images: list, masks: list) -> None:
    from workers.render.render import render_batch

    specs = [
        Inpaint(
            model="bench/sd15-inpaint-random",
            prompt=f"a red house, variation {i}",
            image="s3://bench/in.png",
            mask_image="s3://bench/mask.png",
            seed=i,
            num_inference_steps=steps,
            height=size,
            width=size,
        )
        for i in range(batch)
    ]
    progress: dict[str, tuple[int, int]] = {}

    def on_step(step: int, total: int) -> bool:  # what the worker's heartbeat watch does
        for spec in specs:
            progress[spec.prompt] = (step, total)
        return False

    render_batch(pipe, specs, images[:batch], masks[:batch], on_step=on_step)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Any, device: str, batch: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return batch / (time.perf_counter() - t0)


def bench_one(
    pipe: Any,
    device: str,
    batch: int,
    size: int,
    steps: int,
    images: list,
    masks: list,
    rounds: int,
) -> dict[str, Any]:
    """Medians of `rounds` alternating rounds of the direct call and the farm's path."""
    run_direct = functools.partial(direct, pipe, batch, size, steps, images, masks)
    run_farm = functools.partial(farm_path, pipe, batch, size, steps, images, masks)
    run_direct()  # warm-up: cuDNN autotuning, compiles for this shape
    run_farm()
    d: list[float] = []
    f: list[float] = []
    for r in range(rounds):
        pair = [(run_direct, d), (run_farm, f)]
        for fn, out in pair if r % 2 == 0 else pair[::-1]:
            out.append(measure(fn, device, batch))
    return {
        "batch": batch,
        "direct_images_per_s": statistics.median(d),
        "farm_images_per_s": statistics.median(f),
        "farm_over_direct": statistics.median([b / a for a, b in zip(d, f, strict=True)]),
    }


def choices(value: str) -> list[bool]:
    return {"both": [False, True], "off": [False], "on": [True]}[value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes: CPU, seconds")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--batch", type=int, help="the larger batch (default FARM_MAX_BATCH)")
    ap.add_argument("--steps", type=int, help="default 30 (4 with --small)")
    ap.add_argument("--size", type=int, help="image height and width (default 512; 32 --small)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels-last", choices=["both", "off", "on"], default="both")
    ap.add_argument("--compile", choices=["both", "off", "on"], default="both")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = ap.parse_args()

    import torch

    from workers.models.optimize import optimize

    warnings.filterwarnings("ignore")  # random weights in fp16 decode to NaN: no matter here
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    shapes = SMALL if args.small else FULL
    size, steps = args.size or shapes["size"], args.steps or shapes["steps"]
    max_batch = args.batch or FarmSettings().max_batch
    batches = sorted({1, max_batch})
    images, masks = inputs(size, max(batches))
    if device == "cpu":
        torch.set_num_threads(1)  # a smoke run: one thread is steadier on a shared machine
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(
        f"SD 1.5 inpainting {'(small shapes) ' if args.small else ''}random weights, {dtype}, "
        f"{size}x{size}, {steps} steps, on {name}; torch {torch.__version__}",
        flush=True,
    )
    rows = []
    for channels_last in choices(args.channels_last):
        for compiled in choices(args.compile):
            t0 = time.perf_counter()
            pipe = optimize(
                build_pipeline(shapes, device, dtype),
                channels_last=channels_last,
                compile=compiled,
            )
            for batch in batches:
                row = bench_one(pipe, device, batch, size, steps, images, masks, args.rounds)
                rows.append({"channels_last": channels_last, "compile": compiled, **row})
                rows[-1]["setup_s"] = round(time.perf_counter() - t0, 1)
                print(f"  measured batch {batch} cl={channels_last} compile={compiled}", flush=True)
            del pipe
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    plain = [r for r in rows if r["batch"] == 1 and not r["channels_last"] and not r["compile"]]
    base_row = (plain or rows)[0]
    base = base_row["direct_images_per_s"]
    for row in rows:
        row["direct_over_base"] = row["direct_images_per_s"] / base
    print()
    print("batch  channels_last  compile  direct img/s  farm img/s  farm/direct  direct/base")
    for r in rows:
        print(
            f"{r['batch']:>5}  {str(r['channels_last']):>13}  {str(r['compile']):>7}  "
            f"{r['direct_images_per_s']:>12.3f}  {r['farm_images_per_s']:>10.3f}  "
            f"{r['farm_over_direct']:>11.3f}  {r['direct_over_base']:>11.2f}"
        )
    print(
        f"medians of {args.rounds} alternating rounds; base = direct, batch 1, "
        f"channels_last={base_row['channels_last']}, compile={base_row['compile']}; device {name}"
    )
    if args.json:
        meta = {"device": name, "dtype": str(dtype), "size": size, "steps": steps}
        meta |= {"small": args.small, "torch": torch.__version__, "rounds": args.rounds}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
