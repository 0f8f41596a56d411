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

from farm import __version__
from farm.cli import batch as cli_batch
from farm.cli import finetune as cli_finetune
from farm.cli import jobs as cli_jobs
from farm.cli import models as cli_models
from farm.cli import tokens as cli_tokens
from farm.cli import workers as cli_workers
from farm.cli.flags import SUBMIT_FLAGS, add_flags, check_kind_flags, given
from farm.cli.handoff import hand_off
from farm.cli.parsing import FarmParser
from farm.cli.progress import JobsBar, TrainingBar
from farm.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_UNAVAILABLE,
    FarmError,
    FarmNotRunning,
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
    p = FarmParser(prog="farm", description="A render farm for diffusion models.")
    p.add_argument("--version", action="version", version=f"farm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run an embedded farm in the foreground (Ctrl-C stops it)")
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    up.add_argument("--threads", type=int, help="torch threads per worker")
    up.add_argument(
        "--queues", default=LOCAL_QUEUES, help=f"queues the workers serve (default {LOCAL_QUEUES})"
    )
    up.add_argument("--gpus", help="all, or GPU indices 0,1,3: one worker per GPU")
    up.add_argument(
        "--api-port", type=int, default=8000, help="the HTTP API's port (default 8000; busy: any)"
    )
    up.add_argument("--no-api", action="store_true", help="do not start the HTTP API")

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
    s.add_argument(
        "--wait",
        action="store_true",
        help="wait (the id is printed on stderr first); exit 1 unless it succeeds",
    )
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

    sv = sub.add_parser("serve", help="serve the HTTP API, the dashboard and webhooks")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    sv.add_argument("--no-webhooks", action="store_true", help="do not start the webhook sender")
    sv.add_argument("--access-log", action="store_true", help="log every request (paths only)")

    cli_jobs.add_parser(sub)
    cli_batch.add_parser(sub)
    cli_models.add_parser(sub)
    cli_tokens.add_parser(sub)
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


def _farm(*specs: dict[str, Any]) -> Any:
    """The farm the settings name, or the one `farm up` runs. With none to be found, the
    `specs` are checked first (`farm.submit.preflight`): bad input is reported as such,
    not hidden behind "no farm is running"."""
    from farm.client import Farm

    try:
        return Farm()
    except FarmNotRunning:
        if specs:
            from farm.submit import preflight

            preflight(FarmSettings(), specs)
        raise


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
    if rec.error and rec.state.value in ("failed", "cancelled"):
        line += f"  error: {rec.error}"  # a queued or running job's is a past attempt's
    print(line)
    for uri in rec.outputs:
        print(f"  {uri}")


def render_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The render spec `farm submit KIND ...` describes; a flag its kind does not take is
    refused by name (`--image` on txt2img), before the spec's own checks."""
    cli_finetune.refuse_flags(args)
    fields = given(args, SUBMIT_FLAGS)
    check_kind_flags(args.kind, fields)
    spec: dict[str, Any] = {"kind": args.kind, "model": args.model, **fields}
    if args.mask is not None:
        spec["mask_image"] = parse_generator(args.mask, "mask_image") or args.mask
    if args.lora:
        spec["loras"] = [parse_lora_flag(text) for text in args.lora]
    return spec


def cmd_submit(args: argparse.Namespace) -> int:
    spec = cli_finetune.spec_from_args(args) if args.kind == "finetune" else render_spec(args)
    farm = _farm(spec)
    job = farm.submit(spec)
    if not args.wait:
        rec = farm.get(job.id)
        _print_record(rec, True) if args.json else print(job.id)
        return 0
    # The id first, on stderr: a Ctrl-C while waiting stops the waiting, never loses the job
    # (inside the `try`: a Ctrl-C the moment the line is out still says how to wait again).
    try:
        print(
            f"farm: submitted job {job.id}; waiting (Ctrl-C stops waiting, not the job)",
            file=sys.stderr,
            flush=True,
        )
        rec = _wait_one(farm, job.id, args.timeout, spec)
    except KeyboardInterrupt:
        print(
            f"farm: stopped waiting; job {job.id} goes on (`farm wait {job.id}`)", file=sys.stderr
        )
        raise
    _print_record(rec, args.json)
    return 0 if rec.state.value == "succeeded" else EXIT_FAILED


def _wait_one(farm: Any, job_id: str, timeout: float | None, spec: dict[str, Any]) -> JobRecord:
    """Wait for one job with a bar on a terminal: steps and loss (and its total from the
    start) for a fine-tune, the denoising steps for a render."""
    bar: Any = JobsBar(sys.stderr)
    if spec.get("kind") == "finetune":
        bar = TrainingBar(
            sys.stderr, lambda i: farm.get(i).progress.loss, spec.get("max_train_steps")
        )
    records = farm.wait([job_id], timeout=timeout, on_progress=bar, on_unavailable=bar.unavailable)
    return records[0]


def cmd_status(args: argparse.Namespace) -> int:
    _print_record(_farm().get(args.job), args.json)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    farm = _farm()
    bar: Any = JobsBar(sys.stderr)
    first = farm.patience(bar.unavailable).run(farm.get, args.jobs[0])  # JobNotFound: exit 1
    if len(args.jobs) == 1 and first.kind == "finetune":  # steps and loss
        total = first.spec.get("max_train_steps")
        bar = TrainingBar(sys.stderr, lambda job_id: farm.get(job_id).progress.loss, total)
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
    """Cancel a job; one that has ended already is not cancelled, and says so (exit 1)."""
    farm = _farm()
    rec = farm.get(args.job)  # JobNotFound: exit 1
    if rec.state.terminal:
        print(
            f"farm: job {args.job}: already {rec.state.value}; nothing to cancel", file=sys.stderr
        )
        return EXIT_FAILED
    state = farm.cancel(args.job)
    if state.terminal and state.value != "cancelled":  # it ended between the two reads
        print(f"farm: job {args.job}: already {state.value}; nothing to cancel", file=sys.stderr)
        return EXIT_FAILED
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

    def patient(signum: int, frame: Any) -> None:
        print("farm up: still stopping: the workers are handing their jobs back", flush=True)

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
        api_port=None if args.no_api else _free_or_any(args.api_port),
    ) as lf:
        print(f"farm up: redis {lf.settings.redis_url}", flush=True)
        print(f"farm up: storage {lf.settings.storage_url()}", flush=True)
        where = f"GPUs {','.join(map(str, gpus))}" if gpus else f"{args.workers} on {args.device}"
        print(f"farm up: worker(s): {where}; logs in {lf.log_dir}", flush=True)
        if lf.api_url:
            print(
                f"farm up: api {lf.api_url} (dashboard at /; OpenAPI at /openapi.json)", flush=True
            )
            print(f"farm up: local admin token {lf.api_token}", flush=True)
        try:
            ready: set[str] = set()
            while True:
                if len(ready) < len(lf.worker_names):  # say when each worker takes jobs
                    for name in sorted(set(lf.ready_workers()) - ready):
                        print(f"farm up: worker {name} is ready", flush=True)
                        ready.add(name)
                    if len(ready) == len(lf.worker_names):
                        print(
                            "farm up: ready: submit from another terminal (`farm submit ...`); "
                            "Ctrl-C stops",
                            flush=True,
                        )
                time.sleep(0.5 if len(ready) < len(lf.worker_names) else 1)
        except KeyboardInterrupt:
            # The workers first (each hands its job back, which needs Redis), then Redis; a
            # second Ctrl-C must not cut that short.
            signal.signal(signal.SIGINT, patient)
            signal.signal(signal.SIGTERM, patient)
            print(
                "farm up: stopping: the workers hand their jobs back, then Redis stops", flush=True
            )
    print("farm up: stopped", flush=True)
    return 0


def _free_or_any(port: int) -> int:
    """`port` if nothing listens on it on loopback, else 0 (any free port)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def cmd_demo(args: argparse.Namespace) -> int:
    from farm.cli.demo import run_demo

    return run_demo(
        args.out, workers=args.workers, n_images=args.images, variations=args.variations
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    """The API's app, read-only, every tenant, no login: the operator's own page."""
    from farm.api.auth import OPERATOR
    from farm.api.server import serve

    serve(
        FarmSettings(api_url=None),
        args.host,
        args.port,
        anonymous=OPERATOR,
        webhooks=False,
        name="farm dashboard",
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from farm.api.server import serve

    serve(
        FarmSettings(api_url=None),
        args.host,
        args.port,
        webhooks=not args.no_webhooks,
        access_log=args.access_log,
    )
    return 0


COMMANDS = {
    "up": cmd_up,
    "worker": cmd_worker,
    "submit": cmd_submit,
    "jobs": cli_jobs.run,
    "status": cmd_status,
    "wait": cmd_wait,
    "fetch": cmd_fetch,
    "cancel": cmd_cancel,
    "models": cli_models.run,
    "demo": cmd_demo,
    "batch": cli_batch.run,
    "dashboard": cmd_dashboard,
    "serve": cmd_serve,
    "tokens": cli_tokens.run,
    "workers": cli_workers.run,
}
