"""Job records: what the farm knows about a job, as the Redis hash `farm:job:<id>` holds it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from farm.jobs.state import JobState


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
