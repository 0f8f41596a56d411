"""One settings object for the whole farm, read from `FARM_*` environment variables.

    >>> s = FarmSettings(redis_url="redis://10.0.0.5:6379/0", storage="s3://renders/farm")
    >>> s.key_prefix
    'farm:'

Built once (by `Farm()`, the CLI or a worker) and passed explicitly; nothing reads the
environment behind its back. AWS credentials come from the standard AWS chain, never from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from farm.errors import FarmNotRunning


def default_home() -> Path:
    """Where an embedded farm keeps its Redis data and local storage."""
    return Path.home() / ".cache" / "render-farm"


class FarmSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FARM_", extra="ignore")

    redis_url: str | None = None
    """Redis for job records and the Celery broker. Unset: `farm up` starts a private one."""

    redis_ca_file: Path | None = None
    """CA bundle that verifies a `rediss://` server (unset: the system's CAs)."""

    redis_timeout: float | None = Field(default=None, gt=0)
    """Seconds one Redis call may take before it fails (unset: no limit, calls are retried).
    The API and the dashboard use 10: a hung Redis answers 503 rather than hanging them."""

    storage: str | None = None
    """`s3://bucket/prefix` or `file:///path`. Unset: a folder under `home`."""

    s3_endpoint_url: str | None = None
    """For MinIO and other S3-compatible servers; unset means AWS."""

    s3_region: str | None = None

    s3_max_attempts: int = Field(default=5, ge=1, le=20)
    """Attempts per S3 request (botocore's standard retry mode, with backoff)."""

    home: Path = Field(default_factory=default_home)
    """The embedded farm's working folder (Redis data, local storage, `farm up` state)."""

    key_prefix: str = "farm:"
    """Prefix of every Redis key the farm writes."""

    record_ttl: int = Field(default=7 * 24 * 3600, ge=60)
    """Seconds a finished job's record stays in Redis."""

    visibility_timeout: int = Field(default=4 * 3600, ge=1)
    """Seconds before Redis hands an unacknowledged message to another worker."""

    time_limit: float = Field(default=3600.0, gt=0)
    """Seconds one job (or batch) may render, checked between steps; then it fails. A worker
    refuses to start unless this is shorter than `visibility_timeout`."""

    finetune_time_limit: float = Field(default=24 * 3600.0, gt=0)
    """Seconds one fine-tune may train, checked between steps; then it fails (its checkpoints
    stay). It may exceed `visibility_timeout`: a message redelivered while the job trains finds
    its lease alive and is acknowledged without running."""

    lease_seconds: float = Field(default=30.0, gt=0)
    """A running job's lease; its worker renews it every third of this."""

    max_deliveries: int = Field(default=5, ge=1)
    """Attempts at one job before it is failed as a poison job (dead-lettered)."""

    reconcile_interval: float = Field(default=10.0, gt=0)
    """Seconds between reconciler passes (one worker at a time runs one)."""

    reconnect_seconds: float = Field(default=180.0, ge=0)
    """How long a waiting client (`farm wait`, `farm batch wait`, `--watch`, the SDK's `wait`,
    the dashboard) rides out a Redis that is down or restarting before it gives up."""

    requeue_after: float = Field(default=600.0, gt=0)
    """A job queued this long without being claimed is enqueued again (its message was lost)."""

    max_pixels: int = Field(default=2048 * 2048, ge=64)
    """Pixels per image a job may render: its working height × width, given or taken from its
    input image (`farm.inputs.budgets`). Refused at submit, and by a worker."""

    max_input_pixels: int = Field(default=4096 * 4096, ge=64)
    """Pixels an input image may have once decoded, read from its header before decoding: a
    small file that declares a huge picture is refused before it takes any memory."""

    max_prompt_chars: int = Field(default=4000, ge=1)
    """Characters per prompt, negative prompt, instance prompt or caption."""

    max_manifest_line: int = Field(default=64 * 1024, ge=256)
    """Bytes per line of a batch manifest (its labels are stored in Redis with each slot)."""

    allow_foreign_inputs: bool = False
    """Let jobs read `s3://` inputs outside the farm's bucket and `file://` inputs outside its
    folder. Off by default: a job names only what the farm itself stored. (`http://` never.)"""

    fault_injection: bool = False
    """Tests only: honour `[fault:kill]` and `[fault:oom]` markers in prompts."""

    max_batch: int = Field(default=4, ge=1, le=64)
    """Images per pipeline call: a worker runs queued jobs of one batch signature together."""

    model_cache_gb: float = Field(default=0.0, ge=0)
    """Pipelines kept warm per worker, in GB of weights (0: keep the two most recent)."""

    models_dir: Path | None = None
    """Relative local model refs resolve under this folder, and may not leave it."""

    model_check: bool = True
    """Refuse at submit a repo id missing from the local Hugging Face cache, when there is one.
    Off (`FARM_MODEL_CHECK=0`) on a submit-only box whose cache is not the workers': the first
    worker that cannot resolve the ref fails the job with the reason."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """A worker serves Prometheus metrics on this port (0: no endpoint). `farm worker --gpus`
    and `--workers` give child i the port + i."""

    channels_last: bool = False
    """Workers put each model's UNet and VAE in channels_last memory format (`workers.models.optimize`)."""

    compile: bool = False
    """Workers `torch.compile` each model's denoiser (UNet or transformer) and VAE decoder
    (compiles on first use and on each new shape)."""

    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    """The dtype workers load models in; auto: bf16 for SD3 and FLUX.1, fp16 for SD and SDXL
    on CUDA, fp32 on CPU (`workers.models.precision`)."""

    offload: Literal["none", "model", "sequential"] = "none"
    """CPU offload for GPUs too small for a model: diffusers' `enable_model_cpu_offload`
    (model) or `enable_sequential_cpu_offload` (sequential, CUDA only)."""

    vae_tiling: bool = False
    """Workers decode large images in tiles (`vae.enable_tiling()`): less memory above the
    VAE's tile size, faint seams; nothing changes below it."""

    events: bool = True
    """Celery task events and worker heartbeats on, so Flower can list workers and tasks."""

    api_url: str | None = None
    """The farm's HTTP API (`http://host:8000`): where set, `Farm()` and the CLI submit, follow
    and fetch over it instead of Redis and storage (`FARM_API_URL`)."""

    api_token: str | None = None
    """The bearer token sent to `api_url` (`FARM_API_TOKEN`)."""

    api_max_queued: int = Field(default=0, ge=0)
    """Jobs a tenant may have not yet ended (0: no limit); `farm tokens limits` sets one tenant's."""

    api_jobs_per_minute: int = Field(default=0, ge=0)
    """Jobs a tenant may submit per minute, a token bucket with a minute's burst (0: no limit)."""

    api_max_images: int = Field(default=0, ge=0)
    """Images a tenant's job may ask for, `num_images_per_prompt` (0: no limit but the spec's)."""

    api_threads: int = Field(default=64, ge=4, le=4096)
    """Threads the API server runs blocking calls in (each following client holds one)."""

    api_session_seconds: int = Field(default=12 * 3600, ge=60)
    """How long a dashboard login (its session cookie) lasts."""

    webhook_allow_private: bool = False
    """Deliver webhooks to loopback, private, link-local and other non-public addresses. Off:
    every address a webhook's host resolves to must be public."""

    webhook_max_seconds: float = Field(default=24 * 3600.0, gt=0)
    """How long a webhook is retried (exponential backoff) before it is given up as failed."""

    webhook_backoff: float = Field(default=2.0, gt=0)
    """Seconds before a webhook's second attempt; each later one waits twice as long."""

    webhook_backoff_max: float = Field(default=600.0, gt=0)
    """The longest wait between two attempts of a webhook."""

    webhook_timeout: float = Field(default=10.0, gt=0)
    """Seconds one webhook attempt may take (connect and answer)."""

    def storage_url(self) -> str:
        return self.storage or (self.home / "storage").resolve().as_uri()


def settings_env(settings: FarmSettings) -> dict[str, str]:
    """The environment that hands these settings to a child process."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"FARM_{name.upper()}"] = str(value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def embedded_state_file(settings: FarmSettings) -> Path:
    """Where `farm up` writes the Redis URL and storage of the farm it runs."""
    return settings.home / "up.json"


def resolve_settings(settings: FarmSettings | None = None) -> FarmSettings:
    """FARM_* settings; where no Redis URL is set, those of the farm `farm up` is running.

    An `up.json` left by a `farm up` that is no longer running (killed) does not count: the
    client says no farm runs, rather than that Redis is unreachable."""
    settings = settings or FarmSettings()
    if settings.redis_url:
        return settings
    state_file = embedded_state_file(settings)
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = None
    if isinstance(state, dict) and state.get("redis_url") and _alive(state.get("pid")):
        return settings.model_copy(
            update={
                "redis_url": state["redis_url"],
                "storage": settings.storage or state["storage"],
            }
        )
    gone = f" (the one that wrote {state_file} is gone)" if state else ""
    raise FarmNotRunning(
        f"FARM_REDIS_URL is not set and no embedded farm is running{gone}: start one with "
        "`farm up`",
        field="FARM_REDIS_URL",
    )


def _alive(pid: object) -> bool:
    """Whether process `pid` exists on this machine (a `farm up` that wrote no pid counts)."""
    if not isinstance(pid, int):
        return pid is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
