"""The worker: one process per device, one Celery task, thin: claim → run → store → finish.

Everything heavy (the device, the pipelines, the Redis and storage clients) is loaded once per
process in `Runtime` and reused by every job.
"""

from __future__ import annotations

import gc
import json
import logging
import platform
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from farm import images
from farm.errors import InvalidJob, StaleAttempt, TransientError
from farm.jobs import Img2Img, Inpaint, JobState, parse_spec
from farm.keys import mask_key, meta_key, output_key
from farm.queue import RENDER_QUEUE, RUN_TASK, enqueue, make_celery
from farm.settings import FarmSettings
from farm.storage import open_store
from farm.tracker import Tracker

log = logging.getLogger("farm.worker")


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from farm import __version__

    return {
        "farm": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


class Runtime:
    """What a worker process loads once: settings, Redis, storage, device, warm pipelines."""

    def __init__(
        self,
        settings: FarmSettings,
        device: str = "cpu",
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        from workers.device import pin_device
        from workers.pipelines import PipelineCache

        self.settings = settings
        self.device = pin_device(device, threads)
        self.name = name or f"{device}@{socket.gethostname()}"
        self.tracker = Tracker.from_url(
            settings.redis_url, settings.key_prefix, settings.record_ttl
        )
        self.store = open_store(settings)
        import torch

        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.cache = PipelineCache(
            str(self.device),
            dtype,
            max_models=2,
            models_dir=settings.models_dir,
            max_gb=settings.model_cache_gb,
        )
        self.celery = make_celery(settings)
        self.versions = versions()
        self.jobs_done = 0


@dataclass
class Heartbeat:
    """Renews a running job's lease and publishes its progress from a background thread.

    The denoising loop only touches memory (`step`, `total`, `cancelled`); the thread does
    the Redis round trips, so per-step overhead is nil and a cancel lands within one step of
    the next beat.
    """

    tracker: Tracker
    job_id: str
    token: str
    lease: float
    interval: float = 0.2
    step: int = 0
    total: int = 0
    cancelled: bool = False
    stale: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{self.job_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def beat(self) -> None:
        try:
            if self.tracker.heartbeat(self.job_id, self.token, self.lease, self.step, self.total):
                self.cancelled = True
        except StaleAttempt:
            self.stale = True
        except Exception as e:  # Redis blip: the lease covers several missed beats
            log.warning("heartbeat for job %s failed: %s", self.job_id, e)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def on_step(self, step: int, total: int) -> bool:
        """The render's step callback: record progress; True asks the pipeline to stop."""
        self.step, self.total = step, total
        return self.cancelled or self.stale


def _load_input(rt: Runtime, uri: str, field: str) -> Any:
    return images.decode_image(rt.store.get_uri(uri), field=field)


def run_job(rt: Runtime, job_id: str) -> str:
    """Run one job to its end. Returns the state it ended in, or `skipped`."""
    t0 = time.perf_counter()
    # 1. Claim: a duplicate or stale message finds the job claimed or done, and stops here.
    claim = rt.tracker.claim(job_id, rt.name, rt.settings.lease_seconds)
    if not claim.ok:
        log.info("job %s is %s: message acknowledged, nothing run", job_id, claim.state.value)
        return "skipped"
    token = claim.token
    record = rt.tracker.get(job_id)
    try:
        with Heartbeat(
            rt.tracker,
            job_id,
            token,
            rt.settings.lease_seconds,
            interval=min(0.2, rt.settings.lease_seconds / 3),
        ) as hb:
            outcome = _render_and_store(rt, record, token, hb, t0)
    except InvalidJob as e:
        outcome = _end(rt, job_id, token, JobState.FAILED, error=str(e))
    except StaleAttempt:
        outcome = "stale"
    except TransientError as e:
        outcome = _hand_back(rt, job_id, token, claim.attempt, str(e))
    except Exception as e:
        log.exception("job %s failed", job_id)
        outcome = _end(rt, job_id, token, JobState.FAILED, error=f"{type(e).__name__}: {e}")
    rt.jobs_done += 1
    log.info(
        "job %s (%s, %s): %s in %.2fs",
        job_id,
        record.kind,
        record.spec.get("model"),
        outcome,
        time.perf_counter() - t0,
    )
    return outcome


def _render_and_store(rt: Runtime, record: Any, token: str, hb: Heartbeat, t0: float) -> str:
    from workers.render import render

    job_id = record.id
    # 2. Read the spec and its inputs.
    spec = parse_spec(record.spec)
    image = mask = None
    if isinstance(spec, Img2Img | Inpaint):
        image = _load_input(rt, spec.image, "image").convert("RGB")
    if isinstance(spec, Inpaint):
        mask = images.as_mask(_load_input(rt, spec.mask_image, "mask_image"))
    t_inputs = time.perf_counter()
    # 3. The warm pipeline (loaded once per process, shared across kinds).
    pipe = rt.cache.get(spec.model, spec.kind)
    t_load = time.perf_counter()
    # 4. Render, reporting progress and honouring a cancel between steps.
    result = render(pipe, spec, image, mask, on_step=hb.on_step)
    t_render = time.perf_counter()
    if hb.stale:
        raise StaleAttempt("attempt superseded while rendering", job_id=job_id)
    if result.interrupted:
        return _end(rt, job_id, token, JobState.CANCELLED, error="cancelled while running")
    hb.step, hb.total = result.steps, result.steps
    # 5. Outputs before the state: deterministic keys, so a rerun rewrites the same objects.
    objects = {output_key(job_id, i): images.encode_png(img) for i, img in enumerate(result.images)}
    if result.mask_used is not None:
        objects[mask_key(job_id)] = images.encode_png(result.mask_used)
    outputs = [rt.store.uri(output_key(job_id, i)) for i in range(len(result.images))]
    meta = {
        "job_id": job_id,
        "kind": spec.kind,
        "spec": record.spec,
        "seed": spec.seed,
        "model": spec.model,
        "height": result.height,
        "width": result.width,
        "steps": result.steps,
        "worker": rt.name,
        "device": str(rt.device),
        "attempt": int(token.split(":")[0]),
        "versions": rt.versions,
        "timings": {
            "queued_s": round(max(0.0, time.time() - (t_render - t0) - record.created_at), 4),
            "inputs_s": round(t_inputs - t0, 4),
            "load_s": round(t_load - t_inputs, 4),
            "render_s": round(t_render - t_load, 4),
        },
        "outputs": outputs,
        "mask": rt.store.uri(mask_key(job_id)) if result.mask_used is not None else None,
    }
    objects[meta_key(job_id)] = json.dumps(meta, indent=2).encode()
    rt.store.put_many(objects)
    # 6. Succeeded, if this attempt is still the current one.
    return _end(
        rt,
        job_id,
        token,
        JobState.SUCCEEDED,
        outputs=outputs,
        mask=meta["mask"] or "",
        meta=rt.store.uri(meta_key(job_id)),
        step=result.steps,
        total=result.steps,
    )


def _end(rt: Runtime, job_id: str, token: str, state: JobState, **fields: Any) -> str:
    try:
        rt.tracker.finish(job_id, token, state, **fields)
    except StaleAttempt:
        log.warning(
            "job %s: attempt %s superseded; its %s is not recorded", job_id, token, state.value
        )
        return "stale"
    return state.value


def _hand_back(rt: Runtime, job_id: str, token: str, attempt: int, reason: str) -> str:
    """A transient failure: re-queue the job for another attempt, or fail it after too many."""
    if attempt >= rt.settings.max_deliveries:
        return _end(
            rt, job_id, token, JobState.FAILED, error=f"gave up after {attempt} attempts: {reason}"
        )
    time.sleep(min(30.0, 0.5 * 2**attempt))  # back off: the cause is likely shared by all jobs
    outcome = _end(rt, job_id, token, JobState.QUEUED, error=reason)
    if outcome == JobState.QUEUED.value:
        record = rt.tracker.get(job_id)
        enqueue(rt.celery, [(job_id, RENDER_QUEUE, int(record.spec.get("priority", 0)))])
    return outcome


def register(rt: Runtime) -> None:
    """Bind the `farm.run` task to this process's runtime."""

    @rt.celery.task(name=RUN_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run(job_id: str) -> str:
        return run_job(rt, job_id)


def run_worker(
    settings: FarmSettings,
    device: str = "cpu",
    queues: list[str] | None = None,
    threads: int | None = None,
    name: str | None = None,
    preload: list[str] | None = None,
    loglevel: str = "INFO",
) -> None:
    """Serve jobs on one device until stopped (SIGTERM/SIGINT: finish the job, then exit)."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rt = Runtime(settings, device, threads, name)
    for ref in preload or []:
        rt.cache.get(ref, "inpaint" if "inpaint" in ref else "txt2img")
    register(rt)
    # Everything loaded so far lives as long as the process: keep the collector off it, so
    # the objects a render allocates are all a collection has to scan.
    gc.collect()
    gc.freeze()
    worker = rt.celery.Worker(
        hostname=rt.name,
        pool_cls="solo",
        concurrency=1,
        queues=queues or [RENDER_QUEUE],
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        optimization="fair",
        quiet=True,
    )
    log.info("worker %s serving %s on %s", rt.name, ",".join(queues or [RENDER_QUEUE]), rt.device)
    worker.start()
