"""The light side's family table (`farm.jobs.families`) is diffusers' own: each pipeline row is
its `__call__`'s signature, each kind the AutoPipeline's choice, each scheduler listed runs and
each left out does not, and every built-in is what the table says. So the table cannot drift
from an upgraded diffusers without a test failing here."""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.auto_pipeline import (
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
)
from PIL import Image

from farm.inputs.models import folder_info, model_info
from farm.jobs.families import (
    BUILTIN_INFO,
    COMMON_DEFAULTS,
    DEDICATED_INPAINT,
    FAMILIES,
    FLOW_SCHEDULERS,
    KARRAS_SCHEDULERS,
    OPTIONAL_ARGS,
    RENDER_KINDS,
    family_of_class,
)
from farm.jobs.refs import BUILTIN_MODELS
from workers.builtin.families import build_builtin
from workers.models.families import derive, info_of, make_scheduler

AUTO_KEYS = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl", "sd3": "stable-diffusion-3"}
AUTO_KEYS["flux"] = "flux"
AUTO = {
    "txt2img": AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
    "img2img": AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    "inpaint": AUTO_INPAINT_PIPELINES_MAPPING,
}
ROWS = [(f, p) for f in FAMILIES.values() for p in f.pipelines.values()]


@pytest.mark.parametrize(("family", "row"), ROWS, ids=[p.class_name for _, p in ROWS])
def test_each_pipeline_row_is_its_call_signature(family, row):
    params = inspect.signature(getattr(diffusers, row.class_name).__call__).parameters

    assert dict(row.defaults) == {k: params[k].default for k in COMMON_DEFAULTS if k in params}
    assert dict(row.args) == {k: params[k].default for k in OPTIONAL_ARGS if k in params}
    assert row.takes_size == ("height" in params and "width" in params)
    assert family_of_class(row.class_name) is family
    assert set(row.schedulers) <= set(family.schedulers)


def test_each_kind_runs_the_autopipelines_choice():
    for name, key in AUTO_KEYS.items():
        family = FAMILIES[name]
        for kind in RENDER_KINDS:
            assert family.auto[kind] == AUTO[kind][key].__name__
        assert set(family.pipelines) == set(family.auto.values()) | (
            set(DEDICATED_INPAINT) & set(family.pipelines)
        )
    mapped = {cls.__name__ for mapping in AUTO.values() for cls in mapping.values()}
    assert not set(DEDICATED_INPAINT) & mapped  # diffusers maps no kind to FluxFillPipeline


@pytest.mark.parametrize("name", list(BUILTIN_MODELS))
def test_builtin_info_is_what_the_built_pipeline_is(name):
    pipe = build_builtin(name)
    info = info_of(pipe)

    assert info == BUILTIN_INFO[name] == model_info(name)
    if FAMILIES[info.family].denoiser == "unet":  # diffusers' SD reads the UNet's sample size
        assert info.default_size == pipe.unet.config.sample_size * pipe.vae_scale_factor
    else:
        assert info.default_size == pipe.default_sample_size * pipe.vae_scale_factor


def test_folders_read_on_the_light_side_as_the_heavy_side_builds_them(family_folders, tiny_folders):
    for name, folder in {**tiny_folders, **family_folders}.items():
        assert folder_info(folder) == BUILTIN_INFO[name], name


def test_stable_diffusion_schedulers_are_their_compatibles():
    table = {s.class_name for s in KARRAS_SCHEDULERS.values()}
    for name in ("tiny", "tiny-sdxl"):
        compatibles = {c.__name__ for c in build_builtin(name).scheduler.compatibles}
        # Left out on purpose: one needs torchsde, the other is for EDM-trained models.
        assert compatibles - table == {"DPMSolverSDEScheduler", "EDMEulerScheduler"}
        assert table <= compatibles


def test_flow_schedulers_are_flow_matching_or_take_flow_sigmas():
    own = {c.__name__ for c in build_builtin("tiny-flux").scheduler.compatibles}
    assert own == {"FlowMatchEulerDiscreteScheduler"}  # diffusers lists only itself
    for choice in FLOW_SCHEDULERS.values():
        params = inspect.signature(getattr(diffusers, choice.class_name).__init__).parameters
        assert choice.class_name.startswith("FlowMatch") or (
            choice.flow and {"use_flow_sigmas", "flow_shift", "prediction_type"} <= set(params)
        )


# --------------------------------------------------------------------------- schedulers run

SCHEDULER_CASES = [
    (model, kind, name)
    for model in ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux-fill")
    for kind in BUILTIN_INFO[model].kinds
    if kind in RENDER_KINDS
    for name in FAMILIES[BUILTIN_INFO[model].family].schedulers
]


@pytest.fixture(scope="module")
def bases() -> dict:
    return {}


@pytest.mark.parametrize(
    ("model", "kind", "name"), SCHEDULER_CASES, ids=["-".join(c) for c in SCHEDULER_CASES]
)
def test_a_scheduler_runs_in_diffusers_where_the_table_says_it_fits(model, kind, name, bases):
    if model not in bases:
        base = build_builtin(model)
        bases[model] = base, base.scheduler  # the model's own, whatever a case sets
    base, own = bases[model]
    info = info_of(base)
    pipe = derive(base, info, kind)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(name, own, info)
    kwargs = {"prompt": "a fox", "num_inference_steps": 4, "output_type": "np"}
    kwargs |= {"height": 32, "width": 32, "generator": torch.Generator().manual_seed(0)}
    if kind != "txt2img":
        kwargs |= {"image": Image.new("RGB", (32, 32), (200, 80, 40)), "strength": 1.0}
        if not info.pipeline_for(kind).takes_size:
            del kwargs["height"], kwargs["width"]
    if kind == "inpaint":
        kwargs["mask_image"] = Image.new("L", (32, 32), 255)

    if name in info.pipeline_for(kind).schedulers:
        image = pipe(**kwargs).images[0]
        assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    else:  # diffusers itself cannot run it: the farm refuses it at submit
        with pytest.raises((ValueError, AttributeError, TypeError, AssertionError)):
            pipe(**kwargs)
