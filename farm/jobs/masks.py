"""Mask generators for inpainting augmentation: `box`, `strokes` and `full` (Pillow only).

A manifest row (or `--mask`) may name a generator instead of a mask file:

    box                          one random rectangle, sides 25–50% of the image's
    box:min_size=0.1,max_size=0.3
    strokes                      LaMa-style irregular brush strokes (thick random polylines)
    strokes:max_strokes=8,max_width=0.2
    full                         the whole image (plain img2img through an inpainting model)

In JSONL the same can be an object: `{"generator": "strokes", "max_width": 0.2}`. Lengths and
widths are fractions of the image's shorter side, so a generator looks alike at 64 and 1024
pixels. A mask is a function of (generator, size, seed) only: the batch derives the seed from
the row, the variation and `--seed` (unless the row fixes one, `strokes:seed=7`), so a re-run
draws the very same masks.

A job spec carries a generated mask as such, never as pixels: `mask_image` may be a generator
with its seed (`{"generator": "strokes", "seed": 123, "max_width": 0.2, ...}` in the record,
`Strokes(seed=123)` in Python), and the worker draws it at the source image's size just
before rendering (this module is light: Pillow and pydantic). Nothing is uploaded for it at
submit; the mask as the model used it is stored with the job's results (`jobs/<id>/mask.png`).

`strokes` follows LaMa's `RandomIrregularMaskGenerator` (Suvorov et al., 2021): each stroke
starts at a random point and runs through a few vertices, turning by a random angle, with a
random brush width; the joints are rounded. Strokes that would push the covered area over
`max_coverage` are dropped, and strokes are added until `min_coverage` is reached, so every
mask repaints a sensible share of the picture (5–50% by default).
"""

from __future__ import annotations

import difflib
import math
import random
from typing import Any, Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from farm.errors import InvalidJob

MAX_EXTRA_STROKES = 64
"""Strokes tried beyond `max_strokes` to reach `min_coverage` before giving up."""


class _Gen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    generator: str
    seed: int | None = Field(default=None, ge=0, le=2**64 - 1)
    """The seed the mask is drawn with; None: one the batch (or the job's seed) supplies."""

    def describe(self) -> str:
        """Canonical text form (`name` or `name:k=v,...`, defaults left out): keys and metadata."""
        params = self.model_dump(exclude_defaults=True, exclude={"generator"})
        args = ",".join(f"{k}={params[k]}" for k in sorted(params))
        return f"{self.generator}:{args}" if args else self.generator


class Box(_Gen):
    """One rectangle; each side a random fraction in [min_size, max_size] of the image's side."""

    generator: Literal["box"] = "box"
    min_size: float = Field(default=0.25, gt=0.0, le=1.0)
    max_size: float = Field(default=0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _order(self) -> Box:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is larger than max_size {self.max_size}")
        return self

    def draw(self, size: tuple[int, int], rng: random.Random) -> Image.Image:
        w, h = size
        mask = Image.new("L", size, 0)
        bw = max(1, round(w * rng.uniform(self.min_size, self.max_size)))
        bh = max(1, round(h * rng.uniform(self.min_size, self.max_size)))
        x0 = math.floor(rng.random() * (w - bw + 1))
        y0 = math.floor(rng.random() * (h - bh + 1))
        ImageDraw.Draw(mask).rectangle((x0, y0, x0 + bw - 1, y0 + bh - 1), fill=255)
        return mask


class Strokes(_Gen):
    """LaMa-style brush strokes; widths and lengths are fractions of the shorter side."""

    generator: Literal["strokes"] = "strokes"
    max_strokes: int = Field(default=4, ge=1, le=64)
    max_vertices: int = Field(default=5, ge=1, le=32)
    min_width: float = Field(default=0.06, gt=0.0, le=1.0)
    max_width: float = Field(default=0.15, gt=0.0, le=1.0)
    max_length: float = Field(default=0.4, gt=0.0, le=2.0)
    max_angle: float = Field(default=4.0, gt=0.0, le=2 * math.pi)
    min_coverage: float = Field(default=0.05, ge=0.0, lt=1.0)
    max_coverage: float = Field(default=0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _order(self) -> Strokes:
        if self.min_width > self.max_width:
            raise ValueError(
                f"min_width {self.min_width} is larger than max_width {self.max_width}"
            )
        if self.min_coverage >= self.max_coverage:
            raise ValueError(
                f"min_coverage {self.min_coverage} must be below max_coverage {self.max_coverage}"
            )
        return self

    def _stroke(self, canvas: Image.Image, rng: random.Random, i: int) -> None:
        w, h = canvas.size
        side = min(w, h)
        draw = ImageDraw.Draw(canvas)
        x, y = rng.random() * w, rng.random() * h
        width = max(1, round(side * rng.uniform(self.min_width, self.max_width)))
        points = [(x, y)]
        for _ in range(1 + math.floor(rng.random() * self.max_vertices)):
            angle = 0.01 + rng.random() * self.max_angle
            if i % 2 == 0:
                angle = 2 * math.pi - angle
            length = side * (0.05 + rng.random() * self.max_length)
            x = min(max(x + length * math.sin(angle), 0), w - 1)
            y = min(max(y + length * math.cos(angle), 0), h - 1)
            points.append((x, y))
        draw.line(points, fill=255, width=width, joint="curve")
        r = width / 2
        for px, py in (points[0], points[-1]):  # round caps, as a brush leaves them
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)

    def draw(self, size: tuple[int, int], rng: random.Random) -> Image.Image:
        w, h = size
        total = w * h
        mask = Image.new("L", size, 0)
        covered = 0
        wanted = 1 + math.floor(rng.random() * self.max_strokes)
        for i in range(wanted + MAX_EXTRA_STROKES):
            if i >= wanted and covered >= self.min_coverage * total:
                break
            candidate = mask.copy()
            self._stroke(candidate, rng, i)
            n = candidate.histogram()[255]
            if n > self.max_coverage * total:
                continue
            mask, covered = candidate, n
        return mask


class Full(_Gen):
    """The whole image is repainted."""

    generator: Literal["full"] = "full"

    def draw(self, size: tuple[int, int], rng: random.Random) -> Image.Image:
        return Image.new("L", size, 255)


MaskGenerator = Box | Strokes | Full
GENERATORS: dict[str, type[_Gen]] = {"box": Box, "strokes": Strokes, "full": Full}


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def generator_from(value: Any) -> MaskGenerator:
    """A generator from its object form (`{"generator": "strokes", "max_width": 0.2, ...}`) or
    a generator itself; `ValueError` naming the bad parameter and its value."""
    if isinstance(value, _Gen):
        return value  # type: ignore[return-value]
    if not isinstance(value, dict):
        raise ValueError(f"expected a mask generator object, got {type(value).__name__}")
    params = dict(value)
    return _build(params.pop("generator", None), params)


def _build(name: Any, params: dict[str, Any]) -> MaskGenerator:
    if name not in GENERATORS:
        raise ValueError(f"generator must be one of {', '.join(GENERATORS)}, got {name!r}")
    try:
        return GENERATORS[name](**params)  # type: ignore[return-value]
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if where and first["type"] != "extra_forbidden":
            msg += f" (got {first.get('input')!r})"
        raise ValueError(f"{name} {where}: {msg}" if where else f"{name} {msg}") from None


def parse_generator(value: Any, field: str = "mask") -> MaskGenerator | None:
    """The generator `value` names (`strokes`, `box:max_size=0.3`, `{"generator": ...}`), or
    None when it is not one (a path or URI). Bad parameters are `InvalidJob` naming them."""
    if isinstance(value, dict):
        params = dict(value)
        name = params.pop("generator", None)
    elif isinstance(value, str):
        name, sep, args = value.strip().partition(":")
        if name not in GENERATORS:
            _near_miss(value, name, field)
            return None
        params = {}
        for part in filter(None, (p.strip() for p in args.split(","))) if sep else ():
            k, eq, v = part.partition("=")
            if not eq:
                raise InvalidJob(f"{field}: {part!r} in {value!r} is not key=value", field=field)
            params[k.strip()] = _number(v.strip())
    else:
        return None
    try:
        return _build(name, params)
    except ValueError as e:
        raise InvalidJob(f"{field}: {e}", field=field) from None


def _near_miss(value: str, name: str, field: str) -> None:
    """`InvalidJob` for a bare word close to a generator's name (`stroke`): a typo, not a file
    (a mask file has a suffix or a folder), which would otherwise read "no such file"."""
    if "/" in value or "\\" in value or "." in name:
        return
    close = difflib.get_close_matches(name.lower(), list(GENERATORS), n=1, cutoff=0.6)
    if close:
        raise InvalidJob(
            f"{field}: no mask generator {name!r}; did you mean {close[0]!r}? (a generator: "
            f"{', '.join(GENERATORS)}, or a mask file's path)",
            field=field,
        )


def generate(gen: MaskGenerator, size: tuple[int, int], seed: int | None = None) -> Image.Image:
    """The mask `gen` draws for an image of `size` (width, height) with `seed` (default: the
    generator's own): mode `L`, 255 where the model repaints, 0 where the source is kept."""
    seed = gen.seed if seed is None else seed
    if seed is None:
        raise ValueError(f"{gen.describe()}: no seed to draw the mask with")
    return gen.draw(size, random.Random(seed))


def coverage(mask: Image.Image) -> float:
    """Share of the mask's pixels that are repainted (value >= 128)."""
    hist = mask.convert("L").histogram()
    return sum(hist[128:]) / (mask.width * mask.height)
