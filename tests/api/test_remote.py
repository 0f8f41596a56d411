"""The SDK and the CLI over HTTP: `Farm(url=..., token=...)` and `FARM_API_URL`/`FARM_API_TOKEN`
on a machine that holds no Redis URL or storage credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from farm import Batch, Farm, Inpaint, Txt2Img, submit_batch
from farm.errors import InvalidJob, JobNotFound
from farm.jobs.state import JobState
from farm.remote import RemoteFarm
from tests.api.conftest import png


def test_the_sdk_over_http_submits_waits_downloads_and_cancels(api, tmp_path):
    (tmp_path / "in.png").write_bytes(png("orange"))
    (tmp_path / "m.png").write_bytes(png("white", mode="L"))
    with Farm(url=api.url, token=api.tokens["acme"]) as farm:
        assert isinstance(farm, RemoteFarm) and not hasattr(farm, "tracker")
        job = farm.submit(
            Inpaint(
                model="tiny-inpaint",
                prompt="a cat",
                image=str(tmp_path / "in.png"),
                mask_image=str(tmp_path / "m.png"),
                seed=4,
                num_inference_steps=2,
            )
        )
        rec = job.wait(timeout=120)
        assert rec.state == JobState.SUCCEEDED and rec.mask
        names = sorted(p.name for p in job.download(tmp_path / "remote"))
        assert names == ["0.png", "mask.png", "meta.json"]
        api.farm.download(job.id, tmp_path / "local")
        for n in names:
            assert (tmp_path / "remote" / n).read_bytes() == (tmp_path / "local" / n).read_bytes()
        many = farm.submit_many(
            Txt2Img(model="tiny", prompt=str(i), num_inference_steps=40) for i in range(3)
        )
        assert many[-1].cancel() in (JobState.CANCELLED, JobState.RUNNING)
        records = farm.wait([j.id for j in many], timeout=120)
        assert records[-1].state == JobState.CANCELLED or records[-1].cancel_requested
        with pytest.raises(InvalidJob, match="width: must be a multiple of 8"):
            farm.submit({"kind": "txt2img", "model": "tiny", "prompt": "x", "width": 100})
        with pytest.raises(JobNotFound):
            farm.get("0" * 32)


def test_batches_over_http(api, tmp_path):
    for i in (1, 2):
        (tmp_path / f"img{i}.png").write_bytes(png(["red", "blue"][i - 1]))
    manifest = tmp_path / "cats.jsonl"
    rows = [
        {"defaults": {"model": "tiny-inpaint", "num_inference_steps": 2, "prompt": "p"}},
        {"image": "img1.png", "mask": "box"},
        {"image": "img2.png", "mask": "strokes"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with Farm(url=api.url, token=api.tokens["beta"]) as farm:
        result = submit_batch(farm, manifest, "remote-cats", variations=2)
        assert (result.jobs, result.new) == (4, 4)
        status = Batch(farm, "remote-cats").wait(timeout=180)
        assert status.all_succeeded and status.counts == {"succeeded": 4}
        again = submit_batch(farm, manifest, "remote-cats", variations=2)
        assert (again.new, again.present) == (0, 4)
        assert len(Batch(farm, "remote-cats").job_ids()) == 4


def test_the_cli_over_http_without_redis(api, tmp_path):
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "FARM_HOME": str(tmp_path / "home"),
        "FARM_API_URL": api.url,
        "FARM_API_TOKEN": api.tokens["acme"],
        "HF_HUB_OFFLINE": "1",
    }

    def farm_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "farm", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=os.getcwd(),
        )

    done = farm_cli(
        "submit",
        "txt2img",
        "--model",
        "tiny",
        "--prompt",
        "fox",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--wait",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["id"]
    assert farm_cli("status", job_id).stdout.startswith(f"{job_id}  txt2img  succeeded")
    fetched = farm_cli("fetch", job_id, str(tmp_path / "out"))
    assert fetched.returncode == 0 and (tmp_path / "out" / "0.png").exists()
    bad = farm_cli("submit", "txt2img", "--model", "tiny", "--prompt", "fox", "--width", "100")
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "farm: error: width: must be a multiple of 8, got 100"
    )
    env["FARM_API_TOKEN"] = "farm_000000000000_nope"
    refused = farm_cli("status", job_id)
    assert refused.returncode == 1 and "401" in refused.stderr and "Traceback" not in refused.stderr
