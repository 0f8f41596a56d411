"""Training steps that a cancel or a shutdown can stop part-way, not only between steps.

A 512 px step of even the built-in tiny model takes minutes on a CPU. `interruptible` makes
every convolution and linear layer of the given modules ask `should_stop()` before it runs
(a forward pre-hook) and again when its gradient arrives in the backward pass (a hook on its
output); True raises `Interrupted` there, out of the forward or out of `backward()`. The
caller (`LoraTrainer.run`) drops the abandoned step's gradients and puts its random
generators back, so the state is the last whole step's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

StopFn = Callable[[], bool]
"""`should_stop()`, asked many times within a step; True abandons the step."""


class Interrupted(Exception):
    """A training step abandoned part-way because `should_stop` said so."""


@contextlib.contextmanager
def interruptible(modules: Iterable[torch.nn.Module], should_stop: StopFn | None) -> Iterator[None]:
    """While inside: the layers of `modules` ask `should_stop` (see the module docstring)."""
    if should_stop is None:
        yield
        return

    def check(*_: Any) -> None:
        if should_stop():
            raise Interrupted

    def watch_grad(module: Any, args: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(check)

    handles = []
    for top in modules:
        for module in top.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                handles.append(module.register_forward_pre_hook(check))
                handles.append(module.register_forward_hook(watch_grad))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
