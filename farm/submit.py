"""The one submit pipeline: prepare → validate → write → enqueue → release → re-send.

Every way a job enters the farm goes through a `Submission`: `Farm.submit_many`, a batch's
chunks (`farm.batches.submit`), a batch's retries (`Batch.retry`), and manifest validation,
which prepares one job per distinct row as a dry run (nothing encoded, stored or written).
With no farm to be found, `preflight` makes the same dry run against `Offline` parts, so bad
input is reported as such before "no farm is running" (the CLI's order: validate, then look
for the farm).

    >>> sub = Submission(farm)
    >>> records = [sub.prepare(parse_spec(s)) for s in specs]   # 1-2: checked, nothing written
    >>> sub.store_inputs()                                     # inputs, content-addressed
    >>> sub.write(records)                                     # 3-6

1. Prepare: the model checked where this machine can see it, and the spec resolved against it
   (`farm.jobs.defaults.resolve`: its kind, family arguments, scheduler and sizes checked,
   every left-out field at that model's own default), a seed for a spec without one, every
   input resolved (`InputResolver`: checked, given its content key, queued for upload), LoRA
   refs resolved (a render naming an unfinished fine-tune waits for it), the batch signature
   and the queue chosen.
   Many jobs alike but for their prompts, seeds and keys (`prepare_alike`: a dataset's
   augmentations) are prepared once and stamped: each other record is the first one's with
   its own prompts, seed, key, id and generated mask's seed, its texts measured.
2. Validate: everything the client can check is checked in step 1, the budgets a job must fit
   (`farm.inputs.budgets`: pixels, prompt length, text that is UTF-8 and holds no NUL)
   included; and before step 3 that no idempotency key names a job written with another
   spec. The first problem is an `InvalidJob` naming the field, before anything is stored.
3. Write: the records (`Tracker.create`: a record whose id exists is left alone; ids derive
   from idempotency keys), after registering waiting ones with what they wait for.
4. Enqueue: one message per new record that is not waiting.
5. Release: a waiting record whose dependencies ended before it was registered is queued (or
   failed) now (`farm.state.dependencies`).
6. Re-send: when asked, records found already written and still queued get their message
   again (a submit that died between writing and enqueueing), plus any `also_send`.
"""

from __future__ import annotations

import functools
import gc
import json
import operator
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from farm.errors import InvalidJob
from farm.inputs import images
from farm.inputs.budgets import Budgets
from farm.inputs.loras import prepare_loras
from farm.inputs.models import check_resolvable, check_visible_model, model_info
from farm.inputs.resolver import InputResolver
from farm.jobs.defaults import resolve
from farm.jobs.families import ModelInfo
from farm.jobs.masks import MaskGenerator
from farm.jobs.signature import batch_signature
from farm.jobs.specs import Img2Img, Inpaint, Style, Txt2Img, dump_spec, parse_spec
from farm.jobs.state import JobState
from farm.queue.app import enqueue
from farm.queue.routing import Router
from farm.settings import FarmSettings
from farm.state import dependencies
from farm.state.tracker import Tracker, new_job_id
from farm.storage import ObjectStore, open_store


class Parts(Protocol):
    """What a submission needs of a farm (`farm.client.Farm` has it all)."""

    settings: FarmSettings
    tracker: Tracker
    router: Router

    @property
    def store(self) -> ObjectStore: ...

    @property
    def celery(self) -> Any: ...

    def check_model(self, ref: str) -> None: ...


@dataclass
class Written:
    """What `Submission.write` did."""

    created: list[bool]
    """Per record: True where it was new, False where a record with its id existed."""
    resent: int = 0
    """Messages sent again for records that were present and still queued (or `also_send`)."""

    @property
    def new(self) -> int:
        return sum(self.created)


class Submission:
    """One submit through the pipeline: one input resolver, then one or more writes."""

    def __init__(self, farm: Parts, inputs: InputResolver | None = None) -> None:
        self.farm = farm
        self.budgets = Budgets.of(farm.settings)
        """What one job may ask of a worker (`farm.inputs.budgets`), checked in `prepare`."""
        self.inputs = inputs or InputResolver(
            farm.store, max_input_pixels=self.budgets.max_input_pixels
        )
        self._drawn: set[str] = set()  # ids of records whose seed `prepare` drew at random
        self._models: dict[str, ModelInfo | None] = {}
        self._templates: dict[tuple[Any, ...], dict[str, Any]] = {}  # `prepare_alike`'s

    # ------------------------------------------------------------------ 1-2

    def prepare(self, spec: Any, *, dry: bool = False) -> dict[str, Any]:
        """The record of a parsed spec, every client check made; nothing is written.

        `dry`: inputs are checked but not encoded or queued for upload (manifest validation).
        """
        farm = self.farm
        self.budgets.check(spec)  # text and explicit sizes, before anything is read
        farm.check_model(spec.model)
        info = self.model_info(spec.model)
        if spec.kind == "finetune":
            if info is not None:
                info.check_finetune(spec.resolution, spec.model)
        else:
            refiner = None
            if spec.refiner is not None:
                farm.check_model(spec.refiner.model)
                refiner = self.model_info(spec.refiner.model)
            if info is not None:  # else the worker resolves it against the loaded model
                spec = resolve(spec, info, refiner)
        updates: dict[str, Any] = {}
        if spec.seed is None:
            updates["seed"] = secrets.randbits(32)
        image = None
        depends_on: list[str] = []
        if getattr(spec, "loras", None):
            updates["loras"], depends_on = prepare_loras(
                spec.loras, self.inputs, farm.tracker, dry=dry
            )
        if spec.kind == "finetune":  # training images and captions, resolved to store URIs
            from farm.inputs.training_data import training_set

            updates.update(training_set(spec, self.inputs, dry=dry))
        elif not isinstance(spec, Txt2Img):
            updates["image"], image = self.inputs.image(spec.image, "image", dry=dry)
            if isinstance(spec, Inpaint) and isinstance(spec.mask_image, MaskGenerator):
                # Drawn by the worker at the image's size: nothing to decode or upload here;
                # its seed is written down (the job's, unless it has its own).
                if spec.mask_image.seed is None:
                    seed = updates.get("seed", spec.seed)
                    updates["mask_image"] = spec.mask_image.model_copy(update={"seed": seed})
            elif isinstance(spec, Inpaint):
                updates["mask_image"], mask = self.inputs.image(
                    spec.mask_image, "mask_image", mask=True, dry=dry
                )
                images.check_mask_matches(image, mask)
        if isinstance(spec, Style):  # the reference image, stored once like `image`
            check_resolvable(
                spec.ip_adapter,
                farm.settings.model_check,
                farm.settings.models_dir,
                field="ip_adapter",
            )
            updates["ip_adapter_image"], _ = self.inputs.image(
                spec.ip_adapter_image, "ip_adapter_image", dry=dry
            )
        spec = spec.model_copy(update=updates)
        if image is not None:  # the working size taken from the input
            self.budgets.check_size(spec, image.size)
        n_images = int(getattr(spec, "num_images_per_prompt", 1))
        job_id = new_job_id(spec.key)
        if "seed" in updates:
            self._drawn.add(job_id)
        return {
            "id": job_id,
            "kind": spec.kind,
            "state": (JobState.WAITING if depends_on else JobState.QUEUED).value,
            "depends_on": depends_on or None,
            "spec": dump_spec(spec),
            "priority": spec.priority,
            "created_at": repr(time.time()),
            "attempt": 0,
            "signature": batch_signature(spec, image.size if image is not None else None, info),
            "queue": farm.router.queue_for(spec),
            # The HTTP API submits through a farm view that names the caller's tenant
            # (`farm.api.farms`); the SDK and the CLI write none (the `default` tenant).
            "tenant": getattr(farm, "tenant", None),
            "images": n_images if n_images > 1 else None,
        }

    def prepare_alike(self, spec: Any) -> dict[str, Any]:
        """`prepare(spec)`, stamped from the record of a job prepared before by this
        submission that differs only in its prompt, negative prompt, seed, key and generated
        mask's seed (`_shape`: the same kind, fields given, inputs (paths or bytes), and
        every other value): its checks were made on that job, and its texts are measured
        here. ~2.5x cheaper than a prepare; a spec with anything else (a LoRA, an input given
        as pixels, a refiner, a style job) is prepared whole."""
        shape = _shape(spec)
        template = self._templates.get(shape) if shape is not None else None
        if template is None:
            record = self.prepare(spec)
            if shape is not None and not record["depends_on"]:
                remember(self._templates, shape, record)
            return record
        texts = {name: getattr(spec, name) for name in STAMPED}
        self.budgets.check_texts(texts)
        seed = spec.seed if spec.seed is not None else secrets.randbits(32)
        mask = getattr(spec, "mask_image", None)
        mask_seed = seed if isinstance(mask, MaskGenerator) and mask.seed is None else None
        record = stamp(template, spec.key, seed, texts, mask_seed)
        if spec.seed is None:
            self._drawn.add(record["id"])
        return record

    def model_info(self, ref: str) -> ModelInfo | None:
        """What this machine can tell of model `ref` (`farm.inputs.models.model_info`), once
        per submission."""
        if ref not in self._models:
            self._models[ref] = model_info(ref, self.farm.settings.models_dir)
        return self._models[ref]

    # ------------------------------------------------------------------ 3-6

    def store_inputs(self, uploads: dict[str, bytes] | None = None) -> int:
        """Store the inputs prepared so far (or `uploads`) that are not stored yet; how many."""
        items = self.inputs.take_uploads() if uploads is None else uploads
        return self.farm.store.put_missing(items) if items else 0

    def write(
        self,
        records: Sequence[dict[str, Any]],
        *,
        resend_present: bool = False,
        also_send: Iterable[tuple[str, str, int]] = (),
    ) -> Written:
        """Write the records, send the new ones' messages, release the waiting ones; with
        `resend_present`, re-send the messages of records already written and still queued."""
        tracker, celery = self.farm.tracker, self.farm.celery
        self.check_keys(records)
        # 3. Records, after registering the waiting ones with what they wait for.
        dependencies.register(tracker, records)
        created = tracker.create(records)
        # 4. Messages for the new records that are not waiting.
        send = [
            (rec["id"], rec["queue"], rec["priority"])
            for rec, new in zip(records, created, strict=True)
            if new and not rec.get("depends_on")
        ]
        # 6. Records already there and still queued: their message may never have been sent.
        resent = list(also_send)
        if resend_present:
            again = [rec for rec, new in zip(records, created, strict=True) if not new]
            states = tracker.states([rec["id"] for rec in again])
            resent += [
                (rec["id"], rec["queue"], rec["priority"])
                for rec, (state, _, _) in zip(again, states, strict=True)
                if state == JobState.QUEUED
            ]
        enqueue(celery, [*send, *resent])
        # 5. A job it waits for may have ended before it was registered.
        waiting = [
            rec["id"]
            for rec, new in zip(records, created, strict=True)
            if new and rec.get("depends_on")
        ]
        if waiting:
            dependencies.release(tracker, celery, waiting)
        return Written(created, len(resent))

    def check_keys(self, records: Sequence[dict[str, Any]]) -> None:
        """`InvalidJob` for a record whose idempotency key names a job already written with a
        different spec: submitting it would silently return the old job. A seed `prepare`
        drew at random (and a generated mask's seed drawn from it) does not count."""
        keyed = [rec for rec in records if rec["spec"].get("key")]
        if not keyed:
            return
        stored = self.farm.tracker.job_fields([rec["id"] for rec in keyed], "spec")
        for rec, (raw,) in zip(keyed, stored, strict=True):
            if raw is None:
                continue
            drawn = rec["id"] in self._drawn
            if _comparable(json.loads(raw), drawn) != _comparable(rec["spec"], drawn):
                key = rec["spec"]["key"]
                raise InvalidJob(
                    f"key: {key!r} was used for job {rec['id']} with a different spec; give "
                    "this job a key of its own",
                    field="key",
                )


TEMPLATES = 1024
"""Alike jobs' templates a submission keeps, at most (`remember`)."""


def remember(cache: dict[Any, Any], key: Any, value: Any, most: int = TEMPLATES) -> None:
    """`cache[key] = value`, its oldest entry dropped past `most`: a submit of many jobs of
    distinct shapes (every row its own image) keeps no more than that."""
    if len(cache) >= most:
        del cache[next(iter(cache))]
    cache[key] = value


STAMPED = ("prompt", "negative_prompt")
"""The texts in which records stamped from one template differ (with seeds and keys)."""

_VARYING = frozenset({*STAMPED, "seed", "key", "mask_image", "loras"})
_STAMPABLE = (Txt2Img, Img2Img, Inpaint)


@functools.cache
def _values_of(cls: type[BaseModel]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A spec class's field values but the varying ones, as a tuple (in C, ~1 µs)."""
    return operator.itemgetter(*(name for name in cls.model_fields if name not in _VARYING))


def _shape(spec: Any) -> tuple[Any, ...] | None:
    """What `prepare` makes of `spec`, but for its prompts, seed, key and generated mask's
    seed: equal for two specs whose records differ only there. None: not known cheaply (a
    value that cannot be hashed: pixels, as an image or an array; LoRAs; a refiner; a style
    job, a fine-tune). An input given as a path or as bytes stands for its content (a path
    is read once per submission)."""
    cls: type[BaseModel] = type(spec)
    if cls not in _STAMPABLE:
        return None
    values = spec.__dict__
    if values["loras"]:
        return None
    mask = values.get("mask_image")
    if isinstance(mask, MaskGenerator):  # its parameters, with whether it has its own seed
        mask = (type(mask), *mask.__dict__.values())
    shape = (
        cls,
        frozenset(spec.model_fields_set),  # what was left out takes the model's default
        values["negative_prompt"] is None,
        values["key"] is None,
        mask,
        _values_of(cls)(values),
    )
    try:
        hash(shape)
    except TypeError:  # a list, an array, a model: compared whole by `prepare`
        return None
    return shape


def stamp(
    template: dict[str, Any],
    key: str | None,
    seed: int,
    texts: dict[str, str | None],
    mask_seed: int | None,
) -> dict[str, Any]:
    """The record of a job alike `template`'s but for its `texts` (prompts; None: not given,
    as in the template), seed, key (so its id) and, where its mask is drawn with its own
    seed, `mask_seed`."""
    spec = {**template["spec"], "seed": seed}
    for name, text in texts.items():
        if text is not None:
            spec[name] = text
    if key is not None:
        spec["key"] = key
    if mask_seed is not None:
        spec["mask_image"] = {**spec["mask_image"], "seed": mask_seed}
    return {**template, "id": new_job_id(key), "spec": spec, "created_at": repr(time.time())}


def _comparable(spec: dict[str, Any], drawn: bool) -> dict[str, Any]:
    """A spec as two submits of the same job agree on it (see `Submission.check_keys`)."""
    if not drawn:
        return spec
    out = {k: v for k, v in spec.items() if k != "seed"}
    mask = out.get("mask_image")
    if isinstance(mask, dict) and "generator" in mask:
        out["mask_image"] = {k: v for k, v in mask.items() if k != "seed"}
    return out


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused around a submit of many jobs, restarted after.

    Each job leaves specs, records and messages alive until its chunk is written, and the
    collector, run every few hundred allocations, walks them over and over: ~15% of a
    10,000-job `submit_many`'s CPU. Reference counting still frees what a job drops; the
    few cycles made meanwhile wait for the next collection. A collector someone else paused
    is left paused."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Offline:
    """The parts of a farm a dry run needs when no farm is to be found (`preflight`): the
    settings and the store they name, no Redis. A `job:<id>` LoRA ref, which only the farm's
    records can answer for, is checked once the farm is found."""

    tracker: Any = None
    celery: Any = None

    def __init__(self, settings: FarmSettings) -> None:
        self.settings = settings
        self.router = Router(set)  # no registry to read: every render to `render`
        self._store: ObjectStore | None = None

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store(self.settings)
        return self._store

    def check_model(self, ref: str) -> None:
        check_visible_model(ref, self.settings.models_dir, self.settings.model_check)


def preflight(settings: FarmSettings, specs: Iterable[Any]) -> None:
    """Every check `Submission.prepare` makes without a farm, as a dry run (nothing encoded,
    stored or written): `InvalidJob` for the first bad spec. For a client that found no farm,
    so that `--width 100` or a missing file is reported before "no farm is running"."""
    sub = Submission(Offline(settings))
    for spec in specs:
        sub.prepare(parse_spec(spec), dry=True)
