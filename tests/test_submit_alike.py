"""`Submission.prepare_alike`: records stamped from an alike job's are the ones `prepare` makes.

`Farm.submit_many` and the HTTP API's batches prepare specs this way: one job per shape in
full, the others stamped (prompts, seed, key, generated mask's seed). Real Redis, a real
folder store; `prepare` itself is the oracle.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from farm import Box, Farm, Img2Img, Inpaint, InvalidJob, Strokes, Txt2Img
from farm.cli.demo import box_mask, sample_image
from farm.submit import Submission


@pytest.fixture
def farm(settings):
    with Farm(settings) as f:
        yield f


def specs(folder) -> list:
    for i in range(2):
        sample_image(i).save(folder / f"{i}.png")
    box_mask(0).save(folder / "mask.png")
    masks = [Strokes(), Box(max_size=0.4), Strokes(seed=7), str(folder / "mask.png")]
    out: list = [
        Inpaint(
            model="tiny-inpaint",
            prompt=f"a cat {i}",
            negative_prompt=f"blurry {i}" if i % 3 == 0 else None,
            image=str(folder / f"{i % 2}.png"),
            mask_image=masks[i % 4],
            seed=None if i % 5 == 0 else 100 + i,
            key=f"cat-{i}" if i % 2 else None,
            num_inference_steps=2,
        )
        for i in range(24)
    ]
    for i in range(6):
        out.append(Img2Img(model="tiny", prompt=f"a dog {i}", image=str(folder / "1.png"),
                           strength=0.5, seed=i, key=f"dog-{i}"))  # fmt: skip
        out.append(Txt2Img(model="tiny", prompt=f"an owl {i}", seed=i, width=64, height=64))
        out.append(Txt2Img(model="tiny", prompt=f"an owl {i}", seed=i))  # sizes left out
        out.append(Txt2Img(model="tiny-sdxl", prompt=f"a fox {i}", prompt_2="oil", seed=i,
                           original_size=(64, 64), key=f"fox-{i}"))  # fmt: skip
        given = {"guidance_scale": 7.5} if i % 3 else {}  # its default, given: not left out
        out.append(Txt2Img(model="tiny", prompt=f"a hen {i}", seed=i, priority=i % 2, **given))
    png = io.BytesIO()
    sample_image(3).save(png, format="PNG")  # bytes (a shape by content); pixels: whole
    out.append(Img2Img(model="tiny", prompt="bytes", image=png.getvalue(), seed=1))
    out.append(Img2Img(model="tiny", prompt="pixels", image=Image.open(png), seed=1))
    return out


def comparable(rec: dict, drawn: bool) -> dict:
    """A record without what is random: its time, a keyless id, a drawn seed."""
    out = {k: v for k, v in rec.items() if k != "created_at"}
    spec = out["spec"] = dict(out["spec"])
    if "key" not in spec:
        out["id"] = len(out["id"])
    if drawn:
        seed, spec["seed"] = spec["seed"], None
        mask = spec.get("mask_image")
        if isinstance(mask, dict) and mask.get("seed") == seed:  # drawn with the job's seed
            spec["mask_image"] = {**mask, "seed": None}
    return out


def test_stamped_records_are_what_prepare_makes_of_each_spec(farm, tmp_path):
    given = specs(tmp_path)
    alike, whole = Submission(farm), Submission(farm)
    stamped = [alike.prepare_alike(s) for s in given]
    oracle = [whole.prepare(s) for s in given]

    assert len(alike._templates) < len(given) // 3  # most were stamped, not prepared
    for spec, got, want in zip(given, stamped, oracle, strict=True):
        drawn = spec.seed is None
        assert comparable(got, drawn) == comparable(want, drawn), spec
        assert (got["id"] in alike._drawn) == drawn  # a drawn seed does not count as a key's
        if isinstance(spec, Inpaint) and isinstance(spec.mask_image, Strokes | Box):
            own = spec.mask_image.seed
            mask = got["spec"]["mask_image"]
            assert mask["seed"] == (own if own is not None else got["spec"]["seed"])
    drawn_seeds = [r["spec"]["seed"] for s, r in zip(given, stamped, strict=True) if s.seed is None]
    assert len(set(drawn_seeds)) == len(drawn_seeds)  # each its own
    # Submitted, every stamped record is stored and reads back as its spec.
    handles = farm.submit_many(given)
    assert [h.status().spec["prompt"] for h in handles] == [s.prompt for s in given]


def test_a_stamped_spec_still_has_its_texts_measured(farm, tmp_path, settings):
    first = specs(tmp_path)[1]  # a key of its own, a seed given
    sub = Submission(farm)
    sub.prepare_alike(first)
    long = first.model_copy(update={"prompt": "x" * (settings.max_prompt_chars + 1)})
    with pytest.raises(InvalidJob, match="prompt: is .* characters, over FARM_MAX_PROMPT_CHARS"):
        sub.prepare_alike(long)
    nul = first.model_copy(update={"negative_prompt": "bad\x00text", "key": "other"})
    with pytest.raises(InvalidJob, match="NUL"):
        sub.prepare_alike(nul)
    with pytest.raises(InvalidJob, match="NUL"):  # as the SDK meets it: nothing written
        farm.submit_many([first, nul])
    assert farm.tracker.get_many([sub.prepare(first)["id"]]) == [None]


def test_a_submission_keeps_a_bounded_number_of_templates(farm):
    """Every job of its own shape (a guidance scale each): no template is ever used, and
    the submission keeps at most `TEMPLATES` of them, the oldest dropped first."""
    from farm.submit import TEMPLATES

    sub = Submission(farm)
    given = [
        Txt2Img(model="tiny", prompt="a fox", seed=1, guidance_scale=i / 20)
        for i in range(TEMPLATES + 50)
    ]
    records = [sub.prepare_alike(s) for s in given]
    assert len(sub._templates) == TEMPLATES
    assert [r["spec"]["guidance_scale"] for r in sub._templates.values()][0] == 50 / 20
    again = sub.prepare_alike(given[-1].model_copy(update={"prompt": "a hen"}))  # still kept
    assert again["spec"] == {**records[-1]["spec"], "prompt": "a hen"}
