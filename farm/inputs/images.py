"""Decode, check and encode the images and masks that jobs carry (Pillow only, no torch).

Everything a user hands in goes through `decode_image` at the edge, so a truncated file, a
decompression bomb or a GIF is refused with one line naming the field before anything is
stored, never in a worker:

    >>> img = load_image_input("cat.png", field="image")          # RGB
    >>> mask = as_mask(load_image_input("mask.png", field="mask_image"))
    >>> check_mask_matches(img, mask)

Images are oriented and converted as diffusers' own `load_image` does (EXIF transpose, then
RGB), so a job sees the same pixels as a direct pipeline call on the same file.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from farm.errors import InvalidJob

FORMATS = ("PNG", "JPEG", "WEBP")
"""The only formats decoded; anything else is refused before a decoder runs."""

MAX_SIDE = 8192
"""Largest width or height accepted, in pixels."""

# Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is never lowered to None here:
# we only ever refuse more than Pillow does, never less.


def _refuse(field: str, why: str) -> InvalidJob:
    return InvalidJob(f"{field}: {why}", field=field)


MAX_PIXELS = 4096 * 4096
"""Pixels of a decoded input accepted by default (`FARM_MAX_INPUT_PIXELS`)."""


def _check_size(img: Image.Image, field: str, max_side: int, max_pixels: int = MAX_PIXELS) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise _refuse(field, f"image has no pixels ({w}x{h})")
    if w > max_side or h > max_side:
        raise _refuse(field, f"image is {w}x{h}; the largest side allowed is {max_side}")
    if w * h > max_pixels:
        raise _refuse(
            field,
            f"image is {w}x{h} = {w * h} pixels, over FARM_MAX_INPUT_PIXELS ({max_pixels})",
        )
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:  # Pillow only warns here; we refuse
        raise _refuse(field, f"image is {w}x{h} = {w * h} pixels, over the limit of {limit}")


def decode_image(
    data: bytes, *, field: str, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode PNG, JPEG or WEBP bytes fully, or `InvalidJob(field=field)` with one clear line.

    The size is checked from the header first (at most `max_side` a side, `max_pixels` in
    all), so a small file that declares a huge picture is refused before its pixels take any
    memory. `load()` runs here, so a truncated or corrupt file fails now. The image keeps its
    mode.
    """
    if not data:
        raise _refuse(field, "empty file, not an image")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        _check_size(img, field, max_side, max_pixels)  # from the header, before any pixels
        img.load()
    except InvalidJob:
        raise
    except Image.DecompressionBombError as e:
        raise _refuse(field, f"image too large, refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise _refuse(field, f"not a {', '.join(FORMATS)} image") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
        raise _refuse(field, f"corrupt or truncated image ({e})") from None
    return img


def load_image_input(
    value: Any, *, field: str, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """An RGB image from a path, bytes or a PIL image. URIs are the caller's to fetch."""
    if isinstance(value, str | os.PathLike):
        path = os.fspath(value)
        if isinstance(path, str) and "://" in path:
            raise _refuse(
                field,
                f"{path!r}: URLs are not fetched here; give a path, bytes, a PIL image, or an "
                "s3:// URI inside the farm's storage",
            )
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise _refuse(field, f"no such file {str(path)!r}") from None
        except OSError as e:
            raise _refuse(field, f"cannot read {str(path)!r} ({e.strerror or e})") from None
        img = decode_image(data, field=field, max_side=max_side, max_pixels=max_pixels)
    elif isinstance(value, bytes | bytearray | memoryview):
        img = decode_image(bytes(value), field=field, max_side=max_side, max_pixels=max_pixels)
    elif isinstance(value, Image.Image):
        _check_size(value, field, max_side, max_pixels)
        img = value
    else:
        raise _refuse(field, f"expected a path, bytes or PIL image, got {type(value).__name__}")
    try:
        img = ImageOps.exif_transpose(img) or img
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as e:
        raise _refuse(field, f"corrupt EXIF orientation ({e})") from None
    return img if img.mode == "RGB" else img.convert("RGB")


def as_mask(img: Image.Image) -> Image.Image:
    """The mask as one channel (`L`): white is repainted, black is kept."""
    return img if img.mode == "L" else img.convert("L")


def check_mask_matches(image: Image.Image, mask: Image.Image) -> None:
    """`InvalidJob` on `mask_image` unless the mask is the image's size."""
    if image.size != mask.size:
        (iw, ih), (mw, mh) = image.size, mask.size
        raise _refuse("mask_image", f"mask is {mw}x{mh} but the image is {iw}x{ih}")


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes that depend only on the pixels (mode, size, palette, transparency).

    No metadata (ICC profile, text, EXIF, dpi); `compress_level=1` because outputs are written
    often and read rarely.
    """
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1, icc_profile=None)
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def label_height() -> int:
    """Pixels of one line of `grid` labels (a header or a caption)."""
    return _font().getbbox("Ag")[3] + 4


def _font() -> Any:
    return ImageFont.load_default()  # Pillow's own font: nothing to find or download


def _fit(text: str, width: int, font: Any) -> str:
    """`text`, cut with `…` to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def grid(
    rows: list[list[Image.Image | None]],
    cell: int = 128,
    gap: int = 4,
    *,
    header: list[str] | None = None,
    captions: list[str] | None = None,
) -> Image.Image:
    """A grid for looking at results: one row per job (e.g. input | mask | outputs).

    Each image is scaled to fit a `cell`-pixel square, keeping its aspect, and centred in it;
    rows may differ in length, and a None cell stays empty (so a column keeps one meaning).
    `header` labels the columns above the first row; `captions` are one line under each row
    (the prompt and seed, say), cut to the sheet's width. White background, `gap` pixels
    between cells.
    """
    if not rows or cell < 1 or gap < 0:
        raise ValueError("grid needs at least one row, cell >= 1 and gap >= 0")
    if captions is not None and len(captions) != len(rows):
        raise ValueError(f"{len(captions)} captions for {len(rows)} rows")
    font = _font()
    line = label_height() if header or captions else 0
    top = line + gap if header else 0
    below = line if captions else 0
    cols = max(1, max(len(r) for r in rows), len(header or []))
    width = cols * cell + (cols + 1) * gap
    height = top + len(rows) * (cell + below) + (len(rows) + 1) * gap
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(header or []):
        text = _fit(text, cell, font)
        x = gap + c * (cell + gap) + (cell - int(font.getlength(text))) // 2
        draw.text((x, gap), text, fill="black", font=font)
    for r, row in enumerate(rows):
        y0 = top + gap + r * (cell + below + gap)
        for c, img in enumerate(row):
            if img is None:
                continue
            thumb = img.convert("RGB")
            thumb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
            if thumb.width < cell and thumb.height < cell:  # small images: scale up, keep aspect
                scale = cell / max(thumb.size)
                size = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
                thumb = thumb.resize(size, Image.Resampling.NEAREST)
            x = gap + c * (cell + gap) + (cell - thumb.width) // 2
            y = y0 + (cell - thumb.height) // 2
            sheet.paste(thumb, (x, y))
        if captions:
            draw.text(
                (gap, y0 + cell + 1),
                _fit(captions[r], width - 2 * gap, font),
                fill="black",
                font=font,
            )
    return sheet
