"""The reconciler re-sends only messages that are really gone, one pass at a time."""

from __future__ import annotations

import threading
import time

import pytest

from farm import Farm, Txt2Img
from farm.errors import FarmError
from farm.settings import FarmSettings
from farm.state.inflight import UNFENCED, LostTurn
from farm.state.reconciler import reconcile, take_turn
from farm.state.tracker import Tracker
from tests.support.raw import raw

N = 200


@pytest.fixture
def farm(redis_url, tmp_path):
    settings = FarmSettings(redis_url=redis_url, storage=(tmp_path / "s").as_uri(), home=tmp_path)
    with Farm(settings) as farm:
        yield farm


def backlog(farm: Farm, n: int = N) -> list[str]:
    """`n` queued jobs with their messages, and no worker."""
    specs = [Txt2Img(model="tiny", prompt="x", seed=i) for i in range(n)]
    return [job.id for job in farm.submit_many(specs)]


def lists(farm: Farm) -> list[str]:
    return [k for k in raw(farm).keys(f"{farm.settings.key_prefix}celery:render*")]


def messages(farm: Farm) -> dict[str, int]:
    """Job id → messages for it waiting in the render lists."""
    out: dict[str, int] = {}
    for key in lists(farm):
        for m in raw(farm).lrange(key, 0, -1):
            job_id = m.split('"argsrepr": "[\'', 1)[1].split("'", 1)[0]
            out[job_id] = out.get(job_id, 0) + 1
    return out


def test_a_backlog_gets_no_more_messages_however_many_passes(farm):
    ids = backlog(farm)
    now = time.time()
    for i in range(3):  # every job overdue: each pass audits the broker, and sends nothing
        report = reconcile(farm.tracker, farm.celery, requeue_after=1, now=now + 10 * (i + 1))
        assert report.requeued == [] and report.audited == N
    assert messages(farm) == dict.fromkeys(ids, 1)
    # A pass with nothing overdue reads nothing of the broker.
    assert reconcile(farm.tracker, farm.celery, requeue_after=600, now=now + 40).audited == 0


def test_a_message_deleted_by_hand_is_resent_once(farm):
    ids = backlog(farm)
    victim = ids[N // 2]
    (key,) = lists(farm)
    (message,) = [m for m in raw(farm).lrange(key, 0, -1) if victim in m]
    assert raw(farm).lrem(key, 1, message) == 1
    now = time.time()
    assert reconcile(farm.tracker, farm.celery, requeue_after=5, now=now).requeued == []
    report = reconcile(farm.tracker, farm.celery, requeue_after=5, now=now + 6)
    assert report.requeued == [victim]
    for later in (12, 18, 24):
        assert reconcile(farm.tracker, farm.celery, requeue_after=5, now=now + later).requeued == []
    assert messages(farm) == dict.fromkeys(ids, 1)


def test_a_message_delivered_and_not_yet_acknowledged_is_not_lost(farm):
    ids = backlog(farm, 3)
    with farm.celery.connection_for_read() as conn:
        fetched = conn.default_channel.basic_get("render", no_ack=False)  # into kombu's unacked
        assert fetched is not None
        assert raw(farm).hlen(farm.tracker.keys.broker_unacked) == 1
        report = reconcile(farm.tracker, farm.celery, requeue_after=1, now=time.time() + 10)
        assert report.requeued == [] and report.audited == 3
        assert sum(messages(farm).values()) == 2 and set(ids) > set(messages(farm))
    assert messages(farm) == dict.fromkeys(ids, 1)  # kombu restores it as the channel closes


def test_one_pass_at_a_time_and_a_stalled_pass_is_fenced_off(farm, redis_url):
    ids = backlog(farm, 5)
    other = Tracker.from_url(redis_url)
    try:
        a = farm.tracker.inflight.take_turn("a", lease=0.2)
        assert a is not None and a.value.startswith("a:")
        assert other.inflight.take_turn("b") is None  # a's pass holds the lock
        assert take_turn(other, farm.celery, "b", interval=1, requeue_after=1) is None
        time.sleep(0.3)  # a stalls past its lease: b takes over
        b = other.inflight.take_turn("b")
        assert b is not None and b.value != a.value
        # Whatever a does next is refused, in the same step as the write it tries.
        with pytest.raises(LostTurn):
            reconcile(farm.tracker, farm.celery, requeue_after=0, now=time.time() + 5, turn=a)
        with pytest.raises(LostTurn):
            next(farm.tracker.inflight.lost(a, time.time() + 5, time.time(), set()))
        with pytest.raises(LostTurn):
            farm.tracker.inflight.audit(a, ["render"])
        assert isinstance(LostTurn("x"), FarmError)
        report = reconcile(other, farm.celery, requeue_after=0, now=time.time() + 5, turn=b)
        assert report.requeued == [] and report.audited == 5
        other.inflight.end_turn(b, keep=0)
        assert take_turn(other, farm.celery, "b", interval=60, requeue_after=600) is not None
        # ...and holds the lock for the rest of its interval: one pass per interval.
        assert take_turn(farm.tracker, farm.celery, "a", interval=60, requeue_after=600) is None
    finally:
        other.close()
    assert messages(farm) == dict.fromkeys(ids, 1)


def test_an_audit_of_a_long_list_misses_nothing_while_workers_pop_and_clients_push(farm):
    # Long enough that the audit reads the newer half from the head and the rest from the
    # tail, in several windows each.
    ids = backlog(farm, 6000)
    (key,) = lists(farm)
    r = raw(farm)
    stop = threading.Event()
    # A message taken whose job is not claimed yet is in no list and still queued: the
    # queued jobs are read when no worker is between the two.
    in_hand = threading.Lock()

    def publish() -> None:  # clients send duplicates at the head
        while not stop.is_set():
            r.lpush(key, r.lindex(key, -1) or "")

    def consume() -> None:  # workers take the oldest, and claim its job
        while not stop.is_set():
            with in_hand:
                m = r.rpop(key)
                if m and "argsrepr" in m:
                    job = m.split('"argsrepr": "[\'', 1)[1].split("'", 1)[0]
                    farm.tracker.claim(job, "w", 30)

    threads = [threading.Thread(target=f) for f in (publish, consume)]
    for t in threads:
        t.start()
    try:
        for i in range(3):
            farm.tracker.inflight.audit(UNFENCED, ["render"])
            seen = raw(farm).smembers(farm.tracker.keys.reconciler_seen)
            with in_hand:
                queued = raw(farm).zrange(farm.tracker.keys.queued, 0, -1)
            # Every job still queued had its message in the list all along: it was seen.
            assert queued and set(queued) <= seen, i
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(queued) < len(ids)  # the workers did take some meanwhile


def test_the_sweep_takes_in_jobs_an_older_client_wrote_without_the_indexes(farm):
    ids = backlog(farm, 3)
    keys = farm.tracker.keys
    r = raw(farm)
    # As an older client leaves them: in the live index only (and one ended meanwhile).
    r.delete(keys.queued, keys.queues)
    r.hset(keys.job(ids[2]), "state", "succeeded")
    report = reconcile(farm.tracker, farm.celery, requeue_after=600)
    assert report.forgotten == 1
    assert set(r.zrange(keys.queued, 0, -1)) == set(ids[:2]) and r.smembers(keys.queues) == {
        "render"
    }
    assert set(r.zrange(keys.jobs, 0, -1)) == set(ids[:2])
