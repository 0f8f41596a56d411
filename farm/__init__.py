"""A render farm for diffusion models: submit jobs here, run them on `farm worker`s.

This package is the light side: it never imports torch or diffusers.
"""

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
from farm.jobs import Finetune, Img2Img, Inpaint, JobRecord, JobState, Style, Txt2Img
from farm.settings import FarmSettings

__version__ = "0.1.0"

__all__ = [
    "Farm",
    "FarmError",
    "FarmSettings",
    "Finetune",
    "Img2Img",
    "Inpaint",
    "InvalidJob",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobRecord",
    "JobState",
    "StaleAttempt",
    "Style",
    "TransientError",
    "Txt2Img",
    "WaitTimeout",
]
