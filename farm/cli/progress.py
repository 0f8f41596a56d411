"""Progress on a terminal: one live line, rewritten in place; elsewhere a line per change."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from farm.errors import TransientError

ENDED = ("succeeded", "failed", "cancelled")


class LiveLine:
    """Writes status lines to `stream`: in place on a terminal, else one per change (or none
    with `only_tty`)."""

    def __init__(self, stream: Any, only_tty: bool = False) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.quiet = only_tty and not self.tty
        self.last = ""

    def show(self, line: str) -> None:
        if self.quiet or line == self.last:
            return
        self.last = line
        self.stream.write(f"\r{line}\x1b[K" if self.tty else f"{line}\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()

    def unavailable(self, why: str | None) -> None:
        """`Patience`'s callback: Redis went away (`why`), or came back (None)."""
        if why is None:
            self.last = ""  # the next status line is shown, even if it did not change
            return
        line = f"Redis unavailable, retrying… ({why})"
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
        else:  # a log: one line per outage, on stderr whatever the status lines use
            sys.stderr.write(f"farm: {line}\n")
        self.stream.flush()
        self.last = line


class JobsBar:
    """`Farm.wait`'s `on_progress`: a bar over the jobs' steps, on a terminal only."""

    def __init__(self, stream: Any) -> None:
        self.line = LiveLine(stream, only_tty=True)
        self.started = time.monotonic()
        self.unavailable = self.line.unavailable
        """`Farm.wait`'s `on_unavailable`: says so on the terminal while Redis is away."""

    def __call__(self, states: list[tuple[str, str | None, int, int]]) -> None:
        done = sum(s in ENDED for _, s, _, _ in states)
        frac = sum(1.0 if s in ENDED else (a / b if b else 0.0) for _, s, a, b in states)
        frac /= len(states)
        waiting = sum(s == "waiting" for _, s, _, _ in states)
        self.line.show(
            f"[{'#' * int(frac * 30):<30}] {done}/{len(states)} jobs  {frac:4.0%}  "
            f"{time.monotonic() - self.started:5.1f}s" + (f"  {waiting} waiting" if waiting else "")
        )
        if done == len(states):
            self.line.end()


class TrainingBar:
    """`Farm.wait`'s `on_progress` for one fine-tune: steps and the latest training loss, read
    from the job's record by `loss(job_id)`, on a terminal only."""

    def __init__(self, stream: Any, loss: Callable[[str], float | None]) -> None:
        self.line = LiveLine(stream, only_tty=True)
        self.loss = loss
        self.started = time.monotonic()
        self.unavailable = self.line.unavailable

    def __call__(self, states: list[tuple[str, str | None, int, int]]) -> None:
        job_id, state, step, total = states[0]
        if self.line.quiet:
            return
        frac = 1.0 if state in ENDED else (step / total if total else 0.0)
        try:
            loss = self.loss(job_id)
        except TransientError:  # Redis went away just now: the next beat shows it again
            loss = None
        shown = f"  loss {loss:.4f}" if loss is not None else ""
        self.line.show(
            f"[{'#' * int(frac * 30):<30}] step {step}/{total or '?'}{shown}  {state}  "
            f"{time.monotonic() - self.started:5.1f}s"
        )
        if state in ENDED:
            self.line.end()
