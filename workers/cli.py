"""The `farm` commands that need torch, on the heavy side: `python -m workers ARGS`.

`farm worker`, `farm models verify` and `farm models export` hand off to this module
(`farm.cli.main.hand_off` execs `python -m workers` with the same arguments), so the light
`farm` command never imports torch. The arguments are parsed by the `farm` command's own
parser, and failures are reported the way every `farm` command reports them.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence

from farm.cli.main import guarded, parser
from farm.errors import InvalidJob
from farm.settings import FarmSettings, resolve_settings


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.worker import run_worker

    settings = resolve_settings(FarmSettings())
    queues = [q for q in (args.queues or "").split(",") if q] or None
    run_worker(settings, args.device, queues, args.threads, args.name, args.preload)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from workers.models.verify import verify

    verdict = verify(args.ref, FarmSettings().models_dir)  # InvalidJob: exit 2 with the reason
    print(f"{verdict.ref}: {verdict.kind}")
    print(f"  at {verdict.location}")
    for line in verdict.details:
        print(f"  {line}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from workers.builtin.families import export_builtin

    if args.single_file and args.name not in ("tiny", "tiny-inpaint"):
        raise InvalidJob(
            f"--single-file: only the Stable Diffusion 1.x built-ins have an original-layout "
            f"checkpoint, not {args.name!r}",
            field="single_file",
        )
    print(export_builtin(args.name, args.dir))
    if args.single_file:
        from workers.builtin.tiny import export_single_file

        checkpoint = export_single_file(args.name, args.dir / f"{args.name}.safetensors")
        # Its diffusers config beside it (`<name>.config/`, where workers and `farm models
        # verify` look for a single file's): the folder's configs and tokenizer, no weights.
        beside = checkpoint.with_suffix(".config")
        shutil.rmtree(beside, ignore_errors=True)
        shutil.copytree(
            args.dir, beside, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", beside.name)
        )
        print(checkpoint)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "worker" and not (args.gpus or args.workers):
        return guarded(cmd_worker, args)
    if args.command == "models" and args.models_command in ("verify", "export"):
        return guarded({"verify": cmd_verify, "export": cmd_export}[args.models_command], args)

    def elsewhere(args: argparse.Namespace) -> int:
        raise InvalidJob(
            f"`python -m workers` runs `farm worker` and `farm models verify|export` "
            f"only; run `farm {args.command}`"
        )

    return guarded(elsewhere, args)
