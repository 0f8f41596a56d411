"""`farm batch ...`: manifests in, datasets out.

    farm batch submit MANIFEST --name NAME [--kind K] [--model REF] [--variations K] [--seed S]
                      [--prompt P | --prompt-template T] [--mask box|strokes|full|PATH]
                      [--steps N] [...job flags] [--set FIELD=VALUE]... [--defaults FILE]
    farm batch status NAME [--watch] [--failed] [--json]   counts; failed slots and why
    farm batch wait NAME [--timeout S]           exit 0 only if every job succeeded (else why)
    farm batch retry NAME [--cancelled] [--force]   failed (and cancelled) slots get new jobs
    farm batch cancel NAME
    farm batch list
    farm batch fetch NAME DIR                    an imagefolder dataset (farm.dataset)
    farm batch sheet NAME OUT.png [--rows 16]    a contact sheet

A bad manifest prints one line per bad row (`file:line: field: what`) and exits 2 having
written nothing, whether a farm is running or not (rows are checked before the farm is looked
for). Rows of kind inpaint keep the pixels outside their mask (`preserve_unmasked`), so a
dataset's labels stay valid; `--no-preserve-unmasked` gives diffusers' own pixels.
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
from farm.cli.text import first_line, plural
from farm.errors import EXIT_FAILED, EXIT_INVALID, FarmNotRunning, InvalidJob


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
        preserve_unmasked="inpaint rows: pixels outside the mask come back exactly as in the "
        "source, so labels stay valid (default on; --no-preserve-unmasked: diffusers' pixels)",
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
    s.add_argument(
        "--webhook",
        help="http(s) URL POSTed once when the batch has settled (every job ended), signed; "
        "`--set webhook=URL` names one per job instead",
    )

    st = bsub.add_parser("status", help="counts per state, images/s, ETA")
    st.add_argument("name")
    st.add_argument("--watch", action="store_true", help="follow until nothing is pending")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    st.add_argument(
        "--failed", action="store_true", help="list every failed slot (default: the first few)"
    )
    st.add_argument("--json", action="store_true")

    w = bsub.add_parser("wait", help="wait for the batch (exit 0 only if all succeeded)")
    w.add_argument("name")
    w.add_argument("--timeout", type=float)

    r = bsub.add_parser("retry", help="give failed jobs a new attempt (new jobs, same specs)")
    r.add_argument("name")
    r.add_argument("--cancelled", action="store_true", help="retry cancelled jobs too")
    r.add_argument(
        "--force",
        action="store_true",
        help="retry failures that cannot succeed as they are (invalid input) too",
    )

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

    try:
        farm = _checked_farm(args)
    except InvalidManifest as e:
        for line in e.lines():
            print(f"farm: error: {line}", file=sys.stderr)
        return EXIT_INVALID
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            sys.stderr.write(f"\rsubmitting: {done}/{plural(total, 'job')}")
            sys.stderr.write("\n" if done == total else "")
            sys.stderr.flush()

    tenants, before = farm.tracker.tenants, None
    if args.webhook is not None:  # checked before anything is written, as the API does
        from farm.api.webhooks import check_url
        from farm.jobs.specs import check_webhook

        try:
            check_url(check_webhook(args.webhook) or "", farm.settings.webhook_allow_private)
        except (InvalidJob, ValueError) as e:
            print(f"farm: error: --webhook: {e}", file=sys.stderr)
            return EXIT_INVALID
        # Set before the first job can end, so the batch's end is never missed
        before = tenants.batch_webhook(args.name)
        tenants.set_batch_webhook(args.name, args.webhook)
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
    except InvalidManifest as e:  # nothing of the batch written: nor its webhook
        if args.webhook is not None:
            tenants.set_batch_webhook(args.name, before)
        for line in e.lines():
            print(f"farm: error: {line}", file=sys.stderr)
        return EXIT_INVALID
    print(result.line())
    return 0


def _checked_farm(args: argparse.Namespace) -> Any:
    """The farm; with none running, the manifest is checked first, so a bad row is reported
    as such (`InvalidManifest`) rather than hidden behind "no farm is running"."""
    from farm.client import Farm

    try:
        return Farm()
    except FarmNotRunning:
        from farm.batches.submit import validate_manifest
        from farm.settings import FarmSettings
        from farm.submit import Offline

        validate_manifest(
            Offline(FarmSettings()),
            args.manifest,
            defaults=_defaults(args),
            variations=args.variations,
            seed=args.seed,
        )
        raise


SHOWN_FAILURES = 5
"""Failed slots `farm batch status` lists without `--failed`."""


def cmd_status(args: argparse.Namespace) -> int:
    batch = _batch(args.name)
    if not args.watch:
        status = batch.status()
        failures = batch.failures() if status.counts.get("failed") else []
        if args.json:
            shown = failures if args.failed else failures[:20]
            doc = {**vars(status), "pending": status.pending}
            doc["failures"] = [f.as_dict() for f in shown]
            doc["reasons"] = dict(_top(failures))
            print(json.dumps(doc, indent=2))
        else:
            meta = batch.meta()
            rows = plural(meta["rows"], "row")
            print(f"batch {args.name}: {rows} x {meta['variations']}, {meta['manifest']}")
            print(status.line())
            _print_failures(args.name, failures, everything=args.failed)
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


def _top(failures: list[Any]) -> list[tuple[str, int]]:
    from farm.batches.batch import top_reasons

    return top_reasons(failures)


def _print_failures(name: str, failures: list[Any], *, everything: bool) -> None:
    """The top reasons counted, then the failed slots (the first few, or all)."""
    if not failures:
        return
    print(f"{plural(len(failures), 'failed job')}; top reasons:")
    for reason, n in _top(failures):
        print(f"  {n:>5}  {first_line(reason)}")
    shown = failures if everything else failures[:SHOWN_FAILURES]
    for f in shown:
        where = f"row {f.row} variation {f.variation}" if f.row is not None else f"slot {f.slot}"
        kind = f" [{f.failure.value}]" if f.failure else ""
        print(f"  {f.job}  {where}{kind}: {first_line(f.error)}")
    if len(shown) < len(failures):
        print(f"  … {len(failures) - len(shown)} more: `farm batch status {name} --failed`")


def cmd_wait(args: argparse.Namespace) -> int:
    display = LiveLine(sys.stderr, only_tty=True)
    batch = _batch(args.name)
    status = batch.wait(
        args.timeout,
        on_status=lambda st: display.show(st.line()),
        on_unavailable=display.unavailable,
    )
    display.end()
    print(status.line())
    if status.all_succeeded:
        return 0
    # Why not: what did not succeed, the top reason, and where to read the rest.
    why = [
        plural(n, f"job {state}", f"jobs {state}")
        for state, n in sorted(status.counts.items())
        if n and state != "succeeded"
    ]
    line = f"farm: batch {args.name}: {', '.join(why)} of {status.total}"
    if status.counts.get("failed"):
        reason, n = _top(batch.failures())[0]
        line += f"; top reason ({n}x): {first_line(reason, 80)}"
        line += f"; `farm batch status {args.name} --failed` lists them"
    if status.counts.get("unsubmitted"):
        line += "; unsubmitted jobs need `farm batch submit` again"
    print(line, file=sys.stderr)
    return EXIT_FAILED


def cmd_retry(args: argparse.Namespace) -> int:
    batch = _batch(args.name)
    stuck = [f for f in batch.failures() if not f.retryable]
    ids = batch.retry(cancelled=args.cancelled, force=args.force)
    print(f"batch {args.name}: {plural(len(ids), 'job')} re-queued as new attempts")
    if stuck and not args.force:
        reason, n = _top(stuck)[0]
        print(
            f"farm: batch {args.name}: {plural(len(stuck), 'failed job')} not retried: "
            f"{'it' if len(stuck) == 1 else 'they'} cannot succeed as submitted "
            f"({n}x {first_line(reason, 80)}); --force retries them anyway",
            file=sys.stderr,
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    n = _batch(args.name).cancel()
    print(f"batch {args.name}: {plural(n, 'job')} cancelled or cancelling")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from farm.batches.batch import Batch, list_batches

    farm = _farm()
    for name, meta in list_batches(farm):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(meta.get("created_at", 0)))
        status = Batch(farm, name).status()
        counts = " ".join(f"{s}={n}" for s, n in sorted(status.counts.items()) if n)
        print(f"{name}  {when}  {plural(meta['rows'], 'row')} x {meta['variations']}  {counts}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from farm.batches.dataset import fetch_dataset

    r = fetch_dataset(_batch(args.name), args.dir)
    print(
        f"batch {args.name}: {plural(r.images, 'image')} in {args.dir} "
        f"({plural(r.downloaded, 'file')} fetched, {r.skipped} already there); "
        f"{plural(r.not_succeeded, 'job')} not succeeded"
    )
    return 0


def cmd_sheet(args: argparse.Namespace) -> int:
    from farm.batches.dataset import contact_sheet

    n = contact_sheet(_batch(args.name), args.out, rows=max(1, args.rows), cell=args.cell)
    print(f"{args.out}: {plural(n, 'row')}")
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
