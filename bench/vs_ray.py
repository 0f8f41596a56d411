"""The farm against Ray Data on the same jobs: steady state and the whole run.

    pip install -e '.[bench]'        # ray[data]: the bench extra, not the farm's dependencies
    python bench/vs_ray.py [--jobs 32] [--size 64] [--steps 10] [--rounds 3] [--batch 4]

The same inpaint jobs (tiny-inpaint, 32 by default, one batch signature) two ways, cold, in
alternating rounds in one run:

    ray    `ray.init(num_cpus=cores)`, then `ray.data.from_items(jobs).map_batches(Render,
           batch_size=b, compute=ActorPoolStrategy(size=cores), num_cpus=1)`: a class UDF holding the pipeline,
           one actor per core on one torch thread, that decodes its inputs and returns
           each image PNG-encoded; the driver writes them to a folder
    farm   `LocalFarm(workers=cores)` started, the jobs submitted (`Farm.submit_many`) and
           waited for, `FARM_MAX_BATCH=b`: its outputs are stored with meta.json

Whole run: from the start (`ray.init` / `LocalFarm.start`) to the last image stored. Steady
state: the rows Ray's actors finished after their first batch each, over the time from then
to the last batch's end (the actors' own clocks); the farm's rate in a warm round right after
(submit to the last end). Prints per round, then the
medians of farm/ray (targets >= 1.0 steady, >= 1.5 whole run).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ceiling import PROMPT, specs  # noqa: E402  (the same jobs as the ceiling)
from farm.cli.demo import write_samples  # noqa: E402
from farm.client import Farm  # noqa: E402
from farm.local.up import LocalFarm  # noqa: E402
from farm.settings import FarmSettings  # noqa: E402


class Render:
    """Ray's class UDF: the pipeline loaded once per actor, a batch of jobs per call."""

    def __init__(self, steps: int) -> None:
        import torch

        from workers.builtin.tiny import build_tiny

        torch.set_num_threads(1)
        self.steps = steps
        self.pipe = build_tiny("tiny-inpaint")
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, batch: dict) -> dict:
        import torch
        from PIL import Image

        images = [Image.open(p).convert("RGB") for p in batch["image"]]
        masks = [Image.open(p).convert("L") for p in batch["mask"]]
        out = self.pipe(
            prompt=[PROMPT] * len(images),
            image=images,
            mask_image=masks,
            num_inference_steps=self.steps,
            height=images[0].height,
            width=images[0].width,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in batch["seed"]],
        ).images
        pngs = []
        for picture in out:
            buf = io.BytesIO()
            picture.save(buf, format="PNG", compress_level=1)
            pngs.append(buf.getvalue())
        done = time.time()  # when this actor finished the batch (the driver may read it later)
        return {"i": batch["i"], "png": pngs, "t": [done] * len(pngs)}


def run_ray(args, pairs, seed0: int, out: Path) -> tuple[float, float]:
    """(whole-run images/s, steady images/s) of one cold Ray Data run."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    try:
        items = [
            {"i": i, "image": str(a), "mask": str(b), "seed": seed0 + i}
            for i, (a, b) in enumerate(pairs)
        ]
        ds = ray.data.from_items(items).map_batches(
            Render,
            fn_constructor_args=(args.steps,),
            batch_size=args.batch,
            compute=ray.data.ActorPoolStrategy(size=args.workers),
            num_cpus=1,
        )
        ends: dict[float, int] = {}  # a batch's end in its actor → its rows
        for batch in ds.iter_batches(batch_size=None):
            for i, png, t in zip(batch["i"], batch["png"], batch["t"], strict=True):
                (out / f"{int(i)}.png").write_bytes(png)
                ends[float(t)] = ends.get(float(t), 0) + 1
        t_end = time.perf_counter()
    finally:
        ray.shutdown()
    # Steady: rows the actors finished after their first wave (one batch each), over the time
    # from that wave's end to the last batch's, by the actors' own clocks (the driver's reads
    # come in bursts).
    times = sorted(ends)
    skip = min(args.workers, len(times) - 1)
    rows_after = sum(ends[t] for t in times[skip:])
    steady = rows_after / (times[-1] - times[skip - 1]) if skip else float("nan")
    return len(pairs) / (t_end - t0), steady


def run_farm(args, pairs, seed0: int, home: Path) -> tuple[float, float]:
    """(whole-run images/s from a cold start, steady images/s of a warm round after)."""
    t0 = time.perf_counter()
    settings = FarmSettings(home=home, max_batch=args.batch)
    with (
        LocalFarm(settings, workers=args.workers, threads=1, preload=["tiny-inpaint"]) as lf,
        Farm(lf.settings) as farm,
    ):
        rates = []
        for k in range(2):
            t_round = time.perf_counter()
            handles = farm.submit_many(specs(pairs, args.steps, seed0 + 500 * k))
            records = farm.wait([h.id for h in handles], timeout=3600)
            assert all(r.state.value == "succeeded" for r in records), [r.error for r in records]
            rates.append(len(pairs) / (time.perf_counter() - (t0 if k == 0 else t_round)))
    return rates[0], rates[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    whole, steady = [], []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        pairs = write_samples(tmp / "in", args.jobs, args.size)
        for r in range(args.rounds):
            order = ("ray", "farm") if r % 2 == 0 else ("farm", "ray")
            rates = {}
            for side in order:
                if side == "ray":
                    out = tmp / f"ray{r}"
                    out.mkdir()
                    rates[side] = run_ray(args, pairs, r * 1000, out)
                else:
                    rates[side] = run_farm(args, pairs, r * 1000, tmp / f"farm{r}")
            whole.append(rates["farm"][0] / rates["ray"][0])
            steady.append(rates["farm"][1] / rates["ray"][1])
            print(
                f"round {r}: whole run farm {rates['farm'][0]:.2f} img/s ray "
                f"{rates['ray'][0]:.2f} img/s ({whole[-1]:.3f}); steady farm "
                f"{rates['farm'][1]:.2f} img/s ray {rates['ray'][1]:.2f} img/s ({steady[-1]:.3f})",
                flush=True,
            )
    print(
        f"{args.jobs} inpaint jobs, {args.size}x{args.size}, {args.steps} steps, batch "
        f"{args.batch}, {args.workers} workers/actors, 1 torch thread each: farm/ray whole run "
        f"median {statistics.median(whole):.3f} ({min(whole):.3f}-{max(whole):.3f}; target "
        f">= 1.5), steady median {statistics.median(steady):.3f} ({min(steady):.3f}-"
        f"{max(steady):.3f}; target >= 1.0)"
    )


if __name__ == "__main__":
    main()
