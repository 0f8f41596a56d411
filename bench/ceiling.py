"""The machine's ceiling against the farm: diffusers called directly vs the farm's workers.

    python bench/ceiling.py [--jobs 32] [--size 64] [--steps 10] [--rounds 5] [--max-batch 4]
    python bench/ceiling.py --size 512 --steps 2 --jobs 16     # the "fast model" case

The same inpaint jobs (tiny-inpaint, one batch signature, seeds differing) four ways, in
alternating rounds in one run, one side busy at a time:

    direct b=1, direct b=B   one process per core, each in its own session and on one torch
                             thread, holding the pipeline warm, its inputs decoded before the
                             clock starts, rendering its share of the jobs in calls of b images;
                             no PNG is encoded, nothing is stored: what the machine can do
                             (the collector frozen after loading, as in a worker;
                             `--no-freeze` leaves it be)
    farm b=1, farm b=B       `LocalFarm(workers=cores)` with `FARM_MAX_BATCH=b` (its workers
                             are in sessions of their own too), from submit to the last end

The ceiling of a round is the best direct rate of that round (the best batch size); each farm
rate is divided by it. Prints per round, then the median ratio (and range) at each batch size
(target >= 0.99), and the render thread's idle fraction: per worker, the wall time from its
first claim to its last job's end minus the seconds inside pipeline calls (meta.json's
`render_s`, one per batch), over that wall (target <= 1 %).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.cli.demo import write_samples  # noqa: E402
from farm.client import Farm  # noqa: E402
from farm.jobs.specs import Inpaint  # noqa: E402
from farm.local.embedded import RedisServer  # noqa: E402
from farm.local.up import LocalFarm  # noqa: E402
from farm.settings import FarmSettings  # noqa: E402
from farm.storage import open_store  # noqa: E402

PROMPT = "a red house"


# --------------------------------------------------------------------------- direct side


def child(pairs_file: str, freeze: bool) -> None:
    """One direct process: load the pipeline, then per command line `<batch> <seed0> <i,j,..>`
    render those jobs in calls of `batch` and answer the seconds it took. With `freeze`, the
    garbage collector is kept off what was loaded, as a worker does (`gc.freeze`), so that
    the two sides differ only by the farm (in one process it made no measurable difference:
    1.404 s against 1.400 s a call of 4 jobs)."""
    import torch
    from PIL import Image

    from workers.builtin.tiny import build_tiny

    torch.set_num_threads(1)
    pipe = build_tiny("tiny-inpaint")
    pipe.set_progress_bar_config(disable=True)
    pairs = json.loads(Path(pairs_file).read_text())
    loaded = [
        (Image.open(img).convert("RGB"), Image.open(mask).convert("L")) for img, mask in pairs
    ]
    if freeze:  # what a worker does after its preloads (`workers.worker._serve`)
        gc.collect()
        gc.freeze()
    print("ready", flush=True)
    for line in sys.stdin:
        batch_s, seed_s, steps_s, which = line.split()
        batch, seed0, steps = int(batch_s), int(seed_s), int(steps_s)
        idx = [int(i) for i in which.split(",") if i]
        t0 = time.perf_counter()
        for start in range(0, len(idx), batch):
            part = idx[start : start + batch]
            image, mask = loaded[part[0]]
            pipe(
                prompt=[PROMPT] * len(part),
                image=[loaded[i][0] for i in part],
                mask_image=[loaded[i][1] for i in part],
                num_inference_steps=steps,
                height=image.height,
                width=image.width,
                generator=[torch.Generator("cpu").manual_seed(seed0 + i) for i in part],
            )
        print(f"{time.perf_counter() - t0:.6f}", flush=True)


class Direct:
    """`n` direct processes, each in its own session, fed commands on stdin."""

    def __init__(
        self, n: int, pairs: list[tuple[Path, Path]], tmp: Path, freeze: bool = True
    ) -> None:
        listing = tmp / "pairs.json"
        listing.write_text(json.dumps([[str(a), str(b)] for a, b in pairs]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--child", str(listing)]
                + ([] if freeze else ["--no-freeze"]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                start_new_session=True,
            )
            for _ in range(n)
        ]
        for p in self.procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def run(self, jobs: int, batch: int, seed0: int, steps: int) -> float:
        """Images/s of all processes together, each taking every n-th job."""
        n = len(self.procs)
        t0 = time.perf_counter()
        for k, p in enumerate(self.procs):
            share = ",".join(str(i) for i in range(k, jobs, n))
            assert p.stdin is not None
            p.stdin.write(f"{batch} {seed0} {steps} {share}\n")
            p.stdin.flush()
        for p in self.procs:
            assert p.stdout is not None
            float(p.stdout.readline())
        return jobs / (time.perf_counter() - t0)

    def close(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(30)


# --------------------------------------------------------------------------- farm side


def specs(pairs, steps: int, seed0: int) -> list[Inpaint]:
    return [
        Inpaint(
            model="tiny-inpaint",
            prompt=PROMPT,
            image=str(img),
            mask_image=str(mask),
            seed=seed0 + i,
            num_inference_steps=steps,
        )
        for i, (img, mask) in enumerate(pairs)
    ]


def run_farm(farm: Farm, jobs: list[Inpaint]) -> tuple[float, float]:
    """(images/s, the render threads' idle fraction) of one round."""
    t0 = time.perf_counter()
    handles = farm.submit_many(jobs)
    records = farm.wait([h.id for h in handles], timeout=3600)
    elapsed = time.perf_counter() - t0
    assert all(r.state.value == "succeeded" for r in records), [r.error for r in records]
    return len(jobs) / elapsed, idle_fraction(farm, records)


def idle_fraction(farm: Farm, records) -> float:
    """Per worker: 1 - (seconds in pipeline calls) / (first claim → last end); the mean."""
    store = open_store(farm.settings)
    spans: dict[str, list[float]] = collections.defaultdict(list)
    rendered: dict[str, dict[tuple[str, ...], float]] = collections.defaultdict(dict)
    for r in records:
        meta = json.loads(store.get_uri(r.meta))
        spans[r.worker] += [r.started_at, r.finished_at]
        rendered[r.worker][tuple(meta["batch"]["jobs"])] = meta["timings"]["render_s"]
    fractions = []
    for worker, times in spans.items():
        wall = max(times) - min(times)
        fractions.append(max(0.0, 1 - sum(rendered[worker].values()) / wall))
    return statistics.mean(fractions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the direct processes' garbage collector as Python starts it",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, not args.no_freeze)

    batches = sorted({1, args.max_batch})
    with tempfile.TemporaryDirectory() as tmp_s, RedisServer(Path(tmp_s) / "redis") as redis:
        tmp = Path(tmp_s)
        pairs = write_samples(tmp / "in", args.jobs, args.size)

        def farm_settings(b: int) -> FarmSettings:
            return FarmSettings(
                redis_url=redis.url,
                home=tmp / f"b{b}",
                key_prefix=f"b{b}{uuid.uuid4().hex[:6]}:",
                max_batch=b,
            )

        direct = Direct(args.workers, pairs, tmp, freeze=not args.no_freeze)
        farms = {
            b: LocalFarm(
                farm_settings(b), workers=args.workers, threads=1, preload=["tiny-inpaint"]
            )
            for b in batches
        }
        clients = {}
        try:
            for b, lf in farms.items():
                lf.start()
                clients[b] = Farm(lf.settings)
                run_farm(clients[b], specs(pairs[: 2 * args.workers], args.steps, 99))  # warm
            for b in batches:
                direct.run(2 * args.workers, b, 99, args.steps)
            ratios: dict[int, list[float]] = {b: [] for b in batches}
            idles: dict[int, list[float]] = {b: [] for b in batches}
            same: dict[int, list[float]] = {b: [] for b in batches}  # farm / direct at b
            for r in range(args.rounds):
                sides = [("direct", b) for b in batches] + [("farm", b) for b in batches]
                if r % 2:
                    sides.reverse()
                rates: dict[tuple[str, int], float] = {}
                for side, b in sides:
                    seed0 = r * 1000
                    if side == "direct":
                        rates[side, b] = direct.run(args.jobs, b, seed0, args.steps)
                    else:
                        rates[side, b], idle = run_farm(clients[b], specs(pairs, args.steps, seed0))
                        idles[b].append(idle)
                ceiling = max(rates["direct", b] for b in batches)
                for b in batches:
                    ratios[b].append(rates["farm", b] / ceiling)
                    same[b].append(rates["farm", b] / rates["direct", b])
                print(
                    f"round {r}: "
                    + "  ".join(f"{s} b={b} {v:.2f} img/s" for (s, b), v in sorted(rates.items()))
                    + "  farm/ceiling "
                    + " ".join(f"b={b} {ratios[b][-1]:.3f}" for b in batches)
                    + "  idle "
                    + " ".join(f"b={b} {idles[b][-1]:.1%}" for b in batches),
                    flush=True,
                )
        finally:
            for c in clients.values():
                c.close()
            for lf in farms.values():
                lf.stop()
            direct.close()
    print(
        f"{args.jobs} inpaint jobs, {args.size}x{args.size}, {args.steps} steps, "
        f"{args.workers} processes a side, 1 torch thread each, {args.rounds} alternating rounds:"
    )
    for b in batches:
        rs, ids, ss = ratios[b], idles[b], same[b]
        print(
            f"  FARM_MAX_BATCH={b}: farm/ceiling median {statistics.median(rs):.3f} "
            f"(rounds {min(rs):.3f}-{max(rs):.3f}; target >= 0.99), farm/direct at the same "
            f"batch size {statistics.median(ss):.3f} ({min(ss):.3f}-{max(ss):.3f}); render thread idle "
            f"median {statistics.median(ids):.1%} ({min(ids):.1%}-{max(ids):.1%}; target <= 1%)"
        )


if __name__ == "__main__":
    main()
