"""Job specs: diffusers' names and defaults, and errors that name the field and the value."""

import math

import pytest

from farm.errors import InvalidJob
from farm.jobs.specs import SCHEDULERS, Inpaint, Txt2Img, parse_spec
from farm.jobs.state import TRANSITIONS, JobState, allowed


def test_defaults_are_diffusers_defaults():
    spec = Txt2Img(model="tiny", prompt="a fox")
    assert (spec.num_inference_steps, spec.guidance_scale, spec.num_images_per_prompt) == (
        50,
        7.5,
        1,
    )
    assert (
        Inpaint(model="tiny-inpaint", prompt="", image="a.png", mask_image="m.png").strength == 1.0
    )
    assert (
        parse_spec({"kind": "img2img", "model": "tiny", "prompt": "x", "image": "a.png"}).strength
        == 0.8
    )


@pytest.mark.parametrize(
    ("override", "field", "shown"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps", "0"),
        ({"num_inference_steps": 100_000}, "num_inference_steps", "100000"),
        ({"guidance_scale": math.nan}, "guidance_scale", "nan"),
        ({"width": 100}, "width", "100"),
        ({"height": 0}, "height", "0"),
        ({"scheduler": "warp"}, "scheduler", "warp"),
        ({"prompt": "  "}, "prompt", "''"),
        ({"model": "weights.ckpt"}, "model", "weights.ckpt"),
        ({"model": "http://evil/x"}, "model", "http://evil/x"),
        ({"num_images_per_prompt": 99}, "num_images_per_prompt", "99"),
        ({"seed": -1}, "seed", "-1"),
        ({"colour": "red"}, "colour", "red"),
    ],
)
def test_invalid_field_is_named_with_its_value(override, field, shown):
    with pytest.raises(InvalidJob) as err:
        parse_spec({"kind": "txt2img", "model": "tiny", "prompt": "a fox", **override})
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert shown.strip("'") in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_unknown_kind():
    with pytest.raises(InvalidJob, match=r"^mask_image: is required"):
        parse_spec({"kind": "inpaint", "model": "tiny-inpaint", "prompt": "", "image": "a.png"})
    with pytest.raises(InvalidJob) as err:
        parse_spec({"kind": "paint", "model": "tiny"})
    assert err.value.field == "kind" and "paint" in str(err.value)


def test_schedulers_by_name():
    assert {"ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "dpmpp_2m"} <= set(SCHEDULERS)


def test_transition_table():
    terminal = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    for src in JobState:
        assert src.terminal == (src in terminal)
        if src.terminal:
            assert not TRANSITIONS[src]
    assert allowed("queued", "running") and allowed("running", "queued")
    assert not allowed("queued", "succeeded")
    assert not allowed("succeeded", "queued")
