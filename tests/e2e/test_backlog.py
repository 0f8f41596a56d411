"""A backlog of 100,000 queued jobs behind one slow worker, through many reconciler passes:
the queue holds about one message per queued job, and no job loses its message."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from farm import Batch, Farm, submit_batch
from farm.local.embedded import RedisServer
from farm.local.launcher import Child, Supervisor, worker_command
from farm.settings import FarmSettings, settings_env
from farm.state.reconciler import reconcile
from tests.support.raw import raw

ROWS, VARIATIONS = 1000, 100
JOBS = ROWS * VARIATIONS
REQUEUE_AFTER = 2.0


def broker_messages(farm: Farm) -> dict[str, int]:
    """Job id → its messages in the broker: the render lists and the unacknowledged hash."""
    r = raw(farm)
    found: dict[str, int] = {}
    payloads = [
        m for k in r.keys(f"{farm.settings.key_prefix}celery:render*") for m in r.lrange(k, 0, -1)
    ]
    payloads += list(r.hvals(farm.tracker.keys.broker_unacked))
    for m in payloads:
        job_id = m.split('"argsrepr": "[\'', 1)[1].split("'", 1)[0]
        found[job_id] = found.get(job_id, 0) + 1
    return found


@pytest.mark.slow
def test_a_backlog_behind_a_slow_worker_keeps_one_message_per_job(tmp_path):
    with RedisServer(tmp_path / "redis", appendonly=False) as rs:
        settings = FarmSettings(
            redis_url=rs.url,
            storage=(tmp_path / "store").as_uri(),
            home=tmp_path,
            key_prefix=f"b{uuid.uuid4().hex[:6]}:",
            lease_seconds=5.0,
            reconcile_interval=0.5,
            requeue_after=REQUEUE_AFTER,
        )
        manifest = tmp_path / "rows.jsonl"
        manifest.write_text(
            "".join(json.dumps({"prompt": f"a fox, {i}"}) + "\n" for i in range(ROWS))
        )
        name = "slow@test"
        child = Child(
            name, worker_command("cpu", 1, name=name, preload=["tiny"]), {}, tmp_path / "w.log"
        )
        sup = Supervisor([child], settings_env(settings), restart=False)
        sup.start()
        try:
            with Farm(settings) as farm:
                # 1. The backlog, written as `farm batch submit` writes it.
                defaults = {"model": "tiny", "num_inference_steps": 40, "height": 32, "width": 32}
                result = submit_batch(
                    farm, manifest, "backlog", variations=VARIATIONS, defaults=defaults
                )
                assert result.new == JOBS
                written = time.time()
                # 2. Many reconciler passes (the worker's, every 0.5 s), each job overdue
                #    (unseen for 2 s) every few of them: each such pass audits the broker.
                epoch = int(raw(farm).get(farm.tracker.keys.reconciler_epoch) or 0)
                time.sleep(6 * REQUEUE_AFTER)
                passes = int(raw(farm).get(farm.tracker.keys.reconciler_epoch) or 0) - epoch
                queued = farm.tracker.counts()["queued"]
                audited = float(raw(farm).get(farm.tracker.keys.reconciler_audited) or 0)
                assert passes >= 3 and audited > written + 2 * REQUEUE_AFTER, passes  # audits ran
                assert 0 < queued < JOBS  # the worker works through the backlog, slowly
                total = sum(broker_messages(farm).values())
                assert total <= 1.05 * queued, (total, queued)
        finally:
            sup.stop()  # SIGTERM: its job in hand is handed back, with a message
        with Farm(settings) as farm:
            # 3. Lost none: every job succeeded or is queued with a message.
            status = Batch(farm, "backlog").status()
            assert set(status.counts) <= {"queued", "succeeded"}, status.counts
            assert sum(status.counts.values()) == JOBS
            queued_ids = set(raw(farm).zrange(farm.tracker.keys.queued, 0, -1))
            assert len(queued_ids) == status.counts["queued"]
            found = broker_messages(farm)
            assert queued_ids <= set(found)
            # 4. A message deleted by hand is sent again, once.
            victim = sorted(queued_ids)[len(queued_ids) // 2]
            r = raw(farm)
            for key in r.keys(f"{settings.key_prefix}celery:render*"):
                for m in r.lrange(key, 0, -1):
                    if f"['{victim}']" in m:
                        r.lrem(key, 1, m)
            assert broker_messages(farm).get(victim) is None
            now = time.time() + REQUEUE_AFTER + 1
            report = reconcile(farm.tracker, farm.celery, requeue_after=REQUEUE_AFTER, now=now)
            assert (
                report.requeued == [victim]
                and report.audited == sum(found.values()) - found[victim]
            )
            later = reconcile(farm.tracker, farm.celery, requeue_after=REQUEUE_AFTER, now=now + 3)
            assert later.requeued == []
            assert broker_messages(farm)[victim] == 1
