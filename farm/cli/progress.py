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


def bar(good: float, bad: float, width: int = 30) -> str:
    """`[#####---       ]`: `good` (a share, 0..1) as `#`, `bad` (failed or cancelled) as `-`,
    the rest blank, so a cancelled run never shows a full bar."""
    hashes = int(good * width)
    dashes = min(width - hashes, int(round(bad * width)))
    return f"[{'#' * hashes}{'-' * dashes}{' ' * (width - hashes - dashes)}]"


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h10m`."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class JobsBar:
    """`Farm.wait`'s `on_progress`: a bar over the jobs' steps, on a terminal only."""

    def __init__(self, stream: Any) -> None:
        self.line = LiveLine(stream, only_tty=True)
        self.started = time.monotonic()
        self.unavailable = self.line.unavailable
        """`Farm.wait`'s `on_unavailable`: says so on the terminal while Redis is away."""

    def __call__(self, states: list[tuple[str, str | None, int, int]]) -> None:
        n = len(states)
        done = sum(s in ENDED for _, s, _, _ in states)
        good = sum(
            1.0 if s == "succeeded" else (a / b if b and s not in ENDED else 0.0)
            for _, s, a, b in states
        )
        bad = sum(s in ("failed", "cancelled") for _, s, _, _ in states)
        waiting = sum(s == "waiting" for _, s, _, _ in states)
        word = "job" if n == 1 else "jobs"
        self.line.show(
            f"{bar(good / n, bad / n)} {done}/{n} {word}  {good / n:4.0%}  "
            f"{time.monotonic() - self.started:5.1f}s" + (f"  {waiting} waiting" if waiting else "")
        )
        if done == n:
            self.line.end()


class TrainingBar:
    """`Farm.wait`'s `on_progress` for one fine-tune: steps of the total (the spec's
    `max_train_steps` until the worker says), the latest training loss read from the job's
    record by `loss(job_id)`, and the time left at the pace so far, on a terminal only."""

    def __init__(
        self, stream: Any, loss: Callable[[str], float | None], total: int | None = None
    ) -> None:
        self.line = LiveLine(stream, only_tty=True)
        self.loss = loss
        self.total = total
        self.started = time.monotonic()
        self.unavailable = self.line.unavailable
        self._first: tuple[int, float] | None = None
        """(step, time) when training was first seen moving: the pace is measured from it."""

    def eta(self, step: int, total: int) -> str:
        now = time.monotonic()
        if step == 0:
            return ""
        if self._first is None or step < self._first[0]:
            self._first = (step, now)  # a resumed attempt starts from its checkpoint
            return ""
        first_step, first_t = self._first
        if step <= first_step or step >= total:
            return ""
        per_step = (now - first_t) / (step - first_step)
        return f"  ETA {duration(per_step * (total - step))}"

    def __call__(self, states: list[tuple[str, str | None, int, int]]) -> None:
        job_id, state, step, total = states[0]
        if self.line.quiet:
            return
        total = total or self.total or 0
        frac = step / total if total else 0.0
        good = 1.0 if state == "succeeded" else frac
        try:
            loss = self.loss(job_id)
        except TransientError:  # Redis went away just now: the next beat shows it again
            loss = None
        shown = f"  loss {loss:.4f}" if loss is not None else ""
        eta = self.eta(step, total) if state == "running" and total else ""
        self.line.show(
            f"{bar(good, 1.0 - good if state in ('failed', 'cancelled') else 0.0)} "
            f"step {step}/{total or '?'}{shown}  {state}  "
            f"{time.monotonic() - self.started:5.1f}s{eta}"
        )
        if state in ENDED:
            self.line.end()
