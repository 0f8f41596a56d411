"""Soak: tiny jobs through 2 workers while a random worker is SIGKILLed every few seconds.

    python bench/soak.py [--jobs 500] [--kill-every 5] [--steps 2]

Real Redis (AOF), S3 from a moto server with versioning on, workers restarted when they
die, the reconciler handing back what they held. Prints the checker's lost / duplicated /
unexpected (target 0 / 0 / 0) and jobs/s.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "soak")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "soak")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from farm import Farm, Txt2Img  # noqa: E402
from farm.local.embedded import RedisServer
from farm.local.up import LocalFarm
from farm.settings import FarmSettings  # noqa: E402
from farm.storage.s3 import S3Store
from tests.support.checker import check, enable_versioning
from tests.support.s3_server import S3Server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--kill-every", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with (
        tempfile.TemporaryDirectory() as tmp,
        S3Server() as s3,
        RedisServer(Path(tmp) / "redis", appendonly=True) as redis,
    ):
        bucket = f"soak-{uuid.uuid4().hex[:12]}"
        store = S3Store(bucket, "farm/", endpoint_url=s3.endpoint_url, region="us-east-1")
        store.ensure_bucket()
        enable_versioning(store)
        settings = FarmSettings(
            redis_url=redis.url,
            storage=f"s3://{bucket}/farm",
            s3_endpoint_url=s3.endpoint_url,
            s3_region="us-east-1",
            home=Path(tmp),
            lease_seconds=2.0,
            reconcile_interval=0.5,
            requeue_after=30,
            max_deliveries=20,
        )
        with (
            LocalFarm(settings, workers=2, threads=1, preload=["tiny"]) as lf,
            Farm(lf.settings) as farm,
        ):
            t0 = time.monotonic()
            jobs = farm.submit_many(
                Txt2Img(model="tiny", prompt=f"soak {i}", seed=i, num_inference_steps=args.steps)
                for i in range(args.jobs)
            )
            ids = [j.id for j in jobs]
            kills, next_kill = 0, time.monotonic() + args.kill_every
            while True:
                states = farm.tracker.states(ids)
                done = sum(s in ("succeeded", "failed", "cancelled") for s, _, _ in states)
                if done == len(ids):
                    break
                if time.monotonic() >= next_kill:
                    victim = rng.randrange(len(lf.procs))
                    if lf.procs[victim].poll() is None:
                        lf.procs[victim].kill()
                        kills += 1
                    next_kill += args.kill_every
                print(f"\r{done}/{len(ids)} done, {kills} workers killed", end="", flush=True)
                time.sleep(0.2)
            elapsed = time.monotonic() - t0
            records = farm.tracker.get_many(ids)
        verdict = check(store, {j: 1 for j in ids})
        failed = [r.id for r in records if r is None or r.state.value != "succeeded"]
    print()
    print(
        f"{args.jobs} jobs, 2 workers, a worker SIGKILLed every {args.kill_every:g} s "
        f"({kills} kills): lost {len(verdict.lost)} / duplicated {len(verdict.duplicated)} / "
        f"unexpected {len(verdict.unexpected)}; failed {len(failed)}; "
        f"{args.jobs / elapsed:.1f} jobs/s"
    )


if __name__ == "__main__":
    main()
