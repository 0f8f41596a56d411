"""A batch's results as a dataset folder, and as a contact sheet to look at.

`fetch_dataset` writes a folder that Hugging Face `datasets` loads as it is
(`load_dataset("imagefolder", data_dir=DIR)`):

    DIR/metadata.jsonl          one JSON object per output image, every line the same keys
    DIR/images/<job>-<i>.png    the outputs (the `image` column)
    DIR/masks/<job>.png         the mask as the model used it (`mask`, inpaint only)
    DIR/sources/<hash>.png      each source picture once (`source`, img2img and inpaint)

Each metadata line has `file_name`, `mask_file_name`, `source_file_name` (paths relative to
DIR; `datasets` turns the `*_file_name` columns into image columns), `job_id`, `row` (the
manifest line), `variation`, `image_index`, `source_image` (as the manifest gave it),
`mask_source` (the mask file as given, or the generator, e.g. `strokes`), `prompt`, `negative_prompt`,
`seed` (the job's; image i was drawn with seed + i), `model`, `kind`, the other job
parameters, and the row's labels. Files already in DIR are not fetched again, so a re-run
after more jobs finished only adds what is new; metadata.jsonl is rewritten whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from farm.batches.batch import READ_CHUNK, Batch, Slot
from farm.inputs import images
from farm.jobs.masks import generate, generator_from
from farm.jobs.record import JobRecord

FETCH_THREADS = 8
"""Parallel downloads."""

_SPEC_SKIP = {"image", "mask_image", "key", "priority", "kind", "model", "prompt"}
_SPEC_SKIP |= {"negative_prompt", "seed"}


@dataclass
class FetchResult:
    images: int
    """Output images listed in metadata.jsonl."""
    downloaded: int
    """Files written by this fetch (outputs, masks, sources)."""
    skipped: int
    """Files already there."""
    not_succeeded: int
    """Slots left out: their job has not succeeded (yet)."""


def _records(batch: Batch, slots: list[Slot]) -> list[JobRecord | None]:
    out: list[JobRecord | None] = []
    for start in range(0, len(slots), READ_CHUNK):
        out += batch.farm.tracker.get_many(s.job or "" for s in slots[start : start + READ_CHUNK])
    return out


def _source_name(uri: str) -> str:
    return f"sources/{hashlib.sha256(uri.encode()).hexdigest()[:32]}.png"


def metadata_row(slot: Slot, rec: JobRecord, index: int) -> dict[str, Any]:
    """The metadata.jsonl line of output `index` of a succeeded job."""
    spec, info = rec.spec, slot.info
    row: dict[str, Any] = {
        "file_name": f"images/{rec.id}-{index}.png",
        "mask_file_name": f"masks/{rec.id}.png" if rec.mask else None,
        "source_file_name": _source_name(spec["image"]) if spec.get("image") else None,
        "job_id": rec.id,
        "row": info.get("row"),
        "variation": info.get("variation"),
        "image_index": index,
        "source_image": info.get("image"),
        "mask_source": info.get("mask"),
        "prompt": spec.get("prompt"),
        "negative_prompt": spec.get("negative_prompt"),
        "seed": spec.get("seed"),
        "model": spec.get("model"),
        "kind": rec.kind,
    }
    row |= {k: v for k, v in sorted(spec.items()) if k not in _SPEC_SKIP}
    row |= info.get("labels") or {}
    return row


def fetch_dataset(batch: Batch, directory: str | Path, threads: int = FETCH_THREADS) -> FetchResult:
    """Write the batch's succeeded outputs into `directory` as an imagefolder dataset."""
    out = Path(directory)
    slots = batch.slots()
    done = [s for s in slots if s.state == "succeeded"]
    # 1. What goes where: one metadata line per output image; the files it names.
    lines: list[dict[str, Any]] = []
    files: dict[Path, str] = {}
    for slot, rec in zip(done, _records(batch, done), strict=True):
        if rec is None or not rec.outputs:
            continue
        for i, uri in enumerate(rec.outputs):
            line = metadata_row(slot, rec, i)
            lines.append(line)
            files[out / line["file_name"]] = uri
        if rec.mask:
            files[out / f"masks/{rec.id}.png"] = rec.mask
        if rec.spec.get("image"):
            files[out / _source_name(rec.spec["image"])] = rec.spec["image"]
    # 2. The files not there yet, in parallel; each written whole or not at all.
    todo = [(path, uri) for path, uri in files.items() if not path.is_file()]
    for sub in ("images", "masks", "sources"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if todo:
        with ThreadPoolExecutor(max(1, threads), "farm-fetch") as pool:
            list(pool.map(lambda item: _write(item[0], batch.farm.store.get_uri(item[1])), todo))
    # 3. metadata.jsonl: every line with the same keys, as `datasets` infers one schema.
    keys = list(dict.fromkeys(k for line in lines for k in line))
    text = "".join(json.dumps({k: line.get(k) for k in keys}) + "\n" for line in lines)
    _write(out / "metadata.jsonl", text.encode())
    return FetchResult(len(lines), len(todo), len(files) - len(todo), len(slots) - len(done))


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def contact_sheet(batch: Batch, out: str | Path, rows: int = 16, cell: int = 128) -> int:
    """A labelled PNG grid of the first `rows` jobs in manifest order (a manifest row's
    variations follow each other), one line each, every column with one meaning:
    `source | mask | output 1 … output N` (N: the most images a shown job has; an empty cell
    where a job has none, e.g. a txt2img job's source), headed by those names, with the
    manifest row, variation, seed, state (unless succeeded) and prompt under each line. The
    mask is the one the model used (or, not drawn yet, as it will be). Returns the lines."""
    slots = [s for s in batch.slots(limit=max(1, rows)) if s.job]
    store = batch.farm.store

    def load(uri: str) -> Image.Image:
        return images.decode_image(store.get_uri(uri), field="sheet")

    lines: list[list[Image.Image | None]] = []
    captions: list[str] = []
    for slot, rec in zip(slots, _records(batch, slots), strict=True):
        if rec is None:
            continue
        source = load(rec.spec["image"]) if rec.spec.get("image") else None
        given, mask = rec.spec.get("mask_image"), None
        if rec.mask:
            mask = load(rec.mask)
        elif isinstance(given, str):
            mask = load(given)
        elif given and source is not None:  # a generated mask not drawn yet: as it will be
            mask = generate(generator_from(given), source.size)
        lines.append([source, mask, *(load(uri) for uri in rec.outputs)])
        row, variation = slot.info.get("row"), slot.info.get("variation")
        state = "" if rec.state.value == "succeeded" else f"{rec.state.value} · "
        captions.append(
            f"row {row} v{variation} · seed {rec.spec.get('seed')} · {state}"
            f"{rec.spec.get('prompt', '')}"
        )
    if not lines:
        lines, captions = [[None, None]], ["no jobs yet"]
    outputs = max(len(line) for line in lines) - 2
    header = ["source", "mask", *(f"output {i + 1}" for i in range(max(1, outputs)))]
    images.grid(lines, cell=cell, header=header, captions=captions).save(out)
    return len(lines)
