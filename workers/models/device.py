"""One worker process per device: which device it renders on and how many CPU threads it uses.

    >>> pin_device("cuda:1")          # this process renders on GPU 1 only
    >>> pin_device("cpu", threads=4)  # a CPU worker on four threads

Threads are set on purpose, never left to torch's guess: a CPU worker uses the cores this
process may run on (or `threads`); a GPU worker, whose CPU work is light, takes an even share
of them per visible GPU so that one worker per GPU does not oversubscribe the machine.
"""

from __future__ import annotations

import os
import re

import torch

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def pin_device(device: str, threads: int | None = None) -> torch.device:
    """Validate `device` ("cpu" or "cuda:N"), make it this process's device, set its threads."""
    if not _DEVICE.match(device):
        raise ValueError(f"device must be 'cpu' or 'cuda:N', got {device!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    cores = _usable_cores()
    if device == "cpu":
        torch.set_num_threads(threads or cores)
        return torch.device("cpu")

    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {device!r} does not exist: no CUDA device is visible here")
    if index >= count:
        raise ValueError(
            f"device {device!r} does not exist: {count} CUDA device(s) visible (cuda:0…cuda:{count - 1})"
        )
    torch.cuda.set_device(index)
    torch.set_num_threads(threads or max(1, cores // count))
    return torch.device("cuda", index)


def _usable_cores() -> int:
    """The cores this process may run on (its affinity), which a container may limit."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
