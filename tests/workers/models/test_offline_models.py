"""Models on offline nodes: `org/name` refs from a local Hugging Face cache (HF_HUB_OFFLINE=1),
refused at submit when the cache lacks them, failed by the worker when the submitter cannot
tell; and `farm models pull | list | verify` through the real CLI (pull against a local server
that speaks the Hub's API, see tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farm import Farm, JobState, Txt2Img
from farm.inputs.hub import PULL_PATTERNS
from farm.jobs.refs import BUILTIN_SIZES
from farm.local.up import LocalFarm
from farm.settings import FarmSettings
from tests.support.cli import run_cli
from tests.support.hub_server import HubServer
from tests.support.raw import raw

COMMIT = "a1b2c3d4" * 5
STEPS = 2


def put_in_hub_cache(hub: Path, repo_id: str, folder: Path) -> Path:
    """Lay `folder` out as huggingface_hub caches a download: blobs named by content, a
    snapshot of relative symlinks to them, and `refs/main` naming the snapshot's commit."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from workers.builtin.tiny import export_tiny
    from workers.builtin.tiny_ip_adapter import export_tiny_ip_adapter

    root = tmp_path_factory.mktemp("exported")
    folders = {name: export_tiny(name, root / name) for name in ("tiny", "tiny-inpaint")}
    folders["tiny-ip-adapter"] = export_tiny_ip_adapter(root / "tiny-ip-adapter")
    return folders


@pytest.fixture(scope="module")
def hub(tmp_path_factory, exported):
    """An offline node's environment: its own HF cache holding org/tiny and org/tiny-inpaint."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    put_in_hub_cache(cache, "org/tiny", exported["tiny"])
    put_in_hub_cache(cache, "org/tiny-inpaint", exported["tiny-inpaint"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("HF_HOME", raising=False)
        yield cache


@pytest.fixture(scope="module")
def farm(hub, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline-farm")
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=(tmp / "store").as_uri(),
        home=tmp,
        key_prefix=f"offline{uuid.uuid4().hex[:8]}:",
    )
    with LocalFarm(settings, workers=1, threads=1) as lf, Farm(lf.settings) as f:
        yield f
    for log in (tmp / "logs").glob("*.log"):
        print(log.read_text()[-3000:])


def submit_txt2img(farm, model, **env):
    return run_cli(
        farm.settings, "submit", "txt2img", "--model", model, "--prompt", "a fox", "--seed", 3,
        "--steps", STEPS, "--height", 32, "--width", 32, "--wait", "--json", **env,
    )  # fmt: skip


def pixels(farm, uri):
    return np.asarray(Image.open(io.BytesIO(farm.store.get_uri(uri))))


def test_a_cached_repo_id_runs_offline_and_equals_the_builtin(farm):
    ran = {}
    for model in ("org/tiny", "tiny"):
        res = submit_txt2img(farm, model)
        assert res.returncode == 0, res.stderr
        rec = json.loads(res.stdout)
        assert rec["state"] == "succeeded", rec["error"]
        ran[model] = pixels(farm, rec["outputs"][0])
    assert np.array_equal(ran["org/tiny"], ran["tiny"])


def test_an_unknown_repo_id_is_refused_at_submit_with_nothing_stored(farm):
    keys_before = set(raw(farm).keys("*"))
    res = submit_txt2img(farm, "org/absent")
    assert res.returncode == 2
    assert (
        "model: 'org/absent'" in res.stderr and "not in the local Hugging Face cache" in res.stderr
    )
    assert "farm models pull org/absent" in res.stderr
    assert set(raw(farm).keys("*")) == keys_before


def test_a_worker_that_cannot_resolve_fails_the_job_with_the_reason(farm):
    res = submit_txt2img(farm, "org/absent", FARM_MODEL_CHECK="0")  # a submit-only box
    assert res.returncode == 1, res.stderr
    rec = json.loads(res.stdout)
    assert rec["state"] == JobState.FAILED.value and rec["attempt"] == 1
    assert "'org/absent' is not in the local Hugging Face cache" in rec["error"]
    # the queue moves on: the next job runs
    assert farm.submit(Txt2Img(model="tiny", prompt="x", num_inference_steps=1)).wait(60).state == (
        JobState.SUCCEEDED
    )


def test_models_list_shows_builtins_and_the_cache_with_sizes(hub, exported):
    res = run_cli(FarmSettings(), "models", "list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert {"tiny", "tiny-inpaint", "tiny-ip-adapter"} <= {line.split()[0] for line in lines}
    (tiny,) = [line for line in lines if line.startswith("tiny ")]
    assert "built-in" in tiny and f"{BUILTIN_SIZES['tiny'] / 1e6:.1f} MB" in tiny
    (row,) = [line for line in lines if line.startswith("org/tiny ")]
    size = sum(p.stat().st_size for p in exported["tiny"].rglob("*") if p.is_file())
    assert f"{size / 1e6:.1f} MB" in row and "1 revision(s)" in row
    assert any(line.strip().startswith(COMMIT[:12]) and "(main)" in line for line in lines)


@pytest.fixture
def in_process_cache(hub, monkeypatch):
    """`farm.cli.main` in this process, against the node's cache: huggingface_hub reads
    HF_HUB_CACHE once, at import, so its constant follows the fixture's environment here."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def farm_cli(capsys, *args) -> tuple[int, str, str]:
    """The heavy side of `farm` (what `farm models verify` hands off to, `python -m workers`)
    run in this process: torch imported once for all of a test's calls."""
    from workers.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_models_verify_reports_kinds_and_refuses_broken_models(
    in_process_cache, exported, tmp_path, capsys
):
    kinds = {
        "org/tiny": "txt2img (4-channel UNet)",
        "org/tiny-inpaint": "inpaint (9-channel UNet)",
        str(exported["tiny-ip-adapter"]): "IP-Adapter",
        "tiny-ip-adapter": "IP-Adapter",
        "tiny-inpaint": "inpaint (9-channel UNet)",
    }
    for ref, kind in kinds.items():
        code, out, err = farm_cli(capsys, "models", "verify", ref)
        assert code == 0, err
        assert out.splitlines()[0] == f"{ref}: {kind}"

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(exported["tiny"], broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("conv_in.weight")
    save_file(state, weights)
    code, _, err = farm_cli(capsys, "models", "verify", broken)
    assert code == 2 and "unet/ weights lack 1 of" in err and "conv_in.weight" in err, err

    state["conv_in.weight"] = torch.zeros(32, 4, 3, 1)  # back, at the wrong shape
    save_file(state, weights)
    code, _, err = farm_cli(capsys, "models", "verify", broken)
    assert code == 2 and "wrong shape (conv_in.weight" in err, err

    adapter = shutil.copytree(exported["tiny-ip-adapter"], tmp_path / "adapter")
    shutil.rmtree(adapter / "image_encoder")
    code, _, err = farm_cli(capsys, "models", "verify", adapter)
    assert code == 2 and "model_index.json" in err, err  # neither a pipeline nor an adapter

    code, _, err = farm_cli(capsys, "models", "verify", "org/absent")
    assert code == 2 and "not in the local Hugging Face cache" in err, err


def test_models_pull_fetches_safetensors_and_configs_only_and_twice_fetches_nothing(
    exported, tmp_path, monkeypatch, capsys
):
    served = tmp_path / "served"
    shutil.copytree(exported["tiny"], served)
    (served / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle, never fetched")
    (served / "pipeline_custom.py").write_text("import os\n")
    (served / "README.md").write_text("# a model\n")
    cache = tmp_path / "fresh-cache"
    with HubServer({"org/served": served}) as server:
        env = {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(cache)}
        res = run_cli(FarmSettings(), "models", "pull", "org/served", **env)
        assert res.returncode == 0, res.stderr
        snapshot = Path(res.stdout.strip().splitlines()[-1])
        assert snapshot == cache / "models--org--served" / "snapshots" / server.commit
        wanted = {
            name
            for name in server.files("org/served")
            if name.endswith((".safetensors", ".json", ".txt"))
        }
        got = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
        assert got == wanted and "unet/diffusion_pytorch_model.safetensors" in got
        assert sorted(server.downloads()) == sorted(wanted)

        again = run_cli(FarmSettings(), "models", "pull", "org/served", **env)
        assert again.returncode == 0, again.stderr
        assert sorted(server.downloads()) == sorted(wanted)  # nothing fetched a second time

    # Offline, a worker resolves the pulled snapshot as whole (no pickles, no code: by design).
    import huggingface_hub.constants

    from workers.models.pipelines import resolve_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model("org/served").location == str(snapshot)
    code, out, err = farm_cli(capsys, "models", "verify", "org/served")
    assert code == 0 and "txt2img (4-channel UNet)" in out, err
    assert set(PULL_PATTERNS) >= {"*.safetensors", "*.json"}
