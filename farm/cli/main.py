"""The `farm` command.

Exit codes (`farm.errors`): 0 done; 1 a job failed, or a check did; 2 invalid input (one line
naming the field and the value, and nothing written); 3 Redis or storage could not be reached
(one line saying which, and what was being done); 130 interrupted. Every failure is one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from farm.cli import batch as cli_batch
from farm.cli import finetune as cli_finetune
from farm.cli import models as cli_models
from farm.cli import workers as cli_workers
from farm.cli.flags import SUBMIT_FLAGS, add_flags, given
from farm.cli.handoff import hand_off
from farm.cli.progress import JobsBar, TrainingBar
from farm.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_UNAVAILABLE,
    FarmError,
    InvalidJob,
    TransientError,
)
from farm.inputs.loras import parse_lora_flag
from farm.jobs.masks import parse_generator
from farm.jobs.record import JobRecord
from farm.local.up import LOCAL_QUEUES
from farm.settings import FarmSettings


def parser() -> argparse.ArgumentParser:
    """The `farm` command's parser (the heavy side's `python -m workers` parses with it too)."""
    p = argparse.ArgumentParser(prog="farm", description="A render farm for diffusion models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run an embedded farm in the foreground (Ctrl-C stops it)")
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    up.add_argument("--threads", type=int, help="torch threads per worker")
    up.add_argument(
        "--queues", default=LOCAL_QUEUES, help=f"queues the workers serve (default {LOCAL_QUEUES})"
    )
    up.add_argument("--gpus", help="all, or GPU indices 0,1,3: one worker per GPU")

    w = sub.add_parser("worker", help="serve jobs on one device")
    w.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    w.add_argument(
        "--queues", default=None, help="comma-separated queues: render, finetune (default render)"
    )
    w.add_argument("--threads", type=int, help="torch threads (default: all cores on cpu)")
    w.add_argument("--name", help="worker name (default DEVICE@HOST)")
    w.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="REF",
        help="load this model before taking jobs (repeatable)",
    )
    w.add_argument("--gpus", help="all, or GPU indices 0,1,3: one worker process per GPU")
    w.add_argument("--workers", type=int, help="N worker processes on --device (1 thread each)")

    s = sub.add_parser("submit", help="submit one job")
    s.add_argument("kind", choices=["txt2img", "img2img", "inpaint", "style", "finetune"])
    s.add_argument(
        "--model", required=True, help="tiny, tiny-inpaint, org/name, folder, .safetensors"
    )
    add_flags(s, SUBMIT_FLAGS)
    s.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="REF[:SCALE]",
        help="LoRA adapter (repeatable): job:<finetune id>, s3:// or file:// URI, or a local "
        ".safetensors path; SCALE defaults to 1",
    )
    s.add_argument("--wait", action="store_true", help="wait; exit 1 unless it succeeds")
    s.add_argument("--timeout", type=float, help="with --wait: give up after S seconds")
    s.add_argument("--json", action="store_true", help="print the job record as JSON")
    cli_finetune.add_arguments(s)

    st = sub.add_parser("status", help="show a job's record")
    st.add_argument("job")
    st.add_argument("--json", action="store_true")

    wt = sub.add_parser("wait", help="wait for jobs to end (exit 1 unless all succeed)")
    wt.add_argument("jobs", nargs="+", metavar="JOB")
    wt.add_argument("--timeout", type=float)

    f = sub.add_parser("fetch", help="download a job's outputs, mask and meta.json")
    f.add_argument("job")
    f.add_argument("dir", type=Path)

    c = sub.add_parser("cancel", help="cancel a job (queued: at once; running: within a step)")
    c.add_argument("job")

    d = sub.add_parser("demo", help="inpaint a few sample images on an embedded farm")
    d.add_argument("--out", type=Path, default=Path("demo-out"))
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--images", type=int, default=4)
    d.add_argument("--variations", type=int, default=2)

    db = sub.add_parser("dashboard", help="serve a read-only web page: queues, workers, jobs")
    db.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    db.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free)")

    cli_batch.add_parser(sub)
    cli_models.add_parser(sub)
    cli_workers.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # what cannot be printed as it is, escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    return guarded(COMMANDS[args.command], args)


def guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one command; every failure is one line on stderr and an exit status, never a
    traceback (`farm.errors` defines the statuses)."""
    try:
        return command(args)
    except InvalidJob as e:
        print(f"farm: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    except TransientError as e:
        print(f"farm: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (FarmError, OSError) as e:
        print(f"farm: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: still one line, the traceback only when asked for
        if os.environ.get("FARM_DEBUG"):
            raise
        print(
            f"farm: internal error: {type(e).__name__}: {e} (FARM_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _farm() -> Any:
    from farm.client import Farm

    return Farm()


def _print_record(rec: JobRecord, as_json: bool) -> None:
    if as_json:
        try:
            print(rec.model_dump_json(indent=2))
        except ValueError:  # text that is not UTF-8 (a record an older client wrote): escaped
            print(json.dumps(rec.model_dump(mode="json"), indent=2))
        return
    p = rec.progress
    line = f"{rec.id}  {rec.kind}  {rec.state.value}"
    if rec.state.value == "running" and p.total:
        line += f"  step {p.step}/{p.total}"
    if p.loss is not None:
        line += f"  loss {p.loss:.4f}"
    if rec.state.value == "waiting":
        line += "  for " + ", ".join(f"job:{job_id}" for job_id in rec.depends_on)
    if rec.error:
        line += f"  error: {rec.error}"
    print(line)
    for uri in rec.outputs:
        print(f"  {uri}")


def cmd_submit(args: argparse.Namespace) -> int:
    if args.kind == "finetune":
        return cli_finetune.submit(args, _farm(), _print_record)
    cli_finetune.refuse_flags(args)
    spec: dict[str, Any] = {"kind": args.kind, "model": args.model, **given(args, SUBMIT_FLAGS)}
    if args.mask is not None:
        spec["mask_image"] = parse_generator(args.mask, "mask_image") or args.mask
    if args.lora:
        spec["loras"] = [parse_lora_flag(text) for text in args.lora]
    farm = _farm()
    job = farm.submit(spec)
    if args.wait:
        bar = JobsBar(sys.stderr)
        rec = farm.wait(
            [job.id], timeout=args.timeout, on_progress=bar, on_unavailable=bar.unavailable
        )[0]
    else:
        rec = farm.get(job.id)
    if args.json:
        _print_record(rec, True)
    else:
        print(job.id) if not args.wait else _print_record(rec, False)
    return 0 if not args.wait or rec.state.value == "succeeded" else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    _print_record(_farm().get(args.job), args.json)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    farm = _farm()
    bar: Any = JobsBar(sys.stderr)
    first = farm.patience(bar.unavailable).run(farm.get, args.jobs[0])  # JobNotFound: exit 1
    if len(args.jobs) == 1 and first.kind == "finetune":  # steps and loss
        bar = TrainingBar(sys.stderr, lambda job_id: farm.get(job_id).progress.loss)
    records = farm.wait(
        args.jobs, timeout=args.timeout, on_progress=bar, on_unavailable=bar.unavailable
    )
    for rec in records:
        _print_record(rec, False)
    return 0 if all(r.state.value == "succeeded" for r in records) else EXIT_FAILED


def cmd_fetch(args: argparse.Namespace) -> int:
    for path in _farm().download(args.job, args.dir):
        print(path)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    state = _farm().cancel(args.job)
    print(f"{args.job}: {'cancelling' if state.value == 'running' else state.value}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if args.gpus or args.workers:
        return cli_workers.run_many(args)
    return hand_off(args.argv)


def cmd_up(args: argparse.Namespace) -> int:
    import signal

    from farm.local.up import LocalFarm

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops `farm up` the way Ctrl-C does

    from farm.local.launcher import parse_gpus

    settings = FarmSettings()
    gpus = parse_gpus(args.gpus) if args.gpus else None
    signal.signal(signal.SIGTERM, interrupt)
    with LocalFarm(
        settings,
        workers=args.workers,
        device=args.device,
        threads=args.threads,
        write_state=True,
        queues=args.queues,
        gpus=gpus,
        metrics_port=settings.metrics_port,
    ) as lf:
        print(f"farm up: redis {lf.settings.redis_url}", flush=True)
        print(f"farm up: storage {lf.settings.storage_url()}", flush=True)
        where = f"GPUs {','.join(map(str, gpus))}" if gpus else f"{args.workers} on {args.device}"
        print(f"farm up: worker(s): {where}; logs in {lf.log_dir}", flush=True)
        print("farm up: submit from another terminal (`farm submit ...`); Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("farm up: stopping", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from farm.cli.demo import run_demo

    return run_demo(
        args.out, workers=args.workers, n_images=args.images, variations=args.variations
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    from farm.dashboard.data import DashboardData
    from farm.dashboard.server import serve

    with _farm() as farm:
        serve(DashboardData(farm), args.host, args.port)
    return 0


COMMANDS = {
    "up": cmd_up,
    "worker": cmd_worker,
    "submit": cmd_submit,
    "status": cmd_status,
    "wait": cmd_wait,
    "fetch": cmd_fetch,
    "cancel": cmd_cancel,
    "models": cli_models.run,
    "demo": cmd_demo,
    "batch": cli_batch.run,
    "dashboard": cmd_dashboard,
    "workers": cli_workers.run,
}
