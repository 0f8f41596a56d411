"""LoRA adapters on renders, end to end: refs checked at submit, renders chained to fine-tunes.

Submit-side tests run against a real Redis and each store (a local folder, S3 over HTTP from
moto) with no worker. Chaining runs one real worker subprocess; the fine-tune a render waits
for is driven the way a worker drives it (real `Tracker` claim, the adapter stored at
`adapter_key`, and `workers.outcomes.end`, which releases what waits), since the training
worker is not needed to test the mechanism. The farm's pixels are compared with diffusers'
own `load_lora_weights` + `set_adapters` on the exported tiny model.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from farm import Farm, InvalidJob, JobState, Txt2Img
from farm.cli import main as farm_cli
from farm.inputs.loras import parse_lora_flag
from farm.jobs.specs import Finetune, parse_spec
from farm.keys import adapter_input_key, adapter_key
from farm.local.up import LocalFarm
from farm.queue.routing import FINETUNE_QUEUE
from farm.settings import FarmSettings, settings_env
from farm.state.reconciler import reconcile
from farm.state.tracker import Tracker, new_job_id
from farm.storage import open_store
from farm.submit import Submission
from tests.support.raw import raw

STEPS = 2


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from workers.builtin.tiny_lora import save_tiny_lora

    return save_tiny_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", seed=1)


def finetune_record(tracker: Tracker) -> str:
    """A fine-tune's record, as `Farm.submit` writes one (kind finetune, queue finetune)."""
    job_id = new_job_id()
    spec = Finetune(model="tiny", images="s3://b/train/", instance_prompt="sks", seed=0)
    created = tracker.create(
        [
            {
                "id": job_id,
                "kind": "finetune",
                "state": JobState.QUEUED.value,
                "spec": spec.model_dump(mode="json", exclude_none=True),
                "priority": 0,
                "created_at": repr(time.time()),
                "attempt": 0,
                "queue": FINETUNE_QUEUE,
            }
        ]
    )
    assert created == [True]
    return job_id


def styled(ref: str, scale: float = 0.8, seed: int = 9) -> Txt2Img:
    return Txt2Img(
        model="tiny",
        prompt="a fox",
        seed=seed,
        num_inference_steps=STEPS,
        loras=[{"ref": ref, "scale": scale}],
    )


# --------------------------------------------------------------------------- submit side


def test_parse_lora_flag():
    assert parse_lora_flag("style.safetensors") == {"ref": "style.safetensors"}
    assert parse_lora_flag("style.safetensors:0.5") == {"ref": "style.safetensors", "scale": 0.5}
    assert parse_lora_flag("s3://b/p/x.safetensors") == {"ref": "s3://b/p/x.safetensors"}
    assert parse_lora_flag("s3://b/x.safetensors:-1.5") == {
        "ref": "s3://b/x.safetensors",
        "scale": -1.5,
    }
    assert parse_lora_flag("job:ab12") == {"ref": "job:ab12"}
    assert parse_lora_flag("job:123") == {"ref": "job:123"}  # an all-digit id, not a scale
    assert parse_lora_flag("job:ab12:0.7") == {"ref": "job:ab12", "scale": 0.7}


def test_local_adapter_is_uploaded_once_content_addressed(settings, lora_file, tmp_path):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(lora_file.read_bytes())
    with Farm(settings) as farm:
        a = farm.submit(styled(str(lora_file), 0.5)).status()
        b = farm.submit(styled(str(copy), 0.5, seed=10)).status()
        key = adapter_input_key(hashlib.sha256(lora_file.read_bytes()).hexdigest())
        assert a.spec["loras"] == [{"ref": farm.store.uri(key), "scale": 0.5}]
        assert b.spec["loras"] == a.spec["loras"]
        assert a.signature == b.signature  # same adapter bytes, same scale: one batch
        assert farm.store.get(key) == lora_file.read_bytes()
        assert [k for k in farm.store.list("inputs/")] == [key]
        assert a.state == JobState.QUEUED and a.depends_on == []


def test_bad_adapter_refs_fail_at_submit_with_nothing_stored(settings, lora_file, tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not a safetensors file at all")
    foreign = (
        "file:///elsewhere/x.safetensors"
        if settings.storage.startswith("file://")
        else "s3://someone-elses-bucket/x.safetensors"
    )
    with Farm(settings) as farm:
        tracker = farm.tracker
        render = farm.submit(Txt2Img(model="tiny", prompt="x", num_inference_steps=1)).id
        failed = finetune_record(tracker)
        t = tracker.claim(failed, "trainer", 30)
        tracker.finish(failed, t.token, JobState.FAILED, error="loss went NaN at step 3")
        empty = finetune_record(tracker)
        t = tracker.claim(empty, "trainer", 30)
        tracker.finish(empty, t.token, JobState.SUCCEEDED)
        cases = {
            str(tmp_path / "missing.safetensors"): "no such file",
            str(fake): "is not a safetensors file",
            str(tmp_path / "weights.bin"): "pickle weights",
            farm.store.uri("inputs/nothing.safetensors"): "no such object",
            foreign: "outside this farm's storage",
            "job:doesnotexist": "job:doesnotexist: no such job",
            f"job:{render}": f"job:{render} is a txt2img job, not a fine-tune",
            f"job:{failed}": f"fine-tune job:{failed} failed: loss went NaN at step 3",
            f"job:{empty}": "succeeded but no adapter is stored",
        }
        jobs_before = set(raw(tracker).keys(tracker.keys.job("*")))
        stored_before = farm.store.list("")
        for ref, why in cases.items():
            # The good local adapter first: its upload must not happen either.
            spec = {"kind": "txt2img", "model": "tiny", "prompt": "x"}
            spec["loras"] = [str(lora_file), {"ref": ref}]
            with pytest.raises(InvalidJob, match=why) as err:
                farm.submit(spec)
            assert err.value.field.startswith("loras"), ref
        assert set(raw(tracker).keys(tracker.keys.job("*"))) == jobs_before
        assert farm.store.list("") == stored_before
        assert not raw(tracker).keys(tracker.keys.dependents("*"))


def test_cli_lora_flags(settings, lora_file, monkeypatch, capsys):
    with Farm(settings) as farm:
        parent = finetune_record(farm.tracker)
        for name, value in settings_env(settings).items():
            if name.startswith("FARM_"):
                monkeypatch.setenv(name, value)
        code = farm_cli.main(
            [
                "submit",
                "txt2img",
                "--model",
                "tiny",
                "--prompt",
                "a fox",
                "--lora",
                f"{lora_file}:0.5",
                "--lora",
                f"job:{parent}",
            ]
        )
        assert code == 0
        rec = farm.get(capsys.readouterr().out.strip())
        key = adapter_input_key(hashlib.sha256(lora_file.read_bytes()).hexdigest())
        assert rec.spec["loras"] == [
            {"ref": farm.store.uri(key), "scale": 0.5},
            {"ref": f"job:{parent}", "scale": 1.0},
        ]
        assert rec.state == JobState.WAITING and rec.depends_on == [parent]
        assert farm_cli.main(["status", rec.id]) == 0
        assert f"waiting  for job:{parent}" in capsys.readouterr().out
        bad = farm_cli.main(
            ["submit", "txt2img", "--model", "tiny", "--prompt", "x"] + ["--lora", "job:nope"]
        )
        assert bad == farm_cli.EXIT_INVALID
        assert "loras: job:nope: no such job" in capsys.readouterr().err


# --------------------------------------------------------------------------- chaining


@pytest.fixture(scope="module")
def farm_settings(redis_server, tmp_path_factory):
    """A running farm with one warm worker; its reconciler kept out of the way, so the tests
    see what the release hooks do (and run the reconciler's pass themselves)."""
    tmp = tmp_path_factory.mktemp("farm-loras")
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=(tmp / "store").as_uri(),
        home=tmp,
        key_prefix=f"lora{uuid.uuid4().hex[:8]}:",
        reconcile_interval=3600,
    )
    with LocalFarm(settings, workers=1, threads=1, preload=["tiny"]) as lf:
        yield lf.settings
    for log in (tmp / "logs").glob("*.log"):
        print(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def farm(farm_settings):
    with Farm(farm_settings) as f:
        yield f


@pytest.fixture(scope="module")
def trainer(farm_settings):
    """What a fine-tune's worker holds: a real `Runtime` on this farm, to end jobs through."""
    from workers.runtime import Runtime

    rt = Runtime(farm_settings, "cpu", threads=1, name="trainer")
    yield rt
    rt.cancels.stop()


def run_parent(trainer, parent: str, adapter: bytes | None, state=JobState.SUCCEEDED, **fields):
    """Claim the fine-tune, store its adapter, and end it as its worker would."""
    from workers.outcomes import end
    from workers.runtime import Held

    t = trainer.tracker.claim(parent, trainer.name, 30)
    assert t.ok
    if adapter is not None:
        trainer.store.put(adapter_key(parent), adapter)
    return end(trainer, Held(trainer.tracker.get(parent), t.token, t.attempt), state, **fields)


def diffusers_with_lora(folder, lora_file, spec: Txt2Img) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_file.parent, weight_name=lora_file.name, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[spec.loras[0].scale])
    image = pipe(
        prompt=spec.prompt,
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(spec.seed)],
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_chained_render_waits_for_its_finetune_then_runs_with_its_adapter(
    farm, trainer, lora_file, tmp_path
):
    parent = finetune_record(farm.tracker)
    spec = styled(f"job:{parent}", 0.8)
    job = farm.submit(spec)
    rec = job.status()
    assert rec.state == JobState.WAITING and rec.depends_on == [parent]
    # Not claimable: not in its batch signature's index, no message, and a claim is refused.
    assert farm.tracker.queued_with(rec.signature) == []
    assert farm.tracker.claim(job.id, "thief", 30).status == "illegal"
    assert raw(farm).smembers(farm.tracker.keys.dependents(parent)) == {job.id}
    time.sleep(1.0)  # the worker is idle and listening: it is given nothing
    assert job.status().state == JobState.WAITING

    assert run_parent(trainer, parent, lora_file.read_bytes()) == "succeeded"
    assert farm.get(job.id).state in (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED)
    rec = job.wait(timeout=120)
    assert rec.state == JobState.SUCCEEDED
    job.download(tmp_path)
    got = np.asarray(Image.open(tmp_path / "0.png").convert("RGB"), dtype=np.int16)

    from workers.builtin.tiny import export_tiny

    want = diffusers_with_lora(export_tiny("tiny", tmp_path / "tiny"), lora_file, spec)
    assert np.abs(got - want).max() <= 1
    # A render naming the finished fine-tune now is queued at once.
    later = farm.submit(styled(f"job:{parent}", 0.8, seed=10)).status()
    assert later.state != JobState.WAITING and later.depends_on == []  # queued, or taken
    assert farm.wait([later.id], timeout=120)[0].state == JobState.SUCCEEDED


def test_a_failed_or_cancelled_finetune_fails_what_waits_for_it(farm, trainer):
    parent = finetune_record(farm.tracker)
    job = farm.submit(styled(f"job:{parent}"))
    run_parent(trainer, parent, None, JobState.FAILED, error="loss went NaN at step 3")
    rec = job.status()
    assert rec.state == JobState.FAILED
    assert rec.error == f"lora job:{parent} failed: loss went NaN at step 3"

    parent = finetune_record(farm.tracker)
    job = farm.submit(styled(f"job:{parent}"))
    assert farm.cancel(parent) == JobState.CANCELLED
    rec = job.status()
    assert rec.state == JobState.FAILED and rec.error == f"lora job:{parent} was cancelled"


def test_a_render_registered_as_its_finetune_ends_is_released(farm, trainer, lora_file):
    """The submitter reads the fine-tune running, the fine-tune ends (finding nothing to
    release), then the render is written: the submitter's own re-check queues it."""
    parent = finetune_record(farm.tracker)
    sub = Submission(farm)
    records = [sub.prepare(parse_spec(styled(f"job:{parent}", seed=11)))]
    assert records[0]["state"] == JobState.WAITING
    run_parent(trainer, parent, lora_file.read_bytes())
    sub.store_inputs()
    sub.write(records)
    assert farm.get(records[0]["id"]).state != JobState.WAITING
    assert farm.wait([records[0]["id"]], timeout=120)[0].state == JobState.SUCCEEDED


def test_the_reconciler_releases_what_a_crashed_worker_left_waiting(farm, trainer, lora_file):
    parent = finetune_record(farm.tracker)
    job = farm.submit(styled(f"job:{parent}", seed=12))
    # The fine-tune's worker stores the adapter and marks it done, then dies before the hook.
    t = trainer.tracker.claim(parent, trainer.name, 30)
    trainer.store.put(adapter_key(parent), lora_file.read_bytes())
    trainer.tracker.finish(parent, t.token, JobState.SUCCEEDED)
    time.sleep(0.5)
    assert job.status().state == JobState.WAITING
    report = reconcile(farm.tracker, farm.celery, requeue_after=600)
    assert report.released == [job.id] and report.failed == []
    assert job.wait(timeout=120).state == JobState.SUCCEEDED
    assert reconcile(farm.tracker, farm.celery, requeue_after=600).released == []

    # A fine-tune whose record expired while a render waited: the render fails.
    parent = finetune_record(farm.tracker)
    job = farm.submit(styled(f"job:{parent}", seed=13))
    raw(farm).delete(farm.tracker.keys.job(parent))
    report = reconcile(farm.tracker, farm.celery, requeue_after=600)
    assert report.failed == [job.id]
    assert job.status().error == f"lora job:{parent} is gone (its record expired)"


def test_a_waiting_render_can_be_cancelled(farm, trainer, lora_file, farm_settings):
    parent = finetune_record(farm.tracker)
    job = farm.submit(styled(f"job:{parent}", seed=14))
    assert farm.cancel(job.id) == JobState.CANCELLED
    run_parent(trainer, parent, lora_file.read_bytes())
    time.sleep(0.5)
    assert job.status().state == JobState.CANCELLED
    assert open_store(farm_settings).list(f"jobs/{job.id}/") == []


def test_manifest_rows_take_loras_too(farm, trainer, lora_file, tmp_path):
    """A batch row's local adapter is uploaded with the chunk's inputs, and a row naming an
    unfinished fine-tune waits for it like any render."""
    import json

    from farm.batches.batch import Batch
    from farm.batches.submit import submit_batch

    parent = finetune_record(farm.tracker)
    manifest = tmp_path / "rows" / "rows.jsonl"
    manifest.parent.mkdir()
    (manifest.parent / "fox.safetensors").write_bytes(lora_file.read_bytes())
    rows = [
        {"defaults": {"kind": "txt2img", "model": "tiny", "num_inference_steps": STEPS}},
        # A relative adapter path is read next to the manifest, as images are.
        {"prompt": "a fox", "loras": [{"ref": "fox.safetensors", "scale": 0.5}]},
        {"prompt": "a cat", "loras": [f"job:{parent}"]},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = submit_batch(farm, manifest, "styled", seed=0)
    assert result.new == 2
    batch = Batch(farm, "styled")
    slots = batch.slots()
    first, second = (farm.get(s.job) for s in slots)
    key = adapter_input_key(hashlib.sha256(lora_file.read_bytes()).hexdigest())
    assert first.spec["loras"] == [{"ref": farm.store.uri(key), "scale": 0.5}]
    assert farm.store.exists(key)
    assert second.state == JobState.WAITING and second.depends_on == [parent]
    assert batch.status().counts.get("waiting") == 1
    run_parent(trainer, parent, lora_file.read_bytes())
    records = farm.wait([first.id, second.id], timeout=120)
    assert [r.state for r in records] == [JobState.SUCCEEDED, JobState.SUCCEEDED]


def test_a_render_whose_adapter_cannot_be_read_fails_alone(farm, trainer, lora_file):
    """A fine-tune that stored a broken adapter: the render naming it fails with a clear
    reason, and the worker's next job (same pipeline) is unaffected."""
    parent = finetune_record(farm.tracker)
    run_parent(trainer, parent, lora_file.read_bytes()[:1000])  # truncated
    doomed = farm.submit(styled(f"job:{parent}", seed=15))
    plain = farm.submit(Txt2Img(model="tiny", prompt="a fox", seed=15, num_inference_steps=STEPS))
    failed, fine = farm.wait([doomed.id, plain.id], timeout=120)
    assert failed.state == JobState.FAILED
    assert failed.error.startswith(f"loras: lora job:{parent}: not a readable safetensors file")
    assert fine.state == JobState.SUCCEEDED
