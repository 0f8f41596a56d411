"""How a held job ends: one classifier by error type, and a hand-back whose backoff is
scheduled in Redis (sent by the reconciler), never slept away on the worker's thread."""

from __future__ import annotations

import time
import uuid

import pytest

from farm import Farm, JobState, Txt2Img
from farm.errors import InvalidJob, StaleAttempt, TransientError
from farm.queue.routing import RENDER_QUEUE
from farm.settings import FarmSettings
from farm.state.reconciler import reconcile
from workers.outcomes import Outcome, hand_back, settle
from workers.runtime import Held, Runtime


@pytest.fixture
def rt(redis_url, tmp_path):
    settings = FarmSettings(
        redis_url=redis_url,
        storage=(tmp_path / "store").as_uri(),
        home=tmp_path,
        key_prefix=f"o{uuid.uuid4().hex[:6]}:",
        max_deliveries=5,
    )
    rt = Runtime(settings, "cpu", threads=1, name="outcomes@test")
    yield rt
    rt.cancels.stop()


def held(rt) -> Held:
    with Farm(rt.settings) as farm:
        job = farm.submit(Txt2Img(model="tiny", prompt="a fox", seed=1))
    claim = rt.tracker.claim(job.id, rt.name, 30)
    return Held(rt.tracker.get(job.id), claim.token, claim.attempt)


def messages(rt) -> int:
    return rt.tracker.queue_depths([RENDER_QUEUE])[RENDER_QUEUE]


def test_errors_decide_by_their_type(rt):
    cases = [
        (InvalidJob("image: not a PNG"), Outcome.FAILED, "image: not a PNG"),
        (RuntimeError("boom"), Outcome.FAILED, "RuntimeError: boom"),
        (TransientError("storage unavailable"), Outcome.HANDED_BACK, "storage unavailable"),
    ]
    for error, outcome, recorded in cases:
        job = held(rt)
        assert settle(rt, job, error) == outcome
        assert rt.tracker.get(job.id).error == recorded
    job = held(rt)
    assert settle(rt, job, StaleAttempt("taken over")) == Outcome.STALE
    assert rt.tracker.get(job.id).state == JobState.RUNNING  # nothing recorded by this attempt


def test_a_transient_failure_schedules_its_retry_instead_of_sleeping(rt):
    job = held(rt)
    before = messages(rt)  # the job's own first message
    job.attempt = 4  # a backoff of 0.5 s × 2^4 = 8 s
    assert hand_back(rt, job, "storage unavailable") == Outcome.HANDED_BACK
    # The worker is free at once: the job is queued, its message not sent yet but scheduled.
    rec = rt.tracker.get(job.id)
    assert rec.state == JobState.QUEUED and rec.error == "storage unavailable"
    assert messages(rt) == before
    now = time.time()
    assert reconcile(rt.tracker, rt.celery, requeue_after=600, now=now).retried == []
    assert messages(rt) == before
    # Once the backoff has run out, the reconciler sends it, once.
    report = reconcile(rt.tracker, rt.celery, requeue_after=600, now=now + 9)
    assert report.retried == [job.id] and messages(rt) == before + 1
    assert reconcile(rt.tracker, rt.celery, requeue_after=600, now=now + 20).retried == []


def test_a_shutdown_hands_back_at_once_and_gives_up_only_on_counted_attempts(rt):
    job = held(rt)
    before = messages(rt)
    assert hand_back(rt, job, "worker shut down", backoff=False, counted=False) == "queued"
    assert messages(rt) == before + 1  # sent now: the next worker may start at once
    job = held(rt)
    job.attempt = 5  # max_deliveries
    assert hand_back(rt, job, "storage unavailable") == Outcome.FAILED
    assert rt.tracker.get(job.id).error == "gave up after 5 attempts: storage unavailable"
