"""A million-job backlog: what it costs Redis, the reconciler and `farm batch status`.

    python bench/backlog.py [--batches 5] [--jobs-per-batch 200000] [--rounds 50]

A private Redis (`farm.local.embedded.RedisServer`, no persistence) and a local storage folder;
`--batches` batches of `--jobs-per-batch` txt2img jobs each (1,000 rows × variations), written
by `submit_batch` exactly as `farm batch submit` writes them (records, messages, the batch
index, the counters), with no worker, so every job stays queued. Then, each figure printed
with its target:

1. Redis memory per job: `used_memory` after the submits minus before, over the jobs.
2. Reconciler pass time: a pass with nothing overdue (reads the running and waiting jobs and a
   sweep chunk, never the backlog), and three passes with every job overdue
   (`requeue_after=0`, the clock moved on), each of which audits every message in the broker
   (in life an audit comes once per `FARM_REQUEUE_AFTER`, 10 minutes): wall time, and the
   Redis server's own CPU time (this machine is shared: the second is the steadier figure).
3. Messages per queued job after those three passes (the lists and kombu's unacked hash).
4. `Batch.status()` of one batch: the median of `--rounds` calls, side by side with reading
   its every slot and record (what status did before the counters: three rounds), and the
   ratio; and the dashboard's overview (every batch's status, queues, recent jobs).

It takes minutes at the default size (the submits dominate) and about 3.5 GB of Redis memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.dashboard.data import DashboardData  # noqa: E402

from farm.batches.batch import Batch  # noqa: E402
from farm.batches.submit import submit_batch  # noqa: E402
from farm.client import Farm  # noqa: E402
from farm.local.embedded import RedisServer  # noqa: E402
from farm.settings import FarmSettings  # noqa: E402
from farm.state.reconciler import reconcile  # noqa: E402
from tests.support.raw import raw  # noqa: E402

ROWS = 1000


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def messages(farm: Farm) -> int:
    r = raw(farm)
    keys = r.keys(f"{farm.settings.key_prefix}celery:render*")
    return sum(r.llen(k) for k in keys) + r.hlen(farm.tracker.keys.broker_unacked)


def redis_cpu(r) -> float:
    """Seconds of CPU the Redis server has used (user + system)."""
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def line(what: str, value: str, target: str, ok: bool) -> None:
    print(f"{what:<52} {value:>16}   target {target:<14} {'ok' if ok else 'MISSED'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--jobs-per-batch", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    variations = max(1, args.jobs_per_batch // ROWS)
    with (
        tempfile.TemporaryDirectory() as tmp_dir,
        RedisServer(Path(tmp_dir) / "redis", appendonly=False) as rs,
    ):
        tmp = Path(tmp_dir)
        settings = FarmSettings(redis_url=rs.url, storage=(tmp / "store").as_uri(), home=tmp)
        manifest = tmp / "rows.jsonl"
        manifest.write_text(
            "".join(json.dumps({"prompt": f"a photo of thing {i}"}) + "\n" for i in range(ROWS))
        )
        with Farm(settings) as farm:
            r = raw(farm)
            before = r.info("memory")["used_memory"]
            t0 = time.perf_counter()
            names = []
            for b in range(args.batches):
                name = f"backlog-{b}"
                res = submit_batch(
                    farm,
                    manifest,
                    name,
                    variations=variations,
                    defaults={"model": "tiny", "num_inference_steps": 20},
                )
                names.append(name)
                print(f"{res.line()}  ({(time.perf_counter() - t0):.0f}s in all)", flush=True)
            jobs = farm.tracker.counts()["queued"]
            per_job = (r.info("memory")["used_memory"] - before) / jobs
            print(
                f"\n{jobs:,} queued jobs in {args.batches} batches, {messages(farm):,} messages\n"
            )
            line("Redis memory per job", f"{per_job:,.0f} B", "< 4,096 B", per_job < 4096)

            now = time.time()
            quiet = timed(lambda: reconcile(farm.tracker, farm.celery, requeue_after=600), 5)
            q = statistics.median(quiet)
            line(
                "reconciler pass, nothing overdue (median of 5)",
                f"{q * 1000:.1f} ms",
                "< 100 ms",
                q < 0.1,
            )
            audits, cpus = [], []
            for i in range(3):
                c0, t = redis_cpu(r), time.perf_counter()
                report = reconcile(
                    farm.tracker, farm.celery, requeue_after=0, now=now + 60 * (i + 1)
                )
                audits.append(time.perf_counter() - t)
                cpus.append(redis_cpu(r) - c0)
                print(
                    f"  pass {i + 1}, every job overdue: {audits[-1]:.1f} s ({cpus[-1]:.1f} s "
                    f"of Redis CPU), {report.audited:,} messages audited, "
                    f"{len(report.requeued)} re-sent",
                    flush=True,
                )
            a, c = statistics.median(audits), statistics.median(cpus)
            line("reconciler pass, every job overdue (median of 3)", f"{a:.1f} s", "< 60 s", a < 60)
            line("  of it Redis CPU (once per FARM_REQUEUE_AFTER)", f"{c:.1f} s", "< 30 s", c < 30)
            ratio = messages(farm) / jobs
            line(
                "messages per queued job after three passes",
                f"{ratio:.3f}",
                "<= 1.05",
                ratio <= 1.05,
            )

            batch = Batch(farm, names[0])
            status = statistics.median(timed(batch.status, args.rounds))
            line(
                f"batch status, {batch.status().total:,} jobs (median of {args.rounds})",
                f"{status * 1000:.2f} ms",
                "< 50 ms",
                status < 0.05,
            )
            slots = statistics.median(timed(lambda: Counter(s.state for s in batch.slots()), 3))
            print(
                f"  reading every slot and record instead: {slots:.2f} s (median of 3), "
                f"{slots / status:,.0f}x the counters",
                flush=True,
            )
            data = DashboardData(farm)
            overview = statistics.median(timed(data.overview, max(5, args.rounds // 5)))
            line(
                f"dashboard overview, {args.batches} batches (median)",
                f"{overview * 1000:.1f} ms",
                "< 100 ms",
                overview < 0.1,
            )


if __name__ == "__main__":
    main()
