"""Submit speed side by side: `farm batch submit` (the whole command) vs `Farm.submit_many`.

    python bench/submit_many.py [--jobs 10000] [--images 200] [--size 64]
                                [--stores local,s3] [--rounds 3] [--profile OUT.prof]

The same 10,000 inpaint jobs over 200 distinct 64x64 sources (rows alternating the `box` and
`strokes` mask generators, a prompt each, seeds given), submitted into an empty store and key
prefix each time, no worker:

- CLI: `python -m farm batch submit manifest.jsonl --name bench --model tiny-inpaint
  --steps 4`, a child process timed from its start to its exit (interpreter start-up,
  imports, manifest reading and validation, uploads, records, messages, index);
- SDK: a child process that builds 10,000 `Inpaint` specs (image as a path, mask as a
  generator) and calls `Farm.submit_many` once, timed around that call.

Each side runs as its own process; its peak resident memory (`ru_maxrss` from `os.wait4`) is
printed beside its rate. Stores: a folder and moto's S3 server (`--stores`). Rounds alternate
CLI and SDK; medians come last, with the machine's load average before the run (this machine
is shared: absolute rates are noisy, the ratio SDK/CLI less so). Target: both >= 10,000 rows/s,
the SDK at least as fast as the CLI. `--profile OUT.prof` runs the SDK side once under cProfile
instead (`python -m pstats OUT.prof`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from farm.local.embedded import RedisServer  # noqa: E402
from farm.settings import FarmSettings, settings_env  # noqa: E402

MODEL, STEPS = "tiny-inpaint", 4


def write_inputs(folder: Path, jobs: int, n_images: int, size: int) -> Path:
    """`n_images` sources and a manifest of `jobs` rows over them; the SDK reads the same."""
    from farm.cli.demo import sample_image

    for i in range(n_images):
        sample_image(i).resize((size, size)).save(folder / f"{i:04d}.png")
    lines = [json.dumps({"defaults": {"prompt_template": "a photo of a {label}"}})]
    for r in range(jobs):
        mask = "strokes" if r % 2 else "box"
        lines.append(
            json.dumps({"image": f"{r % n_images:04d}.png", "mask": mask, "label": f"thing {r}"})
        )
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def sdk_child(folder: Path, jobs: int, n_images: int, profile: str | None) -> None:
    """The SDK side, in its own process: build the specs, `submit_many` them, print the time."""
    from farm import Box, Farm, Inpaint, Strokes

    specs = [
        Inpaint(
            model=MODEL,
            prompt=f"a photo of a thing {r}",
            image=str(folder / f"{r % n_images:04d}.png"),
            mask_image=Strokes() if r % 2 else Box(),
            seed=r,
            num_inference_steps=STEPS,
        )
        for r in range(jobs)
    ]
    with Farm() as farm:
        t0 = time.perf_counter()
        if profile:
            import cProfile

            cProfile.runctx("farm.submit_many(specs)", globals(), locals(), profile)
        else:
            farm.submit_many(specs)
        took = time.perf_counter() - t0
    print(json.dumps({"seconds": took}))


def run_child(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run `argv` to its end: (wall seconds, peak RSS in MiB from `os.wait4`, its stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        took = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{argv[:5]} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return took, usage.ru_maxrss / 1024, out.read()


def settings_for(
    store: str, redis_url: str, root: Path, s3_url: str | None, tag: str
) -> FarmSettings:
    """Fresh settings per side and round: an empty store and key prefix."""
    if store == "local":
        return FarmSettings(
            redis_url=redis_url,
            storage=(root / "stores" / tag).as_uri(),
            home=root,
            key_prefix=f"{tag}:",
        )
    from farm.storage.s3 import S3Store

    S3Store(tag, endpoint_url=s3_url, region="us-east-1").ensure_bucket()
    return FarmSettings(
        redis_url=redis_url,
        storage=f"s3://{tag}/farm",
        s3_endpoint_url=s3_url,
        s3_region="us-east-1",
        home=root,
        key_prefix=f"{tag}:",
    )


def sdk_argv(folder: Path, args: argparse.Namespace) -> list[str]:
    """This script as the SDK side's child process."""
    return [sys.executable, __file__, "--child-sdk", str(folder), "--jobs", str(args.jobs),
            "--images", str(args.images)]  # fmt: skip


def one_round(
    side: str, settings: FarmSettings, folder: Path, manifest: Path, args: argparse.Namespace
) -> tuple[float, float]:
    """(rows/s, peak RSS MiB) of one side's submit."""
    env = settings_env(settings) | {"PYTHONPATH": str(ROOT)}
    if side == "cli":
        argv = [sys.executable, "-m", "farm", "batch", "submit", str(manifest), "--name", "bench",
                "--model", MODEL, "--steps", str(STEPS)]  # fmt: skip
        took, rss, out = run_child(argv, env)
        if f"new={args.jobs}" not in out:
            raise SystemExit(f"the CLI did not write {args.jobs} jobs: {out!r}")
    else:
        _, rss, out = run_child(sdk_argv(folder, args), env)
        took = json.loads(out.strip().splitlines()[-1])["seconds"]
    return args.jobs / took, rss


def rounds(args: argparse.Namespace, stores: list[str], root: Path, folder: Path, manifest: Path,
           redis_url: str, s3_url: str | None) -> dict[tuple[str, str], list[tuple[float, float]]]:  # fmt: skip
    """Alternating rounds: (store, side) → [(rows/s, peak MiB)]."""
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for i in range(args.rounds):
        for store in stores:
            for side in ["cli", "sdk"] if i % 2 == 0 else ["sdk", "cli"]:
                settings = settings_for(store, redis_url, root, s3_url, f"r{i}-{store}-{side}")
                rate, rss = one_round(side, settings, folder, manifest, args)
                figures.setdefault((store, side), []).append((rate, rss))
                print(
                    f"round {i + 1} {store:5} {side}: {rate:8,.0f} rows/s, peak RSS {rss:5.0f} MiB"
                )
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--stores", default="local,s3")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", help="run the SDK side once under cProfile, into this file")
    p.add_argument("--child-sdk", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_sdk:
        return sdk_child(args.child_sdk, args.jobs, args.images, os.environ.get("BENCH_PROFILE"))
    load = os.getloadavg()
    print(
        f"{args.jobs} inpaint jobs over {args.images} distinct {args.size}x{args.size} sources; "
        f"{os.cpu_count()} cores; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    stores = args.stores.split(",")
    with tempfile.TemporaryDirectory(prefix="farm-bench-submit-many-") as tmp:
        root = Path(tmp)
        folder = root / "data"
        folder.mkdir()
        manifest = write_inputs(folder, args.jobs, args.images, args.size)
        s3 = None
        if "s3" in stores:
            from tests.support.s3_server import AWS_TEST_ENV, S3Server

            os.environ.update(AWS_TEST_ENV)
            s3 = S3Server().start()
        s3_url = s3.endpoint_url if s3 else None
        try:
            with RedisServer(root / "redis", appendonly=True) as redis_server:
                if args.profile:
                    settings = settings_for(stores[0], redis_server.url, root, s3_url, "prof")
                    env = settings_env(settings) | {
                        "PYTHONPATH": str(ROOT),
                        "BENCH_PROFILE": args.profile,
                    }
                    _, _, out = run_child(sdk_argv(folder, args), env)
                    print(f"profile of the SDK side in {args.profile}: {out.strip()}")
                    return
                figures = rounds(args, stores, root, folder, manifest, redis_server.url, s3_url)
        finally:
            if s3 is not None:
                s3.stop()
    print(f"medians (load average now {os.getloadavg()[0]:.2f}):")
    for store in stores:
        cli = statistics.median(r for r, _ in figures[(store, "cli")])
        sdk = statistics.median(r for r, _ in figures[(store, "sdk")])
        cli_rss = statistics.median(m for _, m in figures[(store, "cli")])
        sdk_rss = statistics.median(m for _, m in figures[(store, "sdk")])
        print(
            f"  {store:5}: CLI (whole command) {cli:8,.0f} rows/s, peak {cli_rss:.0f} MiB; "
            f"SDK submit_many {sdk:8,.0f} rows/s, peak {sdk_rss:.0f} MiB; SDK/CLI {sdk / cli:.2f} "
            "(targets: both >= 10,000, SDK/CLI >= 1)"
        )


if __name__ == "__main__":
    main()
