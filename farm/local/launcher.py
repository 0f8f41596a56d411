"""Many workers on one machine: one child process per GPU (or N CPU workers), kept running.

    farm worker --gpus all          # one child per GPU: cuda0@host, cuda1@host, ...
    farm worker --gpus 0,1,3        # these GPUs only
    farm worker --workers 4         # four CPU workers, one torch thread each: cpu0@host, ...

Each child is an ordinary `python -m workers worker --device ...` process (what `farm worker`
hands off to). A GPU child sees only
its own device (`CUDA_VISIBLE_DEVICES=<i>`, so it renders on `cuda:0`), which keeps one
process's allocations and NCCL/driver state off the other GPUs. The parent never imports torch:
it counts GPUs with `nvidia-smi -L` and checks a given list against it (without `nvidia-smi` it
believes the list), and a child that cannot open its device fails loudly in its own log and is
restarted with backoff.

`Supervisor` is the one piece that starts, restarts and stops children; `farm up`
(`farm.local.up.LocalFarm`) and `farm worker --gpus/--workers` both use it. SIGTERM or SIGINT to the
parent is passed to every child as SIGTERM: each stops its job at the next step and hands it
back (see `workers.worker`), then exits. A parent killed outright (SIGKILL) takes its children
along (`die_with_parent`), so no orphan keeps serving a farm nobody runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from farm.errors import InvalidJob
from farm.local.embedded import die_with_parent

log = logging.getLogger("farm.launcher")

QUICK_EXIT_S = 5.0
"""A child that dies sooner than this after its start counts as crash-looping: backoff grows."""

MAX_BACKOFF_S = 30.0
"""The longest wait before restarting a crash-looping child."""


@dataclass
class Child:
    """One worker process the supervisor keeps running."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables set on top of the supervisor's environment (device pinning, metrics port)."""
    log_path: Path | None = None
    started_at: float = 0.0
    failures: int = 0
    """Quick exits in a row: the restart backoff is 0.5 s × 2^(failures - 1)."""
    restart_at: float = 0.0


def worker_command(
    device: str = "cpu",
    threads: int | None = None,
    queues: str | None = None,
    name: str | None = None,
    preload: Sequence[str] | None = None,
) -> list[str]:
    """`python -m workers worker ...` for one device: the heavy side of `farm worker`."""
    cmd = [sys.executable, "-m", "workers", "worker", "--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    if queues:
        cmd += ["--queues", queues]
    if name:
        cmd += ["--name", name]
    for ref in preload or []:
        cmd += ["--preload", ref]
    return cmd


def machine_gpus() -> list[int] | None:
    """Indices of this machine's NVIDIA GPUs as `nvidia-smi -L` lists them (no torch in this
    process); None when there is no `nvidia-smi` to ask."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return list(range(sum(1 for line in out.splitlines() if line.startswith("GPU "))))


def visible_gpus() -> list[int]:
    """The GPUs `--gpus all` means: the machine's, narrowed by `CUDA_VISIBLE_DEVICES` when it
    holds plain indices (as CUDA would narrow them)."""
    found = machine_gpus() or []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(p.strip().isdigit() for p in visible.split(",") if p.strip()):
        found = [i for i in (int(p) for p in visible.split(",") if p.strip()) if i in found]
    return found


def parse_gpus(spec: str) -> list[int]:
    """`all` → every GPU `visible_gpus` finds; `0,1,3` → those indices, each checked against
    `nvidia-smi -L` where there is one. InvalidJob naming the value otherwise."""
    spec = spec.strip()
    if spec == "all":
        gpus = visible_gpus()
        if not gpus:
            raise InvalidJob(
                "gpus: 'all' found no GPU on this machine (`nvidia-smi -L` lists none); "
                "use --workers N for CPU workers",
                field="gpus",
            )
        return gpus
    parts = [p.strip() for p in spec.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise InvalidJob(
            f"gpus: 'all' or comma-separated GPU indices such as 0,1,3, got {spec!r}",
            field="gpus",
        )
    gpus = [int(p) for p in parts]
    if len(set(gpus)) != len(gpus):
        raise InvalidJob(f"gpus: an index appears twice in {spec!r}", field="gpus")
    known = machine_gpus()
    missing = [g for g in gpus if known is not None and g not in known]
    if missing:
        raise InvalidJob(
            f"gpus: no GPU {missing[0]} on this machine (`nvidia-smi -L` lists "
            f"{len(known or [])}), got {spec!r}",
            field="gpus",
        )
    return gpus


def plan(
    *,
    gpus: Sequence[int] | None = None,
    workers: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    queues: str | None = None,
    preload: Sequence[str] = (),
    metrics_port: int = 0,
    log_dir: Path | None = None,
    host: str | None = None,
) -> list[Child]:
    """The children for `--gpus` (one per GPU) or `--workers N` (N on `device`).

    GPU child i: `CUDA_VISIBLE_DEVICES=<gpu>`, `--device cuda:0`, name `cuda<gpu>@<host>`.
    CPU child i: `--device cpu`, one torch thread unless `threads` says otherwise, name
    `cpu<i>@<host>`. With `metrics_port` set, child i serves its metrics on `metrics_port + i`.
    """
    host = host or socket.gethostname()
    if workers < 1:
        raise InvalidJob(f"workers: must be at least 1, got {workers}", field="workers")
    children = []
    if gpus:
        cores = max(1, (os.cpu_count() or 1) // len(gpus))
        for i, gpu in enumerate(gpus):
            name = f"cuda{gpu}@{host}"
            env = {"CUDA_VISIBLE_DEVICES": str(gpu)}
            cmd = worker_command("cuda:0", threads or cores, queues, name, preload)
            children.append(Child(name, cmd, env, _log(log_dir, f"worker-cuda{gpu}.log")))
            _metrics(children[-1], metrics_port, i)
        return children
    for i in range(workers):
        tag = f"cpu{i}" if device == "cpu" else device.replace(":", "")
        if device != "cpu" and workers > 1:
            tag += f"-{i}"
        name = f"{tag}@{host}"
        cmd = worker_command(device, threads or 1, queues, name, preload)
        children.append(Child(name, cmd, {}, _log(log_dir, f"worker-{i}.log")))
        _metrics(children[-1], metrics_port, i)
    return children


def _log(log_dir: Path | None, name: str) -> Path | None:
    return log_dir / name if log_dir is not None else None


def _metrics(child: Child, port: int, i: int) -> None:
    if port:
        child.env["FARM_METRICS_PORT"] = str(port + i)


class Supervisor:
    """Starts children, restarts those that die (with backoff when they keep dying), stops all.

    `procs[i]` is child i's current process (tests and benches kill them on purpose).
    """

    def __init__(self, children: list[Child], env: dict[str, str], restart: bool = True) -> None:
        self.children = children
        self.env = env
        """The base environment of every child (the farm's settings as FARM_* variables)."""
        self.restart = restart
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        self.procs = [self._spawn(c) for c in self.children]
        if self.restart:
            threading.Thread(target=self._supervise, name="supervisor", daemon=True).start()

    def _spawn(self, child: Child) -> subprocess.Popen[bytes]:
        out = None
        if child.log_path is not None:
            child.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(child.log_path, "ab")  # noqa: SIM115 - owned by the child
        child.started_at = time.monotonic()
        return subprocess.Popen(
            child.command,
            env=self.env | child.env,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,  # a Ctrl-C reaches the supervisor, which forwards it
            preexec_fn=die_with_parent,  # and a supervisor killed outright takes them along
        )

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                if not self._stopping.is_set():
                    self.restart_dead()

    def restart_dead(self) -> int:
        """Restart children that exited (after their backoff); how many were restarted."""
        n = 0
        now = time.monotonic()
        for i, (child, p) in enumerate(zip(self.children, self.procs, strict=True)):
            if p.poll() is None:
                continue
            if not child.restart_at:
                quick = now - child.started_at < QUICK_EXIT_S
                child.failures = child.failures + 1 if quick else 0
                delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (child.failures - 1)) if quick else 0.0
                child.restart_at = now + delay
                log.warning(
                    "worker %s exited with %s; restarting it%s",
                    child.name,
                    p.returncode,
                    f" in {delay:.1f}s" if delay else "",
                )
            if now >= child.restart_at:
                child.restart_at = 0.0
                self.procs[i] = self._spawn(child)
                self.restarts += 1
                n += 1
        return n

    def signal_all(self, signum: int = signal.SIGTERM) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every child (each hands back its job), wait, then SIGKILL the late ones."""
        self._stopping.set()
        with self._lock:
            procs = list(self.procs)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run(self) -> None:
        """Run in the foreground until SIGTERM/SIGINT, then stop the children (`farm worker`)."""
        stop = threading.Event()

        def forward(signum: int, frame: object) -> None:
            stop.set()

        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            for child in self.children:
                log.info("started %s: %s", child.name, " ".join(child.command[3:]))
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)
