"""Every family through a real worker subprocess, S3 (moto) and Redis: a job that leaves its
arguments to the model renders diffusers' default pixels and its record and meta.json say the
values it used; a job whose model only the worker can see is resolved there (and a scheduler
that does not fit it fails as invalid, once); SDXL jobs with and without a negative prompt keep
their own pixels however they were queued."""

from __future__ import annotations

import io
import json
import shutil
import uuid

import pytest
from PIL import Image

from farm import Farm, JobState
from farm.jobs.specs import parse_spec
from farm.local.up import LocalFarm
from farm.settings import FarmSettings
from farm.storage.s3 import S3Store
from tests.workers.render.test_families_render import PIPELINES, direct
from tests.workers.test_micro_batching import behind_a_busy_worker
from workers.models.pipelines import PipelineCache
from workers.render.render import render

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def lf(redis_server, s3_server, tmp_path_factory, family_folders):
    tmp = tmp_path_factory.mktemp("families-e2e")
    bucket = f"families-{uuid.uuid4().hex[:8]}"
    S3Store(bucket, endpoint_url=s3_server.endpoint_url, region="us-east-1").ensure_bucket()
    models = tmp / "models"  # what only the workers see (FARM_MODELS_DIR on their side)
    shutil.copytree(family_folders["tiny-sdxl"], models / "sdxl-folder")
    shutil.copytree(family_folders["tiny-flux"], models / "flux-folder")
    shutil.copytree(family_folders["tiny-sdxl-inpaint"], models / "sdxl-inpaint-folder")
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=f"s3://{bucket}/farm",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region="us-east-1",
        home=tmp,
        key_prefix=f"fam{uuid.uuid4().hex[:8]}:",
        max_batch=4,
        models_dir=models,
    )
    with LocalFarm(settings, workers=1, threads=1, preload=["tiny", "tiny-sdxl"]) as farm:
        yield farm
    for log in (tmp / "logs").glob("*.log"):
        print(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def farm(lf):
    """A client that shares the workers' Redis and storage but not their models folder."""
    with Farm(lf.settings.model_copy(update={"models_dir": None})) as f:
        yield f


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-inputs")
    Image.new("RGB", (64, 48), (30, 120, 200)).save(folder / "in.png")
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 8, 48, 40))
    mask.save(folder / "mask.png")
    return folder


def output(farm: Farm, rec) -> Image.Image:
    return Image.open(io.BytesIO(farm.store.get_uri(rec.outputs[0]))).convert("RGB")


def meta(farm: Farm, rec) -> dict:
    return json.loads(farm.store.get_uri(rec.meta))


DEFAULTED = [
    ("tiny", "txt2img"),
    ("tiny-sdxl", "txt2img"),
    ("tiny-sd3", "img2img"),
    ("tiny-flux", "txt2img"),
    ("tiny-flux-fill", "inpaint"),
]


@pytest.mark.parametrize(("model", "kind"), DEFAULTED, ids=["-".join(c) for c in DEFAULTED])
def test_a_job_left_to_its_models_defaults_renders_diffusers_default_pixels(
    model, kind, farm, inputs, oracle, tiny_folders, family_folders, max_diff
):
    spec = {"kind": kind, "model": model, "prompt": PROMPT, "seed": 11}
    if kind != "txt2img":
        spec["image"] = str(inputs / "in.png")
    if kind == "inpaint":
        spec["mask_image"] = str(inputs / "mask.png")

    rec = farm.submit(spec).wait(timeout=300)

    assert rec.state == JobState.SUCCEEDED, rec.error
    image, mask = Image.open(inputs / "in.png"), Image.open(inputs / "mask.png").convert("L")
    folder = {**tiny_folders, **family_folders}[model]
    expected = direct(oracle, folder, model, kind, {}, image, mask, (64, 48))
    assert max_diff(output(farm, rec), expected) <= 1
    # Resolved at submit (a built-in): the record and meta.json hold the values used.
    import inspect

    params = inspect.signature(PIPELINES[model][kind].__call__).parameters
    assert rec.spec["guidance_scale"] == params["guidance_scale"].default
    assert rec.spec["num_inference_steps"] == params["num_inference_steps"].default
    assert meta(farm, rec)["spec"] == rec.spec


def test_a_model_only_the_worker_sees_is_resolved_on_the_worker(
    farm, oracle, family_folders, max_diff
):
    job = farm.submit({"kind": "txt2img", "model": "./sdxl-folder", "prompt": PROMPT, "seed": 11})
    queued = farm.get(job.id).spec
    assert "guidance_scale" not in queued and "height" not in queued  # left to the model

    rec = job.wait(timeout=300)

    assert rec.state == JobState.SUCCEEDED, rec.error
    assert (rec.spec["guidance_scale"], rec.spec["num_inference_steps"]) == (5.0, 50)
    assert (rec.spec["height"], rec.spec["width"]) == (64, 64)
    assert rec.spec["crops_coords_top_left"] == [0, 0]
    assert meta(farm, rec)["spec"] == rec.spec
    expected = direct(
        oracle, family_folders["tiny-sdxl"], "tiny-sdxl", "txt2img", {}, None, None, None
    )
    assert max_diff(output(farm, rec), expected) <= 1


def test_a_scheduler_that_does_not_fit_fails_on_the_first_worker_as_invalid(farm):
    spec = {"kind": "txt2img", "model": "./flux-folder", "prompt": PROMPT, "scheduler": "euler_a"}
    (rec,) = farm.wait([farm.submit(spec).id], timeout=300)

    assert rec.state == JobState.FAILED and rec.attempt == 1
    assert rec.error.startswith("scheduler: 'euler_a' does not fit './flux-folder'")
    assert "runs euler, dpmpp_2m" in rec.error


def test_sdxl_jobs_with_and_without_a_negative_prompt_keep_their_own_pixels(farm, max_diff):
    """The issue's case: without a negative prompt SDXL zeroes the negative embeddings, so a
    job without one must never share a call with one that has one."""
    common = {"model": "tiny-sdxl", "num_inference_steps": 4, "height": 32, "width": 32}
    specs = [
        parse_spec({"kind": "txt2img", "prompt": "a fox", "seed": 1, **common}),
        parse_spec(
            {"kind": "txt2img", "prompt": "a hen", "seed": 2, "negative_prompt": "", **common}
        ),
        parse_spec({"kind": "txt2img", "prompt": "a cat", "seed": 3, **common}),
    ]
    ids = behind_a_busy_worker(farm, specs)
    records = farm.wait(ids, timeout=300)

    assert all(r.state == JobState.SUCCEEDED for r in records), [r.error for r in records]
    batches = [meta(farm, r)["batch"]["jobs"] for r in records]
    assert sorted(batches[0]) == sorted(batches[2]) == sorted([ids[0], ids[2]])
    assert batches[1] == [ids[1]]
    pipe = PipelineCache().get("tiny-sdxl", "txt2img")
    for spec, rec in zip(specs, records, strict=True):
        assert max_diff(output(farm, rec), render(pipe, spec).images[0]) <= 1


@pytest.fixture(scope="module")
def photos(inputs):
    """Training pictures for a fine-tune: one."""
    (inputs / "photos").mkdir()
    shutil.copy(inputs / "in.png", inputs / "photos" / "0.png")
    return inputs / "photos"


def test_a_finetune_or_style_job_a_model_only_the_worker_sees_cannot_run_fails_once(
    farm, inputs, photos
):
    """Unseen at submit, a fine-tune of an inpainting model or a style job on FLUX.1 is refused
    by the first worker, as the submit refuses them (never retried, nothing trained)."""
    finetune = {
        "kind": "finetune", "model": "./sdxl-inpaint-folder", "images": str(photos),
        "instance_prompt": "sks", "max_train_steps": 2, "resolution": 32,
    }  # fmt: skip
    style = {
        "kind": "style", "model": "./flux-folder", "prompt": PROMPT, "image": str(inputs / "in.png"),
        "ip_adapter_image": str(inputs / "in.png"), "ip_adapter": "tiny-sdxl-ip-adapter",
    }  # fmt: skip
    records = farm.wait([farm.submit(finetune).id, farm.submit(style).id], timeout=300)

    assert [(r.state, r.attempt) for r in records] == [(JobState.FAILED, 1)] * 2
    assert records[0].error.startswith("model: './sdxl-inpaint-folder' is an inpainting model")
    assert "not finetune" in records[0].error
    assert records[1].error.startswith("model: './flux-folder' is a FLUX.1 model and style")
    assert not records[0].outputs and not records[1].outputs


def test_a_finetune_of_a_flux_model_only_the_worker_sees_trains_there(farm, photos):
    spec = {
        "kind": "finetune", "model": "./flux-folder", "images": str(photos),
        "instance_prompt": "sks", "max_train_steps": 2, "resolution": 32,
    }  # fmt: skip
    rec = farm.submit(spec).wait(timeout=300)
    assert rec.state == JobState.SUCCEEDED and rec.progress.step == 2, rec.error
