"""Previews: every `preview_every` steps, the latents mapped to RGB; the render's pixels are
exactly those of a render without previews."""

from __future__ import annotations

import numpy as np
import pytest

from farm.jobs.specs import Inpaint, Txt2Img
from workers.render.previews import preview
from workers.render.render import render, render_batch


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_a_render_with_previews_equals_one_without(cache, model):
    spec = Txt2Img(model=model, prompt="a fox", seed=3, num_inference_steps=6, height=32, width=32)
    pipe = cache.get(model, "txt2img")
    plain = render(pipe, spec).images[0]
    seen: list[tuple[int, int, dict]] = []
    shown = render_batch(
        pipe,
        [spec.model_copy(update={"preview_every": 2})],
        on_preview=lambda step, total, pics: seen.append((step, total, pics)),
    )[0].images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(shown))
    assert [s for s, _, _ in seen] == [2, 4, 6] and all(t == 6 for _, t, _ in seen)
    picture = seen[-1][2][0]
    assert picture.mode == "RGB" and 1 <= picture.width <= 32 and len(set(picture.getdata())) > 1


def test_only_jobs_that_ask_get_previews_in_a_batch(cache):
    base = dict(model="tiny", prompt="p", num_inference_steps=4, height=32, width=32)
    specs = [Txt2Img(**base, seed=1, preview_every=1), Txt2Img(**base, seed=2)]
    seen: list[dict] = []
    render_batch(cache.get("tiny", "txt2img"), specs, on_preview=lambda s, t, p: seen.append(p))
    assert len(seen) == 4 and all(set(p) == {0} for p in seen)


def test_preview_is_a_fixed_linear_map_of_the_latents(cache):
    import torch

    pipe = cache.get("tiny", "txt2img")
    zeros = preview(pipe, torch.zeros(1, 4, 4, 4))[0]
    assert set(zeros.getdata()) == {(128, 128, 128)}  # 0 ↦ the middle grey
    assert Inpaint.model_fields["preview_every"].default is None  # off by default
