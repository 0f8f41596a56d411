"""Budgets at the edge, and the small ways a submit went wrong, as a user meets them: `farm`
in a subprocess, exit 2, one line naming the field, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from farm import Farm, InvalidJob, Txt2Img
from farm.keys import RedisKeys
from tests.cli.test_invalid_input import nothing_written
from tests.support.cli import run_cli
from tests.support.raw import raw


def refused(res, field: str, *words: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"farm: error: {field}: ") or f": {field}: " in line, line
    for word in words:
        assert word in line, line
    return line


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    """65 KB on disk, 8192×8192 pixels (200 MB as RGB) once decoded."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("L", (8192, 8192)).save(path, optimize=True)
    assert path.stat().st_size < 100_000
    return path


def test_a_small_png_of_8192x8192_is_refused_from_its_header(empty_farm, huge_png, tmp_path):  # noqa: F811
    res = run_cli(
        empty_farm, "submit", "img2img", "--model", "tiny", "--prompt", "x", "--image", huge_png
    )
    refused(res, "image", "8192x8192 = 67108864 pixels, over FARM_MAX_INPUT_PIXELS (16777216)")
    # From the header, before decoding: a file cut after its first bytes is refused the same.
    head = tmp_path / "head.png"
    head.write_bytes(huge_png.read_bytes()[:200])
    res = run_cli(
        empty_farm, "submit", "img2img", "--model", "tiny", "--prompt", "x", "--image", head
    )
    refused(res, "image", "over FARM_MAX_INPUT_PIXELS")
    assert nothing_written(empty_farm)


def test_the_working_size_taken_from_the_input_must_fit_the_pixel_budget(empty_farm, tmp_path):  # noqa: F811
    Image.new("RGB", (2560, 2048), "red").save(tmp_path / "big.png")
    args = [
        "submit",
        "img2img",
        "--model",
        "tiny",
        "--prompt",
        "x",
        "--image",
        tmp_path / "big.png",
    ]
    refused(run_cli(empty_farm, *args), "image", "2560x2048 = 5242880", "FARM_MAX_PIXELS (4194304)")
    refused(
        run_cli(
            empty_farm,
            "submit",
            "txt2img",
            "--model",
            "tiny",
            "--prompt",
            "x",
            "--width",
            "4096",
            "--height",
            "2048",
        ),
        "height",
        "4096x2048 = 8388608",
    )
    assert nothing_written(empty_farm)
    # Asked at a size that fits, the same picture is fine; and the budget is a setting.
    assert run_cli(empty_farm, *args, "--width", "1024", "--height", "1024").returncode == 0
    assert run_cli(empty_farm, *args, FARM_MAX_PIXELS=str(2560 * 2048)).returncode == 0


def test_prompts_are_measured_in_characters(empty_farm):  # noqa: F811
    base = ["submit", "txt2img", "--model", "tiny"]
    refused(
        run_cli(empty_farm, *base, "--prompt", "é" * 4001),
        "prompt",
        "4001 characters, over FARM_MAX_PROMPT_CHARS (4000)",
    )
    refused(
        run_cli(empty_farm, *base, "--prompt", "x", "--negative-prompt", "n" * 5000),
        "negative_prompt",
        "5000 characters",
    )
    assert nothing_written(empty_farm)
    assert run_cli(empty_farm, *base, "--prompt", "é" * 4000).returncode == 0


def test_a_prompt_that_is_not_utf8_is_refused(empty_farm):  # noqa: F811
    # What `--prompt "$(printf 'fox\xff')"` hands Python: the stray byte as a lone surrogate.
    res = run_cli(
        empty_farm, "submit", "txt2img", "--model", "tiny", "--prompt", "fox\udcff", "--json"
    )
    refused(res, "prompt", "is not valid UTF-8 text", "fox\\udcff")
    assert res.stdout == "" and nothing_written(empty_farm)
    with Farm(empty_farm) as farm, pytest.raises(InvalidJob, match="prompt: holds a NUL"):
        farm.submit(Txt2Img(model="tiny", prompt="fox\x00"))
    assert nothing_written(empty_farm)


def test_status_json_prints_a_record_an_older_client_wrote_with_such_a_prompt(empty_farm):  # noqa: F811
    res = run_cli(empty_farm, "submit", "txt2img", "--model", "tiny", "--prompt", "fox", "--json")
    assert res.returncode == 0, res.stderr
    job_id = json.loads(res.stdout)["id"]
    with Farm(empty_farm) as farm:
        key = RedisKeys(empty_farm.key_prefix).job(job_id)
        spec = json.loads(raw(farm).hget(key, "spec"))
        raw(farm).hset(key, "spec", json.dumps({**spec, "prompt": "fox\udcff"}))
    for args in (["status", job_id, "--json"], ["status", job_id]):
        res = run_cli(empty_farm, *args)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert (
        json.loads(run_cli(empty_farm, "status", job_id, "--json").stdout)["spec"]["prompt"]
        == "fox\udcff"
    )


def test_a_key_used_again_for_another_spec_is_refused(empty_farm):  # noqa: F811
    base = ["submit", "txt2img", "--model", "tiny", "--key", "nightly-1"]
    first = run_cli(empty_farm, *base, "--prompt", "a fox")
    assert first.returncode == 0, first.stderr
    again = run_cli(empty_farm, *base, "--prompt", "a fox")  # the same job: the same id
    assert again.returncode == 0 and again.stdout == first.stdout
    res = run_cli(empty_farm, *base, "--prompt", "a cat")
    refused(res, "key", "'nightly-1' was used for job", first.stdout.strip(), "different spec")
    with Farm(empty_farm) as farm:
        assert farm.tracker.counts()["queued"] == 1


def test_a_manifest_line_over_the_limit_is_refused_by_its_line(empty_farm, tmp_path):  # noqa: F811
    rows = [{"prompt": "a fox"}, {"prompt": "a cat", "notes": "x" * 70_000}, {"prompt": "an owl"}]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_cli(empty_farm, "batch", "submit", manifest, "--name", "long", "--model", "tiny")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("farm: error: rows.jsonl:2: the line is 70")
    assert (
        "over FARM_MAX_MANIFEST_LINE (65536)" in lines[0] and "nothing was submitted" in lines[-1]
    )
    assert nothing_written(empty_farm)
    csv_manifest = tmp_path / "rows.csv"
    csv_manifest.write_text(f"prompt,notes\na fox,x\na cat,{'y' * 70_000}\n")
    res = run_cli(empty_farm, "batch", "submit", csv_manifest, "--name", "long", "--model", "tiny")
    assert res.returncode == 2 and "rows.csv:3: the line is 70" in res.stderr, res.stderr
    assert nothing_written(empty_farm)


def test_a_manifest_prompt_is_measured_too(empty_farm, tmp_path):  # noqa: F811
    manifest = tmp_path / "rows.jsonl"
    rows = [{"prompt": "a fox"}, {"prompt": "p" * 5000}, {"prompt": "fox\u0000"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_cli(empty_farm, "batch", "submit", manifest, "--name", "p", "--model", "tiny")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert (
        lines[0]
        == "farm: error: rows.jsonl:2: prompt: is 5000 characters, over FARM_MAX_PROMPT_CHARS (4000)"
    )
    assert lines[1].startswith("farm: error: rows.jsonl:3: prompt: holds a NUL character")
    assert nothing_written(empty_farm)


def test_a_manifest_seed_that_overflows_on_a_variation_leaves_no_batch(empty_farm, tmp_path):  # noqa: F811
    manifest = tmp_path / "rows.jsonl"
    rows = [{"prompt": "a fox"}, {"prompt": "a cat", "seed": 2**63 - 1}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["batch", "submit", manifest, "--name", "seeds", "--model", "tiny", "--variations", "2"]
    res = run_cli(empty_farm, *args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(
        "farm: error: rows.jsonl:2: seed: 9223372036854775807 + variation 1 is over the largest seed"
    )
    assert nothing_written(empty_farm)  # no phantom batch index
    assert "seeds" not in run_cli(empty_farm, "batch", "list").stdout
