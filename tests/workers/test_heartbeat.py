"""A cancel reaches a running render at its next step, through the cancel channel."""

from __future__ import annotations

import logging
import time

from farm.local.embedded import RedisServer, free_port
from farm.state.tracker import Tracker, new_job_id
from tests.support.raw import raw
from workers.heartbeat import CancelListener, Heartbeat


def test_cancel_stops_the_render_at_its_next_step(redis_url):
    tracker = Tracker.from_url(redis_url, prefix=f"hb{time.monotonic_ns()}:")
    job_id = new_job_id()
    tracker.create(
        [
            {
                "id": job_id,
                "kind": "txt2img",
                "state": "queued",
                "spec": {},
                "created_at": time.time(),
            }
        ]
    )
    claim = tracker.claim(job_id, "w", lease=60)
    listener = CancelListener(tracker)
    listener.start()
    while not raw(tracker).pubsub_numsub(tracker.keys.cancels)[0][1]:
        time.sleep(0.01)  # subscribed
    # A beat so rare it never comes during the test: only the channel can tell the render.
    with Heartbeat(tracker, {job_id: claim.token}, lease=60, interval=3600, cancels=listener) as hb:
        on_step = hb.watch([job_id])
        assert on_step(1, 50) is False
        tracker.request_cancel(job_id)
        deadline = time.monotonic() + 10
        while job_id not in listener.ids:  # the message is in flight, not a step
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert on_step(2, 50) is True  # the very next step stops
        assert job_id in hb.cancelled
        hb.release(job_id)
    assert job_id not in listener.ids
    listener.stop()


def test_a_stopped_listener_ends_quietly_when_its_redis_goes(tmp_path, caplog):
    """A process that outlives its Redis (a test's, at the end of a run) is not told once a
    second that the cancel channel is gone, once its listener is stopped."""
    with RedisServer(tmp_path / "redis", port=free_port(), appendonly=False) as server:
        tracker = Tracker.from_url(server.url, prefix="quiet:")
        listener = CancelListener(tracker)
        listener.start()
        while not raw(tracker).pubsub_numsub(tracker.keys.cancels)[0][1]:
            time.sleep(0.01)
        listener.stop()
        caplog.set_level(logging.WARNING, logger="workers.heartbeat")
    listener.join(timeout=10)
    assert not listener.is_alive()
    assert "cancel listener" not in caplog.text
