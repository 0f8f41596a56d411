"""Scaling out: images/s through one CPU worker and through two (one torch thread each).

    python bench/scaling.py [--jobs 16] [--size 64] [--steps 10] [--rounds 5] [--max-batch 1]

Two embedded farms side by side on one private Redis (a key prefix each): one with one worker,
one with two (`LocalFarm(workers=2)`, the launcher's children), every worker on one torch
thread with the tiny txt2img model preloaded. The same jobs (different prompts and seeds, one
batch signature) go to each in turn, in short alternating rounds in one run, so the machine's
drift hits both alike; only one farm is busy at a time. A round's time runs from submit to the
last job's end. `--max-batch 1` (the default) keeps micro-batching out of it: what is measured
is jobs spread over processes. Prints each round's rates and the median speed-up two/one
(target >= 1.8 on a machine with two free cores).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.client import Farm  # noqa: E402
from farm.jobs.specs import Txt2Img
from farm.local.embedded import RedisServer
from farm.local.up import LocalFarm
from farm.settings import FarmSettings  # noqa: E402


def specs(args: argparse.Namespace, round_: int, n: int | None = None) -> list[Txt2Img]:
    return [
        Txt2Img(
            model="tiny",
            prompt=f"a red house, variation {i}",
            seed=round_ * 1000 + i,
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
        )
        for i in range(n or args.jobs)
    ]


def run(farm: Farm, jobs: list[Txt2Img]) -> tuple[float, dict[str, int]]:
    """(images/s, jobs per worker) for one round."""
    t0 = time.perf_counter()
    handles = farm.submit_many(jobs)
    records = farm.wait([h.id for h in handles], timeout=3600)
    elapsed = time.perf_counter() - t0
    assert all(r.state.value == "succeeded" for r in records), [r.error for r in records]
    return len(jobs) / elapsed, dict(collections.Counter(r.worker for r in records))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-batch", type=int, default=1)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis:

        def farm_settings(name: str) -> FarmSettings:
            return FarmSettings(
                redis_url=redis.url,
                home=Path(tmp) / name,
                key_prefix=f"{name}{uuid.uuid4().hex[:6]}:",
                max_batch=args.max_batch,
            )

        with (
            LocalFarm(farm_settings("one"), workers=1, threads=1, preload=["tiny"]) as l1,
            LocalFarm(farm_settings("two"), workers=2, threads=1, preload=["tiny"]) as l2,
            Farm(l1.settings) as one,
            Farm(l2.settings) as two,
        ):
            run(one, specs(args, 99, 4))  # warm: workers up, pipelines loaded
            run(two, specs(args, 99, 4))
            ratios = []
            for r in range(args.rounds):
                order = (one, two) if r % 2 == 0 else (two, one)
                rates = {}
                for farm in order:
                    rates[farm is two] = run(farm, specs(args, r))
                (rate_1, _), (rate_2, split) = rates[False], rates[True]
                ratios.append(rate_2 / rate_1)
                print(
                    f"round {r}: 1 worker {rate_1:.2f} img/s  2 workers {rate_2:.2f} img/s "
                    f"(jobs per worker {sorted(split.values())})  speed-up {ratios[-1]:.3f}",
                    flush=True,
                )
    print(
        f"{args.jobs} txt2img jobs, {args.size}x{args.size}, {args.steps} steps, "
        f"FARM_MAX_BATCH={args.max_batch}, 1 torch thread per worker, {os.cpu_count()} cores: "
        f"median speed-up 2 workers / 1 worker = {statistics.median(ratios):.3f} "
        f"(rounds {min(ratios):.2f}-{max(ratios):.2f}; target >= 1.8)"
    )


if __name__ == "__main__":
    main()
