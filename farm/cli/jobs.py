"""`farm jobs`: the farm's jobs, newest first, with why the failed ones failed.

    $ farm jobs --state failed --limit 5
    ID                                KIND     MODEL         STATE   AGE  ERROR
    0f3c9a6d2b1e4c5f8a7b6c5d4e3f2a1b  txt2img  org/missing   failed  2m   model: 'org/missing' is not …

Where the ids come from: ended jobs leave the live index (`farm:jobs`, pruned by the
reconciler), so the listing reads the events stream backwards (each job's latest state change
first; it keeps the last ~100,000 changes) and then the live index for jobs the stream no longer
mentions (`Tracker.job_ids_by_activity`); `--batch NAME` reads that batch's slots instead. The
records themselves stay for `FARM_RECORD_TTL` after a job ends; an older job is not listed.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from farm.cli.text import age, columns, first_line
from farm.jobs.record import JobRecord
from farm.jobs.state import JobState

DEFAULT_LIMIT = 20


def add_parser(sub: Any) -> None:
    j = sub.add_parser("jobs", help="list jobs, newest first, with the error of failed ones")
    j.add_argument("--state", choices=[s.value for s in JobState], help="only jobs in this state")
    j.add_argument("--batch", metavar="NAME", help="only this batch's (current) jobs")
    j.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help=f"at most N jobs (default {DEFAULT_LIMIT})"
    )
    j.add_argument("--json", action="store_true", help="the records, as a JSON list")


def run(args: argparse.Namespace) -> int:
    from farm.client import Farm

    with Farm() as farm:
        records = newest(farm, state=args.state, batch=args.batch, limit=max(1, args.limit))
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return 0
    if not records:
        print("no jobs" + (f" {args.state}" if args.state else ""))
        return 0
    print(table(records, time.time()))
    return 0


def newest(farm: Any, *, state: str | None, batch: str | None, limit: int) -> list[JobRecord]:
    """Up to `limit` records, newest first (by creation), of the jobs in `state` (any when
    None), of batch `batch` (all when None)."""
    if batch is not None:
        from farm.batches.batch import Batch

        chunks: Any = [Batch(farm, batch).job_ids()]
    else:
        chunks = farm.tracker.job_ids_by_activity()
    found: list[JobRecord] = []
    for ids in chunks:
        for start in range(0, len(ids), 1000):
            for rec in farm.tracker.get_many(ids[start : start + 1000]):
                if rec is not None and (state is None or rec.state.value == state):
                    found.append(rec)
        if batch is None and len(found) >= limit:
            break  # by latest activity: enough to pick the newest from
    found.sort(key=lambda r: r.created_at, reverse=True)
    return found[:limit]


def table(records: list[JobRecord], now: float) -> str:
    head = ("ID", "KIND", "MODEL", "STATE", "AGE", "ERROR")
    rows = [head] + [
        (
            r.id,
            r.kind,
            str(r.spec.get("model", "-")),
            r.state.value,
            age(now - r.created_at),
            first_line(r.error, 80) if r.state.value in ("failed", "cancelled") else "",
        )
        for r in records
    ]
    return columns(rows)
