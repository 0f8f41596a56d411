"""`farm workers` (who is serving, on what, holding which models) and `farm worker --gpus /
--workers` (many workers from one command, through `farm.local.launcher.Supervisor`).

    $ farm workers
    NAME          STATE    DEVICE  MODELS        JOB           DONE  HEARTBEAT
    cpu0@box      online   cpu     tiny          -             12    1s ago
    cuda1@gpu7    offline  cuda:0  sd15-inpaint  9f1c…         340   2m ago
    waiting: finetune 0  render 3  render.tiny 0
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from farm.cli.text import ago, columns
from farm.state.registry import WorkerInfo


def add_parser(sub: Any) -> None:
    w = sub.add_parser("workers", help="list the farm's workers: device, warm models, job")
    w.add_argument("--json", action="store_true", help="one JSON object per worker, a list")


def table(workers: list[WorkerInfo], now: float) -> str:
    head = ("NAME", "STATE", "DEVICE", "MODELS", "JOB", "DONE", "HEARTBEAT")
    rows = [head] + [
        (
            w.name,
            ("online" if w.ready else "starting") if w.online(now) else "offline",
            w.device,
            ",".join(w.models) or "-",
            w.job or "-",
            str(w.jobs_done),
            ago(now - w.heartbeat),
        )
        for w in workers
    ]
    return columns(rows)


def run(args: argparse.Namespace) -> int:
    from farm.client import Farm
    from farm.queue.routing import FINETUNE_QUEUE, RENDER_QUEUE

    with Farm() as farm:
        workers = farm.tracker.workers.read(starting=True)
        now = time.time()
        queues = {RENDER_QUEUE, FINETUNE_QUEUE} | {
            q for w in workers if w.online(now) for q in w.queues
        }
        depths = farm.tracker.queue_depths(queues)
    if args.json:
        print(
            json.dumps(
                [w.model_dump(mode="json") | {"online": w.online(now)} for w in workers], indent=2
            )
        )
        return 0
    print(table(workers, now) if workers else "no workers")
    print("waiting: " + "  ".join(f"{q} {n}" for q, n in depths.items()))
    return 0


def run_many(args: argparse.Namespace) -> int:
    """`farm worker --gpus ...` or `--workers N`: supervise the children until stopped."""
    from farm.local.launcher import Supervisor, parse_gpus, plan
    from farm.settings import FarmSettings, resolve_settings, settings_env
    from farm.state.tracker import require_noeviction

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gpus = parse_gpus(args.gpus) if args.gpus else None
    settings = resolve_settings(FarmSettings())
    require_noeviction(settings)
    children = plan(
        gpus=gpus,
        workers=args.workers or 1,
        device=args.device,
        threads=args.threads,
        queues=args.queues,
        preload=args.preload,
        metrics_port=settings.metrics_port,
    )
    Supervisor(children, settings_env(settings)).run()
    return 0
