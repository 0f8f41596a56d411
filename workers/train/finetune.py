"""A `finetune` job on a worker: claimed job → training data → LoRA training → adapter stored.

Any family whose table row says `trainable` (`farm.jobs.families`): the trainer picks the
family's recipe from the pipeline it is given (`workers.train.train_lora`).

`workers.worker.run_job` hands a claimed fine-tune here instead of the render path (no
gathering: fine-tunes run alone). The job keeps every guarantee a render has: a heartbeat renews
its lease and publishes progress (step, total, loss); a cancel, a shutdown (SIGTERM) or
`FARM_FINETUNE_TIME_LIMIT` stops it within the step it is in (the step abandoned, see
`workers.train.train_lora`), not only at the next one: a 512 px step on a CPU takes minutes.
Its progress shows its total from the claim on (`step 0/500`, not `0/?`) while the pipeline
loads. Every write of its end state is fenced by its attempt token.

Preemption: every `checkpointing_steps` the whole training state goes to storage
(`workers.train.checkpoints`), and a shutdown writes one more before handing the job back, so the next
attempt resumes from the newest complete checkpoint instead of step 0.

Storage, under `adapters/<job_id>/`:

    pytorch_lora_weights.safetensors   the adapter, loadable by diffusers' `load_lora_weights`
    loss.json                          the loss per optimizer step, and where attempts resumed
    loss.png                           the loss curve
    meta.json                          spec, model, seed, worker, versions, timings; written last
    checkpoints/<step>/                the checkpoints (all kept, or the newest
                                       `checkpoints_total_limit`)

The adapter, its loss log and curve and meta.json are stored first-writer-wins
(`ObjectStore.put_new`), as a render's results are (`workers.results` argues why): a superseded
attempt that wakes after another one stored them can never replace them, and an attempt whose
meta.json lost to an earlier attempt's finishes from that one. Checkpoints are the job's
working state, not its result: each is written only while the attempt is current, marker last.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

from farm.errors import InvalidJob
from farm.inputs.budgets import Budgets
from farm.jobs.specs import Finetune, parse_spec
from farm.jobs.state import JobState
from farm.keys import ADAPTER_FILE, adapter_file_key, adapter_key
from farm.storage import ObjectStore
from workers.heartbeat import Heartbeat
from workers.outcomes import Limits, Outcome, Stop, dead_letter, end, finish_stored, settle, stopped
from workers.runtime import Held, Runtime, load_input
from workers.train import checkpoints
from workers.train.checkpoints import Checkpoint

log = logging.getLogger("farm.worker")

OUTPUT_FILES = (ADAPTER_FILE, "loss.json", "loss.png")
"""What a fine-tune's record lists as outputs, the adapter first; `meta.json` is its meta."""


def run_finetune(rt: Runtime, job: Held) -> Outcome:
    """Run one claimed fine-tune to its end; how it ended."""
    # Attempts that moved the checkpoint on do not count toward FARM_MAX_DELIVERIES: a long
    # fine-tune on preemptible machines may be stopped many times and still finish.
    counted = replace(job, attempt=attempts_without_progress(rt.store, job.id, job.attempt))
    if dead_letter(rt, job, attempts=counted.attempt):
        return Outcome.FAILED
    lease = rt.settings.lease_seconds
    with Heartbeat(
        rt.tracker, {job.id: job.token}, lease, interval=min(0.2, lease / 3), cancels=rt.cancels
    ) as hb:
        # Its total from the start: the first steps may be minutes away (the model loads).
        hb.watch([job.id])(0, int(job.record.spec.get("max_train_steps", 0)))
        hb.beat()
        try:
            # 1. A retried job whose earlier attempt stored everything is just finished.
            stored = adapter_file_key(job.id, "meta.json")
            outcome = (job.attempt > 1 and finish_stored(rt, job, stored, _stored)) or _train(
                rt, job, hb
            )
        except Exception as e:
            outcome = settle(rt, counted, e)
        hb.release(job.id)
    log.info("fine-tune %s: %s (attempt %d)", job.id, outcome, job.attempt)
    return outcome


def _stored(meta: dict[str, Any]) -> dict[str, Any]:
    """The record's fields of a fine-tune whose earlier attempt stored everything."""
    loss = meta["final_loss"]
    return {
        "outputs": meta["outputs"],
        "step": meta["steps"],
        "total": meta["steps"],
        "loss": loss if loss is not None else "",
    }


def _train(rt: Runtime, job: Held, hb: Heartbeat) -> Outcome:
    from workers.train.loss_plot import loss_curve_png
    from workers.train.train_lora import LoraTrainer

    t_start = time.perf_counter()
    # 2. The spec and the training data, as the client stored them: image URIs and captions.
    spec = parse_spec(job.record.spec)
    if not isinstance(spec, Finetune):
        raise InvalidJob(f"job {job.id} is a {spec.kind}, not a finetune", field="kind")
    if not isinstance(spec.images, list) or spec.captions is None:
        raise InvalidJob("images: a fine-tune reaches a worker as image URIs and captions")
    Budgets.of(rt.settings).check(spec)  # its captions: a job that passed an older client
    images = [load_input(rt, uri, "images") for uri in spec.images]
    t_inputs = time.perf_counter()
    # 3. The warm pipeline renders use; the trainer adds its LoRA layers and removes them after.
    #    A model the client could not see is checked here as it is at submit: a family or a
    #    model that cannot train (an inpainting model, a refiner) is refused, never retried.
    rt.cache.info(spec.model).check_finetune(spec.resolution, spec.model)
    pipe: Any = rt.cache.get(spec.model, "txt2img")  # the model's own txt2img pipeline
    t_load = time.perf_counter()
    stop: list[Stop] = []
    watch = hb.watch([job.id])
    limits = Limits(rt, rt.settings.finetune_time_limit, "FARM_FINETUNE_TIME_LIMIT")

    def on_step(step: int, total: int, loss: float) -> bool:
        hb.report_loss(job.id, loss)
        reason = limits.reason()
        if reason is not None:
            stop.append(reason)
        return watch(step, total) or bool(stop)

    def should_stop() -> bool:
        """Asked within a step: a shutdown, the time limit, a cancel or a newer attempt
        abandons the step at once."""
        if not stop and (reason := limits.reason()) is not None:
            stop.append(reason)
        return (
            bool(stop) or job.id in hb.cancelled or job.id in hb.stale or job.id in rt.cancels.ids
        )

    def on_checkpoint(ckpt: Checkpoint) -> None:
        if job.id in hb.stale:
            return  # a newer attempt owns the job now: write nothing more
        ckpt.extra["segments"] = segments
        ckpt.extra["attempt"] = job.attempt
        checkpoints.save(rt.store, job.id, ckpt)
        log.info("fine-tune %s: checkpoint at step %d", job.id, ckpt.step)
        if spec.checkpoints_total_limit:
            checkpoints.prune(rt.store, job.id, spec.checkpoints_total_limit)

    with LoraTrainer(pipe, spec, images, spec.captions) as trainer:
        # 4. Resume from the newest complete checkpoint an earlier attempt left, if any.
        segments: list[dict[str, Any]] = []
        latest = checkpoints.latest_step(rt.store, job.id) if job.attempt > 1 else None
        if latest is not None:
            ckpt = checkpoints.load(rt.store, job.id, latest)
            trainer.resume(ckpt)
            segments = list(ckpt.extra.get("segments", []))
            log.info("fine-tune %s: resuming from step %d", job.id, latest)
        segments.append({"attempt": job.attempt, "from_step": trainer.step, "worker": rt.name})
        watch(trainer.step, spec.max_train_steps)
        # 5. Train: progress and loss through the heartbeat, checkpoints to storage; a cancel,
        #    a shutdown or the time limit stops it within the step it is in.
        finished = trainer.run(on_step, on_checkpoint, should_stop)
        hb.beat()  # a cancel or takeover that came during the last step counts too
        if not finished or job.id in hb.cancelled or job.id in hb.stale:
            if stop == [Stop.SHUTDOWN] and job.id not in hb.stale | hb.cancelled:
                on_checkpoint(trainer.snapshot())  # the next attempt loses no step
            return stopped(rt, job, hb, stop[0] if stop else Stop.CANCEL, limits, "training")
        adapter = trainer.adapter_bytes()
        losses, resumed_from = trainer.losses, trainer.resumed_from
    t_train = time.perf_counter()
    # 6. Outputs, then meta.json last: its presence means everything else is stored.
    uris = [rt.store.uri(adapter_file_key(job.id, name)) for name in OUTPUT_FILES]
    loss_log = {
        "loss": losses,
        "max_train_steps": spec.max_train_steps,
        "segments": segments,
    }
    rt.store.put_many_new(
        {
            adapter_key(job.id): adapter,
            adapter_file_key(job.id, "loss.json"): json.dumps(loss_log).encode(),
            adapter_file_key(job.id, "loss.png"): loss_curve_png(
                losses, [s["from_step"] for s in segments[1:]]
            ),
        }
    )
    meta = {
        "job_id": job.id,
        "kind": spec.kind,
        "spec": job.record.spec,
        "seed": spec.seed,
        "model": spec.model,
        "steps": len(losses),
        "final_loss": losses[-1] if losses else None,
        "resumed_from": resumed_from,
        "segments": segments,
        "precision": _precision(pipe, spec),
        "worker": rt.name,
        "device": str(rt.device),
        "attempt": job.attempt,
        "versions": rt.versions,
        "timings": {
            "inputs_s": round(t_inputs - t_start, 4),
            "load_s": round(t_load - t_inputs, 4),
            "train_s": round(t_train - t_load, 4),
        },
        "outputs": uris,
    }
    meta_key = adapter_file_key(job.id, "meta.json")
    stored = rt.store.put_new(meta_key, json.dumps(meta, indent=2).encode())
    # 7. Succeeded, if this attempt is still the current one; if an earlier attempt stored
    #    everything first, its files stay and are the result.
    ended = None if stored else finish_stored(rt, job, meta_key, _stored)
    return ended or end(
        rt,
        job,
        JobState.SUCCEEDED,
        outputs=uris,
        meta=rt.store.uri(meta_key),
        step=len(losses),
        total=spec.max_train_steps,
        loss=losses[-1] if losses else "",
    )


def attempts_without_progress(store: ObjectStore, job_id: str, attempt: int) -> int:
    """How many attempts, this one included, since the attempt that wrote the newest complete
    checkpoint: all of them when there is none (or storage cannot say)."""
    try:
        step = checkpoints.latest_step(store, job_id) if attempt > 1 else None
        if step is None:
            return attempt
        written_by = checkpoints.load_state(store, job_id, step).get("attempt")
    except Exception as e:  # storage away: count every attempt, as for a render
        log.warning("fine-tune %s: cannot read its checkpoints (%s)", job_id, e)
        return attempt
    return attempt - int(written_by) if written_by else attempt


def _precision(pipe: Any, spec: Finetune) -> str:
    from workers.models.families import denoiser_of

    weights = str(denoiser_of(pipe).dtype).removeprefix("torch.")
    if pipe.device.type != "cuda" or spec.mixed_precision == "no":
        return f"{weights} weights, float32 LoRA, no autocast"
    return f"{weights} weights, float32 LoRA, {spec.mixed_precision} autocast"
