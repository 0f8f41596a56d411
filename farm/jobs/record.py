"""Job records: what the farm knows about a job, as the Redis hash `farm:job:<id>` holds it."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from farm.jobs.state import JobState


class Failure(StrEnum):
    """What kind of failure ended a failed job (its record's `failure`), so that a retry
    (`farm batch retry`) can tell a job that may succeed from one that must fail again.
    Written by the one place that decides how a job ends (`workers.outcomes`)."""

    INVALID = "invalid"
    """The job as written cannot run (`InvalidJob`: a model that cannot do its kind, an input
    a worker refused); the same spec fails again."""
    DEPENDENCY = "dependency"
    """A fine-tune it waited for failed or was cancelled; that job stays so."""
    TRANSIENT = "transient"
    """Gave up after `FARM_MAX_DELIVERIES` attempts at a transient error (storage down)."""
    LOST = "lost"
    """Dead-lettered: its worker was lost on every attempt (a poison job)."""
    TIME_LIMIT = "time limit"
    """Ran past `FARM_TIME_LIMIT` / `FARM_FINETUNE_TIME_LIMIT`."""
    ERROR = "error"
    """Any other error (a library's, or a bug)."""

    @property
    def retryable(self) -> bool:
        """Whether a new attempt at the same spec may succeed."""
        return self not in (Failure.INVALID, Failure.DEPENDENCY)


class Progress(BaseModel):
    step: int = 0
    total: int = 0
    loss: float | None = None
    """A fine-tune's latest training loss."""


class JobRecord(BaseModel):
    """What the farm knows of one job; mirrors the Redis hash `farm:job:<id>`."""

    id: str
    kind: str
    state: JobState
    spec: dict[str, Any]
    attempt: int = 0
    worker: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress = Progress()
    cancel_requested: bool = False
    error: str | None = None
    failure: Failure | None = None
    """A failed job's kind of failure (`Failure`); None for older records and other states."""
    outputs: list[str] = []
    mask: str | None = None
    meta: str | None = None
    signature: str | None = None
    """Batch signature (`batch_signature`): jobs that share one may run as one pipeline call."""
    queue: str | None = None
    """The queue its message goes to (`queue_for`); re-sends go there too."""
    depends_on: list[str] = []
    """Jobs that must succeed before this one is queued (a `waiting` job)."""
    batch: str | None = None
    """The batch whose slot this job fills now (set when the slot is written)."""
    slot: str | None = None
    """That slot's id in the batch's index."""

    @property
    def done(self) -> bool:
        return self.state.terminal
