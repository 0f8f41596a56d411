"""Model refs resolve locally and safely; the cache loads each model once and shares weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from farm.errors import InvalidJob
from farm.jobs.specs import Inpaint, Txt2Img
from workers.builtin.tiny import export_single_file, export_tiny
from workers.models.pipelines import ModelSource, PipelineCache, resolve_model
from workers.render.render import render

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hf_cache(hub: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)):
    """Lay `folder` out as the Hugging Face cache holds a downloaded snapshot."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(COMMIT)


# --------------------------------------------------------------------------- resolve_model


def test_builtin_names_resolve_without_files():
    assert resolve_model("tiny") == ModelSource("builtin", "tiny")
    assert resolve_model(" tiny-inpaint ") == ModelSource("builtin", "tiny-inpaint")


def test_relative_paths_resolve_under_models_dir(tmp_path, tiny_folders):
    shutil.copytree(tiny_folders["tiny"], tmp_path / "models" / "sd" / "mine")

    source = resolve_model("sd/mine", models_dir=tmp_path / "models")

    assert source == ModelSource("folder", str((tmp_path / "models" / "sd" / "mine").resolve()))


@pytest.mark.parametrize("ref", ["../escape", "sub/../../escape", "./../escape"])
def test_paths_may_not_leave_models_dir(tmp_path, tiny_folders, ref):
    shutil.copytree(tiny_folders["tiny"], tmp_path / "escape")
    (tmp_path / "models" / "sub").mkdir(parents=True)

    with pytest.raises(InvalidJob, match="outside the models folder|escapes its folder") as e:
        resolve_model(ref, models_dir=tmp_path / "models")
    assert ref in str(e.value) and e.value.field == "model"


def test_absolute_paths_outside_models_dir_are_refused_too(tmp_path, tiny_folders):
    (tmp_path / "models").mkdir()
    with pytest.raises(InvalidJob, match="outside the models folder"):
        resolve_model(str(tiny_folders["tiny"]), models_dir=tmp_path / "models")
    assert resolve_model(str(tiny_folders["tiny"])).kind == "folder"  # no models_dir: allowed


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin", "model.pt", "weights.pth"])
def test_pickle_weights_are_refused_before_any_file_is_read(tmp_path, name):
    (tmp_path / name).write_bytes(b"not even read")

    with pytest.raises(InvalidJob, match="pickle") as e:
        resolve_model(name, models_dir=tmp_path)
    assert name in str(e.value)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nobody/nothing", "not in the local Hugging Face cache"),
        ("nobody/nothing@v2", "at revision 'v2'"),
        ("./missing-folder", "no such file or folder"),
        ("missing.safetensors", "no such file or folder"),
        ("not-a-model", "not a built-in model"),
    ],
)
def test_unresolvable_refs_are_invalid_jobs_naming_the_ref(tmp_path, ref, message):
    with pytest.raises(InvalidJob, match=message) as e:
        resolve_model(ref, models_dir=tmp_path)
    assert repr(ref) in str(e.value)


def test_a_folder_must_be_a_diffusers_pipeline(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(InvalidJob, match="model_index.json"):
        resolve_model("./weights", models_dir=tmp_path)


def test_repo_ids_come_from_the_local_hf_cache_only(empty_hf_cache, tiny_folders):
    put_in_hf_cache(empty_hf_cache, "acme/tiny-sd", tiny_folders["tiny"], refs=("main", "v1"))
    snapshot = empty_hf_cache / "models--acme--tiny-sd" / "snapshots" / COMMIT

    for ref in ("acme/tiny-sd", "acme/tiny-sd@v1", f"acme/tiny-sd@{COMMIT}"):
        assert resolve_model(ref) == ModelSource("hub", str(snapshot), revision=COMMIT)
    with pytest.raises(InvalidJob, match="at revision 'v9'"):
        resolve_model("acme/tiny-sd@v9")


def test_a_local_folder_wins_over_a_repo_id_of_the_same_name(tmp_path, tiny_folders):
    shutil.copytree(tiny_folders["tiny"], tmp_path / "acme" / "tiny-sd")

    assert resolve_model("acme/tiny-sd", models_dir=tmp_path).kind == "folder"


def test_a_single_file_takes_its_config_from_the_folder_beside_it(tmp_path):
    path = export_single_file("tiny", tmp_path / "mine.safetensors")
    export_tiny("tiny", tmp_path / "mine.config")

    source = resolve_model("mine.safetensors", models_dir=tmp_path)

    assert source == ModelSource(
        "single_file", str(path.resolve()), config=str((tmp_path / "mine.config").resolve())
    )


def test_a_single_file_without_a_config_names_where_one_is_looked_for(tmp_path):
    export_single_file("tiny", tmp_path / "mine.safetensors")

    with pytest.raises(InvalidJob, match=r"mine\.config") as e:
        resolve_model("mine.safetensors", models_dir=tmp_path)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in str(e.value)  # its default config


def test_a_single_file_uses_the_default_config_when_the_hf_cache_has_it(
    tmp_path, empty_hf_cache, tiny_folders
):
    export_single_file("tiny", tmp_path / "mine.safetensors")
    put_in_hf_cache(
        empty_hf_cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_folders["tiny"]
    )

    source = resolve_model("mine.safetensors", models_dir=tmp_path)

    assert Path(source.config).name == COMMIT


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(InvalidJob, match=r"\.safetensors"):
        resolve_model("./model.onnx", models_dir=tmp_path)


# --------------------------------------------------------------------------- PipelineCache


def test_one_load_serves_every_kind_with_one_set_of_weights(cache):
    txt2img = cache.get("tiny", "txt2img")
    img2img = cache.get("tiny", "img2img")
    inpaint = cache.get("tiny", "inpaint")

    assert cache.loads == 1 and set(cache.load_seconds) == {"tiny"}
    assert type(txt2img).__name__ == "StableDiffusionPipeline"
    assert type(img2img).__name__ == "StableDiffusionImg2ImgPipeline"
    assert type(inpaint).__name__ == "StableDiffusionInpaintPipeline"
    assert txt2img.unet is img2img.unet is inpaint.unet
    assert txt2img.text_encoder is img2img.text_encoder is inpaint.text_encoder
    assert cache.get("tiny", "img2img") is img2img  # derived pipelines stay cached too


def test_least_recently_used_model_is_evicted(tiny_folders):
    cache = PipelineCache(max_models=2, models_dir=tiny_folders["tiny"].parent)

    cache.get("tiny", "txt2img")
    cache.get("tiny-inpaint", "inpaint")
    cache.get("tiny", "img2img")  # tiny is now the most recently used
    cache.get("tiny-inpaint/", "inpaint")  # the exported folder: a third model

    assert cache.loads == 3
    assert cache.held == ["tiny", "tiny-inpaint/"]
    cache.get("tiny", "txt2img")
    assert cache.loads == 3  # still warm
    cache.get("tiny-inpaint", "inpaint")
    assert cache.loads == 4 and cache.held == ["tiny", "tiny-inpaint"]


def test_a_memory_budget_evicts_too_but_keeps_the_newest_model():
    cache = PipelineCache(max_models=5, max_gb=1e-9)  # one byte: less than any model

    cache.get("tiny", "txt2img")
    cache.get("tiny-inpaint", "inpaint")

    assert cache.held == ["tiny-inpaint"] and cache.loads == 2


def test_refs_to_the_same_folder_share_one_load(tiny_folders):
    cache = PipelineCache(models_dir=tiny_folders["tiny"].parent)

    cache.get("tiny/", "txt2img")
    cache.get(str(tiny_folders["tiny"]), "img2img")

    assert cache.loads == 1


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_an_inpainting_unet_runs_inpaint_jobs_only(cache, kind):
    with pytest.raises(InvalidJob, match="9-channel") as e:
        cache.get("tiny-inpaint", kind)
    assert "'tiny-inpaint'" in str(e.value) and kind in str(e.value)
    assert cache.get("tiny-inpaint", "inpaint").unet.config.in_channels == 9


def test_unknown_refs_and_kinds_are_invalid_jobs(cache, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"")
    for ref, message in [
        ("nobody/nothing", "'nobody/nothing'"),
        (str(tmp_path / "model.ckpt"), "pickle"),
    ]:
        with pytest.raises(InvalidJob, match=message):
            cache.get(ref, "txt2img")
    with pytest.raises(InvalidJob, match="unknown kind 'finetune'"):
        cache.get("tiny", "finetune")
    assert cache.loads == 0


def test_escaping_models_dir_is_refused_by_the_cache(tmp_path, tiny_folders):
    shutil.copytree(tiny_folders["tiny"], tmp_path / "outside")
    cache = PipelineCache(models_dir=tmp_path / "models")

    with pytest.raises(InvalidJob, match="escapes its folder"):
        cache.get("../outside", "txt2img")


def test_a_folder_naming_foreign_code_is_refused(tmp_path, tiny_folders):
    folder = shutil.copytree(tiny_folders["tiny"], tmp_path / "custom")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["my_package.models", "EvilUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))

    with pytest.raises(InvalidJob, match="remote code is never run"):
        PipelineCache(models_dir=tmp_path).get("./custom", "txt2img")


def test_a_folder_without_safetensors_weights_is_refused(tmp_path, tiny_folders):
    folder = shutil.copytree(tiny_folders["tiny"], tmp_path / "pickled")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.bin"))

    with pytest.raises(InvalidJob, match="could not be loaded"):
        PipelineCache(models_dir=tmp_path).get("./pickled", "txt2img")


def test_the_cache_puts_the_default_scheduler_back(cache):
    from diffusers import EulerDiscreteScheduler

    pipe = cache.get("tiny", "txt2img")
    default = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(default.config)

    assert cache.get("tiny", "txt2img").scheduler is default


def test_a_model_from_the_hf_cache_renders_like_the_builtin(
    empty_hf_cache, tiny_folders, cache, max_diff
):
    put_in_hf_cache(empty_hf_cache, "acme/tiny-sd", tiny_folders["tiny"])
    spec = Txt2Img(model="acme/tiny-sd", prompt="a fox", num_inference_steps=2, seed=1)

    hub = render(cache.get("acme/tiny-sd", "txt2img"), spec).images[0]
    builtin = render(cache.get("tiny", "txt2img"), spec.model_copy(update={"model": "tiny"}))

    assert max_diff(hub, builtin.images[0]) == 0


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("tiny", Txt2Img(model="x.safetensors", prompt="a fox", num_inference_steps=2, seed=2)),
        (
            "tiny-inpaint",
            Inpaint(
                model="x.safetensors",
                prompt="a cat",
                image="in.png",
                mask_image="m.png",
                num_inference_steps=2,
                seed=2,
            ),
        ),
    ],
)
def test_a_single_file_renders_like_its_folder(
    tmp_path, tiny_folders, name, spec, photo, mask, max_diff
):
    path = export_single_file(name, tmp_path / f"{name}.safetensors")
    shutil.copytree(tiny_folders[name], tmp_path / f"{name}.config")
    cache = PipelineCache(models_dir=tmp_path)

    single = render(cache.get(path.name, spec.kind), spec, photo, mask)
    folder = render(cache.get(f"./{name}.config", spec.kind), spec, photo, mask)

    assert cache.loads == 2
    for a, b in zip(single.images, folder.images, strict=True):
        assert max_diff(a, b) <= 1


@pytest.mark.parametrize(
    ("name", "kinds"),
    [
        ("tiny-sdxl", ("txt2img", "img2img", "inpaint")),
        ("tiny-sdxl-inpaint", ("inpaint",)),
        ("tiny-sd3", ("txt2img", "img2img", "inpaint")),
        ("tiny-flux", ("txt2img", "img2img", "inpaint")),
    ],
)
def test_every_family_built_in_loads_once_for_each_kind_it_runs(name, kinds):
    from farm.jobs.refs import BUILTIN_MODELS

    cache = PipelineCache(device="cpu")
    assert name in BUILTIN_MODELS
    pipes = [cache.get(name, kind) for kind in kinds]
    assert cache.loads == 1  # one set of weights for every kind
    assert len({id(p.vae) for p in pipes}) == 1
