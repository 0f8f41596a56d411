"""The Celery app: Redis broker, JSON only, at-least-once delivery with late acks.

Messages carry job ids, never specs or pixels: the job record in Redis is the single source
of truth, so a duplicate or stale message finds the job already claimed or done and is a no-op.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
from collections.abc import Iterable
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename

from farm.keys import PRIORITY_STEPS
from farm.queue.routing import RENDER_QUEUE
from farm.settings import FarmSettings

__all__ = ["PRIORITY_STEPS", "RUN_TASK", "enqueue", "make_celery"]

RUN_TASK = "farm.run"
"""The one task: run the job whose id is the message's only argument."""


PUBLISH_BATCH = 1000
"""Messages buffered per Redis pipeline when enqueueing."""


def celery_priority(priority: int) -> int:
    """Farm priority (0..9, higher runs sooner) → kombu's Redis priority (0 runs first)."""
    return 9 - priority


def make_celery(settings: FarmSettings, broker_url: str | None = None) -> Celery:
    """A Celery app for this farm. Clients only send; workers register the task on it."""
    app = Celery("farm", broker=broker_url or settings.redis_url, set_as_current=False)
    transport = {
        # Longer than the longest render: a message unacked this long is redelivered.
        "visibility_timeout": settings.visibility_timeout,
        "priority_steps": PRIORITY_STEPS,
        "queue_order_strategy": "priority",
        "global_keyprefix": f"{settings.key_prefix}celery:",
        "health_check_interval": 10,
    }
    url = broker_url or settings.redis_url or ""
    if url.startswith("rediss://"):  # TLS: always verify the server
        app.conf.broker_use_ssl = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": str(settings.redis_ca_file) if settings.redis_ca_file else None,
        }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        broker_pool_limit=4,
        task_default_queue=RENDER_QUEUE,
        task_default_priority=celery_priority(0),
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_heartbeat=0,
        # Flower: task events from workers (a few PUBLISHes per job). `enqueue` bypasses
        # send_task, so the sent event is only there for `send_task` callers.
        worker_send_task_events=settings.events,
        task_send_sent_event=settings.events,
    )
    return app


def enqueue(app: Celery, jobs: Iterable[tuple[str, str, int]]) -> int:
    """Send one message per (job id, queue, priority) over one pooled connection.

    The messages are Celery's own (`app.amqp.as_task_v2`, exactly what `send_task` builds) in
    kombu's own Redis envelope, but serialized by hand: `send_task` costs ~300 µs a message
    (routing, a queue declaration and a Redis round trip each) and kombu's `publish` ~40 µs (a
    message built, serialized twice and routed, an LPUSH each); this ~5 µs, one LPUSH of up to
    `PUBLISH_BATCH` messages per list. What kombu decides is still kombu's: the queue is
    declared by the producer (`maybe_declare`: its binding) and the list named by the channel
    (`_q_for_pri`: the priority step; its client adds the `global_keyprefix`).

    `as_task_v2` runs once per call and the envelope is serialized once per (queue, priority),
    with placeholders: messages differ only in their task id (headers `id`, and `root_id`
    where Celery made it the task's own; properties `correlation_id`), their argument
    (`argsrepr`, the body) and kombu's delivery tag, each spliced into that text. A job id that
    is not a plain token (letters, digits, `.`, `_`, `-`: every id the farm makes) has its
    message serialized in full. tests/queue/test_enqueue.py checks every message against the
    one kombu's own `publish` writes.
    """
    template = app.amqp.as_task_v2(
        _TASK,
        RUN_TASK,
        args=[_JOB],
        argsrepr=repr([_JOB]),
        kwargsrepr="{}",
        origin=anon_nodename(),
        ignore_result=True,
    )
    lists: dict[tuple[str, int], _List] = {}
    sent = 0
    with app.producer_or_acquire() as producer:
        channel = producer.channel
        pipe = channel.client.pipeline(transaction=False)
        for job_id, queue, priority in jobs:
            target = lists.get((queue, priority))
            if target is None:
                producer.maybe_declare(app.amqp.queues[queue])
                pri = celery_priority(priority)
                key = channel._q_for_pri(queue, pri)  # the list for pri's priority step
                target = lists[(queue, priority)] = _List(template, queue, pri, key)
            target.add(job_id)
            sent += 1
            if sent % PUBLISH_BATCH == 0:
                _flush(pipe, lists.values())
        _flush(pipe, lists.values())
    return sent


_TASK, _JOB, _TAG, _BODY = "@@task-id@@", "@@job-id@@", "@@delivery-tag@@", "@@body@@"
_PLAIN = re.compile(r"[\w.-]+", re.ASCII).fullmatch


class _List:
    """One broker list's messages (a queue at a priority): kombu's envelope serialized once
    with placeholders, each message spliced from it."""

    def __init__(self, template: Any, queue: str, priority: int, key: str) -> None:
        self.template, self.queue, self.priority, self.key = template, queue, priority, key
        self.own_root = template.headers["root_id"] == _TASK  # no task around: its own root
        body = json.dumps(list(template.body))  # kombu's JSON: the default separators
        self.body = body.split(_JOB)
        text = json.dumps(self.message(_TASK, _JOB, _TAG, _BODY))
        self.parts = re.split(f"({_TASK}|{_JOB}|{_TAG}|{_BODY})", text)
        self.pending: list[str] = []

    def message(self, task_id: str, job_id: str, tag: str, body: str) -> dict[str, Any]:
        """kombu's Redis envelope of Celery's message (what `Producer.publish` LPUSHes)."""
        headers = {**self.template.headers, "id": task_id, "argsrepr": repr([job_id])}
        if self.own_root:
            headers["root_id"] = task_id
        return {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **self.template.properties,
                "correlation_id": task_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue},
                "priority": self.priority,
                "body_encoding": "base64",
                "delivery_tag": tag,
            },
        }

    def add(self, job_id: str) -> None:
        task_id, tag = _uuid4(), _uuid4()
        if _PLAIN(job_id):  # nothing to escape: spliced into the serialized envelope
            body = base64.b64encode(job_id.join(self.body).encode()).decode()
            fill = {_TASK: task_id, _JOB: job_id, _TAG: tag, _BODY: body}
            text = "".join([fill.get(part, part) for part in self.parts])
        else:  # quotes or escapes to write: the whole message serialized
            args = json.dumps([[job_id], *self.template.body[1:]]).encode()
            text = json.dumps(self.message(task_id, job_id, tag, base64.b64encode(args).decode()))
        self.pending.append(text)


def _uuid4() -> str:
    """`str(uuid.uuid4())`, in half its time (two of them per message)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def _flush(pipe: Any, lists: Iterable[_List]) -> None:
    """LPUSH each list's pending messages, in the order sent (BRPOP takes the first pushed)."""
    for target in lists:
        if target.pending:
            pipe.lpush(target.key, *target.pending)
            target.pending = []
    if len(pipe):
        pipe.execute()
