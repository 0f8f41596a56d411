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
    """A PNG grid, one line per manifest row: source | mask | outputs (a mask again wherever
    a variation's mask differs). Returns how many rows it shows."""
    groups: dict[Any, list[Slot]] = {}
    for slot in batch.slots():
        key = slot.info.get("row", slot.id)
        if key not in groups and len(groups) >= rows:
            break
        groups.setdefault(key, []).append(slot)
    store = batch.farm.store
    flat = [s for group in groups.values() for s in group]
    recs = dict(zip((s.id for s in flat), _records(batch, flat), strict=True))

    def load(uri: str) -> Image.Image:
        return images.decode_image(store.get_uri(uri), field="sheet")

    grid: list[list[Image.Image]] = []
    for group in groups.values():
        cells: list[Image.Image] = []
        last_mask = source = None
        for slot in group:
            rec = recs[slot.id]
            if rec is None:
                continue
            if not cells and rec.spec.get("image"):
                source = load(rec.spec["image"])
                cells.append(source)
            given = rec.spec.get("mask_image")
            if given and given != last_mask:  # the mask as used, once per distinct mask
                if rec.mask or isinstance(given, str):
                    cells.append(load(rec.mask or given))
                elif source is not None:  # a generated mask not drawn yet: as it will be
                    cells.append(generate(generator_from(given), source.size))
                last_mask = given
            cells += [load(uri) for uri in rec.outputs]
        if cells:
            grid.append(cells)
    if not grid:
        grid = [[Image.new("RGB", (cell, cell), "lightgray")]]
    images.grid(grid, cell=cell).save(out)
    return len(grid)
