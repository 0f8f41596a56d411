"""`enqueue` publishes Celery's own messages, built once per call and set per job."""

from __future__ import annotations

import base64
import json
import re
import uuid

import pytest
import redis
from celery.utils.nodenames import anon_nodename

from farm.keys import RedisKeys
from farm.queue.app import PUBLISH_BATCH, RUN_TASK, celery_priority, enqueue, make_celery
from farm.settings import FarmSettings


def celery_task(app, task_id, job_id, origin):
    """What Celery's `send_task` builds for the farm's one task on job `job_id`."""
    return app.amqp.as_task_v2(
        task_id,
        RUN_TASK,
        args=[job_id],
        argsrepr=repr([job_id]),
        kwargsrepr="{}",
        origin=origin,
        ignore_result=True,
    )


def test_each_message_is_the_one_celery_builds_for_its_job(redis_url, tmp_path):
    settings = FarmSettings(redis_url=redis_url, storage=tmp_path.as_uri(), key_prefix="enq:")
    app = make_celery(settings)
    keys = RedisKeys(settings.key_prefix)
    try:
        assert enqueue(app, [("job-a", "render", 0), ("job-b", "render", 0)]) == 2
    finally:
        app.close()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    listed = client.lrange(keys.broker_queue("render", celery_priority(0)), 0, -1)
    pushed = [json.loads(m) for m in reversed(listed)]  # LPUSHed: the first sent is last
    client.close()
    assert [m["headers"]["argsrepr"] for m in pushed] == ["['job-a']", "['job-b']"]
    ids = [m["headers"]["id"] for m in pushed]
    assert len(set(ids)) == 2
    for job_id, task_id, message in zip(["job-a", "job-b"], ids, pushed, strict=True):
        own = celery_task(app, task_id, job_id, message["headers"]["origin"])
        assert message["headers"] == own.headers
        assert json.loads(base64.b64decode(message["body"])) == json.loads(json.dumps(own.body))
        assert message["properties"]["correlation_id"] == task_id
        assert message["properties"]["reply_to"] == own.properties["reply_to"]
        assert message["properties"]["priority"] == celery_priority(0)


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def kombu_publish(app, jobs):
    """The reference: each message through kombu's own `Producer.publish`, as Celery's
    `send_task` hands it over (the body and headers from `as_task_v2` for that job)."""
    with app.producer_or_acquire() as producer:
        for job_id, queue, priority in jobs:
            producer.maybe_declare(app.amqp.queues[queue])
            task_id = str(uuid.uuid4())
            task = celery_task(app, task_id, job_id, anon_nodename())
            producer.publish(
                task.body,
                routing_key=queue,
                exchange="",
                serializer="json",
                headers=task.headers,
                priority=celery_priority(priority),
                delivery_mode=2,
                retry=False,
                **task.properties,
            )


def numbered(text):
    """`text` with each distinct uuid replaced by its number, in order of appearance."""
    seen: dict[str, str] = {}
    return UUID.sub(lambda m: seen.setdefault(m[0], f"<{len(seen)}>"), text)


def broker_lists(redis_url, prefix):
    """Every broker list under `prefix`: its messages, each uuid numbered in order of
    appearance (task ids and delivery tags are random), and each body decoded. (The queues'
    binding sets are left out: both sides declare through kombu's own `maybe_declare`, whose
    cache of what is declared is process-wide, so which side writes them depends on the tests
    that ran before.)"""
    client = redis.Redis.from_url(redis_url)
    out = {}
    try:
        for key in client.keys(f"{prefix}*"):
            if client.type(key) != b"list":
                continue
            out[key.decode()[len(prefix) :]] = [
                (numbered(raw.decode()), base64.b64decode(json.loads(raw)["body"]))
                for raw in client.lrange(key, 0, -1)
            ]
    finally:
        client.close()
    return out


@pytest.mark.parametrize("job_id", ["0123abcd" * 4, "a-b_c.d", "qu\"o\\te'd é"])
def test_every_message_and_list_is_what_kombu_publish_writes(redis_url, tmp_path, job_id):
    """Byte for byte, after numbering the random ids: the same lists (queue and priority
    step under Celery's key prefix), order, envelopes and bodies."""
    jobs = [
        (job_id, "render", 0),
        ("second", "render", 0),
        (job_id + "2", "render", 5),
        ("third", "model.tiny-sd", 9),
        ("fourth", "render", 3),
    ]
    contents = {}
    for side, send in [("kombu", kombu_publish), ("farm", enqueue)]:
        settings = FarmSettings(
            redis_url=redis_url, storage=tmp_path.as_uri(), key_prefix=f"{side}:"
        )
        app = make_celery(settings)
        try:
            send(app, jobs)
        finally:
            app.close()
        contents[side] = broker_lists(redis_url, f"{side}:celery:")
    assert contents["farm"] == contents["kombu"]
    assert sum(map(len, contents["farm"].values())) == len(jobs)


def test_a_large_enqueue_keeps_the_order_sent(redis_url, tmp_path):
    """Past one LPUSH's worth (`PUBLISH_BATCH`), the workers still take them in order."""
    settings = FarmSettings(redis_url=redis_url, storage=tmp_path.as_uri(), key_prefix="big:")
    app = make_celery(settings)
    ids = [f"job{i:05d}" for i in range(PUBLISH_BATCH * 2 + 7)]
    try:
        assert enqueue(app, [(i, "render", 0) for i in ids]) == len(ids)
    finally:
        app.close()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        listed = client.lrange(RedisKeys("big:").broker_queue("render", celery_priority(0)), 0, -1)
    finally:
        client.close()
    messages = [json.loads(m) for m in reversed(listed)]  # BRPOP's order
    assert [m["headers"]["argsrepr"] for m in messages] == [repr([i]) for i in ids]
    drawn = [m["headers"]["id"] for m in messages] + [
        m["properties"]["delivery_tag"] for m in messages
    ]
    assert len(set(drawn)) == len(drawn)  # every task id and delivery tag its own
    assert {uuid.UUID(u).version for u in drawn} == {4} and all(
        str(uuid.UUID(u)) == u for u in drawn
    )
