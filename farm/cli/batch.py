"""`farm batch ...`: manifests in, datasets out.

    farm batch submit MANIFEST --name NAME [--kind K] [--model REF] [--variations K] [--seed S]
                      [--prompt P | --prompt-template T] [--mask box|strokes|full|PATH]
                      [--steps N] [...job flags] [--set FIELD=VALUE]... [--defaults FILE]
    farm batch status NAME [--watch] [--json]
    farm batch wait NAME [--timeout S]           exit 0 only if every job succeeded
    farm batch retry NAME [--cancelled]          failed (and cancelled) slots get new jobs
    farm batch cancel NAME
    farm batch list
    farm batch fetch NAME DIR                    an imagefolder dataset (farm.dataset)
    farm batch sheet NAME OUT.png [--rows 16]    a contact sheet

A bad manifest prints one line per bad row (`file:line: field: what`) and exits 2 having
written nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from farm.cli.flags import BATCH_FLAGS, add_flags, given
from farm.cli.progress import LiveLine
from farm.errors import EXIT_FAILED, EXIT_INVALID, InvalidJob


def add_parser(sub: Any) -> None:
    """Register `farm batch` and its actions on the main parser's subcommands."""
    b = sub.add_parser("batch", help="submit a manifest as a batch; follow it; fetch a dataset")
    bsub = b.add_subparsers(dest="batch_command", required=True, metavar="ACTION")

    s = bsub.add_parser("submit", help="submit every row x variation not submitted before")
    s.add_argument("manifest", type=Path, help="a .jsonl or .csv manifest")
    s.add_argument("--name", required=True, help="the batch's name (re-use it to resume)")
    s.add_argument("--kind", choices=["inpaint", "img2img", "txt2img"])
    s.add_argument("--model", help="tiny, tiny-inpaint, org/name, folder, .safetensors")
    s.add_argument("--variations", type=int, help="jobs per row (default 1)")
    s.add_argument("--seed", type=int, help="every job's seed derives from it (default 0)")
    s.add_argument("--prompt-template", help='filled from each row: "a photo of a {label}"')
    add_flags(
        s,
        BATCH_FLAGS,
        mask="mask for rows without one: box, strokes, full (with parameters) or a path",
        prompt="the prompt of rows without one",
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other job field for every row (JSON value, else text); repeatable",
    )
    s.add_argument("--defaults", type=Path, help="a JSON object of defaults (under the flags)")
    s.add_argument("--chunk-size", type=int, default=1000, help="jobs written per chunk")

    st = bsub.add_parser("status", help="counts per state, images/s, ETA")
    st.add_argument("name")
    st.add_argument("--watch", action="store_true", help="follow until nothing is pending")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    st.add_argument("--json", action="store_true")

    w = bsub.add_parser("wait", help="wait for the batch (exit 0 only if all succeeded)")
    w.add_argument("name")
    w.add_argument("--timeout", type=float)

    r = bsub.add_parser("retry", help="give failed jobs a new attempt (new jobs, same specs)")
    r.add_argument("name")
    r.add_argument("--cancelled", action="store_true", help="retry cancelled jobs too")

    c = bsub.add_parser("cancel", help="cancel every queued and running job of the batch")
    c.add_argument("name")

    bsub.add_parser("list", help="every batch, with its counts")

    f = bsub.add_parser("fetch", help="write the results as an imagefolder dataset")
    f.add_argument("name")
    f.add_argument("dir", type=Path)

    sh = bsub.add_parser("sheet", help="a contact sheet: source | mask | outputs per row")
    sh.add_argument("name")
    sh.add_argument("out", type=Path)
    sh.add_argument("--rows", type=int, default=16)
    sh.add_argument("--cell", type=int, default=128, help="pixels per cell")


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.batch_command](args)


def _farm() -> Any:
    from farm.client import Farm

    return Farm()


def _batch(name: str) -> Any:
    from farm.batches.batch import Batch

    return Batch(_farm(), name)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.defaults:
        try:
            out = json.loads(args.defaults.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidJob(f"--defaults: cannot read {str(args.defaults)!r} ({e})") from None
        if not isinstance(out, dict):
            raise InvalidJob("--defaults: the file must hold one JSON object", field="defaults")
    for item in args.set:
        field, eq, text = item.partition("=")
        if not eq or not field.strip():
            raise InvalidJob(f"--set: expected FIELD=VALUE, got {item!r}", field="set")
        out[field.strip()] = _value(text)
    for flag in ("kind", "model", "prompt_template"):
        if getattr(args, flag) is not None:
            out[flag] = getattr(args, flag)
    out.update(given(args, BATCH_FLAGS))
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    from farm.batches.manifest import InvalidManifest
    from farm.batches.submit import submit_batch

    farm = _farm()
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            sys.stderr.write(f"\rsubmitting: {done}/{total} jobs")
            sys.stderr.write("\n" if done == total else "")
            sys.stderr.flush()

    try:
        result = submit_batch(
            farm,
            args.manifest,
            args.name,
            defaults=_defaults(args),
            variations=args.variations,
            seed=args.seed,
            chunk_size=max(1, args.chunk_size),
            on_chunk=progress,
        )
    except InvalidManifest as e:
        for line in e.lines():
            print(f"farm: error: {line}", file=sys.stderr)
        return EXIT_INVALID
    print(result.line())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    batch = _batch(args.name)
    if not args.watch:
        status = batch.status()
        if args.json:
            print(json.dumps({**vars(status), "pending": status.pending}, indent=2))
        else:
            meta = batch.meta()
            print(
                f"batch {args.name}: {meta['rows']} rows x {meta['variations']}, {meta['manifest']}"
            )
            print(status.line())
        return 0
    display = LiveLine(sys.stderr if sys.stderr.isatty() else sys.stdout)
    patience = batch.farm.patience(display.unavailable)
    while True:
        status = patience.run(batch.status)
        display.show(status.line())
        if status.settled:
            display.end()
            return 0
        time.sleep(max(0.1, args.interval))


def cmd_wait(args: argparse.Namespace) -> int:
    display = LiveLine(sys.stderr, only_tty=True)
    status = _batch(args.name).wait(
        args.timeout,
        on_status=lambda st: display.show(st.line()),
        on_unavailable=display.unavailable,
    )
    display.end()
    print(status.line())
    if status.counts.get("unsubmitted"):
        print(
            f"farm: {status.counts['unsubmitted']} jobs were never submitted: run "
            "`farm batch submit` again",
            file=sys.stderr,
        )
    return 0 if status.all_succeeded else EXIT_FAILED


def cmd_retry(args: argparse.Namespace) -> int:
    ids = _batch(args.name).retry(cancelled=args.cancelled)
    print(f"batch {args.name}: {len(ids)} jobs re-queued as new attempts")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    n = _batch(args.name).cancel()
    print(f"batch {args.name}: {n} jobs cancelled or cancelling")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from farm.batches.batch import Batch, list_batches

    farm = _farm()
    for name, meta in list_batches(farm):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(meta.get("created_at", 0)))
        status = Batch(farm, name).status()
        counts = " ".join(f"{s}={n}" for s, n in sorted(status.counts.items()) if n)
        print(f"{name}  {when}  {meta['rows']} rows x {meta['variations']}  {counts}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from farm.batches.dataset import fetch_dataset

    r = fetch_dataset(_batch(args.name), args.dir)
    print(
        f"batch {args.name}: {r.images} images in {args.dir} ({r.downloaded} files fetched, "
        f"{r.skipped} already there); {r.not_succeeded} jobs not succeeded"
    )
    return 0


def cmd_sheet(args: argparse.Namespace) -> int:
    from farm.batches.dataset import contact_sheet

    n = contact_sheet(_batch(args.name), args.out, rows=max(1, args.rows), cell=args.cell)
    print(f"{args.out}: {n} rows")
    return 0


ACTIONS = {
    "submit": cmd_submit,
    "status": cmd_status,
    "wait": cmd_wait,
    "retry": cmd_retry,
    "cancel": cmd_cancel,
    "list": cmd_list,
    "fetch": cmd_fetch,
    "sheet": cmd_sheet,
}
