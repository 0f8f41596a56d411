"""Batches: manifests in, resumable submits, status/retry/cancel, a dataset folder out.

Real Redis, a real local store, `farm` run as a subprocess for the CLI; the resume test runs
real worker subprocesses (`LocalFarm`) and SIGKILLs one half-way.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from farm import Farm, Inpaint, InvalidJob, JobState
from farm.batches.batch import Batch, list_batches
from farm.batches.dataset import contact_sheet, fetch_dataset
from farm.batches.manifest import InvalidManifest
from farm.batches.submit import submit_batch
from farm.cli.demo import box_mask, sample_image
from farm.inputs.images import label_height
from farm.jobs.masks import Box, Strokes, generate, parse_generator
from farm.local.up import LocalFarm
from farm.settings import FarmSettings, settings_env
from tests.support.cli import run_cli
from tests.support.raw import raw

MODEL = {"model": "tiny-inpaint", "num_inference_steps": 2}


@pytest.fixture
def settings(redis_server, tmp_path) -> FarmSettings:
    """A farm of its own: a fresh key prefix and an empty store (no worker)."""
    return FarmSettings(
        redis_url=redis_server.url,
        storage=(tmp_path / "store").as_uri(),
        home=tmp_path / "home",
        key_prefix=f"b{uuid.uuid4().hex[:8]}:",
        lease_seconds=2,
    )


@pytest.fixture
def farm(settings):
    with Farm(settings) as f:
        yield f


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(4):
        sample_image(i).save(folder / f"{i}.png")
    box_mask(0).save(folder / "mask.png")
    Image.new("L", (32, 32)).save(folder / "small-mask.png")
    good = (folder / "0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    return folder


def write_jsonl(path: Path, rows: list[dict], defaults: dict | None = None) -> Path:
    lines = ([json.dumps({"defaults": defaults})] if defaults else []) + [
        json.dumps(r) for r in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def cats(data: Path, n: int = 3) -> list[dict]:
    masks = ["mask.png", "strokes", "box:max_size=0.4"]
    return [{"image": f"{i}.png", "mask": masks[i % 3], "label": f"cat {i}"} for i in range(n)]


TEMPLATE = {**MODEL, "prompt_template": "a photo of a {label}"}


def queued_messages(settings: FarmSettings) -> int:
    r = redis.Redis.from_url(settings.redis_url)
    try:
        return sum(r.llen(k) for k in r.scan_iter(f"{settings.key_prefix}celery:render*"))
    finally:
        r.close()


def stored(settings: FarmSettings, prefix: str = "") -> list[str]:
    root = Path(settings.storage_url().removeprefix("file://"))
    if not root.exists():
        return []
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix().startswith(prefix)
    )


def nothing_written(settings: FarmSettings) -> bool:
    r = redis.Redis.from_url(settings.redis_url)
    try:
        keys = list(r.scan_iter(f"{settings.key_prefix}*"))
    finally:
        r.close()
    return not keys and not stored(settings)


# --------------------------------------------------------------------------- submit


def test_resubmit_submits_only_what_is_missing(settings, data):
    manifest = write_jsonl(data / "cats.jsonl", cats(data), TEMPLATE)
    args = ["batch", "submit", manifest, "--name", "cats", "--variations", 2, "--chunk-size", 4]
    first = run_cli(settings, *args)
    assert first.returncode == 0, first.stderr
    assert "6 jobs (3 rows x 2 variations): new=6 present=0" in first.stdout
    again = run_cli(settings, *args)
    assert "new=0 present=6" in again.stdout, again.stdout + again.stderr
    assert queued_messages(settings) == 6
    # One more row: only its two jobs are new.
    write_jsonl(manifest, cats(data, 4), TEMPLATE)
    more = run_cli(settings, *args)
    assert "8 jobs (4 rows x 2 variations): new=2 present=6" in more.stdout
    assert queued_messages(settings) == 8
    # 4 sources + 1 mask file; generated masks are drawn by the worker, not stored as inputs.
    assert len(stored(settings, "inputs/")) == 4 + 1


def test_stamped_records_are_the_ones_each_jobs_own_prepare_makes(farm, data):
    """A batch prepares one job per kind of row in full and stamps the records of rows alike
    (same fields but prompts, same inputs) from it: every stamped record must be exactly
    what that job's own prepare makes, for every kind of row and mask, prompts and negative
    prompts given or not, seeds drawn or given, SDXL's second prompt, duplicate rows,
    variations, across chunks."""
    from farm.batches.submit import SubmitResult, _plan, _prepare_chunk, validate_manifest
    from farm.submit import Submission

    rows = []
    for i in range(12):
        mask = ["mask.png", "strokes", "box:max_size=0.4", "strokes:seed=7", "full"][i % 5]
        row = {"image": f"{i % 2}.png", "mask": mask, "label": f"cat {i}"}
        if i % 3 == 0:
            row["negative_prompt"] = f"blurry {i}"
        if i % 4 == 1:
            row["seed"] = 100 + i
        rows.append(row)
    rows += [
        {"image": "1.png", "label": "dog", "strength": 0.5, "model": "tiny", "kind": "img2img"},
        {"image": "1.png", "label": "dog 2", "strength": 0.5, "model": "tiny", "kind": "img2img"},
        {"label": "owl", "model": "tiny", "kind": "txt2img", "width": 64, "height": 64},
        {
            "label": "owl 2",
            "model": "tiny",
            "kind": "txt2img",
            "width": 64,
            "height": 64,
            "negative_prompt": "x",
        },
        {
            "label": "owl 3",
            "model": "tiny",
            "kind": "txt2img",
            "width": 64,
            "height": 64,
            "num_images": 2,
        },
        {"label": "fox", "kind": "txt2img", "model": "tiny-sdxl", "prompt_2": "oil painting"},
        {"label": "fox 2", "kind": "txt2img", "model": "tiny-sdxl", "prompt_2": "oil painting"},
        {"prompt": "no template", "model": "tiny", "kind": "txt2img", "priority": 5},
        {"prompt": "no template", "model": "tiny", "kind": "txt2img", "priority": 5},  # again
    ]
    manifest = write_jsonl(data / "mixed.jsonl", rows, TEMPLATE)
    sub = Submission(farm)
    try:
        checked = validate_manifest(farm, manifest, variations=3, seed=11, sub=sub)
    except InvalidManifest as e:
        raise AssertionError(e.lines()) from None
    planned = list(_plan(checked.rows, checked.variations, checked.seed))

    def records(templates):
        result = SubmitResult("mixed", len(checked.rows), 3, len(planned))
        chunks = [planned[i : i + 7] for i in range(0, len(planned), 7)]
        recs = [
            rec
            for chunk in chunks
            for rec in _prepare_chunk(sub, "mixed", chunk, result, templates).records
        ]
        return [{k: v for k, v in rec.items() if k != "created_at"} for rec in recs]

    templates: dict = {}
    stamped, whole = records(templates), records(None)
    assert len(stamped) == len(planned) == 3 * len(rows)
    assert len(templates) < len(rows)  # rows alike were stamped, not prepared
    assert stamped == whole
    assert len({rec["id"] for rec in stamped}) == len(stamped)  # a duplicate row's too
    masks = {json.dumps(rec["spec"].get("mask_image"), sort_keys=True) for rec in stamped}
    assert len(masks) > 10  # generated masks' seeds differ per slot, unless the row fixes one


def test_rows_checked_from_an_alike_rows_spec_are_the_rows_checked_whole(farm, data):
    """Validation checks a row whose fields but prompt and seed were checked before by
    assigning its prompt and seed to a copy of that spec: every row must come out as checked
    whole, and a bad prompt or seed must be refused with the same words."""
    from farm.batches.manifest import normalize, resolve_row
    from farm.submit import Submission

    base = normalize(TEMPLATE, "the defaults", row=False)
    rows = [
        {"image": f"{i % 3}.png", "mask": ["strokes", "box", "mask.png"][i % 3], "label": f"c{i}",
         **({"seed": str(7 + i)} if i % 2 else {}), **({"negative_prompt": "dull"} if i % 4 else {})}
        for i in range(12)
    ]  # fmt: skip
    rows += [
        {"prompt": "an owl", "model": "tiny", "kind": "txt2img", "seed": 3},
        {"prompt": "an owl 2", "model": "tiny", "kind": "txt2img", "seed": "4"},
        {"prompt": "x" * 5000, "model": "tiny", "kind": "txt2img"},  # too long
        {"prompt": 17, "model": "tiny", "kind": "txt2img"},  # not text
        {"prompt": "an owl 3", "model": "tiny", "kind": "txt2img", "seed": "-1"},  # bad seed
        {"prompt": "an owl 4", "model": "tiny", "kind": "txt2img", "seed": "seven"},
        {"image": "0.png", "mask": "strokes", "label": "nul\x00"},  # NUL in the prompt
    ]
    sub = Submission(farm)
    checked: dict = {}

    def resolved(row, cache):
        try:
            return resolve_row(2, row, base, data, sub.inputs, sub.budgets, cache)
        except InvalidJob as e:
            return f"refused: {e}"

    for row in rows:
        assert resolved(row, checked) == resolved(row, None), row
    assert 0 < len(checked) < len(rows) // 2  # most rows were checked from an alike one
    refused = [resolved(row, checked) for row in rows[-5:]]
    assert all(r.startswith("refused: ") for r in refused), refused


def test_s3_store_inputs_uploaded_once_across_chunks(redis_server, s3_server, data, tmp_path):
    from farm.storage.s3 import S3Store

    bucket = f"batch-{uuid.uuid4().hex[:12]}"
    store = S3Store(bucket, "farm", endpoint_url=s3_server.endpoint_url, region="us-east-1")
    store.ensure_bucket()
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=f"s3://{bucket}/farm",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region="us-east-1",
        home=tmp_path / "home",
        key_prefix=f"s{uuid.uuid4().hex[:8]}:",
    )
    manifest = write_jsonl(data / "cats.jsonl", cats(data, 3), TEMPLATE)
    with Farm(settings) as farm:
        # Chunks of 2 jobs: several chunks, so the inputs go through the upload helper process.
        first = submit_batch(farm, manifest, "cats", variations=2, chunk_size=2)
        again = submit_batch(farm, manifest, "cats", variations=2, chunk_size=2)
        specs = [r.spec for r in farm.tracker.get_many(Batch(farm, "cats").job_ids())]
    assert (first.new, again.new, again.present) == (6, 0, 6)
    assert len(store.list("inputs/")) == 3 + 1
    assert all(s["image"].startswith(f"s3://{bucket}/farm/inputs/") for s in specs)
    files = [s["mask_image"] for s in specs if isinstance(s["mask_image"], str)]
    assert len(files) == 2 and all(store.exists(store.key_of(uri)) for uri in files)
    drawn = [s["mask_image"] for s in specs if isinstance(s["mask_image"], dict)]
    assert [m["generator"] for m in drawn] == ["strokes"] * 2 + ["box"] * 2


def test_jobs_follow_rows_not_line_numbers(farm, data):
    rows = cats(data, 3)
    manifest = write_jsonl(data / "cats.jsonl", rows, TEMPLATE)
    submit_batch(farm, manifest, "cats", variations=2)
    before = {s.info["labels"]["label"]: s.job for s in Batch(farm, "cats").slots()}
    # Reordered rows (and a comment-free blank line): the same jobs, now in the new order.
    manifest.write_text(
        json.dumps({"defaults": TEMPLATE}) + "\n\n" + "\n".join(json.dumps(r) for r in rows[::-1])
    )
    result = submit_batch(farm, manifest, "cats", variations=2)
    assert (result.new, result.present) == (0, 6)
    slots = Batch(farm, "cats").slots()
    assert [s.info["labels"]["label"] for s in slots[::2]] == ["cat 2", "cat 1", "cat 0"]
    assert [s.info["row"] for s in slots[::2]] == [3, 4, 5]
    assert {s.info["labels"]["label"]: s.job for s in slots} == before


def test_seeds_and_masks_derive_from_row_variation_and_seed(farm, data):
    manifest = write_jsonl(data / "cats.jsonl", cats(data, 3), TEMPLATE)

    def specs(name, seed):
        submit_batch(farm, manifest, name, variations=2, seed=seed)
        ids = Batch(farm, name).job_ids()
        return [r.spec for r in farm.tracker.get_many(ids)]

    a, b, c = specs("a", 0), specs("b", 0), specs("c", 1)
    assert [s["seed"] for s in a] == [s["seed"] for s in b]
    assert [s["mask_image"] for s in a] == [s["mask_image"] for s in b]
    assert Batch(farm, "a").job_ids() != Batch(farm, "b").job_ids()  # keys carry the name
    assert all(x["seed"] != y["seed"] for x, y in zip(a, c, strict=True))
    # The file mask is the same for both variations; drawn masks differ per variation and seed.
    assert a[0]["mask_image"] == a[1]["mask_image"]
    assert a[2]["mask_image"] != a[3]["mask_image"] and a[4]["mask_image"] != a[5]["mask_image"]
    assert a[2]["mask_image"] != c[2]["mask_image"]
    assert [s["prompt"] for s in a[::2]] == [
        "a photo of a cat 0",
        "a photo of a cat 1",
        "a photo of a cat 2",
    ]


def test_generated_masks_travel_as_generators_and_nothing_is_drawn_or_stored(farm, data):
    rows = [
        {"image": "0.png", "mask": "strokes:seed=7", "label": "fixed"},
        {"image": "1.png", "mask": {"generator": "box", "max_size": 0.4}, "label": "derived"},
    ]
    manifest = write_jsonl(data / "cats.jsonl", rows, TEMPLATE)
    submit_batch(farm, manifest, "cats", variations=2)
    specs = [r.spec for r in farm.tracker.get_many(Batch(farm, "cats").job_ids())]
    masks = [s["mask_image"] for s in specs]
    # A row's own seed draws every variation's mask; else each variation has its own seed.
    assert masks[0] == masks[1] == {**Strokes(seed=7).model_dump(), "generator": "strokes"}
    assert masks[2]["generator"] == "box" and masks[2]["max_size"] == 0.4
    assert masks[2]["seed"] != masks[3]["seed"]
    assert [s.info["mask"] for s in Batch(farm, "cats").slots()][::2] == [
        "strokes:seed=7",
        "box:max_size=0.4",
    ]
    assert len(stored(farm.settings, "inputs/")) == 2  # the two sources, no masks
    # Before any worker drew them, a contact sheet draws them here: one line per job,
    # source | mask | output 1 (empty: not rendered yet), under a header, over a caption.
    assert contact_sheet(Batch(farm, "cats"), data / "sheet.png", cell=32) == 4
    line = label_height()
    assert Image.open(data / "sheet.png").size == (
        3 * 32 + 4 * 4,
        line + 4 + 4 * (32 + line) + 5 * 4,
    )


def test_submit_one_job_with_a_generated_mask(farm, settings, data):
    common = dict(model="tiny-inpaint", prompt="a cat", image=str(data / "0.png"))
    job = farm.submit(Inpaint(**common, mask_image=Strokes(max_width=0.2), seed=5))
    rec = farm.get(job.id)
    assert rec.spec["mask_image"] == Strokes(max_width=0.2, seed=5).model_dump()
    assert len(stored(settings, "inputs/")) == 1  # the image only
    with_file = farm.submit(Inpaint(**common, mask_image=str(data / "mask.png"), seed=5))
    assert farm.get(with_file.id).signature == rec.signature  # they may share a batch
    res = run_cli(
        settings, "submit", "inpaint", "--model", "tiny-inpaint", "--prompt", "x",
        "--image", data / "1.png", "--mask", "box:max_size=0.3", "--seed", 3,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert farm.get(res.stdout.strip()).spec["mask_image"] == Box(max_size=0.3, seed=3).model_dump()
    bad = run_cli(
        settings, "submit", "inpaint", "--model", "tiny-inpaint", "--prompt", "x",
        "--image", data / "1.png", "--mask", "strokes:max_width=3",
    )  # fmt: skip
    assert bad.returncode == 2 and "mask_image: strokes max_width" in bad.stderr, bad.stderr
    assert len(raw(farm).zrange(farm.tracker.keys.jobs, 0, -1)) == 3


def test_csv_manifest_with_command_line_defaults(settings, data):
    with open(data / "cats.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "steps", "negative_prompt"])
        w.writerow(["0.png", "tabby", "3", ""])
        w.writerow([str(data / "1.png"), "calico", "", "blurry"])
    res = run_cli(
        settings, "batch", "submit", data / "cats.csv", "--name", "csv", "--model", "tiny-inpaint",
        "--mask", "strokes", "--prompt-template", "a {label} cat", "--steps", 2,
        "--set", "guidance_scale=3.5", "--set", "mask_blur=2",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    with Farm(settings) as farm:
        specs = [r.spec for r in farm.tracker.get_many(Batch(farm, "csv").job_ids())]
    assert [s["prompt"] for s in specs] == ["a tabby cat", "a calico cat"]
    assert [s["num_inference_steps"] for s in specs] == [3, 2]  # the row wins over the flag
    assert [s.get("negative_prompt") for s in specs] == [None, "blurry"]
    assert all(s["guidance_scale"] == 3.5 and s["mask_blur"] == 2 for s in specs)


def test_kind_follows_the_row_unless_set(farm, data):
    rows = [
        {"prompt": "a fox", "model": "tiny"},
        {"image": "0.png", "prompt": "a fox", "model": "tiny", "strength": 0.5},
        {"image": "1.png", "mask": "full", "prompt": "a fox"},
    ]
    manifest = write_jsonl(data / "kinds.jsonl", rows, {"model": "tiny-inpaint", "steps": 2})
    submit_batch(farm, manifest, "kinds")
    records = farm.tracker.get_many(Batch(farm, "kinds").job_ids())
    assert [r.kind for r in records] == ["txt2img", "img2img", "inpaint"]
    assert records[1].spec["strength"] == 0.5 and "image" not in records[0].spec
    with pytest.raises(InvalidManifest) as err:
        submit_batch(farm, manifest, "forced", defaults={"kind": "txt2img"})
    assert [p.line for p in err.value.problems] == [3, 4]
    assert "txt2img jobs take no image" in err.value.problems[0].message
    with pytest.raises(InvalidManifest) as err:  # one by one, with `farm submit`
        submit_batch(farm, manifest, "tunes", defaults={"kind": "finetune"})
    problem = err.value.problems[0].message
    assert "batch rows are txt2img, img2img, inpaint, got 'finetune'" in problem
    assert not raw(farm).exists(farm.tracker.keys.batch("tunes"))


BAD_ROWS = [
    ({"image": "nope.png", "mask": "strokes"}, "image", "nope.png"),
    ({"image": "truncated.png", "mask": "strokes"}, "image", "truncated"),
    ({"image": "0.png", "mask": "small-mask.png"}, "mask", "32x32"),
    ({"image": "0.png", "mask": "strokes", "steps": 0}, "num_inference_steps", "0"),
    (
        {"image": "0.png", "mask": "strokes", "num_inference_step": 3},
        "num_inference_step",
        "did you mean",
    ),
    ({"image": "0.png", "mask": "strokes:max_width=3"}, "mask", "max_width"),
    ({"image": "0.png", "mask": "strokes", "scheduler": "warp"}, "scheduler", "warp"),
    (
        {"image": "0.png", "mask": "strokes", "prompt_template": "{colour} cat"},
        "prompt_template",
        "colour",
    ),
    ({"image": "0.png", "mask": "strokes", "key": "mine"}, "key", "set by the batch"),
    ({"image": "http://169.254.169.254/x.png", "mask": "strokes"}, "image", "http"),
]


@pytest.mark.parametrize("chunk", [[], ["--chunk-size", 2]], ids=["one-chunk", "upload-helper"])
def test_bad_rows_reported_by_line_and_nothing_written(settings, data, chunk):
    """With chunks of 2 the uploads' helper process is started before the rows are checked:
    it is closed with nothing stored."""
    good = {"image": "1.png", "mask": "strokes", "prompt": "x"}
    rows = (
        [good]
        + [row if "prompt_template" in row else {"prompt": "x", **row} for row, _, _ in BAD_ROWS]
        + [good]
    )
    manifest = write_jsonl(data / "bad.jsonl", rows, MODEL)
    with manifest.open("a") as f:
        f.write("{not json\n")
    res = run_cli(settings, "batch", "submit", manifest, "--name", "bad", *chunk)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    # Line 1 is the defaults block, line 2 a good row: bad rows are lines 3..12, then 14.
    for i, (_, field, word) in enumerate(BAD_ROWS):
        line = next(x for x in lines if x.startswith(f"farm: error: bad.jsonl:{i + 3}: "))
        assert f": {field}" in line and word in line, line
    assert any(x.startswith("farm: error: bad.jsonl:14: not valid JSON") for x in lines)
    assert len(lines) == len(BAD_ROWS) + 2 and "11 bad rows; nothing was submitted" in lines[-1]
    assert nothing_written(settings)


def test_bad_csv_rows_use_file_line_numbers(farm, data):
    (data / "bad.csv").write_text(
        "image,mask,prompt\n0.png,strokes,ok\n0.png,small-mask.png,x\n9.png,box,y\n"
        "1.png,blob:x=1,z\n1.png,box,ok\n"
    )
    with pytest.raises(InvalidManifest) as err:
        submit_batch(farm, data / "bad.csv", "bad", defaults={"model": "tiny-inpaint"})
    found = [(p.line, p.message.split(":")[0]) for p in err.value.problems]
    assert found == [(3, "mask"), (4, "image"), (5, "mask")], err.value.lines()
    assert "no such file" in err.value.problems[2].message
    assert nothing_written(farm.settings)


def test_submit_that_died_before_indexing_is_completed(farm, settings, data):
    manifest = write_jsonl(data / "cats.jsonl", cats(data, 2), TEMPLATE)
    submit_batch(farm, manifest, "cats", variations=2)
    batch = Batch(farm, "cats")
    lost = batch.slots()[:2]
    # As if the first submit died after writing two records but before their messages and
    # their slots: the slots are missing (and their jobs not counted in the batch, which
    # happens as their slots are written), the queue is empty.
    keys = farm.tracker.keys
    raw(farm).hdel(keys.batch_slots("cats"), *(s.id for s in lost))
    for s in lost:
        raw(farm).hdel(keys.job(s.job), "batch", "slot")
    raw(farm).hincrby(keys.batch_counts("cats"), "queued", -len(lost))
    raw(farm).hincrby(keys.batch_counts("cats"), "images:queued", -len(lost))
    for key in raw(farm).scan_iter(f"{settings.key_prefix}celery:render*"):
        raw(farm).delete(key)
    assert batch.status().counts == {"unsubmitted": 2, "queued": 2}
    result = submit_batch(farm, manifest, "cats", variations=2)
    assert (result.new, result.present, result.requeued) == (0, 4, 2)
    assert queued_messages(settings) == 2
    assert [s.job for s in batch.slots()] == [s.job for s in lost] + batch.job_ids()[2:]


# --------------------------------------------------------------------------- follow, retry, cancel


def play_worker(farm: Farm, job_id: str, state: JobState, **fields) -> None:
    """Do what a worker does to a job's record: claim it, end it."""
    claim = farm.tracker.claim(job_id, "test-worker", 30)
    assert claim.ok
    farm.tracker.finish(job_id, claim.token, state, **fields)


def test_retry_gives_failed_slots_new_jobs_and_never_touches_terminal_states(farm, settings, data):
    manifest = write_jsonl(data / "cats.jsonl", cats(data, 2), TEMPLATE)
    submit_batch(farm, manifest, "cats", variations=2)
    batch = Batch(farm, "cats")
    first = batch.job_ids()
    for job_id in first[:2]:
        play_worker(farm, job_id, JobState.FAILED, error="boom")
    play_worker(farm, first[2], JobState.SUCCEEDED)
    assert batch.status().counts == {"failed": 2, "succeeded": 1, "queued": 1}

    new = batch.retry()
    assert len(new) == 2 and not set(new) & set(first)
    for old_id, new_id in zip(first[:2], new, strict=True):
        old, fresh = farm.get(old_id), farm.get(new_id)
        assert old.state == JobState.FAILED and old.error == "boom"  # terminal: unchanged
        assert fresh.state == JobState.QUEUED and fresh.attempt == 0
        assert {**old.spec, "key": None} == {**fresh.spec, "key": None}
        assert fresh.spec["key"] == old.spec["key"] + "#retry1"
    slots = batch.slots()
    assert [s.job for s in slots] == new + first[2:]
    assert [s.info["generation"] for s in slots] == [1, 1, 0, 0]
    assert slots[0].info["history"] == [first[0]]
    assert batch.status().counts == {"queued": 3, "succeeded": 1}
    assert queued_messages(settings) == 4 + 2
    assert batch.retry() == []  # nothing failed now

    # A resubmit keeps the retried jobs; cancel, then retry the cancelled.
    assert submit_batch(farm, manifest, "cats", variations=2).new == 0
    assert batch.cancel() == 3
    assert batch.status().counts == {"cancelled": 3, "succeeded": 1}
    again = batch.retry(cancelled=True)
    assert len(again) == 3 and [s.info["generation"] for s in batch.slots()] == [2, 2, 0, 1]


def test_status_wait_and_list_from_the_cli(farm, settings, data):
    manifest = write_jsonl(data / "cats.jsonl", cats(data, 2), TEMPLATE)
    submit_batch(farm, manifest, "cats", variations=2)
    ids = Batch(farm, "cats").job_ids()
    play_worker(farm, ids[0], JobState.SUCCEEDED)
    time.sleep(0.05)
    play_worker(farm, ids[1], JobState.SUCCEEDED)
    status = Batch(farm, "cats").status()
    assert status.counts == {"succeeded": 2, "queued": 2} and status.images_done == 2
    assert status.rate and status.rate > 0 and status.eta and status.eta > 0

    shown = run_cli(settings, "batch", "status", "cats")
    assert shown.returncode == 0 and "2/4 jobs" in shown.stdout and "queued 2" in shown.stdout
    as_json = json.loads(run_cli(settings, "batch", "status", "cats", "--json").stdout)
    assert as_json["counts"] == {"succeeded": 2, "queued": 2} and as_json["pending"] == 2
    listed = run_cli(settings, "batch", "list")
    assert "cats" in listed.stdout and "2 rows x 2" in listed.stdout
    waited = run_cli(settings, "batch", "wait", "cats", "--timeout", 0.5)
    assert waited.returncode == 1 and "still not done" in waited.stderr
    for job_id in ids[2:]:
        play_worker(farm, job_id, JobState.SUCCEEDED)
    assert run_cli(settings, "batch", "wait", "cats", "--timeout", 10).returncode == 0
    watched = run_cli(settings, "batch", "status", "cats", "--watch", "--interval", 0.1)
    assert watched.returncode == 0 and "4/4 jobs  succeeded 4" in watched.stdout
    assert run_cli(settings, "batch", "status", "nope").returncode == 1
    assert [name for name, _ in list_batches(farm)] == ["cats"]


# --------------------------------------------------------------------------- real workers


@pytest.fixture(scope="module")
def resumed(redis_server, tmp_path_factory):
    """A batch rendered by a worker that is SIGKILLed half-way, then resumed: submit again,
    start a fresh worker, wait. Yields what each step saw."""
    tmp = tmp_path_factory.mktemp("resume")
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=(tmp / "store").as_uri(),
        home=tmp / "home",
        key_prefix=f"r{uuid.uuid4().hex[:8]}:",
        lease_seconds=2,
    )
    data = tmp / "data"
    data.mkdir()
    for i in range(4):
        sample_image(i).save(data / f"{i}.png")
    box_mask(0).save(data / "mask.png")
    rows = [{**row, "image": f"{i % 4}.png"} for i, row in enumerate(cats(data, 8))]
    manifest = write_jsonl(data / "cats.jsonl", rows, TEMPLATE)
    submit = ["batch", "submit", manifest, "--name", "cats", "--variations", 2]
    seen = {"first": run_cli(settings, *submit)}
    farm = Farm(settings)
    ids = Batch(farm, "cats").job_ids()
    # 1. A worker finishes part of the batch, and is killed with no chance to clean up.
    worker = LocalFarm(settings, workers=1, threads=1, preload=["tiny-inpaint"], log_dir=tmp / "l1")
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while sum(s == "succeeded" for s, _, _ in farm.tracker.states(ids)) < 2:
            assert time.monotonic() < deadline, (tmp / "l1" / "worker-0.log").read_text()[-3000:]
            time.sleep(0.01)
        worker.procs[0].send_signal(signal.SIGKILL)
        worker.procs[0].wait()
    finally:
        worker.stop()
    seen["at_kill"] = {r.id: r for r in farm.tracker.get_many(ids)}
    # 2. Once the dead worker's leases ran out: submit again, start a fresh worker, wait.
    time.sleep(settings.lease_seconds + 0.5)
    seen["second"] = run_cli(settings, *submit)
    with LocalFarm(settings, workers=1, threads=1, preload=["tiny-inpaint"], log_dir=tmp / "l2"):
        seen["wait"] = run_cli(settings, "batch", "wait", "cats", "--timeout", 180, timeout=200)
    seen.update(settings=settings, farm=farm, ids=ids, data=data)
    yield seen
    farm.close()


def test_resume_after_a_killed_worker_renders_every_slot_exactly_once(resumed):
    farm, ids, settings = resumed["farm"], resumed["ids"], resumed["settings"]
    assert "16 jobs (8 rows x 2 variations): new=16 present=0" in resumed["first"].stdout
    at_kill = resumed["at_kill"]
    done_before = {i for i, r in at_kill.items() if r.state == JobState.SUCCEEDED}
    assert 2 <= len(done_before) < len(ids), "the worker was killed with work left"
    assert "new=0 present=16" in resumed["second"].stdout, resumed["second"].stdout
    assert resumed["wait"].returncode == 0, resumed["wait"].stdout + resumed["wait"].stderr

    records = {r.id: r for r in farm.tracker.get_many(ids)}
    assert all(r.state == JobState.SUCCEEDED for r in records.values())
    # Done exactly once: one `succeeded` event per job, and finished jobs were not run again.
    events = raw(farm).xrange(farm.tracker.keys.events)
    succeeded = [e["job"] for _, e in events if e["state"] == "succeeded"]
    assert sorted(succeeded) == sorted(ids)
    for job_id in done_before:
        before, after = at_kill[job_id], records[job_id]
        assert (
            (after.attempt, after.finished_at)
            == (before.attempt, before.finished_at)
            == (1, before.finished_at)
        )
    for job_id, rec in records.items():
        meta = json.loads(farm.store.get_uri(rec.meta))
        # A later attempt finishes without rendering what an attempt killed after storing
        # everything (meta.json last) left: then meta.json is that earlier attempt's.
        assert meta["attempt"] <= rec.attempt and meta["outputs"] == rec.outputs
        assert rec.outputs == [farm.store.uri(f"jobs/{job_id}/out/0.png")]
    # Nothing duplicated in storage: exactly the batch's jobs, three objects each.
    objects = stored(settings, "jobs/")
    assert {key.split("/")[1] for key in objects} == set(ids)
    assert len(objects) == 3 * len(ids)
    assert all(key.split("/", 2)[2] in ("out/0.png", "mask.png", "meta.json") for key in objects)


def test_fetch_writes_an_imagefolder_dataset(resumed, tmp_path):
    settings, farm, ids = resumed["settings"], resumed["farm"], resumed["ids"]
    out = tmp_path / "cats-dataset"
    res = run_cli(settings, "batch", "fetch", "cats", out)
    assert res.returncode == 0, res.stderr
    assert "16 images" in res.stdout and "0 already there" in res.stdout
    # Read metadata.jsonl as `datasets`' imagefolder does: one object per line, one schema,
    # every *_file_name a file relative to the folder.
    lines = (out / "metadata.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 16 and len({tuple(r) for r in rows}) == 1
    specs = {r.id: r.spec for r in farm.tracker.get_many(ids)}
    for row in rows:
        for column in ("file_name", "mask_file_name", "source_file_name"):
            path = out / row[column]
            assert not Path(row[column]).is_absolute() and path.is_file(), row[column]
            assert Image.open(path).size == (64, 64)
        spec = specs[row["job_id"]]
        assert row["prompt"] == spec["prompt"] == f"a photo of a {row['label']}"
        assert (row["seed"], row["model"], row["num_inference_steps"]) == (
            spec["seed"],
            "tiny-inpaint",
            2,
        )
        assert row["mask_source"] in ("mask.png", "strokes", "box:max_size=0.4")
        assert row["source_image"] == f"{(row['row'] - 2) % 4}.png"
    assert sorted((r["row"], r["variation"]) for r in rows) == [
        (n, v) for n in range(2, 10) for v in (0, 1)
    ]
    # Again: nothing to fetch; a lost file comes back.
    (out / rows[0]["file_name"]).unlink()
    again = run_cli(settings, "batch", "fetch", "cats", out)
    assert "1 file fetched, 35 already there" in again.stdout, again.stdout  # 16 + 16 + 4


def test_worker_draws_generated_masks_as_the_client_would_and_stores_them(resumed, tmp_path):
    farm, ids, settings = resumed["farm"], resumed["ids"], resumed["settings"]
    fetch_dataset(Batch(farm, "cats"), tmp_path / "ds")
    slots = {s.job: s for s in Batch(farm, "cats").slots()}
    drawn = [r for r in farm.tracker.get_many(ids) if isinstance(r.spec["mask_image"], dict)]
    assert len(drawn) == 10  # rows with `strokes` or `box:max_size=0.4`, two variations each
    for rec in drawn:
        # The mask the client draws here, from the row's generator and the job's mask seed...
        ref = rec.spec["mask_image"]
        gen = parse_generator(slots[rec.id].info["mask"])
        assert ref == {**gen.model_dump(), "seed": ref["seed"]}
        source = Image.open(io.BytesIO(farm.store.get_uri(rec.spec["image"])))
        expected = np.asarray(generate(gen, source.size, ref["seed"]))
        assert 0 < (expected > 0).mean() < 1
        # ...is, pixel for pixel, the one the worker drew, used and stored with the job,
        assert rec.mask == farm.store.uri(f"jobs/{rec.id}/mask.png")
        used = Image.open(io.BytesIO(farm.store.get_uri(rec.mask)))
        assert used.mode == "L" and np.array_equal(np.asarray(used), expected)
        # and the one `farm batch fetch` writes into masks/.
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"ds/masks/{rec.id}.png")), expected)
    # Variations draw different masks; none of them was ever stored as an input.
    assert len({r.spec["mask_image"]["seed"] for r in drawn}) == len(drawn)
    assert len(stored(settings, "inputs/")) == 4 + 1  # the sources and the one mask file


def test_fetched_folder_loads_with_datasets(resumed, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    from farm.batches.dataset import fetch_dataset

    fetch_dataset(Batch(resumed["farm"], "cats"), tmp_path / "ds")
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path / "ds"), split="train", cache_dir=str(tmp_path / "c")
    )
    assert ds.num_rows == 16
    assert {"image", "mask", "source", "prompt", "seed", "label"} <= set(ds.column_names)
    first = ds[0]
    assert first["image"].size == first["mask"].size == first["source"].size == (64, 64)


def test_contact_sheet_shows_source_mask_and_outputs_per_row(resumed, tmp_path):
    out = tmp_path / "sheet.png"
    res = run_cli(resumed["settings"], "batch", "sheet", "cats", out, "--rows", 3, "--cell", 32)
    assert res.returncode == 0 and "3 rows" in res.stdout, res.stderr
    # One line per job (row 2's two variations, then row 3's first), each column one thing:
    # source | mask | output 1, labelled above; the row, seed and prompt under each line.
    # Cells of 32 px, 4 px apart.
    line = label_height()
    sheet = Image.open(out).convert("L")
    assert sheet.size == (3 * 32 + 4 * 4, line + 4 + 3 * (32 + line) + 4 * 4)
    header = sheet.crop((0, 4, sheet.width, 4 + line))
    assert all(
        min(header.crop((4 + c * 36, 0, 36 + c * 36, line)).getdata()) < 128 for c in range(3)
    )
    for r in range(3):  # a caption under every line
        top = line + 8 + r * (32 + line + 4) + 32
        assert min(sheet.crop((4, top, sheet.width - 4, top + line)).getdata()) < 128


def test_wait_and_watch_follow_slots_that_wait_for_a_fine_tune(farm, settings, tmp_path):
    """A row chained to a fine-tune that has not ended is `waiting`: the batch is not done.
    (Batch.wait used to return at once with {'waiting': 1}, and `farm batch wait` exit 1.)"""
    from farm import Finetune, WaitTimeout

    tune = farm.submit(
        Finetune(model="tiny", images=[sample_image(0)], instance_prompt="sks", max_train_steps=1)
    )  # no worker serves `finetune` here: it stays queued
    rows = [{"prompt": "a fox", "loras": [f"job:{tune.id}"]}]
    manifest = write_jsonl(tmp_path / "chained.jsonl", rows, {"model": "tiny", "kind": "txt2img"})
    submit_batch(farm, manifest, "chained")
    batch = Batch(farm, "chained")
    assert batch.status().counts == {"waiting": 1}
    with pytest.raises(WaitTimeout):
        batch.wait(timeout=1)
    waited = run_cli(settings, "batch", "wait", "chained", "--timeout", 1)
    assert waited.returncode == 1 and "still not done" in waited.stderr, waited
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "farm",
            "batch",
            "status",
            "chained",
            "--watch",
            "--interval",
            "0.1",
        ],
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    assert watcher.poll() is None  # still following the waiting slot
    farm.cancel(tune.id)  # the render can never run now: it fails, and the batch settles
    out, _ = watcher.communicate(timeout=30)
    assert watcher.returncode == 0 and "failed 1" in out.splitlines()[-1], out
    assert batch.wait(timeout=5).counts == {"failed": 1}
