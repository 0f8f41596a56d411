"""Fine-tunes on the farm: SDK and CLI → Redis/Celery (the `finetune` queue) → a real worker
subprocess that trains → the adapter, loss log and curve in storage.

One warm worker for the module, on S3 over HTTP (a moto server), serves renders and fine-tunes
(what `farm up` does), with short leases so a killed worker's job comes back within seconds.
(The local store runs the same `ObjectStore` calls: tests/test_training_data.py covers both
stores at submit, tests/workers/test_finetune.py checkpoints to a local one. A second worker
process per store would double this module's time.) The adapter is checked with diffusers itself: loaded by
`load_lora_weights` into a plain `StableDiffusionPipeline` of the exported tiny model.
"""

from __future__ import annotations

import io
import json
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from farm import Farm, JobCancelled, JobFailed, JobState, Txt2Img
from farm.errors import InvalidJob
from farm.jobs.specs import Finetune
from farm.keys import ADAPTER_FILE, adapter_file_key, checkpoints_prefix
from farm.local.up import LocalFarm
from farm.queue.routing import FINETUNE_QUEUE
from farm.settings import FarmSettings
from farm.storage import open_store
from farm.storage.s3 import S3Store
from tests.support.cli import run_cli
from tests.support.raw import raw

TRAIN = {"resolution": 32, "rank": 8, "learning_rate": 3e-2, "train_batch_size": 2, "seed": 1}
"""Fast and reliable on the tiny model: 32 px, a learning rate that moves the loss in tens of
steps."""


@pytest.fixture(scope="module", params=["s3"])
def local_farm(request, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"finetune-{request.param}")
    common = {
        "redis_url": redis_server.url,
        "home": tmp,
        "key_prefix": f"ft{uuid.uuid4().hex[:8]}:",
        "lease_seconds": 2.0,
        "reconcile_interval": 0.5,
    }
    if request.param == "local":
        settings = FarmSettings(storage=(tmp / "store").as_uri(), **common)
    else:
        s3 = request.getfixturevalue("s3_server")
        bucket = f"ft-{uuid.uuid4().hex[:12]}"
        S3Store(bucket, endpoint_url=s3.endpoint_url, region="us-east-1").ensure_bucket()
        settings = FarmSettings(
            storage=f"s3://{bucket}/farm",
            s3_endpoint_url=s3.endpoint_url,
            s3_region="us-east-1",
            **common,
        )
    with LocalFarm(settings, workers=1, threads=1, preload=["tiny"]) as lf:
        yield lf
    for log in (tmp / "logs").glob("*.log"):
        print(log.read_text()[-4000:])


@pytest.fixture(scope="module")
def farm_settings(local_farm):
    return local_farm.settings


@pytest.fixture(scope="module")
def farm(farm_settings):
    with Farm(farm_settings) as f:
        yield f


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four 48 px pictures of a disc; two with sidecar captions."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(4):
        image = Image.new("RGB", (48, 48), (40 * i, 200 - 30 * i, 100))
        ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(250, 20 * i, 40))
        image.save(root / f"disc{i}.png")
    (root / "disc0.txt").write_text("a red disc on green")
    (root / "disc1.txt").write_text("a red disc on teal")
    return root


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    from workers.builtin.tiny import export_tiny

    return export_tiny("tiny", tmp_path_factory.mktemp("models") / "tiny")


def render_direct(folder: Path, adapter: Path | None = None) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(adapter.parent, weight_name=adapter.name)
    out = pipe(
        prompt="sks disc",
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    )
    return out.images[0]


def wait_step(farm, job_id, at_least, timeout=120):
    deadline = time.monotonic() + timeout
    while (rec := farm.get(job_id)).progress.step < at_least or rec.state != JobState.RUNNING:
        assert not rec.done and time.monotonic() < deadline, rec
        time.sleep(0.05)
    return rec


def done_by_workers(farm) -> int:
    return sum(w.jobs_done for w in farm.tracker.workers.read())


def test_finetune_from_a_folder_stores_an_adapter_diffusers_loads(farm, photos, exported, tmp_path):
    done_before = done_by_workers(farm)
    job = farm.submit(
        Finetune(
            model="tiny",
            images=str(photos),
            instance_prompt="sks disc",
            max_train_steps=40,
            **TRAIN,
        )
    )
    rec = job.wait(timeout=300)
    assert rec.queue == FINETUNE_QUEUE and rec.kind == "finetune"
    deadline = time.monotonic() + 10  # the worker counts it in its registry entry
    while done_by_workers(farm) != done_before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done_by_workers(farm) == done_before + 1
    assert rec.progress.step == rec.progress.total == 40 and rec.progress.loss is not None
    # The stored spec is explicit: content-addressed image URIs and one caption per image.
    assert all("/inputs/" in uri for uri in rec.spec["images"])
    assert rec.spec["captions"] == ["a red disc on green", "a red disc on teal"] + ["sks disc"] * 2
    files = {p.name: p for p in job.download(tmp_path)}
    assert set(files) == {ADAPTER_FILE, "loss.json", "loss.png", "meta.json"}
    assert job.adapter() == rec.outputs[0] and rec.outputs[0].endswith(ADAPTER_FILE)
    log = json.loads(files["loss.json"].read_text())
    losses = log["loss"]
    assert len(losses) == 40 and np.mean(losses[-8:]) < np.mean(losses[:8]) * 0.97
    assert Image.open(files["loss.png"]).size == (640, 360)
    meta = json.loads(files["meta.json"].read_text())
    assert meta["resumed_from"] is None and meta["steps"] == 40 and meta["worker"] == rec.worker
    assert "float32" in meta["precision"]
    # diffusers itself loads the adapter, and it changes what the model renders.
    without = render_direct(exported)
    with_adapter = render_direct(exported, files[ADAPTER_FILE])
    assert np.abs(with_adapter - without).max() > 0.02


def test_render_after_a_finetune_on_the_same_worker_is_unchanged(farm, photos):
    spec = Txt2Img(model="tiny", prompt="a disc", seed=5, num_inference_steps=3)
    before = farm.submit(spec).wait(timeout=120)
    tuned = farm.submit(
        {
            "kind": "finetune",
            "model": "tiny",
            "images": str(photos),
            "instance_prompt": "x",
            "max_train_steps": 5,
            **TRAIN,
        }
    ).wait(timeout=300)
    after = farm.submit(spec).wait(timeout=120)
    assert before.worker == tuned.worker == after.worker
    assert farm.store.get_uri(before.outputs[0]) == farm.store.get_uri(after.outputs[0])


def test_sigkilled_training_worker_resumes_from_its_last_checkpoint(farm, local_farm, photos):
    total, every = 40, 10
    job = farm.submit(
        Finetune(
            model="tiny",
            images=str(photos),
            instance_prompt="sks disc",
            max_train_steps=total,
            checkpointing_steps=every,
            checkpoints_total_limit=2,
            **TRAIN,
        )
    )
    rec = wait_step(farm, job.id, every + 5)
    assert rec.progress.loss is not None
    local_farm.procs[0].kill()  # SIGKILL: no chance to write anything more
    killed_at = farm.get(job.id).progress.step
    done = job.wait(timeout=300)
    assert done.state == JobState.SUCCEEDED and done.attempt == 2
    assert done.progress.step == total
    meta = json.loads(farm.store.get(adapter_file_key(job.id, "meta.json")))
    resumed = meta["resumed_from"]
    assert resumed is not None and resumed % every == 0 and every <= resumed <= killed_at
    assert [s["from_step"] for s in meta["segments"]] == [0, resumed]
    assert [s["attempt"] for s in meta["segments"]] == [1, 2]
    log = json.loads(farm.store.get(adapter_file_key(job.id, "loss.json")))
    assert len(log["loss"]) == total
    stored = farm.store.list(checkpoints_prefix(job.id))
    complete = sorted(int(key.split("/")[-2]) for key in stored if key.endswith("/complete.json"))
    assert len(complete) == 2 and complete[-1] >= total - every  # the newest two are kept
    assert len(stored) == 2 * 5  # the older ones are gone, every file of them


def test_sigterm_checkpoints_hands_back_and_the_next_attempt_resumes_there(
    farm, local_farm, photos
):
    """A shutdown stops training at the next step and writes a checkpoint there, whatever
    `checkpointing_steps` says; the job goes back to the queue and loses no step."""
    job = farm.submit(
        Finetune(
            model="tiny",
            images=str(photos),
            instance_prompt="sks disc",
            max_train_steps=40,
            checkpointing_steps=1000,
            **TRAIN,
        )
    )
    wait_step(farm, job.id, 5)
    local_farm.procs[0].send_signal(signal.SIGTERM)
    done = job.wait(timeout=300)
    assert done.state == JobState.SUCCEEDED and done.attempt == 2 and done.progress.step == 40
    meta = json.loads(farm.store.get(adapter_file_key(job.id, "meta.json")))
    assert 5 <= meta["resumed_from"] < 40
    stored = farm.store.list(checkpoints_prefix(job.id))
    assert [k.rsplit("/", 2)[1] for k in stored if k.endswith("complete.json")] == [
        f"{meta['resumed_from']:08d}"
    ]


def test_cancel_a_running_finetune(farm, photos):
    job = farm.submit(
        Finetune(
            model="tiny", images=str(photos), instance_prompt="x", max_train_steps=5000, **TRAIN
        )
    )
    wait_step(farm, job.id, 3)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.wait(timeout=60)
    assert farm.get(job.id).progress.step < 5000


def test_progress_has_its_total_from_the_start_and_a_cancel_stops_the_step_it_is_in(farm, photos):
    """At 256 px a step of the tiny model takes seconds on a CPU (at 512 px, minutes). The
    record knows the total before the first step ends (`farm wait` showed `step 0/?`), and a
    cancel does not wait for the step to end: the job ends cancelled still at step 0."""
    job = farm.submit(
        Finetune(
            model="tiny",
            images=str(photos),
            instance_prompt="x",
            max_train_steps=3,
            **{**TRAIN, "resolution": 256},
        )
    )
    deadline = time.monotonic() + 120
    while (rec := farm.get(job.id)).state != JobState.RUNNING or not rec.progress.total:
        assert not rec.done and time.monotonic() < deadline, rec
        time.sleep(0.02)
    assert (rec.progress.step, rec.progress.total) == (0, 3)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.wait(timeout=60)
    rec = farm.get(job.id)
    assert rec.progress.step == 0 and rec.error == "cancelled while training"


def test_a_render_chained_to_an_unfinished_finetune_waits_then_uses_its_adapter(
    farm, photos, exported, tmp_path
):
    tune = farm.submit(
        Finetune(
            model="tiny",
            images=str(photos),
            instance_prompt="sks disc",
            max_train_steps=30,
            **TRAIN,
        )
    )
    render = farm.submit(
        Txt2Img(
            model="tiny",
            prompt="sks disc",
            seed=0,
            num_inference_steps=3,
            loras=[{"ref": f"job:{tune.id}", "scale": 1.0}],
        )
    )
    held = farm.get(render.id)
    assert held.state == JobState.WAITING and held.depends_on == [tune.id]
    rec = render.wait(timeout=300)
    tuned = farm.get(tune.id)
    assert tuned.state == JobState.SUCCEEDED and rec.started_at >= tuned.finished_at
    # The farm's render with the adapter the fine-tune stored equals diffusers' own
    # `load_lora_weights` of that file, with the same seed.
    adapter = tmp_path / ADAPTER_FILE
    adapter.write_bytes(farm.store.get_uri(tune.adapter()))
    direct = np.round(render_direct(exported, adapter) * 255)
    ours = np.asarray(Image.open(io.BytesIO(farm.store.get_uri(rec.outputs[0]))), dtype=float)
    assert np.abs(ours - direct).max() <= 1
    assert np.abs(ours - np.round(render_direct(exported) * 255)).max() > 2  # the adapter acted


def test_a_render_chained_to_a_finetune_that_is_cancelled_fails_with_the_reason(farm, photos):
    tune = farm.submit(
        Finetune(
            model="tiny", images=str(photos), instance_prompt="x", max_train_steps=5000, **TRAIN
        )
    )
    render = farm.submit(
        Txt2Img(model="tiny", prompt="x", num_inference_steps=3, loras=[f"job:{tune.id}"])
    )
    assert farm.get(render.id).state == JobState.WAITING
    tune.cancel()
    with pytest.raises(JobFailed, match=f"job:{tune.id}"):
        render.wait(timeout=60)
    assert farm.get(render.id).started_at is None  # it never ran


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"images": "EMPTY", "instance_prompt": "x"}, "images"),
        ({"images": "PHOTOS"}, "captions"),
        ({"images": "PHOTOS", "captions": ["one"]}, "captions"),
        ({"images": "STORE:nothing-there/", "instance_prompt": "x"}, "images"),
        ({"images": [], "instance_prompt": "x"}, "images"),
        ({"images": "PHOTOS", "instance_prompt": "x", "resolution": 30}, "resolution"),
        ({"images": "PHOTOS", "instance_prompt": "x", "model": "tiny-inpaint"}, "model"),
    ],
    ids=[
        "empty-folder",
        "no-captions",
        "captions-count",
        "bad-prefix",
        "no-images",
        "res",
        "inpaint",
    ],
)
def test_invalid_finetune_fails_at_submit_with_nothing_stored(farm, photos, tmp_path, spec, field):
    (tmp_path / "empty").mkdir()
    images = spec["images"]
    if images == "EMPTY":
        images = str(tmp_path / "empty")
    elif images == "PHOTOS":
        images = str(photos)
    elif isinstance(images, str) and images.startswith("STORE:"):
        images = farm.store.uri(images.removeprefix("STORE:").rstrip("/")) + "/"
    # Job records, not the live index: the worker's reconciler prunes ended jobs from that.
    records = farm.tracker.keys.job("*")
    jobs_before = set(raw(farm).keys(records))
    inputs_before = farm.store.list("inputs/")
    with pytest.raises(InvalidJob) as e:
        farm.submit({"kind": "finetune", "model": "tiny", **spec, "images": images})
    assert e.value.field == field
    assert set(raw(farm).keys(records)) == jobs_before
    assert farm.store.list("inputs/") == inputs_before


def test_cli_submit_finetune_wait_json(farm_settings, photos):
    flags = ["--resolution", 32, "--rank", 4, "--learning-rate", 1e-2, "--seed", 3]
    proc = run_cli(
        farm_settings,
        "submit",
        "finetune",
        "--model",
        "tiny",
        "--images",
        photos,
        "--prompt",
        "sks disc",
        "--steps",
        6,
        *flags,
        "--checkpointing-steps",
        4,
        "--wait",
        "--json",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["state"] == "succeeded" and rec["progress"]["step"] == 6
    assert rec["spec"]["instance_prompt"] == "sks disc" and rec["spec"]["max_train_steps"] == 6
    assert rec["spec"]["checkpointing_steps"] == 4 and rec["outputs"][0].endswith(ADAPTER_FILE)
    status = run_cli(farm_settings, "status", rec["id"])
    assert "succeeded" in status.stdout and "loss" in status.stdout
    waited = run_cli(farm_settings, "wait", rec["id"])  # a fine-tune's own progress line
    assert waited.returncode == 0 and f"{rec['id']}  finetune  succeeded" in waited.stdout


def test_cli_refuses_flags_of_the_other_kind(farm_settings, photos):
    bad = run_cli(
        farm_settings,
        "submit",
        "finetune",
        "--model",
        "tiny",
        "--images",
        photos,
        "--prompt",
        "x",
        "--width",
        64,
    )
    assert bad.returncode == 2 and "--width: not a fine-tune flag" in bad.stderr
    bad = run_cli(
        farm_settings, "submit", "txt2img", "--model", "tiny", "--prompt", "x", "--rank", 4
    )
    assert bad.returncode == 2 and "--rank: only for `farm submit finetune`" in bad.stderr
    missing = run_cli(farm_settings, "submit", "finetune", "--model", "tiny", "--images", photos)
    assert missing.returncode == 2 and "captions:" in missing.stderr


def test_finetunes_go_to_their_own_queue(redis_server, tmp_path, photos):
    """Without any worker: the message lands on `finetune`, never on the render queue."""
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=(tmp_path / "store").as_uri(),
        home=tmp_path,
        key_prefix=f"q{uuid.uuid4().hex[:8]}:",
    )
    with Farm(settings) as farm:
        job = farm.submit(Finetune(model="tiny", images=str(photos), instance_prompt="x"))
        assert farm.get(job.id).queue == FINETUNE_QUEUE
        queues = raw(farm).keys(f"{settings.key_prefix}celery:*")
        assert any(k.startswith(f"{settings.key_prefix}celery:finetune") for k in queues)
        assert not any(k.startswith(f"{settings.key_prefix}celery:render") for k in queues)
    assert open_store(settings).list("inputs/")  # its images were stored, content-addressed


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux", "tiny-sd3"])
def test_cli_finetune_of_another_family_stores_an_adapter_its_pipeline_loads(
    farm, farm_settings, photos, model, tmp_path
):
    """An SDXL fine-tune was accepted, then failed at step 1 (no `added_cond_kwargs`, one text
    encoder); FLUX.1 and SD3 were refused. Now the real `farm` command trains each, as
    diffusers' DreamBooth LoRA script for it does, and its adapter loads with `load_lora_weights` on a
    plain pipeline of that family, and changes what it renders."""
    from diffusers import DiffusionPipeline

    from tests.workers.train.test_train_families import render
    from workers.builtin.families import export_family_tiny

    proc = run_cli(
        farm_settings, "submit", "finetune", "--model", model, "--images", photos,
        "--prompt", "sks disc", "--steps", 6, "--resolution", 32, "--rank", 4,
        "--learning-rate", 1e-2, "--seed", 3, "--checkpointing-steps", 4, "--train-text-encoder",
        "--wait", "--json", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["state"] == "succeeded" and rec["progress"]["step"] == 6, rec.get("error")
    (tmp_path / ADAPTER_FILE).write_bytes(farm.store.get_uri(rec["outputs"][0]))

    pipe = DiffusionPipeline.from_pretrained(
        export_family_tiny(model, tmp_path / model), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    without = render(pipe)
    pipe.load_lora_weights(tmp_path, weight_name=ADAPTER_FILE)
    assert np.abs(render(pipe) - without).max() > 0.01
    meta = json.loads(farm.store.get(adapter_file_key(rec["id"], "meta.json")))
    assert "float32" in meta["precision"]
