"""A fine-tune's training set, resolved at submit into store URIs and one caption per image.

    >>> updates = training_set(spec, InputResolver(store))
    >>> updates
    {'images': ['s3://bucket/farm/inputs/<sha>.png', ...], 'captions': ['a photo of sks dog', ...]}

`spec.images` may be

- a local folder: its images (`.png`, `.jpg`, `.jpeg`, `.webp`, sorted by name), each decoded
  and uploaded content-addressed (`inputs/<sha256>.png`, as render inputs are);
- an `s3://` (or `file://`) prefix inside the farm's store: listed, each image read and decoded
  here, then used where it is;
- a list of images (paths, URIs, bytes, PIL images) or one image file.

Each image's caption is, first to last: its entry in `spec.captions`, its line in the folder's
`metadata.jsonl` (`{"file_name": ..., "text": ...}`, as diffusers' imagefolder datasets have it),
its sidecar `<stem>.txt`, `spec.instance_prompt` (DreamBooth style). An image with none of these
is an `InvalidJob` before anything is stored. The stored spec is then the explicit list of URIs
and captions, so the job reads the same data whatever happens to the folder afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from farm.errors import InvalidJob
from farm.inputs.resolver import InputResolver, is_uri, refuse_urls
from farm.jobs.specs import Finetune
from farm.storage import ObjectStore

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST = "metadata.jsonl"
MAX_IMAGES = 10_000
"""More training images than this in one job is refused (a prefix listed by mistake)."""


class _Item:
    """One training image on its way into the job: where it is, and its caption if known."""

    __slots__ = ("caption", "name", "source")

    def __init__(self, source: Any, name: str, caption: str | None = None) -> None:
        self.source = source
        self.name = name
        self.caption = caption


def training_set(spec: Finetune, inputs: InputResolver, *, dry: bool = False) -> dict[str, Any]:
    """`{"images": [URI, ...], "captions": [str, ...]}` for the stored spec; every image goes
    through the input resolver (local ones queued for upload with the other inputs)."""
    store = inputs.store
    # 1. Which images, and the captions their folder or prefix supplies.
    if isinstance(spec.images, list):
        items = [_list_item(x, i) for i, x in enumerate(spec.images)]
    elif is_uri(spec.images):
        items = _prefix_items(store, spec.images)
    elif "://" in spec.images:
        raise InvalidJob(
            f"images: a local folder, an s3:// prefix or a list of images, got {spec.images!r}",
            field="images",
        )
    else:
        items = _local_items(Path(spec.images).expanduser())
    if len(items) > MAX_IMAGES:
        raise InvalidJob(
            f"images: {len(items)} images; a fine-tune takes at most {MAX_IMAGES}", field="images"
        )
    # 2. One caption per image: the spec's list, else what was found, else the instance prompt.
    if spec.captions is not None:
        if len(spec.captions) != len(items):
            raise InvalidJob(
                f"captions: {len(spec.captions)} captions for {len(items)} images", field="captions"
            )
        for item, caption in zip(items, spec.captions, strict=True):
            item.caption = caption
    prompt = (spec.instance_prompt or "").strip() or None
    for item in items:
        if not (item.caption or "").strip():
            if prompt is None:
                raise InvalidJob(
                    f"captions: training image {item.name!r} has no caption (no `captions` entry, "
                    f"no {MANIFEST} line, no sidecar .txt) and there is no instance_prompt",
                    field="captions",
                )
            item.caption = prompt
    # 3. Every image decoded and checked; local ones queued for upload, content-addressed.
    uris = [inputs.image(item.source, f"images ({item.name})", dry=dry)[0] for item in items]
    return {"images": uris, "captions": [item.caption for item in items]}


# --------------------------------------------------------------------------- sources


def _list_item(value: Any, index: int) -> _Item:
    if is_uri(value):
        return _Item(value, value.rsplit("/", 1)[-1])
    refuse_urls(value, "images", f"images[{index}]")
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise InvalidJob(f"images[{index}]: no such file {value!r}", field="images")
        return _Item(str(path), path.name, _sidecar(path))
    return _Item(value, f"images[{index}]")


def _local_items(path: Path) -> list[_Item]:
    if path.is_file():
        return [_Item(str(path), path.name, _sidecar(path))]
    if not path.is_dir():
        raise InvalidJob(f"images: no such folder or file {str(path)!r}", field="images")
    files = sorted(p for p in path.iterdir() if p.is_file() and _is_image(p.name))
    if not files:
        raise InvalidJob(
            f"images: no training images ({', '.join(IMAGE_SUFFIXES)}) in {str(path)!r}",
            field="images",
        )
    manifest_path = path / MANIFEST
    manifest = (
        _manifest(manifest_path.read_text(), str(manifest_path)) if manifest_path.is_file() else {}
    )
    _check_manifest(manifest, {p.name for p in files}, str(manifest_path))
    return [_Item(str(p), p.name, manifest.get(p.name) or _sidecar(p)) for p in files]


def _prefix_items(store: ObjectStore, uri: str) -> list[_Item]:
    key = store.key_of(uri)
    if key is None and uri.endswith("/"):  # a folder URI, `file:///…/photos/`
        key = store.key_of(uri.rstrip("/"))
    if key is None:
        raise InvalidJob(
            f"images: {uri!r} is outside this farm's storage ({store.uri('')!r})", field="images"
        )
    if _is_image(key) and store.exists(key):
        return [_Item(uri, PurePosixPath(key).name)]
    prefix = key if key.endswith("/") or not key else key + "/"
    keys = store.list(prefix)
    files = sorted(k for k in keys if _is_image(k) and "/" not in k[len(prefix) :])
    if not files:
        raise InvalidJob(
            f"images: no training images ({', '.join(IMAGE_SUFFIXES)}) under {uri!r}",
            field="images",
        )
    present = set(keys)
    manifest: dict[str, str] = {}
    if prefix + MANIFEST in present:
        manifest = _manifest(
            store.get(prefix + MANIFEST).decode(), uri.rstrip("/") + "/" + MANIFEST
        )
        _check_manifest(manifest, {k[len(prefix) :] for k in files}, MANIFEST)
    items = []
    for k in files:
        name = k[len(prefix) :]
        sidecar = str(PurePosixPath(k).with_suffix(".txt"))
        caption = manifest.get(name)
        if caption is None and sidecar in present:
            caption = store.get(sidecar).decode("utf-8", errors="replace").strip()
        items.append(_Item(store.uri(k), name, caption))
    return items


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _sidecar(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    return txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None


def _manifest(text: str, where: str) -> dict[str, str]:
    """file_name → caption from a `metadata.jsonl` (`text`, or `caption`, per line)."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
            caption = row.get("text", row.get("caption"))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InvalidJob(
                f"images: {where}:{n}: expected a JSON object with file_name and text",
                field="images",
            ) from None
        if isinstance(caption, str):
            out[str(name)] = caption.strip()
    return out


def _check_manifest(manifest: dict[str, str], names: set[str], where: str) -> None:
    missing = sorted(set(manifest) - names)
    if missing:
        raise InvalidJob(
            f"images: {where} names {missing[0]!r}, which is not an image in that folder",
            field="images",
        )
