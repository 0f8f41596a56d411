"""Fault injection for the fault tests: only with `FARM_FAULT_INJECTION=1`, never otherwise.

A prompt carrying a marker makes the worker fail the way real hardware does:

    [fault:kill]                the worker process dies (SIGKILL) when the render starts: a
                                poison job
    [fault:oom]                 the pipeline call raises the device's out-of-memory error
    [fault:pause-before-store]  a job's first attempt stops its worker (SIGSTOP) after
                                rendering, after every check it makes, just before it stores
                                the results: a zombie in the making, woken by the test's
                                SIGCONT once another attempt has taken the job over
    [fault:slow-store=S]        a job's first attempt waits S seconds just before it stores
                                its results (on the writer's thread: the next batch renders)
    [fault:slow-steps=S]        every denoising step takes S seconds more per job in the call
                                (a micro-batch of n jobs costs n × S a step)
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

_SLOW = re.compile(r"\[fault:slow-steps=([0-9.]+)\]")
_SLOW_STORE = re.compile(r"\[fault:slow-store=([0-9.]+)\]")


def _prompts(specs: Sequence[Any]) -> str:
    return " ".join(str(getattr(s, "prompt", "")) for s in specs)


def inject(
    enabled: bool, specs: Sequence[Any], stage: str = "render", first_attempt: bool = False
) -> None:
    """Raise, die or stop as the specs' prompts ask at this `stage` (`render`: as the
    pipeline call starts; `store`: just before the results of jobs on their `first_attempt`,
    or not, are stored); nothing at all unless `enabled`."""
    if not enabled:
        return
    prompts = _prompts(specs)
    if stage == "store":
        if first_attempt and "[fault:pause-before-store]" in prompts:
            os.kill(os.getpid(), signal.SIGSTOP)
        if first_attempt and (found := _SLOW_STORE.search(prompts)):
            time.sleep(float(found.group(1)))
        return
    if "[fault:kill]" in prompts:
        os.kill(os.getpid(), signal.SIGKILL)
    if "[fault:oom]" in prompts:
        import torch

        raise torch.cuda.OutOfMemoryError(f"injected: out of memory for a batch of {len(specs)}")


def slow_steps(enabled: bool, specs: Sequence[Any]) -> Callable[[], None]:
    """What each denoising step of these specs' call does more: sleep S × jobs seconds when a
    prompt carries `[fault:slow-steps=S]`, else nothing."""
    found = _SLOW.search(_prompts(specs)) if enabled else None
    if found is None:
        return lambda: None
    seconds = float(found.group(1)) * len(specs)
    return lambda: time.sleep(seconds)
