"""Micro-batching keeps every image's pixels, per family: jobs that share a batch signature
render in one call exactly as each does alone, and what would change pixels when mixed (a
negative prompt present or absent on SDXL and FLUX.1, the family arguments a call shares) keeps
jobs apart."""

from __future__ import annotations

import pytest

from farm.jobs.defaults import resolve
from farm.jobs.families import BUILTIN_INFO
from farm.jobs.signature import batch_signature
from farm.jobs.specs import parse_spec
from tests.workers.render.test_render_batch import assert_each_as_alone, box, picture


def job(model: str, kind: str, i: int, **fields):
    data = {"kind": kind, "model": model, "prompt": f"take {i}: a fox", "seed": 3 + i}
    data |= {"num_inference_steps": 3, **fields}
    if kind == "txt2img":
        data |= {"height": 32, "width": 48}
    else:
        data |= {"image": f"{i}.png", "strength": 0.8}
    if kind == "inpaint":
        data["mask_image"] = f"{i}.mask.png"
    return parse_spec(data)


MIXES = {
    # model, kind: per-job fields, mixed as they may be within one signature
    ("tiny", "txt2img"): [{}, {"negative_prompt": "fog"}, {}],
    ("tiny-sdxl", "txt2img"): [
        {"negative_prompt": "fog", "prompt_2": "a watercolour"},
        {"negative_prompt": "", "negative_prompt_2": "grain"},
        {"negative_prompt": "dusk"},
    ],
    ("tiny-sdxl", "img2img"): [{}, {"prompt_2": "a watercolour"}, {"negative_prompt_2": "x"}],
    ("tiny-sdxl-inpaint", "inpaint"): [{}, {"prompt_2": "a watercolour"}, {}],
    ("tiny-sd3", "txt2img"): [
        {},
        {"negative_prompt": "fog", "prompt_3": "a photograph"},
        {"prompt_2": "a watercolour", "negative_prompt_3": "grain"},
    ],
    ("tiny-sd3", "inpaint"): [{}, {"negative_prompt": "fog"}, {"prompt_2": "a watercolour"}],
    ("tiny-flux", "txt2img"): [
        {"negative_prompt": "fog", "true_cfg_scale": 2.0},
        {"negative_prompt": "dusk", "prompt_2": "a watercolour", "true_cfg_scale": 2.0},
        {"negative_prompt": "", "negative_prompt_2": "grain", "true_cfg_scale": 2.0},
    ],
    ("tiny-flux", "img2img"): [{}, {"prompt_2": "a watercolour"}, {}],
    ("tiny-flux-fill", "inpaint"): [{}, {"prompt_2": "a watercolour"}, {}],
}


@pytest.mark.parametrize(("model", "kind"), list(MIXES), ids=["-".join(k) for k in MIXES])
def test_a_mixed_batch_equals_each_job_alone(model, kind, cache, max_diff):
    specs = [job(model, kind, i, **fields) for i, fields in enumerate(MIXES[model, kind])]
    size = (64, 48)
    images = [picture(i, size) if kind != "txt2img" else None for i in range(len(specs))]
    masks = [box(8 * i, 4, 8 * i + 30, 36, size) if kind == "inpaint" else None for i in range(3)]
    info = BUILTIN_INFO[model]
    signatures = {
        batch_signature(resolve(s, info), im and im.size, info)
        for s, im in zip(specs, images, strict=True)
    }
    assert len(signatures) == 1  # they may share a call

    assert_each_as_alone(cache.get(model, kind), specs, images, masks, max_diff)


def signature(model: str, kind: str = "txt2img", **fields) -> str | None:
    info = BUILTIN_INFO[model]
    size = (64, 48) if kind != "txt2img" else None
    return batch_signature(resolve(job(model, kind, 0, **fields), info), size, info)


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_a_negative_prompt_or_none_keeps_jobs_apart_where_it_changes_pixels(model):
    # SDXL zeroes the negative embeddings of a job without one (force_zeros_for_empty_prompt);
    # FLUX.1 runs true CFG only with one. Either way "" is not "none".
    assert signature(model) != signature(model, negative_prompt="")
    assert signature(model, negative_prompt="") == signature(model, negative_prompt="fog")


@pytest.mark.parametrize("model", ["tiny", "tiny-sd3"])
def test_a_negative_prompt_or_none_may_share_a_call_where_it_does_not(model):
    assert signature(model) == signature(model, negative_prompt="fog")


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        ("tiny-sdxl", {"original_size": (128, 128)}),
        ("tiny-sdxl", {"target_size": (32, 32)}),
        ("tiny-sdxl", {"crops_coords_top_left": (8, 0)}),
        ("tiny-sdxl", {"denoising_end": 0.5}),
        ("tiny-sd3", {"max_sequence_length": 32}),
        ("tiny-flux", {"true_cfg_scale": 3.0, "negative_prompt": "x"}),
        ("tiny-flux", {"max_sequence_length": 64}),
    ],
)
def test_family_arguments_a_call_shares_are_in_the_signature(model, fields):
    base = {"negative_prompt": "x"} if "negative_prompt" in fields else {}
    assert signature(model, **base) != signature(model, **fields)


def test_prompts_per_image_are_not_in_the_signature():
    assert signature("tiny-sd3") == signature("tiny-sd3", prompt_2="b", prompt_3="c")
    assert signature("tiny-sdxl") == signature("tiny-sdxl", prompt_2="b")


def test_a_defaulted_job_and_an_explicit_one_with_equal_values_share_a_signature():
    # Resolved at submit: the record carries the values used, so equal values, equal calls.
    assert signature("tiny-sdxl") == signature(
        "tiny-sdxl", guidance_scale=5.0, crops_coords_top_left=(0, 0), height=64, width=64
    )
    assert signature("tiny-flux", kind="img2img") == signature(
        "tiny-flux", kind="img2img", true_cfg_scale=1.0, max_sequence_length=512
    )
    assert signature("tiny-sdxl") != signature("tiny-sdxl", guidance_scale=7.5)
    # Unresolved (the client could not see the model), left out is not given.
    unresolved = job("org/unseen", "txt2img", 0)
    given = job("org/unseen", "txt2img", 0, guidance_scale=7.5)
    assert batch_signature(unresolved) != batch_signature(given)
