"""Submit a manifest as a batch: validate all of it, then write its jobs chunk by chunk.

    >>> submit_batch(farm, "cats.csv", name="cats", variations=4, seed=0,
    ...              defaults={"model": "tiny-inpaint", "mask": "strokes",
    ...                        "prompt_template": "a photo of a {label}"})
    SubmitResult(name='cats', rows=500, jobs=2000, new=2000, present=0, ...)

Keys and seeds. A row's *identity* is the hash of what it renders (its job fields, the content
of its image and mask files, its mask generator, its own seed; see `farm.batches.manifest`). Identical
rows are told apart by their occurrence (0, 1, ...). A slot is (identity, occurrence,
variation) under the batch seed; its id hashes those, its job's idempotency key is
`batch:<name>:<slot>` and its job id derives from the key, so submitting the same manifest
again finds every job it wrote before and writes only the missing ones. A job's seed (unless
the row fixes one: row seed + variation) and a generated mask's seed (unless the row's
generator fixes one: `strokes:seed=7`) derive from the slot the same way. Editing one row,
adding rows or reordering them leaves the other rows' jobs alone.

Generated masks travel as generators: the job's `mask_image` is the row's generator with the
slot's seed (`{"generator": "strokes", "seed": ..., ...}`), which the worker draws at the
source's size (`farm.jobs.masks`) and stores, as the model used it, with the job's results. No
pixels are drawn, encoded or uploaded for them here.

Speed: every distinct input is decoded and encoded once (content-addressed upload, existence
checks in parallel), records go out in pipelines of `chunk_size`, messages in kombu batches.
Memory stays flat: pixels are held for one chunk at a time (plus a bounded decode cache).

Order of writes, per chunk: inputs, job records, messages, then the slots in the index. A
submit that dies half-way leaves slots unwritten (`unsubmitted` in `farm batch status`); the
next submit writes them, and re-sends the message of a job it finds written but still queued
without a slot (the crash fell between the record and the index).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.batches.batch import check_name, slot_key
from farm.batches.manifest import (
    MAX_PROBLEMS,
    InvalidManifest,
    Problem,
    Row,
    normalize,
    read_rows,
    validate_rows,
)
from farm.errors import InvalidJob
from farm.inputs.uploader import UploadHelper
from farm.jobs.masks import MaskGenerator
from farm.jobs.specs import parse_spec
from farm.jobs.state import JobState
from farm.queue.routing import RENDER_QUEUE
from farm.submit import STAMPED, Parts, Submission, gc_paused, remember, stamp

if TYPE_CHECKING:
    from farm.client import Farm

CHUNK_JOBS = 1000
"""Jobs written per chunk (one records pipeline, one messages batch, one index write)."""

CHUNKS_AHEAD = 4
"""Chunks prepared and waiting for their inputs to be stored, at most: what memory holds
beyond the chunk being written (records, not pixels: the decode cache is bounded)."""

MAX_VARIATIONS = 1000

MAX_SEED = 2**63 - 1
"""The largest seed a spec takes (`farm.jobs.specs`)."""


@dataclass(frozen=True, slots=True)
class Planned:
    """One slot to be: a row, a variation, and what derives from them."""

    row: Row
    variation: int
    slot: str
    seed: int
    mask_seed: int
    """Draws the row's generated mask for this slot, unless the row's generator fixes a seed."""


@dataclass
class SubmitResult:
    name: str
    rows: int
    variations: int
    jobs: int
    new: int = 0
    """Jobs written by this submit."""
    present: int = 0
    """Jobs that an earlier submit (or a concurrent one) had written already."""
    requeued: int = 0
    """Of the present jobs, those whose message was sent again: written but never indexed (an
    earlier submit died between the two), or running on an expired lease (their worker died)."""
    seconds: float = 0.0

    def line(self) -> str:
        v = "variation" if self.variations == 1 else "variations"
        jobs = "job" if self.jobs == 1 else "jobs"
        rows = "row" if self.rows == 1 else "rows"
        extra = f" requeued={self.requeued}" if self.requeued else ""
        return (
            f"batch {self.name}: {self.jobs} {jobs} ({self.rows} {rows} x {self.variations} {v}): "
            f"new={self.new} present={self.present}{extra} in {self.seconds:.1f}s"
        )


def _derive(*parts: Any) -> bytes:
    return hashlib.sha256(":".join(map(str, parts)).encode()).digest()


def _setting(settings: dict[str, Any], name: str, given: int | None, lo: int, hi: int) -> int:
    """A batch-wide whole number: the argument, else the defaults' value, else `lo`."""
    value = given if given is not None else settings.get(name, lo)
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not lo <= number <= hi:
        raise InvalidJob(f"{name}: must be a whole number {lo}..{hi}, got {value!r}", field=name)
    return number


@dataclass
class Validated:
    """A manifest checked whole: its rows and the batch-wide settings."""

    path: Path
    rows: list[Row]
    variations: int
    seed: int
    base: dict[str, Any]
    """Job fields every row starts from (defaults block, then the command line)."""


def validate_manifest(
    farm: Parts,
    manifest: str | Path,
    *,
    defaults: dict[str, Any] | None = None,
    variations: int | None = None,
    seed: int | None = None,
    sub: Submission | None = None,
) -> Validated:
    """Steps 1-2 of `submit_batch`: read the manifest and check every row as the client
    would check its job, nothing written. `farm` may be `farm.submit.Offline` (no farm
    found): then bad rows are still reported as such. `InvalidManifest` lists them by line."""
    # 1. The manifest, and the batch-wide settings.
    path = Path(manifest)
    block, raw_rows = read_rows(path, farm.settings.max_manifest_line)
    settings = {
        **normalize(block, "the defaults block", row=False),
        **normalize(defaults or {}, "the command line", row=False),
    }
    variations = _setting(settings, "variations", variations, 1, MAX_VARIATIONS)
    base_seed = _setting(settings, "seed", seed, 0, MAX_SEED)
    base = {k: v for k, v in settings.items() if k not in ("variations", "seed")}
    # 2. Every row checked, each distinct input read once, before anything is written; a
    #    row's own seed must leave room for its variations.
    rows = validate_rows(sub or Submission(farm), path, raw_rows, base)
    _check_seeds(path, rows, variations)
    return Validated(path, rows, variations, base_seed, base)


def submit_batch(
    farm: Farm,
    manifest: str | Path,
    name: str,
    *,
    defaults: dict[str, Any] | None = None,
    variations: int | None = None,
    seed: int | None = None,
    chunk_size: int = CHUNK_JOBS,
    on_chunk: Callable[[int, int], None] | None = None,
) -> SubmitResult:
    """Submit every row × variation of `manifest` not submitted before under `name`.

    `defaults` are job fields for every row (the command line's flags), over the manifest's
    own defaults block and under each row's fields. Nothing is written unless every row is
    valid: `InvalidManifest` lists the bad rows by line.
    """
    if getattr(farm, "remote", False):  # over the HTTP API: the farm validates and submits
        from farm.batches.remote import submit_remote

        return submit_remote(
            farm, manifest, name, defaults=defaults, variations=variations, seed=seed
        )
    with gc_paused():
        return _submit_batch(farm, manifest, name, defaults, variations, seed, chunk_size, on_chunk)


def _submit_batch(
    farm: Farm,
    manifest: str | Path,
    name: str,
    defaults: dict[str, Any] | None,
    variations: int | None,
    seed: int | None,
    chunk_size: int,
    on_chunk: Callable[[int, int], None] | None,
) -> SubmitResult:
    t0 = time.monotonic()
    name = check_name(name)
    sub = Submission(farm)
    # The uploads' helper process starts first: its start-up (~0.25 s) runs beside the
    # validation instead of holding up the first chunk. Nothing is stored until step 4.
    big = _lines(manifest) * (variations or 1) > chunk_size
    with _uploader(farm, big) as uploader:
        # 1-2. The manifest read, every row checked (`validate_manifest`).
        checked = validate_manifest(
            farm, manifest, defaults=defaults, variations=variations, seed=seed, sub=sub
        )
        path, rows, variations, base = checked.path, checked.rows, checked.variations, checked.base
        # 3. The slots, and the batch's index.
        planned = list(_plan(rows, variations, checked.seed))
        _write_index(farm, name, path, base, len(rows), variations, checked.seed, planned)
        # 4. The jobs, chunk by chunk.
        # Chunk n's inputs upload in the background while the next chunks are prepared; a
        # chunk's records and messages are written, in order, once its own inputs are
        # stored, with at most `CHUNKS_AHEAD` chunks prepared and waiting (the first chunk,
        # which holds most of the distinct inputs, does not stall the submit while they
        # upload).
        result = SubmitResult(name, len(rows), variations, len(planned))
        pending: deque[tuple[Future[int], _Chunk, int]] = deque()
        templates: dict[tuple[Any, ...], dict[str, Any]] = {}
        for start in range(0, len(planned), chunk_size):
            batch = planned[start : start + chunk_size]
            chunk = _prepare_chunk(sub, name, batch, result, templates)
            upload = uploader.submit(sub.inputs.take_uploads())
            pending.append((upload, chunk, start + len(batch)))
            while pending and (pending[0][0].done() or len(pending) > CHUNKS_AHEAD):
                _finish(sub, name, pending.popleft(), result, len(planned), on_chunk)
        while pending:
            _finish(sub, name, pending.popleft(), result, len(planned), on_chunk)
    result.seconds = time.monotonic() - t0
    return result


def _uploader(farm: Farm, big: bool) -> UploadHelper | _ThreadUploads:
    """Where chunks' inputs are stored from: a helper process for a batch of several chunks
    (`farm.inputs.uploader`: uploads beside the preparation, not fighting it for the GIL), else a
    thread here (a helper's start-up would cost more than it saves)."""
    return UploadHelper(farm.settings) if big else _ThreadUploads(farm)


def _lines(manifest: str | Path) -> int:
    """About how many rows `manifest` has (its lines), before it is read; 0 if it cannot be
    read (`validate_manifest` says why)."""
    try:
        with open(manifest, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


class _ThreadUploads:
    """`UploadHelper`'s interface, from one thread of this process."""

    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        self.pool = ThreadPoolExecutor(1, "farm-batch-upload")

    def __enter__(self) -> _ThreadUploads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)

    def submit(self, items: dict[str, bytes]) -> Future[int]:
        return self.pool.submit(self.farm.store.put_missing, items)


def _finish(
    sub: Submission,
    name: str,
    pending: tuple[Future[int], _Chunk, int],
    result: SubmitResult,
    total: int,
    on_chunk: Callable[[int, int], None] | None,
) -> None:
    upload, chunk, done = pending
    upload.result()
    _commit_chunk(sub, name, chunk, result)
    if on_chunk:
        on_chunk(done, total)


def _check_seeds(path: Path, rows: list[Row], variations: int) -> None:
    """`InvalidManifest` for rows whose seed + variation leaves the seeds' range: found now,
    before the index is written, not when their jobs are."""
    top = variations - 1
    problems = [
        Problem(
            row.line, f"seed: {row.seed} + variation {top} is over the largest seed, {MAX_SEED}"
        )
        for row in rows
        if row.seed is not None and row.seed + top > MAX_SEED
    ]
    if problems:
        raise InvalidManifest(path, problems[:MAX_PROBLEMS])


def _plan(rows: list[Row], variations: int, base_seed: int) -> Iterator[Planned]:
    seen: Counter[str] = Counter()
    for row in rows:
        occurrence = seen[row.identity]
        seen[row.identity] += 1
        for v in range(variations):
            slot = _derive("slot", base_seed, row.identity, occurrence, v).hex()[:32]
            seed = (
                row.seed + v
                if row.seed is not None
                else int.from_bytes(_derive("seed", base_seed, row.identity, occurrence, v)[:4])
            )
            mask_seed = int.from_bytes(_derive("mask", base_seed, row.identity, occurrence, v)[:8])
            yield Planned(row, v, slot, seed, mask_seed)


def _write_index(
    farm: Farm,
    name: str,
    path: Path,
    base: dict[str, Any],
    n_rows: int,
    variations: int,
    base_seed: int,
    planned: list[Planned],
) -> None:
    """The batch's metadata and its slots in manifest order (replacing an earlier order)."""
    now = time.time()
    meta = {
        "name": name,
        "manifest": str(path.resolve()),
        "rows": n_rows,
        "variations": variations,
        "seed": base_seed,
        "jobs": len(planned),
        "images": sum(int(p.row.fields.get("num_images_per_prompt", 1)) for p in planned),
        "defaults": base,
        "updated_at": now,
    }
    farm.tracker.batches.write(name, meta, [p.slot for p in planned], now)


def _slot_info(p: Planned, job_id: str, old: dict[str, Any] | None) -> dict[str, Any]:
    row = p.row
    info = {
        **(old or {}),
        "job": job_id,
        "row": row.line,
        "variation": p.variation,
        "image": row.image_given,
        "mask": row.mask_desc,
        "labels": row.labels,
        "images": int(row.fields.get("num_images_per_prompt", 1)),
    }
    info.setdefault("generation", 0)
    return info


@dataclass
class _Chunk:
    """One chunk, prepared: records to write, inputs to store, index entries to set."""

    records: list[dict[str, Any]] = field(default_factory=list)
    todo: list[tuple[Planned, dict[str, Any] | None]] = field(default_factory=list)
    index: dict[str, dict[str, Any]] = field(default_factory=dict)
    lost: list[tuple[str, int]] = field(default_factory=list)
    """(id, priority) of jobs found running on an expired lease: their worker died, and a
    new message lets another worker take them over (`Tracker.claim`)."""


def _prepare_chunk(
    sub: Submission,
    name: str,
    chunk: list[Planned],
    result: SubmitResult,
    templates: dict[tuple[Any, ...], dict[str, Any]] | None = None,
) -> _Chunk:
    """The chunk's slots that have a job, and the records of the others. With `templates`
    (kept across chunks), a job whose row is alike one prepared before (`_template_of`) has
    its record stamped from that one's; None: every job prepared whole."""
    tracker = sub.farm.tracker
    out = _Chunk()
    # 1. Which slots already have a job (whose record has not expired).
    old = tracker.batches.slots(name, [p.slot for p in chunk])
    known = iter(
        tracker.job_fields(
            [info["job"] for info in old if info], "state", "lease_until", "priority"
        )
    )
    fields = [next(known) if info else (None, None, None) for info in old]
    now = time.time()
    for p, info, (state, lease, priority) in zip(chunk, old, fields, strict=True):
        if info and state:
            out.index[p.slot] = _slot_info(p, info["job"], info)
            if state == JobState.RUNNING and float(lease or 0) < now:
                out.lost.append((info["job"], int(priority or 0)))  # its worker died
        else:
            out.todo.append((p, info))
    result.present += len(out.index)
    # 2. The records of the others, through the submit pipeline: inputs from the resolver
    #    (each distinct one decoded and encoded once), generated masks as generators.
    for p, info in out.todo:
        generation = int(info.get("generation", 0)) if info else 0
        key = slot_key(name, p.slot, generation)
        shape = _template_of(p.row) if templates is not None else None
        template = templates.get(shape) if templates is not None and shape else None
        if template is not None:
            out.records.append(_stamped(template, p, key))
            continue
        spec = {**p.row.fields, "seed": p.seed, "key": key}
        if p.row.image:
            spec["image"] = p.row.image.source
        if p.row.mask:
            spec["mask_image"] = p.row.mask.source
        elif p.row.mask_gen:  # drawn by the worker, with the slot's seed
            spec["mask_image"] = _seeded(p.row.mask_gen, p.mask_seed)
        record = sub.prepare(parse_spec(spec))
        if templates is not None and shape and not record["depends_on"]:
            remember(templates, shape, record)
        out.records.append(record)
    return out


def _template_of(row: Row) -> tuple[Any, ...] | None:
    """What a job's record is stamped from: rows alike for the client's checks (`Row.alike`:
    fields but prompts, input contents, mask generator), with the same inputs given and the
    same prompt fields present, make records that differ only in those prompts, the seed,
    the key (so the id) and a generated mask's seed. None: the row was not validated."""
    if not row.alike:
        return None
    present = tuple(name in row.fields for name in STAMPED)
    image = row.image.source if row.image else None
    mask = row.mask.source if row.mask else None
    return (row.alike, image, mask, present)


def _stamped(template: dict[str, Any], p: Planned, key: str) -> dict[str, Any]:
    """The record `Submission.prepare` makes of planned job `p`, stamped (`farm.submit.stamp`)
    from the record of a job whose row is alike (`_template_of`): every check was made on
    that one, and on this row by `validate_rows` (its prompts measured, its fields parsed).
    tests/batches/test_batch.py compares both ways on every kind of row."""
    gen = p.row.mask_gen
    mask_seed = p.mask_seed if gen is not None and gen.seed is None else None  # the slot's
    return stamp(template, key, p.seed, {n: p.row.fields.get(n) for n in STAMPED}, mask_seed)


def _seeded(gen: MaskGenerator, seed: int) -> MaskGenerator:
    """The generator with `seed`, unless it has one of its own (`strokes:seed=7`)."""
    return gen if gen.seed is not None else gen.model_copy(update={"seed": seed})


def _commit_chunk(sub: Submission, name: str, chunk: _Chunk, result: SubmitResult) -> None:
    """Records, then messages, then the index: a slot is written only once its job is. A job
    found written but never indexed (a submit that died between the two) and still queued
    gets its message again, and so does one running on an expired lease (its worker died)."""
    lost = [(job_id, RENDER_QUEUE, priority) for job_id, priority in chunk.lost]
    written = sub.write(chunk.records, resend_present=True, also_send=lost)
    result.new += written.new
    result.requeued += written.resent
    result.present += len(chunk.records) - written.new
    for (p, info), rec in zip(chunk.todo, chunk.records, strict=True):
        chunk.index[p.slot] = _slot_info(p, rec["id"], info)
    sub.farm.tracker.batches.set_slots(name, chunk.index)
