"""`farm models`: what a node can run, and how to fill an offline node ahead of time.

    farm models list                      built-ins, and every model in the local HF cache
    farm models pull org/name [--revision R]   fetch safetensors and configs into the cache
    farm models verify REF                resolve like a worker, check the weights, say the kind
    farm models export NAME DIR           write a built-in as a diffusers folder

`verify` and `export` need torch: they run on the heavy side (`python -m workers`, see
`workers.cli`); `list` and `pull` stay light. `verify` first asks, without torch, whether the
ref names anything this machine has (`missing`): a typo is answered at once, not after the
seconds torch takes to import.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from farm.cli.handoff import hand_off
from farm.errors import EXIT_FAILED, InvalidJob
from farm.jobs.refs import BUILTIN_IP_ADAPTERS, BUILTIN_MODELS, BUILTIN_SIZES, is_repo_id


def add_parser(sub: Any) -> None:
    """Register `farm models` and its actions on the main parser's subcommands."""
    m = sub.add_parser("models", help="built-in and local models; fill an offline node")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    msub.add_parser("list", help="the built-in models and every model in the local HF cache")
    pl = msub.add_parser("pull", help="fetch a Hub model into the local HF cache (safetensors)")
    pl.add_argument("ref", help="org/name[@revision]")
    pl.add_argument("--revision", help="a branch, tag or commit (default main)")
    v = msub.add_parser("verify", help="check a model ref as a worker would; print its kind")
    v.add_argument("ref", help="built-in name, org/name, folder, .safetensors, IP-Adapter")
    ex = msub.add_parser("export", help="write a built-in model as a diffusers folder")
    ex.add_argument("name", choices=sorted(BUILTIN_MODELS | BUILTIN_IP_ADAPTERS))
    ex.add_argument("dir", type=Path)
    ex.add_argument(
        "--single-file",
        action="store_true",
        help="also write one original-layout .safetensors checkpoint",
    )


def run(args: argparse.Namespace) -> int:
    return ACTIONS[args.models_command](args)


def cmd_list(args: argparse.Namespace) -> int:
    from farm.inputs.hub import cached_models, human_size
    from farm.inputs.models import hf_cache_dir

    for name, what in (BUILTIN_MODELS | BUILTIN_IP_ADAPTERS).items():
        print(f"{name:21} built-in {human_size(BUILTIN_SIZES[name]):>9}  {what}")
    models = cached_models()
    print(f"# {hf_cache_dir()}: {len(models)} cached model(s)")
    for model in models:
        print(f"{model.repo_id:40} {human_size(model.size):>9}  {len(model.revisions)} revision(s)")
        for commit, refs, size in model.revisions:
            named = f"  ({', '.join(refs)})" if refs else ""
            print(f"  {commit[:12]} {human_size(size):>9}{named}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    import sys

    from farm.inputs.hub import components_without_weights, pull

    folder = pull(args.ref, args.revision)
    print(folder)
    missing = components_without_weights(folder)
    if missing:
        print(
            f"farm: {args.ref}: no safetensors weights for {', '.join(missing)} (pickle weights "
            "are never pulled nor loaded); workers will refuse it",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from farm.settings import FarmSettings

    missing(args.ref, FarmSettings().models_dir)
    return hand_off(args.argv)


def missing(ref: str, models_dir: Path | None) -> None:
    """`InvalidJob` for a ref that names nothing on this machine: not built in, no such file
    or folder, a repo id not in the local Hugging Face cache. The rest is the heavy side's."""
    from farm.inputs.models import cached_snapshot, hf_cache_dir, local_path

    ref = ref.strip()
    if ref in BUILTIN_MODELS or ref in BUILTIN_IP_ADAPTERS:
        return
    path = local_path(ref, models_dir)  # outside FARM_MODELS_DIR: InvalidJob
    if path.exists():
        return
    if is_repo_id(ref):
        repo_id, _, revision = ref.partition("@")
        if cached_snapshot(repo_id, revision or None) is None:
            where = f" at revision {revision!r}" if revision else ""
            raise InvalidJob(
                f"model {ref!r}: not built in, not a local folder, and {repo_id!r}{where} is not "
                f"in the local Hugging Face cache ({hf_cache_dir()}); fetch it with "
                f"`farm models pull {ref}`",
                field="model",
            )
        return
    builtins = ", ".join([*BUILTIN_MODELS, *BUILTIN_IP_ADAPTERS])
    raise InvalidJob(
        f"model {ref!r}: no such file or folder ({str(path)!r}), and not a built-in ({builtins}) "
        "or an org/name repo id",
        field="model",
    )


def cmd_export(args: argparse.Namespace) -> int:
    return hand_off(args.argv)


ACTIONS = {"list": cmd_list, "pull": cmd_pull, "verify": cmd_verify, "export": cmd_export}
