"""The worker: one process per device, one Celery task, thin: claim → run → store → finish.

Micro-batching: a worker that claims job A (from its Celery message) also claims up to
`FARM_MAX_BATCH` images' worth of queued jobs with A's batch signature (`Tracker.claim_and_gather`,
each with its own attempt token and lease) and runs them as one pipeline call. Their own
messages, when they arrive, find the jobs claimed or done and are acknowledged as no-ops.

Everything heavy (the device, the pipelines, the Redis and storage clients) is loaded once per
process in `Runtime` and reused by every job.

Storing results, first writer wins (why: `workers.results`), and finishing jobs from them.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from typing import Any

from farm.errors import InvalidJob
from farm.inputs import images
from farm.queue.app import RUN_TASK
from farm.queue.routing import RENDER_QUEUE
from farm.settings import FarmSettings
from farm.state.tracker import require_noeviction
from workers.faults import inject, slow_steps
from workers.heartbeat import Heartbeat
from workers.outcomes import (
    Limits,
    Outcome,
    Stop,
    dead_letter,
    settle,
    stopped,
)
from workers.pipeline import Line
from workers.results import check_conditional_writes
from workers.runtime import Held, Runtime

log = logging.getLogger("farm.worker")


def run_job(rt: Runtime, job_id: str) -> Outcome:
    """Run one job, with the compatible queued jobs it gathers, to their end; how job
    `job_id` ended."""
    t0 = time.perf_counter()
    # 1-2. Claim, and gather: queued jobs with the same batch signature join it, each with its
    #      own claim, up to `FARM_MAX_BATCH` images, records read, in one round trip. A
    #      duplicate or stale message finds the job claimed or done, and stops here.
    claim, claimed = rt.tracker.claim_and_gather(
        job_id, rt.name, rt.settings.lease_seconds, rt.settings.max_batch
    )
    if not claim.ok:
        log.info("job %s is %s: message acknowledged, nothing run", job_id, claim.state.value)
        return Outcome.SKIPPED
    held = [Held(rec, t.token, t.attempt) for rec, t in claimed]
    if held[0].record.kind == "finetune":  # trains alone, on its own path
        from workers.train.finetune import run_finetune

        ended = run_finetune(rt, held[0])
        rt.jobs_done += 1
        rt.metrics.ended(held, {job_id: ended})
        return ended
    # A job that has used up its attempts (it kills its worker every time) is dead-lettered.
    held = [job for job in held if not dead_letter(rt, job)]
    if not held:
        return Outcome.FAILED
    # 3-7. Read, render, store, finish; then the signature's next batches, pipelined.
    outcomes, chain = _run_chain(rt, held)
    rt.jobs_done += len(chain)
    rt.metrics.ended(chain, outcomes)
    for job in chain:
        log.info(
            "job %s (%s, %s, chain of %d from %s): %s in %.2fs",
            job.id,
            job.record.kind,
            job.record.spec.get("model"),
            len(chain),
            job_id,
            outcomes.get(job.id, "left to its lease"),
            time.perf_counter() - t0,
        )
    return outcomes.get(job_id, Outcome.FAILED)


def _run_chain(rt: Runtime, held: list[Held]) -> tuple[dict[str, Outcome], list[Held]]:
    """Run the held jobs as one micro-batch, then, pipelined (`workers.pipeline`), the batches
    of their signature claimed while the one before renders; (job id → how it ended, every
    job the chain held)."""
    outcomes: dict[str, Outcome] = {}
    lease = rt.settings.lease_seconds
    tokens = {job.id: job.token for job in held}
    lead = held[0].record
    per_job = int(lead.spec.get("num_images_per_prompt", 1))
    with (
        Heartbeat(
            rt.tracker, tokens, lease, interval=min(0.2, lease / 3), cancels=rt.cancels
        ) as hb,
        Line(rt, hb, outcomes, lead.signature, per_job) as line,
    ):
        # 3. Read each job's spec and inputs (`Line.ready`).
        batch = line.ready(held)
        while batch is not None:
            # 4-7. One pipeline call for them all, the next batch claimed and read meanwhile,
            #      the results handed to the writer; then the next batch's turn.
            _run_micro_batch(rt, batch, hb, outcomes, line)
            line.prefetch()  # if the render did not (it failed, or nothing was left to run)
            batch = line.take()
    return outcomes, line.held


def _run_micro_batch(
    rt: Runtime, jobs: list[Held], hb: Heartbeat, outcomes: dict[str, Outcome], line: Line
) -> None:
    """Render, store and finish `jobs` as one call. Out of memory, or past the time limit
    together: retry each half (jobs that each fit alone need not fit together); any other
    failure of a micro-batch: one by one, so a bad job fails alone."""
    if not jobs:
        return
    try:
        _render_and_store(rt, jobs, hb, outcomes, line)
        return
    except Exception as e:
        error = e
    pending = [job for job in jobs if job.id not in outcomes]
    if isinstance(error, TooSlowTogether):
        half = len(pending) // 2
        log.warning("micro-batch of %d ran past its time limit; retrying halves", len(pending))
        _run_micro_batch(rt, pending[:half], hb, outcomes, line)
        _run_micro_batch(rt, pending[half:], hb, outcomes, line)
        return
    if _out_of_memory(error) and len(pending) > 1:
        half = len(pending) // 2
        log.warning("micro-batch of %d ran out of memory; retrying halves", len(pending))
        _run_micro_batch(rt, pending[:half], hb, outcomes, line)
        _run_micro_batch(rt, pending[half:], hb, outcomes, line)
        return
    if len(pending) > 1:
        log.warning(
            "micro-batch of %d failed (%s: %s); running its jobs one by one",
            len(pending),
            type(error).__name__,
            error,
        )
        for job in pending:
            _run_micro_batch(rt, [job], hb, outcomes, line)
        return
    for job in pending:
        if _out_of_memory(error):
            error = InvalidJob(f"out of device memory even alone ({error})")
        outcomes[job.id] = settle(rt, job, error)
        hb.release(job.id)


class TooSlowTogether(Exception):
    """A micro-batch of several jobs passed the time limit: its halves are tried (each job
    alone gets the whole limit)."""


def _out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True
    return False


def _render_and_store(
    rt: Runtime, jobs: list[Held], hb: Heartbeat, outcomes: dict[str, Outcome], line: Line
) -> None:
    """Render `jobs` (one batch signature) as one call; the writer stores and finishes each,
    into `outcomes`, while the next batch renders."""
    from workers.render.ip_adapter import load_for
    from workers.render.render import render_batch

    lead = jobs[0].spec
    ids = [job.id for job in jobs]
    t_start = time.perf_counter()
    # 4. The warm pipeline (loaded once per process, shared across kinds); for style jobs,
    #    their IP-Adapter's, loaded once beside it and attached for the call only. The batch's
    #    LoRA adapters (the same for all: they are in the batch signature) are loaded for this
    #    call only: the pipeline is the base model again after it.
    loads = rt.cache.loads
    ip_adapter = load_for(rt.cache, lead) if lead.kind == "style" else None
    pipe = ip_adapter.pipe if ip_adapter else rt.cache.get(lead.model, lead.kind)
    refiner = None  # an SDXL refiner's pipeline, for jobs that name one (a second warm model)
    if getattr(lead, "refiner", None) is not None:
        second = "inpaint" if lead.kind == "inpaint" else "img2img"
        refiner = rt.cache.get(lead.refiner.model, second)
    with rt.adapters.applied(pipe, lead.loras):
        t_load = time.perf_counter()
        if rt.cache.loads > loads:
            rt.metrics.loaded(t_load - t_start)
        # 5. Render: one call, progress for every job; between steps, a cancel, a shutdown or
        #    the time limit stops it. As its last step starts, the next batch is claimed.
        inject(rt.settings.fault_injection, [job.spec for job in jobs])
        slow = slow_steps(rt.settings.fault_injection, [job.spec for job in jobs])
        watch = hb.watch(ids)
        limits = Limits(rt, rt.settings.time_limit, "FARM_TIME_LIMIT")
        stop: list[Stop] = []

        def on_step(step: int, total: int) -> bool:
            slow()
            if step >= total - 1:  # the last step next: the next batch is claimed meanwhile
                line.prefetch()
            reason = limits.reason()
            if reason is not None:
                stop.append(reason)
            return watch(step, total) or bool(stop)

        def on_preview(step: int, total: int, shown: dict[int, Any]) -> None:
            for j, picture in shown.items():  # published by the heartbeat's next beat
                hb.preview(ids[j], step, total, images.encode_png(picture))

        results = render_batch(
            pipe,
            [job.spec for job in jobs],
            [job.image for job in jobs],
            [job.mask for job in jobs],
            on_step=on_step,
            ip_adapter=ip_adapter,
            ip_adapter_image=jobs[0].style_image,
            on_preview=on_preview,
            info=rt.cache.info(lead.model),
            refiner=refiner,
        )
    t_render = time.perf_counter()
    rt.metrics.rendered(lead.kind, len(jobs), t_render - t_load)
    timings = {
        "load_s": round(t_load - t_start, 4),
        "render_s": round(t_render - t_load, 4),
    }
    if not stop:
        # 6-7. On the writer's thread, while the next batch renders: a last beat (a cancel or
        #      takeover that came during the last step counts too), then the outputs of the
        #      jobs still wanted and their state, first writer wins (`workers.results`).
        line.writer.store(list(zip(jobs, results, strict=True)), ids, timings, limits)
        return
    hb.beat()  # a cancel or takeover that came during the last step counts too
    if stop[0] == Stop.TIME_LIMIT and len(jobs) > 1:
        raise TooSlowTogether(f"{len(jobs)} jobs together took over {limits.seconds:g} s")
    for job in jobs:
        outcomes[job.id] = stopped(rt, job, hb, stop[0], limits, "running")
        hb.release(job.id)


def register(rt: Runtime) -> None:
    """Bind the `farm.run` task to this process's runtime."""

    @rt.celery.task(name=RUN_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run(job_id: str) -> str:
        with rt.presence.running(job_id):  # the registry shows it; then queues follow models
            return run_job(rt, job_id).value


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
    if settings.time_limit >= settings.visibility_timeout:
        raise InvalidJob(
            f"FARM_TIME_LIMIT ({settings.time_limit:g} s) must be shorter than "
            f"FARM_VISIBILITY_TIMEOUT ({settings.visibility_timeout} s), or Redis would hand a "
            "job still rendering to another worker",
            field="time_limit",
        )
    require_noeviction(settings)  # before anything heavy loads
    rt = Runtime(settings, device, threads, name)
    # Until Celery installs its own handlers, SIGTERM ends the start-up cleanly (the entry
    # is withdrawn below), rather than killing the process with its entry left behind.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # Its name first: a name a live worker holds is not shared (`Presence.claim`); the entry
    # then beats from its own thread, through the preloads, until the worker stops.
    rt.presence.claim()
    rt.presence.start()
    try:
        _serve(rt, settings, queues, preload or [], loglevel)
    finally:
        rt.presence.stop()


def _serve(
    rt: Runtime, settings: FarmSettings, queues: list[str] | None, preload: list[str], loglevel: str
) -> None:
    check_conditional_writes(rt)
    for ref in preload:
        rt.cache.info(ref)  # loaded (any family, any kind it runs), its pipelines on demand
    for seconds in rt.cache.load_seconds.values():
        rt.metrics.loaded(seconds)
    if settings.metrics_port:
        rt.metrics.serve(settings.metrics_port)
    # Warm models' queues first, then the ones asked for (`farm.queue.routing`).
    rt.presence.base_queues = queues or [RENDER_QUEUE]
    queues = rt.presence.current = rt.presence.queues()
    register(rt)
    # Everything loaded so far lives as long as the process: keep the collector off it, so
    # the objects a render allocates are all a collection has to scan.
    gc.collect()
    gc.freeze()
    worker = rt.celery.Worker(
        hostname=rt.name,
        pool_cls="solo",
        concurrency=1,
        queues=queues,
        loglevel=loglevel,
        # Gossip (every worker hears every other's events) and mingle (a start-up sync of
        # revoked ids we never use) stay off; the heartbeat event, one PUBLISH per worker
        # every 2 s, is what Flower lists workers by.
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=not settings.events,
        optimization="fair",
        quiet=True,
    )
    from celery.signals import worker_shutting_down

    def on_shutdown(**_: Any) -> None:
        rt.stopping = True  # the job in hand stops at its next step and is handed back

    worker_shutting_down.connect(on_shutdown, weak=False)
    threading.Thread(target=reconcile_in_turn, args=(rt,), name="reconciler", daemon=True).start()
    rt.presence.consumer = worker.consumer
    rt.presence.publish()  # ready: `farm up` says so
    log.info("worker %s serving %s on %s", rt.name, ",".join(queues), rt.device)
    worker.start()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def reconcile_in_turn(rt: Runtime) -> None:
    """The worker's reconciler thread: every `reconcile_interval`, a pass if it is this
    worker's turn (`farm.state.reconciler.take_turn`); Redis away: the next interval."""
    from farm.state.reconciler import take_turn

    interval = rt.settings.reconcile_interval
    while not rt.stopping:
        time.sleep(interval)
        try:
            take_turn(
                rt.tracker,
                rt.celery,
                rt.name,
                interval=interval,
                requeue_after=rt.settings.requeue_after,
            )
        except Exception as e:
            log.warning("reconciler pass failed: %s", e)
