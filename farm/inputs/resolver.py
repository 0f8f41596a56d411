"""Inputs read once: each distinct image or mask file decoded a single time per submit.

A 10,000-row manifest over 200 pictures decodes 200 pictures: `InputCatalog.info` reads and
checks a path or store URI once (its sha256 and size are kept for good), and
`InputCatalog.image` hands out the decoded picture from a bounded LRU, decoding it again only
after eviction, so memory stays flat however many distinct inputs a manifest has.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from farm.errors import InvalidJob
from farm.inputs import images
from farm.storage import ObjectNotFound, ObjectStore

URI_SCHEMES = ("s3://", "file://")


@dataclass(frozen=True, slots=True)
class InputInfo:
    """What validation learnt of one input file: its content hash and size."""

    source: str
    sha256: str
    size: tuple[int, int]


class InputCatalog:
    """Each distinct input decoded once; decoded pixels kept in a bounded LRU.

    `info` reads and checks a path or store URI (its sha256 and size are kept for good);
    `image` gives the decoded picture (RGB, or `L` for masks), decoding again after eviction.
    """

    def __init__(self, store: ObjectStore, cache_bytes: int = 256 << 20) -> None:
        self.store = store
        self.cache_bytes = cache_bytes
        self._info: dict[tuple[str, bool], InputInfo | InvalidJob] = {}
        self._lru: OrderedDict[tuple[str, bool], Image.Image] = OrderedDict()
        self._held = 0

    def _read(self, source: str, field: str) -> bytes:
        if source.startswith(URI_SCHEMES):
            try:
                return self.store.get_uri(source, field=field)
            except ObjectNotFound:
                raise InvalidJob(f"{field}: no such object {source!r}", field=field) from None
        try:
            return Path(source).read_bytes()
        except FileNotFoundError:
            raise InvalidJob(f"{field}: no such file {source!r}", field=field) from None
        except OSError as e:
            raise InvalidJob(
                f"{field}: cannot read {source!r} ({e.strerror or e})", field=field
            ) from None

    def _decode(self, source: str, mask: bool, field: str) -> tuple[bytes, Image.Image]:
        data = self._read(source, field)
        img = images.load_image_input(data, field=field)
        return data, images.as_mask(img) if mask else img

    def info(self, source: str, *, mask: bool, field: str) -> InputInfo:
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

    def image(self, source: str, *, mask: bool) -> Image.Image:
        key = (source, mask)
        img = self._lru.get(key)
        if img is None:
            img = self._decode(source, mask, "mask" if mask else "image")[1]
            self._remember(key, img)
        else:
            self._lru.move_to_end(key)
        return img

    def _remember(self, key: tuple[str, bool], img: Image.Image) -> None:
        self._lru[key] = img
        self._held += img.width * img.height * len(img.getbands())
        while self._held > self.cache_bytes and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self._held -= old.width * old.height * len(old.getbands())
