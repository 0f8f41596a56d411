"""Commands of the heavy side, run in this process's place: `python -m workers ARGS`.

`farm worker` and `farm models verify|export` need torch; the `farm` command never imports it
(nor `workers`). It execs `python -m workers` with the same arguments, which parses them with
the same parser (`workers.cli`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

from farm.errors import FarmError


def hand_off(argv: Sequence[str]) -> int:
    """Run a command of the heavy side (`farm worker`, `farm models verify|export`) in this
    process's place: `python -m workers ARGV`, parsed by the same `parser()`. The light side
    never imports torch; a machine without it gets one line saying what to install."""
    missing = [m for m in ("torch", "diffusers", "workers") if importlib.util.find_spec(m) is None]
    if missing:
        raise FarmError(
            f"`farm {argv[0] if argv else ''}` needs the worker side ({', '.join(missing)} "
            "missing): pip install torch==2.13.0 'render-farm[worker]'"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "workers", *argv])
    return 0  # not reached: exec replaced this process
