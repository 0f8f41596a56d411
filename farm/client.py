"""The SDK: submit jobs, follow them, fetch what they made.

    >>> from farm import Farm, Inpaint
    >>> farm = Farm()                      # FARM_* settings, or the farm `farm up` started
    >>> job = farm.submit(Inpaint(model="tiny-inpaint", prompt="a cat",
    ...                           image="dog.png", mask_image="mask.png", seed=7))
    >>> job.wait(timeout=600)              # raises JobFailed / JobCancelled / WaitTimeout
    >>> job.download("out/")               # out/0.png, out/mask.png, out/meta.json

Submitting is validate → upload inputs → write records → enqueue, in that order: a spec that
fails validation leaves nothing in Redis or storage.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from farm.errors import InvalidJob, JobCancelled, JobFailed, WaitTimeout
from farm.inputs import images
from farm.inputs import loras as adapters
from farm.inputs.models import check_resolvable, check_visible_model
from farm.jobs.masks import MaskGenerator
from farm.jobs.record import JobRecord
from farm.jobs.signature import batch_signature
from farm.jobs.specs import Inpaint, Style, Txt2Img, parse_spec
from farm.jobs.state import JobState
from farm.keys import ADAPTER_FILE, input_key
from farm.queue.routing import Router
from farm.settings import FarmSettings, resolve_settings
from farm.state import dependencies as deps
from farm.state.connection import Patience
from farm.state.tracker import Tracker, new_job_id
from farm.storage import ObjectStore, open_store

ProgressFn = Callable[[Sequence[JobRecord | tuple[str, str | None, int, int]]], None]

_URI_SCHEMES = ("s3://", "file://")


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
    """A connection to a farm: its Redis, its storage and its queue."""

    def __init__(self, settings: FarmSettings | None = None, **overrides: Any) -> None:
        base = settings or FarmSettings(**overrides)
        self.settings = resolve_settings(base)
        self.tracker = Tracker.from_settings(self.settings)
        self.router = Router(self.tracker.workers.consumed_queues)
        """Chooses each job's queue: its model's, when a worker holding it warm is online."""
        self._store: ObjectStore | None = None
        self._checked_models: set[str] = set()
        self._celery: Any = None
        self.known_inputs: dict[str, Any] = {}
        """Store URI → decoded image, for inputs already read and checked in this process
        (`farm.batch_submit` fills it per chunk), so `submit` does not fetch them again."""

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
        its handle points at the existing job.
        """
        # 1. Validate every spec and decode every input image.
        parsed = [parse_spec(s) for s in specs]
        uploads: dict[str, bytes] = {}
        records = [self._prepare(spec, uploads) for spec in parsed]
        # 2. Upload the inputs not yet stored (content-addressed: each once).
        self.upload_inputs(uploads)
        self._write(records)
        return [JobHandle(self, rec["id"]) for rec in records]

    def _write(self, records: list[dict[str, Any]]) -> list[bool]:
        """3. Write the records; 4. enqueue those that are new (a `waiting` one when the jobs
        it waits for have ended: `farm.state.dependencies`). True where a record was new."""
        deps.register(self.tracker, records)
        created = self.tracker.create(records)
        from farm.queue.app import enqueue

        new = [rec for rec, fresh in zip(records, created, strict=True) if fresh]
        enqueue(
            self.celery,
            (
                (rec["id"], rec["queue"], rec["priority"])
                for rec in new
                if not rec.get("depends_on")
            ),
        )
        waiting = [rec["id"] for rec in new if rec.get("depends_on")]
        if waiting:  # a job it waits for may have ended before it was registered
            deps.release(self.tracker, self.celery, waiting)
        return created

    def _prepare(self, spec: Any, uploads: dict[str, bytes]) -> dict[str, Any]:
        """The record of a validated spec; its input images checked and queued for upload."""
        if spec.model not in self._checked_models:
            check_visible_model(spec.model, self.settings.models_dir, self.settings.model_check)
            self._checked_models.add(spec.model)
        updates: dict[str, Any] = {}
        if spec.seed is None:
            updates["seed"] = secrets.randbits(32)
        image = None
        depends_on: list[str] = []
        if getattr(spec, "loras", None):
            updates["loras"], depends_on = adapters.prepare_loras(
                spec.loras, uploads, tracker=self.tracker, store=self.store
            )
        if spec.kind == "finetune":  # training images and captions, resolved to store URIs
            from farm.inputs.training_data import training_set

            updates.update(training_set(spec, self.store, uploads))
        elif not isinstance(spec, Txt2Img):
            image = self._input(spec.image, "image", uploads, updates, mask=False)
            if isinstance(spec, Inpaint) and isinstance(spec.mask_image, MaskGenerator):
                # Drawn by the worker at the image's size: nothing to decode or upload here;
                # its seed is written down (the job's, unless it has its own).
                if spec.mask_image.seed is None:
                    updates["mask_image"] = spec.model_copy(update=updates).mask_generator()
            elif isinstance(spec, Inpaint):
                mask = self._input(spec.mask_image, "mask_image", uploads, updates, mask=True)
                images.check_mask_matches(image, mask)
        if isinstance(spec, Style):  # the reference image, stored once like `image`
            check_resolvable(
                spec.ip_adapter,
                self.settings.model_check,
                self.settings.models_dir,
                field="ip_adapter",
            )
            self._input(spec.ip_adapter_image, "ip_adapter_image", uploads, updates, mask=False)
        spec = spec.model_copy(update=updates)
        job_id = new_job_id(spec.key)
        return {
            "id": job_id,
            "kind": spec.kind,
            "state": (JobState.WAITING if depends_on else JobState.QUEUED).value,
            "depends_on": depends_on or None,
            "spec": spec.model_dump(mode="json", exclude_none=True),
            "priority": spec.priority,
            "created_at": repr(time.time()),
            "attempt": 0,
            "signature": batch_signature(spec, image.size if image is not None else None),
            "queue": self.router.queue_for(spec),
        }

    def upload_inputs(self, items: dict[str, bytes]) -> int:
        """Store the content-addressed inputs not stored yet; how many were uploaded."""
        return self.store.put_missing(items)

    def _input(
        self,
        value: Any,
        field: str,
        uploads: dict[str, bytes],
        updates: dict[str, Any],
        *,
        mask: bool,
    ) -> Any:
        """Decode and check one input; set `updates[field]` to the URI it will be read from."""
        if isinstance(value, str) and value.startswith(_URI_SCHEMES):
            img = self.known_inputs.get(value)
            if img is None:
                data = self.store.get_uri(value, field=field)
                img = images.load_image_input(data, field=field)
            updates[field] = value
        elif isinstance(value, str) and "://" in value:
            raise InvalidJob(
                f"{field}: only local paths, s3:// and file:// URIs, got {value!r}", field=field
            )
        else:
            img = images.load_image_input(value, field=field)
            data = images.encode_png(images.as_mask(img) if mask else img.convert("RGB"))
            key = input_key(images.sha256_hex(data))
            uploads[key] = data
            updates[field] = self.store.uri(key)
        return images.as_mask(img) if mask else img

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
            if all(JobState(s).terminal for s, _, _ in states):
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                pending = [
                    i for i, (s, _, _) in zip(ids, states, strict=True) if not JobState(s).terminal
                ]
                raise WaitTimeout(
                    f"{len(pending)} job(s) still not done after {timeout}s: {', '.join(pending[:5])}",
                    job_id=pending[0] if len(pending) == 1 else None,
                )
            cursor = patience.run(
                self.tracker.wait_event, cursor, min(poll, left) if left else poll
            )
        records = [patience.run(self.tracker.get, i) for i in ids]
        if raise_on_failure:
            for rec in records:
                if rec.state == JobState.FAILED:
                    raise JobFailed(rec.error or "failed", job_id=rec.id)
                if rec.state == JobState.CANCELLED:
                    raise JobCancelled("cancelled", job_id=rec.id)
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
