"""The one input resolver: whatever a job names as an input becomes a checked picture, the URI
a worker reads it from, and (for local inputs) bytes to upload, content-addressed, once.

    >>> inputs = InputResolver(store)
    >>> uri, img = inputs.image("cat.png", "image")                 # a path, bytes, PIL image
    >>> uri, mask = inputs.image("s3://b/farm/inputs/….png", "mask_image", mask=True)
    >>> inputs.adapter("style.safetensors")                          # a local LoRA file
    >>> inputs.take_uploads()                                        # {"inputs/<sha>.png": b"…"}

Renders, manifests, fine-tunes (their training images) and LoRA refs all go through it, so an
input is decoded, checked and encoded by one rule wherever it comes from:

- a local path, bytes or a PIL image is decoded (`farm.inputs.images`: formats, bombs and
  `FARM_MAX_INPUT_PIXELS` from the header before decoding, EXIF orientation, RGB; `L` for
  masks), encoded as PNG and stored at `inputs/<sha256>.png`;
- an `s3://` / `file://` URI is read from the farm's store (outside it only with
  `FARM_ALLOW_FOREIGN_INPUTS`), decoded and checked, and used where it is;
- anything else with `://` is refused: the farm never fetches URLs.

Each distinct path or URI is read and decoded once per resolver: what a file is (its sha256
and size) is kept for good, decoded pixels in a bounded LRU, and the URI a local file was
stored at, so a 10,000-row manifest over 200 pictures decodes and encodes 200 pictures.

A dry run (`dry=True`) checks everything and encodes and uploads nothing: manifest validation
prepares one job per distinct row this way before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from farm.errors import InvalidJob
from farm.inputs import images
from farm.keys import adapter_input_key, input_key
from farm.storage import ObjectNotFound, ObjectStore

URI_SCHEMES = ("s3://", "file://")
"""The URIs a job may name: objects in the farm's store."""

CACHE_BYTES = 256 << 20
"""Decoded pixels a resolver keeps (least recently used go first)."""

MAX_HEADER_BYTES = 100 << 20
"""The largest safetensors header accepted (the limit the safetensors library itself sets)."""


@dataclass(frozen=True, slots=True)
class InputInfo:
    """What a resolver learnt of one input file: its content hash and size."""

    source: str
    sha256: str
    size: tuple[int, int]


def is_uri(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(URI_SCHEMES)


def refuse_urls(value: Any, field: str, label: str | None = None) -> None:
    """`InvalidJob` for a URL the farm will not fetch (http://, and anything not s3/file);
    `label` names the place in the message (`images[2]`), `field` the spec field."""
    if isinstance(value, str) and "://" in value and not is_uri(value):
        raise InvalidJob(
            f"{label or field}: only local paths, s3:// and file:// URIs, got {value!r}",
            field=field,
        )


def check_safetensors(data: bytes, what: str, field: str = "loras") -> dict[str, Any]:
    """The JSON header of a safetensors file, or `InvalidJob`: anything else is refused.

    The format is an 8-byte little-endian header length, a JSON object of tensor name →
    dtype, shape and data offsets, then the tensors' bytes. Read here without torch.
    """

    def refuse(why: str) -> InvalidJob:
        return InvalidJob(f"{field}: {what} is not a safetensors file ({why})", field=field)

    if len(data) < 8:
        raise refuse(f"{len(data)} bytes")
    size = int.from_bytes(data[:8], "little")
    if size < 2 or size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise refuse(f"header length {size} does not fit a {len(data)}-byte file")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, ValueError):
        raise refuse("its header is not JSON") from None
    if not isinstance(header, dict):
        raise refuse("its header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise refuse("it holds no tensors")
    body = len(data) - 8 - size
    for name, info in tensors.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise refuse(f"tensor {name!r} has no valid data offsets")
    return header


class InputResolver:
    """Inputs read, checked and stored once; see the module docstring."""

    def __init__(
        self,
        store: ObjectStore,
        cache_bytes: int = CACHE_BYTES,
        max_input_pixels: int = images.MAX_PIXELS,
    ) -> None:
        self.store = store
        self.cache_bytes = cache_bytes
        self.max_input_pixels = max_input_pixels
        """Pixels an input may decode to (`FARM_MAX_INPUT_PIXELS`), checked from its header."""
        self.uploads: dict[str, bytes] = {}
        """Key → bytes of what local inputs need stored, until `take_uploads`."""
        self._info: dict[tuple[str, bool], InputInfo | InvalidJob] = {}
        self._pixels: OrderedDict[tuple[str, bool], Image.Image] = OrderedDict()
        self._held = 0
        self._stored: dict[tuple[str, bool], str] = {}  # a local source → its store URI

    # ------------------------------------------------------------------ images

    def image(
        self, value: Any, field: str, *, mask: bool = False, dry: bool = False
    ) -> tuple[str, Image.Image]:
        """(the URI a worker reads it from, the picture as the worker will see it).

        `dry`: check it, but neither encode nor queue an upload (the URI is then a stand-in
        for a local input: its `file://` path, or `memory:` for bytes and PIL images).
        """
        refuse_urls(value, field)
        if is_uri(value):
            return value, self.picture(value, mask=mask, field=field)
        if isinstance(value, str | os.PathLike):
            source = os.fspath(value)
            picture = self.picture(source, mask=mask, field=field)
            key = (source, mask)
            if dry:
                return self._stored.get(key) or Path(
                    source
                ).expanduser().absolute().as_uri(), picture
            if key not in self._stored:
                self._stored[key] = self._store(picture)
            return self._stored[key], picture
        picture = self._load(value, field)  # bytes or a PIL image
        picture = images.as_mask(picture) if mask else picture
        return ("memory:" if dry else self._store(picture)), picture

    def picture(self, source: str, *, mask: bool = False, field: str | None = None) -> Image.Image:
        """The decoded picture at a path or store URI (RGB, `L` for masks), decoded once while
        it stays in the LRU."""
        key = (source, mask)
        img = self._pixels.get(key)
        if img is not None:
            self._pixels.move_to_end(key)
            return img
        img = self._decode(source, mask, field or ("mask_image" if mask else "image"))[1]
        self._remember(key, img)
        return img

    def info(self, source: str, *, mask: bool, field: str) -> InputInfo:
        """What the file at a path or store URI is (sha256 of its bytes, size), read once; a
        bad file is the same `InvalidJob` every time it is asked for."""
        key = (source, mask)
        known = self._info.get(key)
        if known is None:
            try:
                data, img = self._decode(source, mask, field)
                known = InputInfo(source, hashlib.sha256(data).hexdigest(), img.size)
                self._remember(key, img)
            except InvalidJob as e:
                known = e
            self._info[key] = known
        if isinstance(known, InvalidJob):
            raise InvalidJob(str(known), field=known.field)
        return known

    # ------------------------------------------------------------------ adapters

    def adapter(self, ref: str, field: str = "loras", *, dry: bool = False) -> str:
        """A LoRA file a job names → the URI workers read it from: a store URI checked to
        exist (and, outside the store, to be safetensors); a local `.safetensors` checked
        (its header, read without torch) and queued for upload as `inputs/<sha256>.safetensors`."""
        if is_uri(ref):
            key = self.store.key_of(ref)
            if key is not None:
                if not self.store.exists(key):
                    raise InvalidJob(f"{field}: no such object {ref!r}", field=field)
                return ref
            check_safetensors(self._read(ref, field), repr(ref), field)  # foreign, if allowed
            return ref
        data = self._read(ref, field)
        check_safetensors(data, repr(ref), field)
        key = adapter_input_key(hashlib.sha256(data).hexdigest())
        if not dry:
            self.uploads[key] = data
        return self.store.uri(key)

    # ------------------------------------------------------------------ uploads

    def take_uploads(self) -> dict[str, bytes]:
        """What was queued for upload since the last call (the caller stores it)."""
        out, self.uploads = self.uploads, {}
        return out

    # ------------------------------------------------------------------ internals

    def _store(self, picture: Image.Image) -> str:
        data = images.encode_png(picture)
        key = input_key(images.sha256_hex(data))
        self.uploads[key] = data
        return self.store.uri(key)

    def _read(self, source: str, field: str) -> bytes:
        if is_uri(source):
            try:
                return self.store.get_uri(source, field=field)
            except ObjectNotFound:
                raise InvalidJob(f"{field}: no such object {source!r}", field=field) from None
        try:
            return Path(source).expanduser().read_bytes()
        except FileNotFoundError:
            raise InvalidJob(f"{field}: no such file {source!r}", field=field) from None
        except OSError as e:
            raise InvalidJob(
                f"{field}: cannot read {source!r} ({e.strerror or e})", field=field
            ) from None

    def _decode(self, source: str, mask: bool, field: str) -> tuple[bytes, Image.Image]:
        data = self._read(source, field)
        img = self._load(data, field)
        return data, images.as_mask(img) if mask else img

    def _load(self, value: Any, field: str) -> Image.Image:
        return images.load_image_input(value, field=field, max_pixels=self.max_input_pixels)

    def _remember(self, key: tuple[str, bool], img: Image.Image) -> None:
        self._pixels[key] = img
        self._held += img.width * img.height * len(img.getbands())
        while self._held > self.cache_bytes and len(self._pixels) > 1:
            _, old = self._pixels.popitem(last=False)
            self._held -= old.width * old.height * len(old.getbands())
