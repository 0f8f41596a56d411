"""The submitting side refuses models it can see that a worker would refuse to load."""

from __future__ import annotations

import json
import shutil

import pytest

from farm import Farm
from farm.errors import InvalidJob
from farm.inputs.models import check_resolvable, check_visible_model, visible_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from workers.builtin.tiny import export_tiny

    return export_tiny("tiny", tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture
def copy(tiny_folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_folder, dst)
    return dst


def test_a_plain_diffusers_folder_passes(tiny_folder):
    check_visible_model(str(tiny_folder))
    assert visible_model("tiny") is None  # built in: nothing to look at


def test_shipped_code_is_refused(copy):
    (copy / "pipeline_custom.py").write_text("import os\n")
    with pytest.raises(InvalidJob, match="remote code.*pipeline_custom.py"):
        check_visible_model(str(copy))


def test_custom_pipeline_class_is_refused(copy):
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = ["my_module", "MyPipeline"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidJob, match="remote code"):
        check_visible_model(str(copy))


def test_pickle_only_weights_are_refused(copy):
    for f in (copy / "unet").glob("*.safetensors"):
        f.rename(f.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(InvalidJob, match=r"only pickle weights in unet/"):
        check_visible_model(str(copy))


def test_hub_cache_snapshot_is_checked(copy, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--name" / "snapshots" / "abc123"
    shutil.copytree(copy, snapshot)
    (snapshot / "scheduler" / "custom.py").write_text("")
    (cache / "models--org--name" / "refs").mkdir()
    (cache / "models--org--name" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert visible_model("org/name") == snapshot
    with pytest.raises(InvalidJob, match="remote code"):
        check_visible_model("org/name")
    with pytest.raises(InvalidJob, match="not in the local Hugging Face cache") as err:
        check_visible_model("org/absent")  # this machine has a cache, without it: refused
    assert err.value.field == "model"
    check_visible_model("org/absent", check=False)  # FARM_MODEL_CHECK=0: left to the worker
    with pytest.raises(InvalidJob, match="ip_adapter: 'org/no-adapter'") as err:
        check_resolvable("org/no-adapter", field="ip_adapter")
    assert err.value.field == "ip_adapter"
    check_resolvable("./org/absent")  # a path: the workers may see it, this machine need not
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache-here"))
    check_visible_model("org/absent")  # no cache on this machine: left to the worker


def test_a_model_outside_the_models_folder_is_refused_at_submit(redis_url, tmp_path):
    """FARM_MODELS_DIR confines local model refs on workers; the submitter applies the same
    rule, so such a job is refused at once (exit 2, nothing written) instead of failing on a
    worker later."""
    from farm.settings import FarmSettings
    from tests.support.cli import run_cli
    from tests.support.raw import raw

    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    (elsewhere / "sd").mkdir(parents=True)
    (elsewhere / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (models / "link").symlink_to(elsewhere / "sd")  # inside by name, outside once resolved
    settings = FarmSettings(
        redis_url=redis_url,
        storage=(tmp_path / "store").as_uri(),
        home=tmp_path,
        models_dir=models,
    )
    for ref in (str(elsewhere / "sd"), "./link"):
        res = run_cli(settings, "submit", "txt2img", "--model", ref, "--prompt", "a fox")
        assert res.returncode == 2, res.stderr
        assert "resolves outside the models folder" in res.stderr, res.stderr
    with Farm(settings) as farm:
        assert not raw(farm).keys("*")
