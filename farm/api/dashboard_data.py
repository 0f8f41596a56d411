"""What the dashboard shows, as JSON-ready dicts read from Redis and the store.

    >>> data = DashboardData(Farm())                 # the operator's view: every tenant
    >>> data = DashboardData(farm, who)              # one tenant's (a logged-in token)
    >>> data.overview()["queues"]       # [{'name': 'render', 'depth': 3, 'by_step': {...}}, ...]
    >>> data.job("3f2a...")["images"]   # {'image': '/files/inputs/....png?job=…', ...}

Read-only: nothing here writes to Redis or storage. Images are never inlined; a stored object
is named by a `/files/<key>` URL that `farm.api.dashboard` serves from the farm's own store,
and only for keys under `FILE_PREFIXES`; a URI outside the store (a foreign input) gets no URL.
An input's URL names the job that reads it (`?job=`): the file is served only to whoever may
see that job. A tenant sees its own jobs and batches only; queues and workers are shared.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from farm.api.auth import OPERATOR, Principal
from farm.api.views import own_job, shown_batch_name
from farm.batches.batch import Batch
from farm.errors import InvalidJob, JobNotFound
from farm.jobs.record import JobRecord
from farm.queue.routing import FINETUNE_QUEUE, RENDER_QUEUE

if TYPE_CHECKING:
    from farm.client import Farm

FILE_PREFIXES = ("inputs/", "jobs/", "adapters/")
"""Storage keys the dashboard may serve: inputs, job outputs/masks/meta, fine-tune adapters."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""Outputs shown as pictures; others (a fine-tune's adapter, its loss log) are links."""

RECENT_JOBS = 24
"""Jobs listed on the front page, the last changed first."""

EVENTS_PER_JOB = 8
"""State changes read per recent job shown (a job has a few: queued, running, its end)."""

RECENT_BATCHES = 10
"""Batches listed on the front page, newest first."""

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""What a job id may look like in a dashboard URL (ids are uuid hex)."""


def check_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id or ""):
        raise InvalidJob(f"job: {job_id!r} is not a job id", field="job")
    return job_id


class DashboardData:
    """The dashboard's JSON API, over one `Farm` connection (thread-safe: redis-py pools)."""

    def __init__(self, farm: Farm, who: Principal = OPERATOR) -> None:
        self.farm = farm
        self.who = who
        self.keys = farm.tracker.keys

    # ------------------------------------------------------------------ the front page

    def overview(self) -> dict[str, Any]:
        """Queues, workers, batches and recent jobs: everything the front page polls."""
        now = time.time()
        jobs = self.recent_jobs()
        workers = self.farm.tracker.workers.read()
        queues = {RENDER_QUEUE, FINETUNE_QUEUE}
        queues.update(q for w in workers for q in w.queues)
        queues.update(j["queue"] for j in jobs if j.get("queue"))
        return {
            "now": now,
            "storage": self.farm.settings.storage_url(),
            "queues": self.queue_depths(sorted(queues)),
            "workers": [{**w.model_dump(mode="json"), "online": w.online(now)} for w in workers],
            "batches": self.batches(),
            "jobs": jobs,
        }

    def queue_depths(self, queues: list[str]) -> list[dict[str, Any]]:
        """Messages waiting per queue, summed over kombu's priority lists (one round trip)."""
        lengths = self.farm.tracker.queue_lengths(queues)
        out = []
        for q, steps in lengths.items():
            by_step = {str(step): n for step, n in steps.items() if n}
            out.append({"name": q, "depth": sum(by_step.values()), "by_step": by_step})
        return out

    def batches(self) -> list[dict[str, Any]]:
        tracker = self.farm.tracker
        names = tracker.batches.names(newest_first=True, limit=RECENT_BATCHES * 10)
        if self.who.tenant is not None:
            owners = tracker.tenants.batch_tenants(names)
            names = [n for n, t in zip(names, owners, strict=True) if t == self.who.tenant]
        out = []
        for name in names[:RECENT_BATCHES]:
            try:
                st = Batch(self.farm, name).status()
            except (JobNotFound, InvalidJob):
                continue  # removed (or never valid) since the listing
            out.append(
                {
                    "name": shown_batch_name(self.who, st.name),
                    "total": st.total,
                    "ended": st.total - st.pending,
                    "counts": st.counts,
                    "images_done": st.images_done,
                    "images_total": st.images_total,
                    "rate": st.rate,
                    "eta": st.eta,
                }
            )
        return out

    def recent_jobs(self, limit: int = RECENT_JOBS) -> list[dict[str, Any]]:
        """The jobs whose state changed last, newest first. Read from the events stream, not
        the live index: the reconciler drops ended jobs from that one."""
        tracker = self.farm.tracker
        if self.who.tenant is None:
            ids = tracker.recent_job_ids(limit, EVENTS_PER_JOB)
        else:
            ids = [i for i, _ in tracker.tenants.job_page(self.who.tenant, None, limit)]
        records = tracker.get_many(ids)
        return [self._summary(rec) for rec in records if rec is not None]

    def _summary(self, rec: JobRecord) -> dict[str, Any]:
        spec = rec.spec
        return {
            "id": rec.id,
            "kind": rec.kind,
            "state": rec.state.value,
            "model": spec.get("model"),
            "prompt": spec.get("prompt") or spec.get("instance_prompt"),
            "queue": rec.queue,
            "worker": rec.worker,
            "created_at": rec.created_at,
            "finished_at": rec.finished_at,
            "progress": {"step": rec.progress.step, "total": rec.progress.total},
            "error": rec.error,
            "thumb": next(
                (self.file_url(u) for u in rec.outputs if u.endswith(IMAGE_SUFFIXES)), None
            ),
        }

    # ------------------------------------------------------------------ one job

    def job(self, job_id: str) -> dict[str, Any]:
        """One job's record with its input, mask and outputs as `/files/` URLs (None where
        the job has none, or where it lies outside the farm's store)."""
        rec = own_job(self.farm, self.who, check_job_id(job_id))
        image = rec.spec.get("image")
        mask = rec.mask or rec.spec.get("mask_image")
        return {
            **self._summary(rec),
            "spec": rec.spec,
            "attempt": rec.attempt,
            "started_at": rec.started_at,
            "images": {
                "image": self.file_url(image, rec.id) if isinstance(image, str) else None,
                "mask": self.file_url(mask, rec.id) if isinstance(mask, str) else None,
                "outputs": [self.file_url(uri) for uri in rec.outputs],
                "meta": self.file_url(rec.meta) if rec.meta else None,
            },
        }

    def file_url(self, uri: str, job_id: str | None = None) -> str | None:
        """`/files/<key>` for a URI inside the farm's store under `FILE_PREFIXES`, else None;
        an input's names the job that reads it (`?job=<id>`)."""
        key = self.farm.store.key_of(uri)
        if key is None or not key.startswith(FILE_PREFIXES):
            return None
        url = "/files/" + quote(key)
        return f"{url}?job={quote(job_id)}" if job_id and key.startswith("inputs/") else url

    def batch(self, name: str) -> dict[str, Any]:
        """One batch: its progress, and its failed jobs with their reasons."""
        from farm.api.batches import status

        return status(_Ctx(self.farm), self.who, name)

    def may_read(self, key: str, job_id: str | None) -> bool:
        """Whether `/files/<key>` is the caller's: a job's or an adapter's files go to whoever
        sees the job; an input to whoever sees the job (`?job=`) that names it."""
        parts = key.split("/")
        if key.startswith(("jobs/", "adapters/")) and len(parts) > 2:
            try:
                own_job(self.farm, self.who, parts[1])
            except Exception:
                return False
            return True
        if key.startswith("inputs/"):
            if self.who.tenant is None:
                return True
            if job_id is None:
                return False
            try:
                rec = own_job(self.farm, self.who, job_id)
            except Exception:
                return False
            uri = self.farm.store.uri(key)
            return uri in (
                rec.spec.get("image"),
                rec.spec.get("mask_image"),
                rec.spec.get("ip_adapter_image"),
            )
        return False


class _Ctx:
    """What `farm.api.batches.status` reads of the app's context."""

    def __init__(self, farm: Farm) -> None:
        self.farm = farm
