"""Budgets at the edge: what one job may ask of a worker, refused at submit with one line.

A 65 KB PNG can declare 8192×8192 pixels (decoded: 200 MB, rendered at: tens of GB); a 10 MB
prompt keeps a worker's tokenizer busy for minutes before its first step, where no time limit
applies; a prompt that is not UTF-8 text is accepted, then breaks every reader of its record.
So every job is measured before anything is stored or enqueued, by the submit pipeline
(`farm.submit.Submission.prepare`) and manifest validation (`farm.batches.manifest`), and again
by the worker (a job that passed an older client):

    FARM_MAX_PIXELS        pixels per image at the working size (height × width, given or
                           taken from the input image); default 2048 × 2048
    FARM_MAX_INPUT_PIXELS  pixels of an input image, read from its header before it is
                           decoded (`farm.inputs.images.decode_image`); default 4096 × 4096
    FARM_MAX_PROMPT_CHARS  characters per prompt, negative prompt, instance prompt or caption
    (every text field)     valid UTF-8 (no lone surrogates: what a terminal's stray byte
                           becomes) and no NUL

    >>> budgets = Budgets.of(settings)
    >>> budgets.check(spec, image_size=(8192, 8192))   # InvalidJob: image: renders at ...
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from farm.errors import InvalidJob
from farm.jobs.signature import working_size

PROMPT_FIELDS = ("prompt", "negative_prompt", "instance_prompt", "captions")
"""The fields `FARM_MAX_PROMPT_CHARS` measures (each caption on its own)."""


@dataclass(frozen=True, slots=True)
class Budgets:
    max_pixels: int = 2048 * 2048
    max_input_pixels: int = 4096 * 4096
    max_prompt_chars: int = 4000

    @classmethod
    def of(cls, settings: Any) -> Budgets:
        return cls(settings.max_pixels, settings.max_input_pixels, settings.max_prompt_chars)

    def check(self, spec: Any, image_size: tuple[int, int] | None = None) -> None:
        """`InvalidJob` naming the field unless the job fits every budget: its text fields,
        and its working size (`image_size`: its input's, `(width, height)`)."""
        if isinstance(spec, BaseModel):
            if not _plain_json(spec):  # the walk, which names the field, only when needed
                check_text(spec.model_dump(mode="python"))
            have = type(spec).model_fields  # a missing attribute costs a raised error
            texts = {name: getattr(spec, name) if name in have else None for name in PROMPT_FIELDS}
        else:
            fields = dict(spec)
            check_text(fields)
            texts = {name: fields.get(name) for name in PROMPT_FIELDS}
        self._check_lengths(texts)
        self.check_size(spec, image_size)

    def check_texts(self, texts: Mapping[str, Any]) -> None:
        """The text half of `check`, for the strings `texts` holds (None: not given)."""
        for name, text in texts.items():
            if text is not None:
                _check_str(text, name)
        self._check_lengths(texts)

    def _check_lengths(self, texts: Mapping[str, Any]) -> None:
        for name, value in texts.items():
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str) and len(text) > self.max_prompt_chars:
                    raise InvalidJob(
                        f"{name}: is {len(text)} characters, over FARM_MAX_PROMPT_CHARS "
                        f"({self.max_prompt_chars})",
                        field=name,
                    )

    def check_size(self, spec: Any, image_size: tuple[int, int] | None) -> None:
        """The working-size half of `check`, for a spec whose text was checked already and
        whose input's size (`(width, height)`) is known now."""
        if getattr(spec, "kind", None) in ("txt2img", "img2img", "inpaint", "style"):
            height, width = working_size(spec, image_size)
            if height and width and height * width > self.max_pixels:
                given = spec.height and spec.width
                where = "height × width" if given else "the input image's size"
                raise InvalidJob(
                    f"{'height' if given else 'image'}: renders at {width}x{height} = "
                    f"{width * height} pixels per image ({where}), over FARM_MAX_PIXELS "
                    f"({self.max_pixels}); give a smaller height and width",
                    field="height" if given else "image",
                )


def check_text(value: Any, field: str = "") -> None:
    """`InvalidJob` where a string in `value` (nested in dicts and lists) is not valid UTF-8
    text (a lone surrogate: `surrogateescape` made it of a byte that was not UTF-8) or holds a
    NUL."""
    try:  # one C-encoded pass for the common case; the walk below names the field
        text = json.dumps(value, ensure_ascii=False, default=_containers)
        if "\\u0000" not in text:
            text.encode("utf-8")
            return
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        pass
    _walk(value, field)


def _plain_json(spec: BaseModel) -> bool:
    """True when `spec` serializes to JSON holding no NUL and no lone surrogate: then no text
    in it can fail `check_text` (JSON escapes a NUL as `\\u0000`; pydantic refuses to encode a
    surrogate). False tells nothing: a NUL, a surrogate, bytes or a PIL image to look at."""
    try:
        return b"\\u0000" not in spec.model_dump_json().encode()
    except (PydanticSerializationError, ValueError):
        return False


def _containers(value: Any) -> Any:
    """`json.dumps`' fallback: what `_walk` descends into, as JSON containers; anything else
    as a string without text of its own (`_walk` skips it too)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return list(value)
    return None


def _check_str(value: str, field: str) -> None:
    if "\x00" in value:
        raise InvalidJob(f"{field or 'text'}: holds a NUL character ({value!r:.60})", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJob(
            f"{field or 'text'}: is not valid UTF-8 text ({value!r:.60})", field=field
        ) from None


def _walk(value: Any, field: str) -> None:
    if isinstance(value, str):
        _check_str(value, field)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _walk(key, field or "field name")
            _walk(item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        for item in value:
            _walk(item, field)
