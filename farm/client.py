"""The SDK: submit jobs, follow them, fetch what they made.

    >>> from farm import Farm, Inpaint
    >>> farm = Farm()                      # FARM_* settings, or the farm `farm up` started
    >>> job = farm.submit(Inpaint(model="tiny-inpaint", prompt="a cat",
    ...                           image="dog.png", mask_image="mask.png", seed=7))
    >>> job.wait(timeout=600)              # raises JobFailed / JobCancelled / WaitTimeout
    >>> job.download("out/")               # out/0.png, out/mask.png, out/meta.json

Submitting goes through the one submit pipeline (`farm.submit`): prepare and validate every
spec, store the inputs, write the records, enqueue: a spec that fails validation leaves
nothing in Redis or storage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from farm.errors import JobCancelled, JobFailed, WaitTimeout
from farm.inputs.models import check_visible_model
from farm.jobs.record import JobRecord
from farm.jobs.specs import parse_spec
from farm.jobs.state import JobState
from farm.keys import ADAPTER_FILE
from farm.queue.routing import Router
from farm.settings import FarmSettings, resolve_settings
from farm.state import dependencies as deps
from farm.state.connection import Patience
from farm.state.tracker import Tracker
from farm.storage import ObjectStore, open_store
from farm.submit import Submission, gc_paused

ProgressFn = Callable[[Sequence[JobRecord | tuple[str, str | None, int, int]]], None]


def raise_unless_succeeded(records: Sequence[JobRecord]) -> None:
    """`JobFailed` or `JobCancelled` for the first record that did not succeed."""
    for rec in records:
        if rec.state == JobState.FAILED:
            raise JobFailed(rec.error or "failed", job_id=rec.id)
        if rec.state == JobState.CANCELLED:
            raise JobCancelled("cancelled", job_id=rec.id)


class JobHandle:
    """A thin handle on one job: its id and the farm it lives on."""

    __slots__ = ("farm", "id")

    def __init__(self, farm: Farm, job_id: str) -> None:
        self.farm = farm
        self.id = job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def status(self) -> JobRecord:
        return self.farm.get(self.id)

    def wait(self, timeout: float | None = None) -> JobRecord:
        """Block until the job ends; its record if it succeeded, else JobFailed/JobCancelled."""
        return self.farm.wait([self.id], timeout=timeout, raise_on_failure=True)[0]

    def cancel(self) -> JobState:
        return self.farm.cancel(self.id)

    def download(self, directory: str | Path) -> list[Path]:
        return self.farm.download(self.id, directory)

    def adapter(self) -> str:
        """A succeeded fine-tune's adapter URI (`adapters/<id>/pytorch_lora_weights.safetensors`),
        for diffusers' `load_lora_weights` or a render's `loras`."""
        rec = self.status()
        if rec.state != JobState.SUCCEEDED or rec.kind != "finetune":
            raise JobFailed(
                f"no adapter: the job is a {rec.state.value} {rec.kind}", job_id=self.id
            )
        return next(uri for uri in rec.outputs if uri.endswith(ADAPTER_FILE))


class Farm:
    """A connection to a farm: its Redis, its storage and its queue; or, given a `url` (or
    `FARM_API_URL`), its HTTP API (`farm.remote.RemoteFarm`: the same calls)."""

    remote = False
    """True for a farm reached over its HTTP API."""

    def __new__(
        cls,
        settings: FarmSettings | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        **overrides: Any,
    ) -> Farm:
        if cls is Farm:
            base = settings or FarmSettings(**overrides)
            if url or base.api_url:
                from farm.remote import RemoteFarm

                return RemoteFarm(base, url=url, token=token)
        return super().__new__(cls)

    def __init__(
        self,
        settings: FarmSettings | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        **overrides: Any,
    ) -> None:
        base = settings or FarmSettings(**overrides)
        self.settings = resolve_settings(base)
        self.tracker = Tracker.from_settings(self.settings)
        self.router = Router(self.tracker.workers.consumed_queues)
        """Chooses each job's queue: its model's, when a worker holding it warm is online."""
        self._store: ObjectStore | None = None
        self._checked_models: set[str] = set()
        self._celery: Any = None

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store(self.settings)
        return self._store

    @property
    def celery(self) -> Any:
        if self._celery is None:
            from farm.queue.app import make_celery

            self._celery = make_celery(self.settings)
        return self._celery

    def close(self) -> None:
        self.tracker.close()
        if self._celery is not None:
            self._celery.close()

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ submit

    def submit(self, spec: Any) -> JobHandle:
        """Validate, upload inputs, record and enqueue one job."""
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Iterable[Any]) -> list[JobHandle]:
        """Submit many jobs; all are validated before anything is written.

        A spec with an idempotency `key` that was submitted before is not submitted again:
        its handle points at the existing job. A key submitted before with a different spec
        is refused (`InvalidJob`), nothing written.
        """
        with gc_paused():
            parsed = [parse_spec(s) for s in specs]
            sub = Submission(self)
            records = [sub.prepare_alike(spec) for spec in parsed]  # checked, nothing written
            sub.check_keys(records)  # a key re-used for another spec: refused, nothing written
            sub.store_inputs()  # content-addressed: each input once
            sub.write(records)
            return [JobHandle(self, rec["id"]) for rec in records]

    def check_model(self, ref: str) -> None:
        """Refuse a model this machine can see that a worker would refuse (`farm.inputs.models`);
        each ref once per process."""
        if ref not in self._checked_models:
            check_visible_model(ref, self.settings.models_dir, self.settings.model_check)
            self._checked_models.add(ref)

    # ------------------------------------------------------------------ follow

    def job(self, job_id: str) -> JobHandle:
        return JobHandle(self, job_id)

    def get(self, job_id: str) -> JobRecord:
        return self.tracker.get(job_id)

    def cancel(self, job_id: str) -> JobState:
        """Cancel a queued or waiting job now, or a running one within one denoising step."""
        state = self.tracker.request_cancel(job_id)
        if state == JobState.CANCELLED:  # jobs waiting for this one fail now
            deps.job_ended(self.tracker, self.celery, job_id)
        return state

    def wait(
        self,
        job_ids: Sequence[str],
        timeout: float | None = None,
        *,
        raise_on_failure: bool = False,
        on_progress: Callable[[list[tuple[str, str | None, int, int]]], None] | None = None,
        poll: float = 0.5,
        on_unavailable: Callable[[str | None], None] | None = None,
    ) -> list[JobRecord]:
        """Block until every job ends; their records, in order.

        Follows the events stream, so it wakes as soon as a job changes state, and polls
        progress every `poll` seconds for `on_progress((id, state, step, total)…)`. A Redis
        that goes away is waited for (`FARM_RECONNECT_SECONDS`), with `on_unavailable(why)`
        when it goes and `on_unavailable(None)` when it is back; then `TransientError`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ids = list(job_ids)
        patience = self.patience(on_unavailable)
        cursor = patience.run(self.tracker.last_event_id)
        while True:
            states = patience.run(self.tracker.states, ids)
            for job_id, (state, _, _) in zip(ids, states, strict=True):
                if state is None:
                    patience.run(self.tracker.get, job_id)  # raises JobNotFound
            if on_progress:
                on_progress([(i, s, a, b) for i, (s, a, b) in zip(ids, states, strict=True)])
            ended = [s is not None and JobState(s).terminal for s, _, _ in states]
            if all(ended):
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                pending = [i for i, done in zip(ids, ended, strict=True) if not done]
                raise WaitTimeout(
                    f"{len(pending)} job(s) still not done after {timeout}s: {', '.join(pending[:5])}",
                    job_id=pending[0] if len(pending) == 1 else None,
                )
            cursor = patience.run(
                self.tracker.wait_event, cursor, min(poll, left) if left else poll
            )
        records = [patience.run(self.tracker.get, i) for i in ids]
        if raise_on_failure:
            raise_unless_succeeded(records)
        return records

    def patience(self, on_unavailable: Callable[[str | None], None] | None = None) -> Patience:
        """Rides out a Redis restart for `FARM_RECONNECT_SECONDS` (`farm.state.connection`)."""
        if on_unavailable is None:
            return Patience(self.settings.reconnect_seconds)
        return Patience(
            self.settings.reconnect_seconds, on_unavailable, lambda: on_unavailable(None)
        )

    # ------------------------------------------------------------------ fetch

    def download(self, job_id: str, directory: str | Path) -> list[Path]:
        """Write a finished job's outputs, mask and meta.json into `directory`."""
        rec = self.get(job_id)
        if rec.state != JobState.SUCCEEDED:
            raise JobFailed(f"nothing to download: the job is {rec.state.value}", job_id=job_id)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        named = [(uri, f"{i}.png") for i, uri in enumerate(rec.outputs)]
        if rec.kind == "finetune":  # adapter, loss.json, loss.png: by their own names
            named = [(uri, uri.rsplit("/", 1)[-1]) for uri in rec.outputs]
        named += [(rec.mask, "mask.png")] if rec.mask else []
        named += [(rec.meta, "meta.json")] if rec.meta else []
        for uri, name in named:
            path = out / name
            path.write_bytes(self.store.get_uri(uri))
            written.append(path)
        return written
