"""Farm overhead: the same N inpaint jobs through the farm and as N direct diffusers calls.

    python bench/overhead.py [--jobs 12] [--size 128] [--steps 20] [--rounds 7]

One warm worker (one torch thread) against diffusers called in this process (one torch
thread), same tiny model, same arguments, alternated in short rounds in one run so that the
machine's drift hits both alike. Prints each round's rates and the median ratio farm/direct
(target ≥ 0.95). The farm's time runs from submit to the last job's end: validation, upload,
queueing, rendering, storing and the final state included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.cli.demo import write_samples
from farm.client import Farm  # noqa: E402
from farm.jobs.specs import Inpaint
from farm.local.up import LocalFarm
from farm.settings import FarmSettings  # noqa: E402


def specs(pairs, steps: int, round_: int) -> list[Inpaint]:
    return [
        Inpaint(
            model="tiny-inpaint",
            prompt="a red house",
            image=str(img),
            mask_image=str(mask),
            seed=round_ * 1000 + i,
            num_inference_steps=steps,
        )
        for i, (img, mask) in enumerate(pairs)
    ]


def run_farm(farm: Farm, jobs: list[Inpaint]) -> float:
    t0 = time.perf_counter()
    handles = farm.submit_many(jobs)
    records = farm.wait([h.id for h in handles], timeout=3600)
    elapsed = time.perf_counter() - t0
    assert all(r.state.value == "succeeded" for r in records), [r.error for r in records]
    return len(jobs) / elapsed


def run_direct(pipe, jobs: list[Inpaint]) -> float:
    import torch
    from PIL import Image

    loaded = [
        (Image.open(j.image).convert("RGB"), Image.open(j.mask_image).convert("L")) for j in jobs
    ]
    t0 = time.perf_counter()
    for job, (image, mask) in zip(jobs, loaded, strict=True):
        pipe(
            prompt=job.prompt,
            image=image,
            mask_image=mask,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            strength=job.strength,
            # What the farm renders at: the input's size (diffusers' own default for an inpaint
            # call without a size is the model's sample size, a quarter of the pixels here).
            height=image.height,
            width=image.width,
            generator=[torch.Generator("cpu").manual_seed(job.seed)],
        )
    return len(jobs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import torch

    from workers.builtin.tiny import build_tiny

    torch.set_num_threads(1)
    pipe = build_tiny("tiny-inpaint")
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_samples(Path(tmp), args.jobs, args.size)
        settings = FarmSettings(home=Path(tmp) / "farm")
        with (
            LocalFarm(settings, workers=1, threads=1, preload=["tiny-inpaint"]) as lf,
            Farm(lf.settings) as farm,
        ):
            run_farm(farm, specs(pairs[:2], args.steps, 99))  # warm: worker up, pipeline loaded
            run_direct(pipe, specs(pairs[:2], args.steps, 99))
            ratios = []
            for r in range(args.rounds):
                farm_rate = run_farm(farm, specs(pairs, args.steps, r))
                direct_rate = run_direct(pipe, specs(pairs, args.steps, r))
                ratios.append(farm_rate / direct_rate)
                print(
                    f"round {r}: farm {farm_rate:.2f} img/s  direct {direct_rate:.2f} img/s  "
                    f"ratio {ratios[-1]:.3f}",
                    flush=True,
                )
    print(
        f"{args.jobs} inpaint jobs, {args.size}x{args.size}, {args.steps} steps, 1 thread each: "
        f"median ratio farm/direct = {statistics.median(ratios):.3f} (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
