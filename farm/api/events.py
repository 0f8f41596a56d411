"""`GET /v1/jobs/{id}/events`: a job's state changes, progress and previews as server-sent events.

    id: 1718000000000-3
    event: state
    data: {"id": "…", "state": "running"}

    event: progress
    data: {"id": "…", "step": 7, "total": 20}

    event: preview
    data: {"id": "…", "step": 10, "total": 20, "png": "data:image/png;base64,…"}

1. Start: without `Last-Event-ID`, one `state` event with the whole record, read with the
   stream's newest id in one MULTI (`Tracker.snapshot`), so what follows is exactly what came
   after it. With `Last-Event-ID` (a browser's `EventSource` sends it by itself on reconnect,
   or `?last_event_id=`), the job's state changes after that id, replayed from the stream.
2. Follow the events stream (`farm:events`); a `state` event carries the stream's id, so a
   client that drops resumes where it was. Progress and previews are the job's current
   values, sent when they change (no id: they are not replayed, the next is newer anyway).
3. End the stream after the job's terminal state (its event carries the whole record).

Each follower holds one of the app's threads while it follows (`FARM_API_THREADS`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from farm.api.auth import Principal, require
from farm.api.errors import ApiError
from farm.api.views import EVENT_ID, job_view, own_job
from farm.jobs.state import JobState

router = APIRouter(tags=["jobs"])

BLOCK = 1.0
"""Seconds one read of the stream waits for an event."""

PROGRESS_EVERY = 0.25
"""Seconds between two looks at a running job's progress."""

KEEPALIVE = 15.0
"""Seconds of silence before a comment line keeps proxies from closing the stream."""

SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def sse(event: str, data: Any, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def follow(ctx: Any, who: Principal, job_id: str, last_id: str | None) -> Iterator[str]:
    """The events of one job (see the module doc); ends after its terminal state."""
    farm = ctx.farm
    tracker = farm.tracker
    # 1. Where to start.
    if last_id is None:
        cursor, rec = tracker.snapshot(job_id)
        yield sse("state", job_view(farm, rec, who.tenant), cursor)
        if rec.state.terminal:
            return
        ended_before = False
    else:
        cursor = last_id
        ended_before = own_job(farm, who, job_id).state.terminal
    # 2. Follow.
    seen: tuple[int, int, int | None] = (-1, -1, None)
    looked = idle = time.monotonic()
    replaying = last_id is not None
    while True:
        entries = tracker.feed.after(cursor, block=None if replaying else BLOCK)
        if replaying and not entries:
            replaying = False
            if ended_before:  # its end was before `Last-Event-ID`: say how it ended, stop
                rec = tracker.get(job_id)
                yield sse("state", job_view(farm, rec, who.tenant))
                return
            continue
        for event_id, fields in entries:
            cursor = event_id
            if fields.get("job") != job_id:
                continue
            state = fields.get("state", "")
            idle = time.monotonic()
            if state in {s.value for s in JobState} and JobState(state).terminal:
                rec = tracker.get(job_id)
                yield sse("state", job_view(farm, rec, who.tenant), event_id)
                return
            yield sse("state", {"id": job_id, "state": state}, event_id)
        now = time.monotonic()
        if now - looked >= PROGRESS_EVERY and not replaying:
            looked = now
            state, step, total, preview_step = tracker.feed.progress(job_id)
            if state is None:
                return  # expired under us
            if (step, total) != seen[:2] and state == JobState.RUNNING:
                idle = now
                yield sse("progress", {"id": job_id, "step": step, "total": total})
            if preview_step is not None and preview_step != seen[2]:
                preview = tracker.feed.preview(job_id)
                if preview is not None:
                    idle = now
                    yield sse(
                        "preview",
                        {
                            "id": job_id,
                            "step": preview["step"],
                            "total": preview["total"],
                            "png": "data:image/png;base64," + preview["png"],
                        },
                    )
            seen = (step, total, preview_step)
        if now - idle >= KEEPALIVE:
            idle = now
            yield ": keepalive\n\n"


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def job_events(
    request: Request,
    job_id: str,
    last_event_id: str | None = Query(default=None, max_length=48),
) -> StreamingResponse:
    """Server-sent events of one job: `state`, `progress` and `preview`; resumable."""
    who = await run_in_threadpool(require, request, "read")
    ctx = request.app.state.ctx
    await run_in_threadpool(own_job, ctx.farm, who, job_id)  # a 404 before the stream starts
    last = request.headers.get("last-event-id") or last_event_id
    if last is not None and not EVENT_ID.match(last):
        raise ApiError(422, f"Last-Event-ID: not an event id this API sent, got {last!r}")
    return StreamingResponse(
        follow(ctx, who, job_id, last), media_type="text/event-stream", headers=SSE_HEADERS
    )
