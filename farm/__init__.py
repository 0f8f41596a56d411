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
