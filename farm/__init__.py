"""A render farm for diffusion models: submit jobs here, run them on `farm worker`s.

This package is the light side: it never imports torch, diffusers or `workers`.

The surface (`__all__`), as README.md's "Use it from Python" documents it:

    Farm, JobHandle                         the SDK: submit, follow, fetch (`farm.client`)
    Txt2Img, Img2Img, Inpaint, Style,       job specs, diffusers' argument names
    Finetune, LoraRef
    Box, Strokes, Full                      generated masks (`mask_image=Strokes(...)`)
    JobRecord, JobState                     what the farm knows of a job
    Batch, submit_batch, fetch_dataset      manifests in, datasets out
    FarmSettings                            the one settings object (`FARM_*`)
    FarmError, InvalidJob, JobNotFound,     the exception tree (`farm.errors`); storage's own
    TransientError, StaleAttempt,           errors (`farm.storage`)
    JobFailed, JobCancelled, WaitTimeout,
    StorageError, ObjectNotFound

Wings, lowest first (a wing imports only its own and lower ones; `tests/test_layout.py`):
errors settings keys · jobs · storage queue · state · inputs · submit client remote · batches ·
local · api · cli.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farm.batches.batch import Batch
    from farm.batches.dataset import fetch_dataset
    from farm.batches.submit import submit_batch
    from farm.client import Farm, JobHandle
    from farm.errors import (
        FarmError,
        InvalidJob,
        JobCancelled,
        JobFailed,
        JobNotFound,
        StaleAttempt,
        TransientError,
        WaitTimeout,
    )
    from farm.jobs.masks import Box, Full, Strokes
    from farm.jobs.record import JobRecord
    from farm.jobs.specs import Finetune, Img2Img, Inpaint, LoraRef, Style, Txt2Img
    from farm.jobs.state import JobState
    from farm.settings import FarmSettings
    from farm.storage import ObjectNotFound, StorageError

_HOMES = {
    "farm.batches.batch": ["Batch"],
    "farm.batches.dataset": ["fetch_dataset"],
    "farm.batches.submit": ["submit_batch"],
    "farm.client": ["Farm", "JobHandle"],
    "farm.errors": [
        "FarmError",
        "InvalidJob",
        "JobCancelled",
        "JobFailed",
        "JobNotFound",
        "StaleAttempt",
        "TransientError",
        "WaitTimeout",
    ],
    "farm.jobs.masks": ["Box", "Full", "Strokes"],
    "farm.jobs.record": ["JobRecord"],
    "farm.jobs.specs": ["Finetune", "Img2Img", "Inpaint", "LoraRef", "Style", "Txt2Img"],
    "farm.jobs.state": ["JobState"],
    "farm.settings": ["FarmSettings"],
    "farm.storage": ["ObjectNotFound", "StorageError"],
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
"""Where each public name lives. They are imported when first asked for (PEP 562), so a
process that needs one corner of the package (a worker, the upload helper, `farm --version`)
does not pay for importing all of it (Celery, redis, the batches)."""


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'farm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Box",
    "Farm",
    "FarmError",
    "FarmSettings",
    "Finetune",
    "Full",
    "Img2Img",
    "Inpaint",
    "InvalidJob",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobRecord",
    "JobState",
    "LoraRef",
    "ObjectNotFound",
    "StaleAttempt",
    "StorageError",
    "Strokes",
    "Style",
    "TransientError",
    "Txt2Img",
    "WaitTimeout",
    "fetch_dataset",
    "submit_batch",
]
