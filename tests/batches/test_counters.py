"""`farm batch status` reads counters the state scripts keep, not the batch's slots: whatever
happens to a batch, they say what reading every slot would say."""

from __future__ import annotations

import time
from collections import Counter

from farm import Batch, Farm, JobState, submit_batch
from farm.jobs.record import JobRecord
from tests.batches.test_batch import (  # noqa: F401 (fixtures)
    data,
    farm,
    play_worker,
    settings,
    write_jsonl,
)
from tests.support.cli import run_cli

ROWS = [
    {"prompt": "a fox"},
    {"prompt": "a cat", "num_images": 2},
    {"prompt": "a dog"},
    {"prompt": "an owl"},
]
TINY = {"model": "tiny", "num_inference_steps": 2}


def from_slots(batch: Batch) -> tuple[dict[str, int], int, int]:
    """(counts, images done, images in all) as reading every slot tells them."""
    slots = batch.slots()
    counts = Counter("unsubmitted" if s.state == "unsubmitted" else s.state for s in slots)
    images = [int(s.info.get("images", 1)) for s in slots]
    done = sum(n for s, n in zip(slots, images, strict=True) if s.state == "succeeded")
    return dict(counts), done, sum(images)


def agree(batch: Batch) -> None:
    status = batch.status()
    assert (status.counts, status.images_done, status.images_total) == from_slots(batch)
    failed = [s.job for s in batch.slots() if s.state == "failed"]
    assert sorted(batch.index.failed(batch.name)) == sorted(failed)


def test_counters_agree_with_the_slots_through_a_batchs_life(farm, data):  # noqa: F811
    manifest = write_jsonl(data / "rows.jsonl", ROWS, TINY)
    submit_batch(farm, manifest, "life", variations=2)
    batch = Batch(farm, "life")
    agree(batch)
    ids = batch.job_ids()
    play_worker(farm, ids[0], JobState.SUCCEEDED)
    play_worker(farm, ids[2], JobState.SUCCEEDED)  # the row with two images
    play_worker(farm, ids[3], JobState.FAILED, error="boom")
    play_worker(farm, ids[4], JobState.FAILED, error="bang")
    farm.cancel(ids[5])
    farm.tracker.claim(ids[6], "w", 30)  # running
    agree(batch)
    status = batch.status()
    assert status.counts == {"succeeded": 2, "failed": 2, "cancelled": 1, "running": 1, "queued": 2}
    assert (status.images_done, status.images_total) == (3, 10)
    assert status.rate is not None and status.eta is not None
    # Failed jobs are listed without reading the slots, with what a reason needs.
    failed = [farm.get(job_id) for job_id in batch.index.failed("life")]
    assert [(r.error, r.batch) for r in failed] == [("boom", "life"), ("bang", "life")]
    assert {r.slot for r in failed} == {s.id for s in batch.slots() if s.job in (ids[3], ids[4])}
    # A retry takes the failed jobs out (they stay failed) and counts their new ones.
    new = batch.retry()
    agree(batch)
    assert batch.status().counts == {"succeeded": 2, "cancelled": 1, "running": 1, "queued": 4}
    assert farm.get(ids[3]).state == JobState.FAILED and farm.get(ids[3]).batch is None
    play_worker(farm, new[0], JobState.FAILED, error="again")
    agree(batch)
    # An edited manifest drops two rows: their slots' jobs leave the counts.
    write_jsonl(data / "rows.jsonl", ROWS[:1] + ROWS[2:3], TINY)
    submit_batch(farm, manifest, "life", variations=2)
    agree(batch)
    assert batch.status().total == 4
    # The rows come back: their slots, and the jobs they held, count again.
    write_jsonl(data / "rows.jsonl", ROWS, TINY)
    submit_batch(farm, manifest, "life", variations=2)
    agree(batch)


def test_a_finished_batch_has_its_rate_from_first_start_to_last_success(farm, data):  # noqa: F811
    manifest = write_jsonl(data / "rows.jsonl", ROWS[:2], TINY)
    submit_batch(farm, manifest, "done")
    batch = Batch(farm, "done")
    t0 = time.time()
    for job_id in batch.job_ids():
        play_worker(farm, job_id, JobState.SUCCEEDED)
    status = batch.status()
    records = [farm.get(j) for j in batch.job_ids()]
    span = max(r.finished_at or 0 for r in records) - min(r.started_at or 0 for r in records)
    assert status.settled and status.eta is None and status.images_done == 3
    assert status.rate == 3 / max(1e-3, span) and min(r.started_at or 0 for r in records) >= t0


def test_farm_wide_counts_follow_every_state_change(farm):  # noqa: F811
    from farm import Txt2Img

    jobs = farm.submit_many(Txt2Img(model="tiny", prompt="x", seed=i) for i in range(5))
    ids = [j.id for j in jobs]
    play_worker(farm, ids[0], JobState.SUCCEEDED)
    farm.tracker.claim(ids[1], "w", 30)
    farm.cancel(ids[2])
    records: list[JobRecord] = [r for r in farm.tracker.get_many(ids) if r is not None]
    counts = farm.tracker.counts()
    assert counts == {
        "waiting": 0,
        "queued": 2,
        "running": 1,
        "succeeded": 1,
        "failed": 0,
        "cancelled": 1,
    }
    assert counts == {s.value: sum(r.state == s for r in records) for s in JobState}


def test_a_batch_name_with_a_trailing_newline_is_refused(settings, data):  # noqa: F811
    manifest = write_jsonl(data / "rows.jsonl", ROWS[:1], TINY)
    res = run_cli(settings, "batch", "submit", manifest, "--name", "cats\n")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "farm: error: name: 'cats\\n' is not a batch name (letters, digits, '.', '_', '-'; up to 128)"
    ]
    with Farm(settings) as other:
        assert other.tracker.batches.names() == []
