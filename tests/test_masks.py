"""Mask generators: deterministic per seed, non-trivial, parameters checked at the edge."""

from __future__ import annotations

import numpy as np
import pytest

from farm import InvalidJob
from farm.masks import Box, Full, Strokes, coverage, generate, parse_generator

SIZES = [(64, 64), (96, 64), (48, 128)]


def pixels(img) -> np.ndarray:
    return np.asarray(img)


@pytest.mark.parametrize("name", ["box", "strokes", "full"])
def test_same_seed_same_mask(name):
    gen = parse_generator(name)
    for size in SIZES:
        a, b = generate(gen, size, 1234), generate(gen, size, 1234)
        assert a.mode == "L" and a.size == size
        assert a.tobytes() == b.tobytes()
        assert set(np.unique(pixels(a))) <= {0, 255}


@pytest.mark.parametrize("size", SIZES)
def test_strokes_cover_5_to_50_percent_and_differ_between_seeds(size):
    gen = parse_generator("strokes")
    masks = [generate(gen, size, seed) for seed in range(60)]
    covers = [coverage(m) for m in masks]
    assert all(0.05 <= c <= 0.5 for c in covers), (min(covers), max(covers))
    assert len({m.tobytes() for m in masks}) == len(masks)
    # Irregular, not boxes: the painted pixels fill well under their bounding box.
    fills = []
    for m in masks:
        ys, xs = np.nonzero(pixels(m))
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / box)
    assert np.median(fills) < 0.7


def test_strokes_parameters_change_the_masks():
    thin = [
        coverage(generate(Strokes(max_width=0.08, min_width=0.04), (64, 64), s)) for s in range(40)
    ]
    thick = [
        coverage(generate(Strokes(max_width=0.3, max_strokes=8), (64, 64), s)) for s in range(40)
    ]
    assert np.mean(thick) > 1.5 * np.mean(thin)
    capped = Strokes(max_strokes=16, max_width=0.4, max_coverage=0.2)
    assert all(coverage(generate(capped, (64, 64), s)) <= 0.2 for s in range(40))


def test_box_is_one_rectangle_within_its_size_bounds():
    gen = Box(min_size=0.25, max_size=0.5)
    for seed in range(50):
        m = pixels(generate(gen, (80, 64), seed))
        ys, xs = np.nonzero(m)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert len(ys) == h * w  # a filled rectangle
        assert 0.25 * 80 - 1 <= w <= 0.5 * 80 + 1 and 0.25 * 64 - 1 <= h <= 0.5 * 64 + 1


def test_full_repaints_everything():
    assert coverage(generate(Full(), (40, 24), 0)) == 1.0


def test_parse_forms_and_canonical_description():
    assert parse_generator("strokes") == Strokes()
    text = parse_generator("strokes: max_width=0.2, max_strokes=8")
    obj = parse_generator({"generator": "strokes", "max_strokes": 8, "max_width": 0.2})
    assert text == obj and text.describe() == "strokes:max_strokes=8,max_width=0.2"
    assert parse_generator("box").describe() == "box"
    # Anything else is a path (or URI): not a generator.
    assert parse_generator("masks/box.png") is None
    assert parse_generator("s3://bucket/strokes.png") is None


@pytest.mark.parametrize(
    "value, words",
    [
        ("strokes:max_width=2", ["max_width", "2"]),
        ("strokes:brush=3", ["brush"]),
        ("box:min_size=0.6", ["min_size", "0.6", "max_size"]),
        ("strokes:max_width", ["max_width", "key=value"]),
        ({"generator": "blob"}, ["blob", "box, strokes, full"]),
        ("strokes:min_coverage=0.6,max_coverage=0.5", ["min_coverage", "max_coverage"]),
    ],
)
def test_bad_parameters_name_the_field_and_value(value, words):
    with pytest.raises(InvalidJob) as err:
        parse_generator(value)
    assert err.value.field == "mask"
    message = str(err.value)
    assert message.startswith("mask: ") and "\n" not in message
    assert all(w in message for w in words), message
