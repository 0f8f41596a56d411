"""The state table applied in Redis: atomic, table-checked, fenced by attempt tokens."""

import itertools
import json
import threading
import time

import pytest
import redis

from farm.errors import StaleAttempt
from farm.jobs.state import TRANSITIONS, JobState
from farm.state.tracker import Tracker, new_job_id
from tests.support.raw import raw


@pytest.fixture
def tracker(redis_url):
    t = Tracker.from_url(redis_url, prefix=f"t{time.monotonic_ns()}:")
    yield t
    t.close()


def make_job(tracker, state=JobState.QUEUED):
    job_id = new_job_id()
    assert tracker.create(
        [
            {
                "id": job_id,
                "kind": "txt2img",
                "state": "waiting" if state == JobState.WAITING else "queued",
                "spec": {},
                "created_at": time.time(),
            }
        ]
    ) == [True]
    if state not in (JobState.QUEUED, JobState.WAITING):
        claim = tracker.claim(job_id, "w", 30)
        if state != JobState.RUNNING:
            tracker.finish(job_id, claim.token, state)
    return job_id


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(JobState, JobState)))
def test_every_transition_follows_the_table(tracker, src, dst):
    job_id = make_job(tracker, src)
    t = tracker.transition(job_id, dst)
    expected = dst in TRANSITIONS[src]
    assert t.ok == expected, (src, dst, t)
    assert tracker.get(job_id).state == (dst if expected else src)


def test_terminal_records_expire(tracker):
    job_id = make_job(tracker, JobState.SUCCEEDED)
    assert 0 < raw(tracker).ttl(tracker.keys.job(job_id)) <= tracker.record_ttl
    assert raw(tracker).ttl(tracker.keys.job(make_job(tracker))) == -1


def test_stale_attempt_cannot_overwrite(tracker):
    job_id = make_job(tracker)
    first = tracker.claim(job_id, "w1", lease=0.2)
    assert not tracker.claim(job_id, "w2", lease=5).ok  # the lease is live: no second run
    time.sleep(0.3)
    second = tracker.claim(job_id, "w2", lease=5)  # lease ran out: taken over
    assert second.ok and second.attempt == 2 and second.token != first.token
    with pytest.raises(StaleAttempt):
        tracker.finish(job_id, first.token, JobState.SUCCEEDED, outputs=["stale"])
    with pytest.raises(StaleAttempt):
        tracker.heartbeat(job_id, first.token, 5, 1, 2)
    tracker.finish(job_id, second.token, JobState.SUCCEEDED, outputs=["fresh"])
    rec = tracker.get(job_id)
    assert (rec.state, rec.outputs, rec.worker, rec.attempt) == (
        JobState.SUCCEEDED,
        ["fresh"],
        "w2",
        2,
    )


def test_concurrent_claims_one_wins(tracker):
    job_id = make_job(tracker)
    results = []
    barrier = threading.Barrier(8)

    def claim(i):
        barrier.wait()
        results.append(tracker.claim(job_id, f"w{i}", 30).ok)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_cancel_queued_and_running(tracker):
    queued = make_job(tracker)
    assert tracker.request_cancel(queued) == JobState.CANCELLED
    running = make_job(tracker, JobState.RUNNING)
    assert tracker.request_cancel(running) == JobState.RUNNING
    assert tracker.get(running).cancel_requested


def test_heartbeat_reports_cancel_and_progress(tracker):
    job_id = make_job(tracker)
    claim = tracker.claim(job_id, "w", 30)
    assert tracker.heartbeat(job_id, claim.token, 30, 3, 10) is False
    assert tracker.get(job_id).progress.step == 3
    tracker.request_cancel(job_id)
    assert tracker.heartbeat(job_id, claim.token, 30, 4, 10) is True


def test_same_key_same_job(tracker):
    assert new_job_id("a") == new_job_id("a") != new_job_id("b")
    job_id = new_job_id("a")
    rec = {"id": job_id, "kind": "txt2img", "state": "queued", "spec": {}, "created_at": 1.0}
    assert tracker.create([rec, rec]) == [True, False]


def test_events_stream_wakes_waiters(tracker):
    cursor = tracker.last_event_id()
    make_job(tracker)
    assert tracker.wait_event(cursor, 1.0) != cursor


def test_create_stores_each_field_as_redis_py_would_across_chunks(tracker):
    """Records go to Redis in chunks, one script call each: every field holds what an HSET
    of the record's values stores (JSON for lists and dicts, `repr` for numbers, text as
    UTF-8), a record whose id exists is left alone in whichever chunk it comes, and the
    counters count each created job once."""
    from farm.state.tracker import CREATE_CHUNK

    created_at = time.time()
    recs = [
        {
            "id": new_job_id(),
            "kind": "txt2img",
            "state": "queued",
            "spec": {"prompt": f"un renard rôti 🦊 {i}", "seed": 2**63 - 1},
            "priority": i % 10,
            "created_at": created_at,
            "attempt": 0,
            "depends_on": None,
            "images": 2 if i % 2 else None,
        }
        for i in range(CREATE_CHUNK + 7)
    ]
    again = recs[3]
    assert tracker.create([*recs, again]) == [True] * len(recs) + [False]
    assert tracker.create([again]) == [False]
    rec = recs[-2]  # in the second chunk
    stored = raw(tracker).hgetall(tracker.keys.job(rec["id"]))
    assert stored["spec"] == json.dumps(rec["spec"])
    assert json.loads(stored["spec"])["prompt"] == rec["spec"]["prompt"]
    assert (stored["priority"], stored["created_at"]) == (str(rec["priority"]), repr(created_at))
    assert "depends_on" not in stored and stored["images"] == "2"
    assert raw(tracker).zscore(tracker.keys.jobs, rec["id"]) == created_at
    assert tracker.counts()[JobState.QUEUED] == len(recs)


def test_create_after_redis_forgot_its_scripts(tracker):
    """A Redis restarted or SCRIPT FLUSHed knows no script: create loads its own again and
    writes the records once, its tenant index entries included."""
    raw(tracker).script_flush()
    rec = {"id": new_job_id(), "kind": "txt2img", "state": "queued", "spec": {}, "tenant": "t"}
    assert tracker.create([rec | {"created_at": repr(time.time())}]) == [True]
    assert tracker.get(rec["id"]).state == JobState.QUEUED
    assert raw(tracker).zcard(tracker.keys.tenant_open("t")) == 1


def test_a_tenants_create_is_one_round_trip_and_survives_a_dropped_connection(redis_url):
    """The HTTP API's submit: the tenant's index entries, the records and the pruning go out
    on one connection in one round trip (streamed, not a pipeline); a pooled connection that
    Redis dropped meanwhile is reconnected and the records written once."""
    from tests.support.tcp_proxy import TcpProxy

    proxy = TcpProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0])).up()
    tracker = Tracker.from_url(f"redis://127.0.0.1:{proxy.port}", prefix="stream:")
    try:

        def rec(tenant="acme"):
            return {"id": new_job_id(), "kind": "txt2img", "state": "queued", "spec": {},
                    "tenant": tenant, "created_at": repr(time.time())}  # fmt: skip

        tracker.create([rec()])  # the script loaded, a connection pooled
        before = proxy.requests
        first = rec()
        assert tracker.create([first]) == [True]
        assert proxy.requests - before == 1
        assert raw(tracker).zcard(tracker.keys.tenant_open("acme")) == 2

        pooled = raw(tracker).client_id()  # the tracker's one pooled connection
        killer = redis.Redis.from_url(redis_url)
        assert killer.client_kill_filter(_id=pooled) == 1
        killer.close()
        many = [rec("other") for _ in range(600)]  # three script calls
        assert tracker.create([first, *many]) == [False] + [True] * 600
        assert raw(tracker).zcard(tracker.keys.tenant_open("other")) == 600
        assert tracker.counts()[JobState.QUEUED] == 602
    finally:
        tracker.close()
        proxy.down()


def test_a_tenants_job_index_drops_jobs_whose_records_expired(redis_url):
    """The index `GET /v1/jobs` lists from holds what is still stored, not every job the tenant
    ever submitted: a write drops the old entries whose records have expired, keeps old jobs
    that are still there, and leaves other tenants' indexes alone."""
    tracker = Tracker.from_url(redis_url, prefix=f"p{time.monotonic_ns()}:", record_ttl=60)
    long_ago = time.time() - 3600

    def write(tenant, created_at):
        job_id = new_job_id()
        rec = {"id": job_id, "kind": "txt2img", "state": "queued", "spec": {}}
        tracker.create([{**rec, "created_at": created_at, "tenant": tenant}])
        return job_id

    expired = [write("acme", long_ago + i) for i in range(3)]
    still_queued = write("acme", long_ago + 10)
    other = write("zeta", long_ago)
    r = raw(tracker)
    r.delete(*(tracker.keys.job(i) for i in [*expired, other]))  # as their TTL would

    new = write("acme", time.time())
    assert set(r.zrange(tracker.keys.tenant_jobs("acme"), 0, -1)) == {still_queued, new}
    assert r.zrange(tracker.keys.tenant_jobs("zeta"), 0, -1) == [other]  # not written since
    tracker.close()
