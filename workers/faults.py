"""Fault injection for the fault tests: only with `FARM_FAULT_INJECTION=1`, never otherwise.

A prompt carrying a marker makes the worker fail the way real hardware does:

    [fault:kill]   the worker process dies (SIGKILL) when the render starts: a poison job
    [fault:oom]    the pipeline call raises the device's out-of-memory error
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any


def inject(enabled: bool, specs: Sequence[Any]) -> None:
    """Raise or die as the specs' prompts ask; nothing at all unless `enabled`."""
    if not enabled:
        return
    prompts = " ".join(str(getattr(s, "prompt", "")) for s in specs)
    if "[fault:kill]" in prompts:
        os.kill(os.getpid(), signal.SIGKILL)
    if "[fault:oom]" in prompts:
        import torch

        raise torch.cuda.OutOfMemoryError(f"injected: out of memory for a batch of {len(specs)}")
