"""The webhook sender: a light-side process that turns ended jobs into signed POSTs.

    $ python -m farm.api.sender          # `farm serve` and `farm up` start it beside the API

It never runs on a GPU worker's thread: a slow receiver delays nobody's render. Steps, in a
loop (`Sender.run`):

1. Read the events stream as the consumer group `webhooks` (`farm.state.webhooks`): what this
   process read before it died and never acknowledged first, then new events; every minute,
   events a dead sender left unacknowledged.
2. For each job that ended with a `webhook` in its spec, create its delivery (`job.<id>`,
   once: reading an event twice creates nothing new), its body the job's record; for each
   batch touched that has a webhook and has settled, the batch's (`batch.<name>.<digest of its
   job ids>`: a retry that settles it again is a new event). Then acknowledge the events.
3. Attempt the deliveries that are due, each leased while it is tried: check the URL's
   addresses again (a refused one is never sent: the attempt says why), POST the body signed
   (`farm.api.webhooks.sign`), no redirects followed. 2xx: delivered. Anything else: again
   after `FARM_WEBHOOK_BACKOFF` × 2ⁿ (up to `FARM_WEBHOOK_BACKOFF_MAX`), until
   `FARM_WEBHOOK_MAX_SECONDS` after the first attempt; then failed. Every attempt is kept on
   the delivery, which the job's record shows (`GET /v1/jobs/{id}`: `webhook.attempts`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import httpx

from farm.api.context import local_farm
from farm.api.views import job_view
from farm.api.webhooks import EVENT_HEADER, SIGNATURE_HEADER, backoff, check_url, event_id, sign
from farm.batches.batch import Batch
from farm.errors import FarmError, InvalidJob
from farm.jobs.state import JobState
from farm.settings import FarmSettings, resolve_settings
from farm.state.tenants import DEFAULT_TENANT

log = logging.getLogger("farm.webhooks")

READ_COUNT = 500
DUE_COUNT = 50
RECLAIM_EVERY = 60.0
TERMINAL = {s.value for s in JobState if s.terminal}


class Sender:
    """Delivers the farm's webhooks (see the module doc)."""

    def __init__(self, settings: FarmSettings) -> None:
        self.farm = local_farm(settings)
        self.settings = self.farm.settings
        self.tracker = self.farm.tracker
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.http = httpx.Client(timeout=self.settings.webhook_timeout, follow_redirects=False)
        self.stopping = threading.Event()

    def close(self) -> None:
        self.http.close()
        self.farm.close()

    def run(self) -> None:
        self.tracker.webhooks.join()
        self.handle(self.tracker.webhooks.read(self.consumer, READ_COUNT, 0, pending=True))
        reclaimed = 0.0
        while not self.stopping.is_set():
            try:
                if time.monotonic() - reclaimed > RECLAIM_EVERY:
                    reclaimed = time.monotonic()
                    self.handle(
                        self.tracker.webhooks.reclaim(self.consumer, RECLAIM_EVERY, READ_COUNT)
                    )
                # 1-2. Ended jobs into deliveries.
                self.handle(self.tracker.webhooks.read(self.consumer, READ_COUNT, 0.5))
                # 3. Deliveries that are due.
                self.deliver_due()
            except FarmError as e:  # Redis away: try again shortly
                log.warning("webhook sender: %s", e)
                self.stopping.wait(1.0)

    # ------------------------------------------------------------------ 2

    def handle(self, events: list[tuple[str, dict[str, str]]]) -> None:
        ended = [(i, f["job"]) for i, f in events if f.get("state") in TERMINAL and f.get("job")]
        batches: set[str] = set()
        if ended:
            ids = [job for _, job in ended]
            rows = self.tracker.job_fields(ids, "spec", "tenant")
            for job_id, (spec_text, tenant) in zip(ids, rows, strict=True):
                spec = json.loads(spec_text) if spec_text else {}
                if spec.get("webhook"):
                    self.enqueue_job(job_id, spec["webhook"], tenant or DEFAULT_TENANT)
                key = spec.get("key") or ""
                if key.startswith("batch:"):
                    batches.add(key.split(":", 2)[1])
        for name in sorted(batches):
            self.enqueue_batch(name)
        self.tracker.webhooks.ack([i for i, _ in events])

    def enqueue_job(self, job_id: str, url: str, tenant: str) -> None:
        rec = self.tracker.get_many([job_id])[0]
        if rec is None:
            return
        delivery = f"job.{job_id}"
        event = event_id(delivery, rec.state.value)
        view = job_view(self.farm, rec, tenant)
        view.pop("webhook", None)
        body = {
            "id": event,
            "type": f"job.{rec.state.value}",
            "created_at": time.time(),
            "tenant": tenant,
            "job": view,
        }
        self._enqueue(delivery, url, tenant, event, body, job_id)

    def enqueue_batch(self, name: str) -> None:
        url = self.tracker.tenants.batch_webhook(name)
        if not url:
            return
        batch = Batch(self.farm, name)
        status = batch.status()
        if not status.settled:
            return
        tenant = self.tracker.tenants.batch_tenant(name)
        digest = hashlib.sha256(",".join(batch.job_ids()).encode()).hexdigest()[:16]
        delivery = f"batch.{name}.{digest}"
        event = event_id(delivery, "settled")
        shown = name.removeprefix(f"{tenant}.")
        body = {
            "id": event,
            "type": "batch.settled",
            "created_at": time.time(),
            "tenant": tenant,
            "batch": {"name": shown, "total": status.total, "counts": status.counts},
        }
        self._enqueue(delivery, url, tenant, event, body, "")

    def _enqueue(
        self, delivery: str, url: str, tenant: str, event: str, body: dict[str, Any], job_id: str
    ) -> None:
        fields = {
            "url": url,
            "tenant": tenant,
            "event_id": event,
            "job": job_id,
            "body": json.dumps(body, separators=(",", ":")),
            "first_at": repr(time.time()),
        }
        if self.tracker.webhooks.enqueue(delivery, fields):
            log.info("webhook %s queued for %s", event, url)

    # ------------------------------------------------------------------ 3

    def deliver_due(self) -> int:
        lease = self.settings.webhook_timeout + 30
        due = self.tracker.webhooks.take_due(time.time(), lease, DUE_COUNT)
        for delivery in due:
            if self.stopping.is_set():
                break
            self.attempt(delivery)
        return len(due)

    def attempt(self, delivery: str) -> None:
        hooks = self.tracker.webhooks
        info = hooks.get(delivery)
        if info is None or info.get("outcome") != "pending":
            return
        now = time.time()
        n = len(info["attempts"]) + 1
        record: dict[str, Any] = {"n": n, "at": now}
        body = info["body"].encode()
        try:
            check_url(info["url"], self.settings.webhook_allow_private)
        except InvalidJob as e:  # never sent: the address is not one the farm posts to
            record["error"] = str(e)
            hooks.attempted(delivery, record, "refused", None)
            log.warning("webhook %s refused: %s", info["event_id"], e)
            return
        secret = self.tracker.tenants.webhook_secret(info.get("tenant") or DEFAULT_TENANT)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "render-farm-webhooks",
            SIGNATURE_HEADER: sign(secret, body),
            EVENT_HEADER: info["event_id"],
        }
        try:
            resp = self.http.post(info["url"], content=body, headers=headers)
            record["status"] = resp.status_code
            ok = 200 <= resp.status_code < 300
        except httpx.HTTPError as e:
            record["error"] = f"{type(e).__name__}: {e}"[:300]
            ok = False
        if ok:
            hooks.attempted(delivery, record, "delivered", None)
            return
        first = float(info.get("first_at") or now)
        wait = backoff(n, self.settings.webhook_backoff, self.settings.webhook_backoff_max)
        if now + wait - first > self.settings.webhook_max_seconds:
            hooks.attempted(delivery, record, "failed", None)
            log.warning("webhook %s failed after %d attempts", info["event_id"], n)
        else:
            hooks.attempted(delivery, record, "pending", now + wait)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sender = Sender(resolve_settings(FarmSettings()))

    def stop(signum: int, frame: Any) -> None:
        sender.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        sender.run()
    finally:
        sender.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
