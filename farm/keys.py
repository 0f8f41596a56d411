"""Every Redis key and every storage key the farm uses, built in this one place."""

from __future__ import annotations

from dataclasses import dataclass

BROKER_PRIORITY_SEP = "\x06\x16"
"""kombu's Redis transport: separator between a queue's name and its priority step."""

PRIORITY_STEPS = list(range(10))
"""kombu's priority steps the farm's queues use (one list per queue and step)."""


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Redis key names under one prefix (`farm:` by default)."""

    prefix: str = "farm:"

    def job(self, job_id: str) -> str:
        """Hash: one job's record (state, spec JSON, attempt, token, progress, outputs)."""
        return f"{self.prefix}job:{job_id}"

    @property
    def events(self) -> str:
        """Stream: one entry per state change, followed by `wait`."""
        return f"{self.prefix}events"

    @property
    def cancels(self) -> str:
        """Pub/sub channel: ids of running jobs whose cancel was just requested."""
        return f"{self.prefix}cancels"

    @property
    def jobs(self) -> str:
        """Sorted set: every live job id (not yet ended), scored by creation time."""
        return f"{self.prefix}jobs"

    @property
    def counts(self) -> str:
        """Hash: state → jobs in it now (waiting, queued, running), or jobs that ever ended in
        it (succeeded, failed, cancelled: their records expire, the count stays). Kept by the
        scripts that change states (`farm.state.scripts`), so reading it is O(1)."""
        return f"{self.prefix}counts"

    @property
    def queued(self) -> str:
        """Sorted set: the queued jobs, scored by when a message for them was last sent
        (`farm.state.inflight`): the reconciler re-sends only those whose message is gone."""
        return f"{self.prefix}queued"

    @property
    def running(self) -> str:
        """Set: the running jobs (the reconciler reads their leases)."""
        return f"{self.prefix}running"

    @property
    def waiting(self) -> str:
        """Set: the waiting jobs (the reconciler releases those whose dependencies ended)."""
        return f"{self.prefix}waiting"

    @property
    def queues(self) -> str:
        """Set: every queue a job was created for (the broker lists the reconciler audits)."""
        return f"{self.prefix}queues"

    def signature(self, signature: str) -> str:
        """Sorted set: the queued jobs of one batch signature, most urgent first."""
        return f"{self.prefix}sig:{signature}"

    @property
    def reconciler_lock(self) -> str:
        """String with a TTL: `<owner>:<epoch>` of the process running the reconciler's pass,
        renewed as the pass goes; every write of the pass checks it (fencing)."""
        return f"{self.prefix}reconciler"

    @property
    def reconciler_epoch(self) -> str:
        """String (a counter): bumped each time a process takes the reconciler's lock."""
        return f"{self.prefix}reconciler:epoch"

    @property
    def reconciler_seen(self) -> str:
        """Set: during the reconciler's audit of the broker, the jobs it found a message for."""
        return f"{self.prefix}reconciler:seen"

    @property
    def reconciler_audited(self) -> str:
        """String: when the reconciler's last audit of the broker began (epoch seconds)."""
        return f"{self.prefix}reconciler:audited"

    @property
    def reconciler_cursor(self) -> str:
        """String: where in `jobs` the reconciler's sweep for vanished records goes on."""
        return f"{self.prefix}reconciler:cursor"

    @property
    def workers(self) -> str:
        """Hash: worker name → JSON (device, models, current job, heartbeat)."""
        return f"{self.prefix}workers"

    @property
    def batches(self) -> str:
        """Sorted set: every batch name, scored by when it was first submitted."""
        return f"{self.prefix}batches"

    def batch(self, name: str) -> str:
        """Hash: one batch's metadata (manifest, rows, variations, seed, defaults, times)."""
        return f"{self.prefix}batch:{name}"

    def batch_order(self, name: str) -> str:
        """List: the batch's slot ids (one per row × variation), in manifest order."""
        return f"{self.prefix}batch:{name}:order"

    def batch_slots(self, name: str) -> str:
        """Hash: slot id → JSON (current job id, retry generation, row, variation, labels)."""
        return f"{self.prefix}batch:{name}:slots"

    def batch_counts(self, name: str) -> str:
        """Hash: the batch's current jobs (one per indexed slot) per state (`<state>`), their
        images per state (`images:<state>`), the first start (`started_at`) and the last
        success (`finished_at`). Kept by the state scripts: `farm batch status` reads this."""
        return f"{self.batch(name)}:counts"

    def batch_failed(self, name: str) -> str:
        """Sorted set: the batch's current jobs that failed, scored by when they failed."""
        return f"{self.batch(name)}:failed"

    def broker_queue(self, queue: str, step: int = 0) -> str:
        """List: one Celery queue's messages at one kombu priority step. kombu's Redis
        transport keeps the bare name for step 0 and `name + '\\x06\\x16' + step` for the
        others, all under Celery's `global_keyprefix` (`<prefix>celery:`); a queue's depth is
        the sum over the steps (what the dashboard shows and KEDA scales on)."""
        name = f"{queue}{BROKER_PRIORITY_SEP}{step}" if step else queue
        return f"{self.prefix}celery:{name}"

    @property
    def broker_unacked(self) -> str:
        """Hash: kombu's messages delivered to a worker and not acknowledged yet (delivery tag
        → JSON of [message, exchange, routing key]), under Celery's `global_keyprefix`."""
        return f"{self.prefix}celery:unacked"

    @property
    def retries(self) -> str:
        """Sorted set: job ids handed back with a backoff, scored by when they may run again;
        the reconciler sends their messages once that time has come."""
        return f"{self.prefix}retries"

    def dependents(self, job_id: str) -> str:
        """Set: ids of the `waiting` jobs that wait for this job to end (`farm.state.dependencies`)."""
        return f"{self.prefix}deps:{job_id}"

    # The HTTP API's keys (`farm.state.tenants`, `farm.state.webhooks`, `farm.state.feed`).

    @property
    def tokens(self) -> str:
        """Hash: API token id → JSON (name, tenant, scopes, sha256 of its secret, created)."""
        return f"{self.prefix}tokens"

    @property
    def session_key(self) -> str:
        """String: the key the API signs dashboard session cookies with (shared by replicas)."""
        return f"{self.prefix}api-session-key"

    def tenant(self, tenant: str) -> str:
        """Hash: one tenant's limits (`max_queued`, `jobs_per_minute`, `max_images`) and its
        webhook signing secret."""
        return f"{self.prefix}tenant:{tenant}"

    def tenant_jobs(self, tenant: str) -> str:
        """Sorted set: the ids of the jobs a tenant submitted, scored by creation time (what
        `GET /v1/jobs` lists, newest first)."""
        return f"{self.prefix}tenant:{tenant}:jobs"

    def tenant_open(self, tenant: str) -> str:
        """Sorted set: a tenant's jobs not yet seen ended (its queued-jobs limit counts them)."""
        return f"{self.prefix}tenant:{tenant}:open"

    def tenant_inputs(self, tenant: str) -> str:
        """Set: the storage keys of the inputs a tenant uploaded: the only ones it may name."""
        return f"{self.prefix}tenant:{tenant}:inputs"

    def tenant_bucket(self, tenant: str) -> str:
        """Hash: a tenant's jobs-per-minute token bucket (tokens left, when last filled)."""
        return f"{self.prefix}tenant:{tenant}:bucket"

    @property
    def batch_tenants(self) -> str:
        """Hash: batch name → the tenant that submitted it through the API (absent: `default`)."""
        return f"{self.prefix}batch-tenants"

    @property
    def batch_webhooks(self) -> str:
        """Hash: batch name → the webhook URL POSTed once the batch has settled."""
        return f"{self.prefix}batch-webhooks"

    @property
    def webhooks(self) -> str:
        """Sorted set: webhook delivery ids, scored by when their next attempt is due."""
        return f"{self.prefix}webhooks"

    def webhook(self, delivery: str) -> str:
        """Hash: one webhook delivery (url, tenant, event id, body, attempts as JSON, outcome)."""
        return f"{self.prefix}webhook:{delivery}"

    def preview(self, job_id: str) -> str:
        """Hash: a running job's latest preview (step, total, PNG as base64), with a TTL."""
        return f"{self.prefix}preview:{job_id}"


# Storage keys: relative to the store's root (bucket prefix or folder).


def input_key(sha256: str) -> str:
    """A content-addressed input image or mask."""
    return f"inputs/{sha256}.png"


def adapter_input_key(sha256: str) -> str:
    """A content-addressed LoRA adapter uploaded with a render (`farm.inputs.loras`)."""
    return f"inputs/{sha256}.safetensors"


def output_key(job_id: str, index: int) -> str:
    return f"jobs/{job_id}/out/{index}.png"


def mask_key(job_id: str) -> str:
    """The mask as the model used it (resized, binarised)."""
    return f"jobs/{job_id}/mask.png"


def meta_key(job_id: str) -> str:
    return f"jobs/{job_id}/meta.json"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


ADAPTER_FILE = "pytorch_lora_weights.safetensors"
"""The adapter's file name, as diffusers' `save_lora_weights` writes it."""


def adapter_prefix(job_id: str) -> str:
    """Everything a fine-tune stores: the adapter, its loss log and curve, its checkpoints."""
    return f"adapters/{job_id}/"


def adapter_key(job_id: str) -> str:
    """A fine-tune's adapter, loadable by diffusers' `load_lora_weights`."""
    return f"adapters/{job_id}/{ADAPTER_FILE}"


def adapter_file_key(job_id: str, name: str) -> str:
    """Another file of a fine-tune's output: `loss.json`, `loss.png`, `meta.json`."""
    return f"adapters/{job_id}/{name}"


def checkpoints_prefix(job_id: str) -> str:
    """Every checkpoint of a fine-tune, one folder per optimizer step."""
    return f"adapters/{job_id}/checkpoints/"


def checkpoint_key(job_id: str, step: int, name: str) -> str:
    """One file of the checkpoint at `step` (zero-padded, so keys sort by step)."""
    return f"adapters/{job_id}/checkpoints/{step:08d}/{name}"
