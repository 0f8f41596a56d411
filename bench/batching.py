"""Micro-batching: images/s through the farm at FARM_MAX_BATCH=1 and at FARM_MAX_BATCH=B.

    python bench/batching.py [--batch 4] [--jobs 16] [--size 32] [--steps 10] [--rounds 5]
                             [--kind inpaint|txt2img]

Two embedded farms side by side on one private Redis (a key prefix each), each with one warm
worker on one torch thread: one runs every job alone, the other gathers up to B compatible
jobs per pipeline call. The same jobs (different prompts, seeds, sources and masks; one batch
signature) go to each in turn, in short alternating rounds in one run, so the machine's drift
hits both alike; only one worker is busy at a time. A round's time runs from submit to the last
job's end: validation, upload, queueing, rendering, storing and the final state included.
Prints each round's rates and the median ratio batched/alone (target >= 1.2 on CPU at 4).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.cli.demo import write_samples
from farm.client import Farm  # noqa: E402
from farm.jobs.specs import Inpaint, Txt2Img
from farm.local.embedded import RedisServer
from farm.local.up import LocalFarm
from farm.settings import FarmSettings  # noqa: E402


def specs(args: argparse.Namespace, pairs, round_: int) -> list[Inpaint | Txt2Img]:
    jobs: list[Inpaint | Txt2Img] = []
    for i, (img, mask) in enumerate(pairs):
        common = {
            "prompt": f"a red house, variation {i}",
            "seed": round_ * 1000 + i,
            "num_inference_steps": args.steps,
        }
        if args.kind == "inpaint":
            jobs.append(
                Inpaint(model="tiny-inpaint", image=str(img), mask_image=str(mask), **common)
            )
        else:
            jobs.append(Txt2Img(model="tiny", height=args.size, width=args.size, **common))
    return jobs


def run(farm: Farm, jobs: list) -> tuple[float, float]:
    """(images/s, mean images per pipeline call) for one round."""
    t0 = time.perf_counter()
    handles = farm.submit_many(jobs)
    records = farm.wait([h.id for h in handles], timeout=3600)
    elapsed = time.perf_counter() - t0
    assert all(r.state.value == "succeeded" for r in records), [r.error for r in records]
    assert all(r.attempt == 1 for r in records)
    sizes = [len(_meta(farm, r.meta)["batch"]["jobs"]) for r in records]
    return len(jobs) / elapsed, statistics.mean(sizes)


def _meta(farm: Farm, uri: str | None) -> dict:
    import json

    assert uri is not None
    return json.loads(farm.store.get_uri(uri))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="FARM_MAX_BATCH of the batching farm")
    ap.add_argument("--jobs", type=int, default=16, help="jobs per round")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kind", choices=["inpaint", "txt2img"], default="inpaint")
    args = ap.parse_args()

    model = "tiny-inpaint" if args.kind == "inpaint" else "tiny"
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis:
        pairs = write_samples(Path(tmp), args.jobs, args.size)

        def farm_settings(name: str, max_batch: int) -> FarmSettings:
            return FarmSettings(
                redis_url=redis.url,
                home=Path(tmp) / name,
                key_prefix=f"{name}{uuid.uuid4().hex[:6]}:",
                max_batch=max_batch,
            )

        with (
            LocalFarm(farm_settings("alone", 1), workers=1, threads=1, preload=[model]) as la,
            LocalFarm(farm_settings("batched", args.batch), threads=1, preload=[model]) as lb,
            Farm(la.settings) as alone,
            Farm(lb.settings) as batched,
        ):
            run(alone, specs(args, pairs[:4], 99))  # warm: workers up, pipelines loaded
            run(batched, specs(args, pairs[:4], 99))
            ratios = []
            for r in range(args.rounds):
                first, second = (alone, batched) if r % 2 == 0 else (batched, alone)
                rates = {}
                for farm in (first, second):
                    rates[farm is batched] = run(farm, specs(args, pairs, r))
                (rate_1, _), (rate_b, per_call) = rates[False], rates[True]
                ratios.append(rate_b / rate_1)
                print(
                    f"round {r}: batch 1 {rate_1:.2f} img/s  batch {args.batch} {rate_b:.2f} img/s "
                    f"(mean {per_call:.1f} images per call)  ratio {ratios[-1]:.3f}",
                    flush=True,
                )
    print(
        f"{args.jobs} {args.kind} jobs, {args.size}x{args.size}, {args.steps} steps, one worker, "
        f"1 thread: median ratio FARM_MAX_BATCH={args.batch} / FARM_MAX_BATCH=1 = "
        f"{statistics.median(ratios):.3f} (target >= 1.2)"
    )


if __name__ == "__main__":
    main()
