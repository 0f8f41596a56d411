"""`enqueue` publishes Celery's own messages, built once per call and set per job."""

from __future__ import annotations

import base64
import json

import redis

from farm.keys import RedisKeys
from farm.queue.app import RUN_TASK, celery_priority, enqueue, make_celery
from farm.settings import FarmSettings


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
        own = app.amqp.as_task_v2(
            task_id,
            RUN_TASK,
            args=[job_id],
            argsrepr=repr([job_id]),
            kwargsrepr="{}",
            origin=message["headers"]["origin"],
            ignore_result=True,
        )
        assert message["headers"] == own.headers
        assert json.loads(base64.b64decode(message["body"])) == json.loads(json.dumps(own.body))
        assert message["properties"]["correlation_id"] == task_id
        assert message["properties"]["reply_to"] == own.properties["reply_to"]
        assert message["properties"]["priority"] == celery_priority(0)
