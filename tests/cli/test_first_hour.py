"""A new user's first commands, typed before any farm runs (or with one): argument errors
that help, input errors reported as such even with no farm, the kind of a model checked at
submit. Every case is the real `farm` command: its screen and its exit status."""

from __future__ import annotations

import json
import os
import stat

import pytest
from PIL import Image

from farm import InvalidJob
from farm.jobs.specs import parse_spec
from farm.settings import FarmSettings
from tests.support.cli import run_cli

NO_FARM = "no embedded farm is running"


@pytest.fixture
def nowhere(tmp_path) -> FarmSettings:
    """A shell with nothing configured and no `farm up` running."""
    return FarmSettings(home=tmp_path / "home")


@pytest.fixture
def files(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    return tmp_path


def screen(res) -> list[str]:
    return res.stderr.strip().splitlines()


# --------------------------------------------------------------------------- the parser


HELPFUL = {
    "subcommand": (["sumbit"], "invalid choice 'sumbit'; did you mean 'submit'?"),
    "flag": (
        ["submit", "txt2img", "--model", "tiny", "--promt", "a fox"],
        "farm submit: error: unrecognized argument --promt; did you mean --prompt?",
    ),
    "missing": (
        ["submit", "txt2img", "--prompt", "a fox"],
        "farm submit: error: the following arguments are required: --model",
    ),
    "batch action": (["batch", "stauts", "cats"], "did you mean 'status'?"),
    "kind": (["submit", "txt2ing", "--model", "tiny"], "did you mean 'txt2img'?"),
    "batch flag": (
        ["batch", "submit", "m.jsonl", "--name", "x", "--variatons", "2"],
        "farm batch submit: error: unrecognized argument --variatons; did you mean --variations?",
    ),
}


@pytest.mark.parametrize("case", HELPFUL)
def test_argument_errors_are_one_line_with_a_suggestion_and_one_usage_line(nowhere, case):
    args, expected = HELPFUL[case]
    res = run_cli(nowhere, *args)
    assert res.returncode == 2
    lines = screen(res)
    assert len(lines) == 2, res.stderr  # not twenty lines of usage
    assert expected in lines[0], lines[0]
    command = lines[0].split(": error:")[0]
    assert lines[1].startswith(f"usage: {command} ") and lines[1].endswith("(--help: all)")


def test_farm_version(nowhere):
    from farm import __version__

    res = run_cli(nowhere, "--version")
    assert res.returncode == 0 and res.stdout.strip() == f"farm {__version__}"


# --------------------------------------------------------------------------- no farm yet


INPUT_ERRORS = {
    "width": (["txt2img", "--width", "100"], "width: must be a multiple of 8, got 100"),
    "scheduler": (["txt2img", "--scheduler", "eulr"], "did you mean 'euler'?"),
    "missing file": (["img2img", "--image", "{d}/nope.png"], "image: no such file"),
    "mask generator": (
        ["inpaint", "--image", "{d}/in.png", "--mask", "stroke"],
        "mask_image: no mask generator 'stroke'; did you mean 'strokes'?",
    ),
    "flag of another kind": (
        ["txt2img", "--image", "{d}/in.png"],
        "--image: not a txt2img flag (it is for img2img, inpaint, style)",
    ),
    "model kind": (
        ["txt2img", "--model", "tiny-inpaint"],
        "model: 'tiny-inpaint' is an inpainting model (9-channel UNet): it runs inpaint jobs "
        "only, not txt2img",
    ),
    "finetune flag": (["txt2img", "--rank", "4"], "--rank: only for `farm submit finetune`"),
    "finetune images": (["finetune"], "images: is required"),
}


@pytest.mark.parametrize("case", INPUT_ERRORS)
def test_input_errors_are_reported_before_looking_for_a_farm(nowhere, files, case):
    """They used to hide behind "no embedded farm is running"."""
    args, expected = INPUT_ERRORS[case]
    args = [a.format(d=files) for a in args]
    if "--model" not in args:
        args += ["--model", "tiny"]
    res = run_cli(nowhere, "submit", *args, "--prompt", "a fox")
    assert res.returncode == 2
    assert screen(res) == [screen(res)[0]] and expected in res.stderr, res.stderr
    assert NO_FARM not in res.stderr


@pytest.mark.parametrize(
    "scheduler", ["DDIM", "Euler_A", "EulerAncestralDiscreteScheduler", "dpmpp-2m"]
)
def test_scheduler_names_in_any_case_and_diffusers_class_names(nowhere, scheduler):
    res = run_cli(
        nowhere, "submit", "txt2img", "--model", "tiny", "--prompt", "x", "--scheduler", scheduler
    )
    assert res.returncode == 2 and NO_FARM in res.stderr, res.stderr  # valid: then the farm
    assert parse_spec({"kind": "txt2img", "model": "tiny", "prompt": "x", "scheduler": scheduler})


def test_diffusers_names_as_flags(nowhere):
    res = run_cli(
        nowhere,
        *("submit", "txt2img", "--model", "tiny", "--prompt", "x", "--num-inference-steps", 3),
        *("--num-images-per-prompt", 2, "--guidance-scale", 5),
    )
    assert res.returncode == 2 and NO_FARM in res.stderr, res.stderr


def test_a_valid_job_with_no_farm_says_how_to_start_one(nowhere, files):
    res = run_cli(
        nowhere, "submit", "inpaint", "--model", "tiny-inpaint", "--prompt", "x",
        "--image", files / "in.png", "--mask", "strokes",
    )  # fmt: skip
    assert res.returncode == 2
    assert screen(res) == [
        "farm: error: FARM_REDIS_URL is not set and no embedded farm is running: start one "
        "with `farm up`"
    ]
    assert not (nowhere.home / "storage").exists() or not any(
        (nowhere.home / "storage").rglob("*.png")
    )


def test_sdk_names_a_field_of_another_kind_and_the_kinds_that_have_it():
    with pytest.raises(InvalidJob) as err:
        parse_spec({"kind": "txt2img", "model": "tiny", "prompt": "x", "image": "in.png"})
    assert str(err.value) == (
        "image: not a field of txt2img jobs (it is for img2img, inpaint, style) (got 'in.png')"
    )


def test_a_manifest_is_checked_before_looking_for_a_farm(nowhere, files):
    (files / "rows.csv").write_text("image,mask,prompt\nin.png,mask.png,a cat\nin.png,,a dog\n")
    bad = run_cli(
        nowhere, "batch", "submit", files / "rows.csv", "--name", "cats", "--model", "tiny-inpaint"
    )
    assert bad.returncode == 2
    lines = screen(bad)
    assert lines[0].startswith("farm: error: rows.csv:3: model: 'tiny-inpaint' is an inpainting"), (
        lines
    )
    assert "not img2img" in lines[0] and lines[-1].endswith("1 bad row; nothing was submitted")
    good = run_cli(
        nowhere,
        "batch",
        "submit",
        files / "rows.csv",
        "--name",
        "cats",
        "--model",
        "tiny-inpaint",
        "--mask",
        "box",
    )
    assert good.returncode == 2 and NO_FARM in good.stderr, good.stderr


# --------------------------------------------------------------------------- with a farm


def test_batch_inpaint_rows_keep_their_labels_by_default_and_a_single_job_does_not(
    empty_farm, files
):
    """`farm batch submit` rows of kind inpaint default to preserve_unmasked (pixels outside
    the mask are the source's, so a dataset's labels stay valid); `farm submit inpaint` keeps
    diffusers' pixels unless asked."""
    from farm import Farm
    from farm.batches.batch import Batch

    (files / "rows.jsonl").write_text(
        json.dumps({"image": "in.png", "mask": "mask.png", "prompt": "a cat"}) + "\n"
        + json.dumps({"image": "in.png", "prompt": "a dog", "model": "tiny"}) + "\n"
    )  # fmt: skip
    manifest = files / "rows.jsonl"
    for name, flags, kept in [("kept", [], True), ("raw", ["--no-preserve-unmasked"], False)]:
        res = run_cli(
            empty_farm,
            "batch",
            "submit",
            manifest,
            "--name",
            name,
            "--model",
            "tiny-inpaint",
            *flags,
        )
        assert res.returncode == 0, res.stderr
        with Farm(empty_farm) as farm:
            inpaint, img2img = farm.tracker.get_many(Batch(farm, name).job_ids())
        assert inpaint.spec["preserve_unmasked"] is kept
        assert "preserve_unmasked" not in img2img.spec  # an img2img job has no such field
    args = [
        "submit",
        "inpaint",
        "--model",
        "tiny-inpaint",
        "--prompt",
        "x",
        "--image",
        files / "in.png",
    ]
    single = run_cli(empty_farm, *args, "--mask", files / "mask.png", "--json")
    assert single.returncode == 0, single.stderr
    assert json.loads(single.stdout)["spec"].get("preserve_unmasked", False) is False
    asked = run_cli(empty_farm, *args, "--mask", "box", "--preserve-unmasked", "--json")
    assert json.loads(asked.stdout)["spec"]["preserve_unmasked"] is True


def test_a_port_in_use_is_one_line_with_a_port_hint(empty_farm):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_cli(empty_farm, "dashboard", "--port", port, timeout=60)
    assert res.returncode == 2
    assert screen(res) == [
        f"farm: error: farm dashboard: 127.0.0.1:{port} is already in use (another farm, or "
        "another program); choose another port with --port N (0: any free port)"
    ], res.stderr


# --------------------------------------------------------------------------- models


def test_exported_single_file_verifies_on_its_own_and_is_readable(nowhere, tmp_path):
    out = tmp_path / "export"
    res = run_cli(nowhere, "models", "export", "tiny", out, "--single-file", timeout=300)
    assert res.returncode == 0, res.stderr
    checkpoint = out / "tiny.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o666 & ~umask  # not 0600
    # Elsewhere, with the config folder the export wrote beside it, and nothing else.
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    os.rename(checkpoint, alone / "tiny.safetensors")
    os.rename(out / "tiny.config", alone / "tiny.config")
    verified = run_cli(nowhere, "models", "verify", alone / "tiny.safetensors", timeout=300)
    assert verified.returncode == 0, verified.stderr
    assert (
        verified.stdout.splitlines()[0] == f"{alone / 'tiny.safetensors'}: txt2img (4-channel UNet)"
    )


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("nobody/nothing", "fetch it with `farm models pull nobody/nothing`"),
        ("./no-such-folder", "no such file or folder"),
    ],
)
def test_verify_answers_on_the_light_side_for_a_ref_that_names_nothing(nowhere, ref, expected):
    res = run_cli(nowhere, "models", "verify", ref)
    assert res.returncode == 2
    assert screen(res) == [screen(res)[0]] and expected in res.stderr, res.stderr
    assert "[transformers]" not in res.stderr  # torch's side was never started


def test_submit_takes_a_webhook_and_previews_as_the_api_does(empty_farm):
    """`farm submit` names a webhook and a preview interval as a spec sent to the API would;
    a URL the farm would never POST to is one line, exit 2, nothing written."""
    args = ("submit", "txt2img", "--model", "tiny", "--prompt", "a fox", "--steps", 4)
    res = run_cli(
        empty_farm, *args, "--webhook", "https://hooks.example.com/farm", "--preview-every", 2,
        "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    spec = json.loads(res.stdout)["spec"]
    assert spec["webhook"] == "https://hooks.example.com/farm" and spec["preview_every"] == 2

    bad = run_cli(empty_farm, *args, "--webhook", "ftp://hooks.example.com/farm")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "farm: error: webhook: must be an http:// or https:// URL with a host, "
        "got 'ftp://hooks.example.com/farm'"
    ]
    listed = run_cli(empty_farm, "jobs", "--json")
    assert len(json.loads(listed.stdout)) == 1  # only the first job
