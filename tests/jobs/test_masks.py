"""Mask generators: deterministic per seed, non-trivial, parameters checked at the edge."""

from __future__ import annotations

import numpy as np
import pytest

from farm import InvalidJob
from farm.jobs.masks import Box, Full, Strokes, coverage, generate, parse_generator

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


# --------------------------------------------------------------------------- in a job spec


def test_a_spec_carries_a_generated_mask_as_its_generator_and_seed():
    from farm.jobs.specs import Inpaint, parse_spec

    common = dict(kind="inpaint", model="tiny-inpaint", prompt="a cat", image="cat.png")
    spec = parse_spec({**common, "mask_image": {"generator": "strokes", "max_width": 0.2}})
    assert spec.mask_image == Strokes(max_width=0.2)
    # Without a seed of its own the mask is drawn with the job's (filled in at submit); its
    # own seed wins.
    assert spec.seed is None and spec.mask_generator() == Strokes(max_width=0.2)
    assert parse_spec({**spec.model_dump(), "seed": 9}).mask_generator() == Strokes(
        max_width=0.2, seed=9
    )
    own = Inpaint(**common, mask_image=Box(seed=3), seed=9)
    assert own.mask_generator() == Box(seed=3)
    # The record's JSON form is the generator, every parameter written out, and reads back.
    dumped = own.model_dump(mode="json", exclude_none=True)["mask_image"]
    assert dumped == {"generator": "box", "seed": 3, "min_size": 0.25, "max_size": 0.5}
    assert parse_spec(own.model_dump(mode="json")).mask_generator() == Box(seed=3)
    # A string is always a path or URI in a spec, whatever its name.
    assert Inpaint(**common, mask_image="strokes").mask_generator() is None


@pytest.mark.parametrize(
    "mask, words",
    [
        ({"generator": "strokes", "max_width": 3}, ["strokes max_width", "3"]),
        ({"generator": "blob"}, ["box, strokes, full", "blob"]),
        ({"generator": "box", "seed": -1}, ["box seed", "-1"]),
        ({"max_width": 0.2}, ["generator must be one of", "None"]),
    ],
)
def test_a_bad_generated_mask_in_a_spec_names_mask_image(mask, words):
    from farm.jobs.specs import parse_spec

    with pytest.raises(InvalidJob) as err:
        parse_spec(
            {"kind": "inpaint", "model": "tiny-inpaint", "prompt": "", "image": "a.png"}
            | {"mask_image": mask}
        )
    assert err.value.field == "mask_image"
    message = str(err.value)
    assert message.startswith("mask_image: ") and all(w in message for w in words), message


def test_the_generators_own_seed_draws_unless_one_is_given():
    def drawn(gen, seed=None):
        return generate(gen, (64, 64), seed).tobytes()

    assert drawn(Strokes(seed=5)) == drawn(Strokes(), 5)
    assert drawn(Strokes(seed=5), 6) != drawn(Strokes(seed=5))
    with pytest.raises(ValueError, match="no seed"):
        drawn(Strokes())
    text = parse_generator("strokes:seed=7,max_width=0.2")
    assert text == Strokes(seed=7, max_width=0.2)
    assert text.describe() == "strokes:max_width=0.2,seed=7"
