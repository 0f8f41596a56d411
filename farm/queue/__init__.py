"""The queue: Celery's app, queue names and routing, and what workers tell of themselves.

app.py       the Celery app (Redis broker, JSON only, late acks) and `enqueue`
routing.py   queue names, model affinity queues, `Router` (which queue a job goes to)
flower.py    the farm's Celery app for Celery's own tools: `celery -A farm.queue.flower flower`

May import: `farm.errors`, `farm.settings`, `farm.keys`, `farm.jobs`, celery, kombu.
"""
