"""Micro-batching: batch signatures, the per-signature index of queued jobs in Redis, and a real
worker running compatible jobs as one pipeline call, each exactly once."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid

import numpy as np
import pytest
from PIL import Image, ImageDraw

from farm import Farm, Inpaint, JobState, Txt2Img
from farm.errors import InvalidJob, JobNotFound
from farm.jobs.signature import batch_signature, working_size
from farm.local.up import LocalFarm
from farm.settings import FarmSettings
from farm.state.tracker import Tracker, new_job_id
from farm.storage import open_store
from tests.support.raw import raw
from tests.support.tcp_proxy import TcpProxy

# --------------------------------------------------------------------------- signatures


def inpaint(**update) -> Inpaint:
    spec = Inpaint(
        model="tiny-inpaint",
        prompt="a cat",
        image="a.png",
        mask_image="m.png",
        seed=1,
        num_inference_steps=4,
    )
    return spec.model_copy(update=update)


def test_jobs_that_differ_only_per_image_share_a_signature():
    sig = batch_signature(inpaint(), (100, 75))
    assert sig == batch_signature(
        inpaint(prompt="a dog", negative_prompt="blur", seed=9, image="b.png", key="k"),
        (97, 79),  # another input size, the same working size: 96x72
    )
    assert working_size(inpaint(), (100, 75)) == working_size(inpaint(), (97, 79)) == (72, 96)


@pytest.mark.parametrize(
    "update",
    [
        {"model": "tiny"},
        {"num_inference_steps": 5},
        {"scheduler": "euler_a"},
        {"guidance_scale": 5.0},
        {"strength": 0.5},
        {"num_images_per_prompt": 2},
        {"height": 64},
        {"mask_blur": 4},
        {"mask_dilate": 2},
        {"preserve_unmasked": True},
    ],
)
def test_what_the_call_shares_is_in_the_signature(update):
    assert batch_signature(inpaint(**update), (100, 75)) != batch_signature(inpaint(), (100, 75))


def test_other_sizes_and_kinds_differ_and_crops_run_alone():
    assert batch_signature(inpaint(), (100, 75)) != batch_signature(inpaint(), (104, 75))
    txt = Txt2Img(model="tiny", prompt="x", num_inference_steps=4)
    assert batch_signature(txt) == batch_signature(txt.model_copy(update={"prompt": "y"}))
    assert batch_signature(txt) != batch_signature(inpaint(model="tiny"), (64, 64))
    assert batch_signature(inpaint(padding_mask_crop=8), (100, 75)) is None


def test_an_input_too_small_to_render_is_refused_by_field():
    with pytest.raises(InvalidJob, match="7x100") as err:
        batch_signature(inpaint(), (7, 100))
    assert err.value.field == "image"
    assert working_size(inpaint(width=64), (7, 100)) == (96, 64)


# --------------------------------------------------------------------------- the index


@pytest.fixture
def tracker(redis_url):
    t = Tracker.from_url(redis_url, prefix=f"b{time.monotonic_ns()}:")
    yield t
    t.close()


def create(tracker, signature="s1", priority=0, n=1, images=None) -> list[str]:
    ids = [new_job_id() for _ in range(n)]
    records = [
        {
            "id": job_id,
            "kind": "txt2img",
            "state": "queued",
            "spec": {},
            "priority": priority,
            "created_at": repr(time.time() + k * 1e-3),
            "signature": signature,
            "images": images,
        }
        for k, job_id in enumerate(ids)
    ]
    assert tracker.create(records) == [True] * n
    return ids


def test_index_holds_the_queued_jobs_of_a_signature_most_urgent_first(tracker):
    old = create(tracker, n=2)
    urgent = create(tracker, priority=5)
    other = create(tracker, signature="s2")
    assert tracker.queued_with("s1") == urgent + old
    assert tracker.queued_with("s2") == other


def test_claim_batch_claims_each_job_with_its_own_attempt_and_lease(tracker):
    ids = create(tracker, n=4)

    claimed = tracker.claim_batch("s1", "w", lease=30, n=3)

    assert [rec.id for rec, _ in claimed] == ids[:3]
    for got, t in claimed:
        job_id = got.id
        rec = tracker.get(job_id)
        assert got == rec  # read in the same step as the claim
        assert (rec.state, rec.attempt, rec.worker) == (JobState.RUNNING, 1, "w") and t.ok
        assert t.attempt == 1 and t.token.startswith("1:")
        lease = float(raw(tracker).hget(tracker.keys.job(job_id), "lease_until"))
        assert time.time() + 25 < lease <= time.time() + 30
        tracker.finish(job_id, t.token, JobState.SUCCEEDED)  # its own token fences its writes
    assert tracker.queued_with("s1") == ids[3:]


def test_jobs_leaving_queued_leave_the_index_and_come_back_when_handed_back(tracker):
    cancelled, own_message, handed_back, waiting = create(tracker, n=4)
    tracker.request_cancel(cancelled)
    claim = tracker.claim(own_message, "w", 30)
    running = tracker.claim(handed_back, "w", 30)
    assert tracker.queued_with("s1") == [waiting]

    tracker.finish(handed_back, running.token, JobState.QUEUED)  # a retry
    claimed = tracker.claim_batch("s1", "w2", lease=30, n=4)

    assert sorted(rec.id for rec, _ in claimed) == sorted([handed_back, waiting])
    assert {rec.id: t for rec, t in claimed}[handed_back].attempt == 2
    assert claim.ok and tracker.get(own_message).state == JobState.RUNNING
    assert tracker.get(cancelled).state == JobState.CANCELLED
    assert tracker.queued_with("s1") == [] and tracker.claim_batch("s1", "w", 30, 4) == []


def test_stale_ids_in_the_index_are_dropped_not_claimed(tracker):
    ids = create(tracker, n=3)
    # An id left behind (say, by an older writer) whose job is already running elsewhere.
    tracker.claim(ids[0], "w", 30)
    raw(tracker).zadd(tracker.keys.signature("s1"), {ids[0]: 0})

    claimed = tracker.claim_batch("s1", "w2", lease=30, n=3)

    assert [rec.id for rec, _ in claimed] == ids[1:]
    assert tracker.get(ids[0]).worker == "w" and tracker.queued_with("s1") == []


def test_a_message_claims_its_job_and_batch_with_records_in_one_round_trip(redis_url):
    """Claim, read, gather and read again were four round trips on every message."""
    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0])).up()
    tracker = Tracker.from_url(f"redis://127.0.0.1:{proxy.port}", prefix="one-trip:")
    try:
        lead, *others = create(tracker, n=5)
        create(tracker, signature="s2")  # another signature: not gathered
        tracker.claim(others[0], "m", 30)  # claimed by its own message first: not again
        before = proxy.requests

        claim, claimed = tracker.claim_and_gather(lead, "w", lease=30, max_images=3)

        assert proxy.requests - before == 1
        assert claim.ok and claim.attempt == 1
        assert [rec.id for rec, _ in claimed] == [lead, *others[1:3]]  # 3 images, most urgent
        assert claimed[0][1] == claim
        for rec, t in claimed:
            assert rec == tracker.get(rec.id) and rec.state == JobState.RUNNING
            assert rec.worker == "w" and t.ok and t.token.startswith("1:")
        assert tracker.queued_with("s1") == others[3:]
    finally:
        tracker.close()
        proxy.down()


def test_the_batch_a_message_gathers_counts_images_and_a_refused_claim_gathers_none(tracker):
    pairs = create(tracker, n=4, images=2)
    claim, claimed = tracker.claim_and_gather(pairs[0], "w", lease=30, max_images=4)
    assert claim.ok and [rec.id for rec, _ in claimed] == pairs[:2]  # 2 jobs of 2 images
    again, none = tracker.claim_and_gather(pairs[0], "w2", lease=30, max_images=4)
    assert again.status == "illegal" and again.state == JobState.RUNNING and none == []
    assert tracker.queued_with("s1") == pairs[2:]  # a refused claim gathers nothing
    alone = create(tracker, signature=None)[0]
    claim, claimed = tracker.claim_and_gather(alone, "w", lease=30, max_images=8)
    assert claim.ok and [rec.id for rec, _ in claimed] == [alone]
    with pytest.raises(JobNotFound):
        tracker.claim_and_gather(new_job_id(), "w", lease=30, max_images=8)


def test_racing_claims_run_every_job_exactly_once(tracker):
    ids = create(tracker, n=40)
    won: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def batcher(i):
        barrier.wait()
        while got := tracker.claim_batch("s1", f"b{i}", 30, 3):
            with lock:
                won.extend(rec.id for rec, _ in got)

    def messages(order):
        barrier.wait()
        for job_id in order:
            if tracker.claim(job_id, "m", 30).ok:
                with lock:
                    won.append(job_id)

    threads = [threading.Thread(target=batcher, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=messages, args=(o,)) for o in (ids, ids[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == sorted(ids)
    assert all(rec.attempt == 1 for rec in tracker.get_many(ids))


# --------------------------------------------------------------------------- through a worker


@pytest.fixture(scope="module")
def farm(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    settings = FarmSettings(
        redis_url=redis_server.url,
        storage=(tmp / "store").as_uri(),
        home=tmp,
        key_prefix=f"batch{uuid.uuid4().hex[:8]}:",
        max_batch=4,
    )
    with (
        LocalFarm(settings, workers=1, threads=1, preload=["tiny", "tiny-inpaint"]) as lf,
        Farm(lf.settings) as f,
    ):
        yield f
    for log in (tmp / "logs").glob("*.log"):
        print(log.read_text()[-3000:])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    paths = []
    for i in range(4):  # an odd size: rendered at 40x32, returned at 43x35
        image = Image.new("RGB", (43, 35), (60 * i, 90, 200 - 40 * i))
        ImageDraw.Draw(image).ellipse((5, 5, 30, 30), fill=(200, 30 * i, 50))
        mask = Image.new("L", (43, 35), 0)
        ImageDraw.Draw(mask).rectangle((4 * i, 4, 4 * i + 20, 24), fill=255)
        image.save(folder / f"{i}.png")
        mask.save(folder / f"{i}.mask.png")
        paths.append((str(folder / f"{i}.png"), str(folder / f"{i}.mask.png")))
    return paths


def behind_a_busy_worker(farm: Farm, specs: list) -> list[str]:
    """Submit `specs` while the worker is busy on a long job, then cancel that job: the
    worker then meets them all queued at once."""
    blocker = farm.submit(Txt2Img(model="tiny", prompt="wait", num_inference_steps=500))
    deadline = time.monotonic() + 60
    while blocker.status().progress.step < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ids = [h.id for h in farm.submit_many(specs)]
    blocker.cancel()
    return ids


def meta_of(farm: Farm, job_id: str) -> dict:
    return json.loads(open_store(farm.settings).get(f"jobs/{job_id}/meta.json"))


def test_compatible_jobs_run_in_batches_each_exactly_once(farm, sources):
    def job(i, steps):
        image, mask = sources[i % 4]
        return Inpaint(
            model="tiny-inpaint",
            prompt=f"a cat, take {i}",
            image=image,
            mask_image=mask,
            seed=i,
            num_inference_steps=steps,
            preserve_unmasked=True,
        )

    specs = [job(i, 2) for i in range(8)]
    specs[3:3] = [job(100, 3)]  # incompatible (3 steps), queued among the others
    specs.append(job(101, 3))
    ids = behind_a_busy_worker(farm, specs)
    compatible = {ids[i] for i in range(10) if specs[i].num_inference_steps == 2}

    records = farm.wait(ids, timeout=120)
    # One worker takes messages in order: once a later job is done, every earlier message
    # (the batched jobs' own among them) was seen.
    farm.submit(Txt2Img(model="tiny", prompt="y", num_inference_steps=1)).wait(timeout=60)

    assert all(r.state == JobState.SUCCEEDED for r in records), [r.error for r in records]
    for rec in farm.tracker.get_many(ids):
        meta = meta_of(farm, rec.id)
        assert rec.attempt == meta["attempt"] == 1
        batch = set(meta["batch"]["jobs"])
        assert rec.id in batch and meta["batch"]["size"] == len(batch)
        group = compatible if rec.id in compatible else set(ids) - compatible
        assert batch <= group  # never batched with a job of another signature
        assert len(batch) > 1
        assert meta["outputs"] == rec.outputs
        if rec.id in compatible:  # preserve_unmasked, through storage: the source, exactly
            spec = specs[ids.index(rec.id)]
            source, mask = (np.asarray(Image.open(p)) for p in (spec.image, spec.mask_image))
            out = np.asarray(Image.open(io.BytesIO(farm.store.get_uri(rec.outputs[0]))))
            assert out.shape == source.shape == (35, 43, 3)
            assert np.array_equal(out[mask == 0], source[mask == 0])
    sizes = sorted({len(meta_of(farm, i)["batch"]["jobs"]) for i in compatible})
    assert max(sizes) == 4  # FARM_MAX_BATCH


def test_a_cancel_in_a_batch_ends_that_job_alone(farm):
    specs = [
        Txt2Img(
            model="tiny", prompt=f"take {i}", seed=i, num_inference_steps=150, height=32, width=32
        )
        for i in range(3)
    ]
    ids = behind_a_busy_worker(farm, specs)
    deadline = time.monotonic() + 60
    while not all(step >= 1 for _, step, _ in farm.tracker.states(ids)):  # progress for each
        assert time.monotonic() < deadline
        time.sleep(0.02)

    assert farm.cancel(ids[1]) == JobState.RUNNING
    records = farm.wait(ids, timeout=120)

    assert [r.state for r in records] == [
        JobState.SUCCEEDED,
        JobState.CANCELLED,
        JobState.SUCCEEDED,
    ]
    assert not records[1].outputs and not open_store(farm.settings).list(f"jobs/{ids[1]}/")
    for rec in (records[0], records[2]):
        assert meta_of(farm, rec.id)["batch"]["jobs"] == ids
        assert rec.progress.step == rec.progress.total == 150 and rec.attempt == 1
