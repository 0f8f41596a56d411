"""Prometheus metrics of one worker process, served over HTTP when `FARM_METRICS_PORT` is set.

    FARM_METRICS_PORT=9400 farm worker        # curl localhost:9400/metrics

Metric names (every worker serves the same; Prometheus adds the `instance` label):

    farm_jobs_total{kind,state}          counter: jobs this worker ended, by kind and how
                                         (succeeded, failed, cancelled, queued = handed back,
                                         skipped = a duplicate message, stale)
    farm_render_seconds{kind}            histogram: seconds per pipeline call (one batch)
    farm_pipeline_load_seconds           histogram: seconds to load a model into the cache
    farm_batch_size                      histogram: jobs per pipeline call
    farm_queue_depth{queue}              gauge: messages waiting per Celery queue, every kombu
                                         priority sub-list counted, read from Redis at scrape
    farm_jobs_in_state{state}            gauge: the farm's jobs per state (waiting, queued,
                                         running: now; succeeded, failed, cancelled: ever),
                                         from the counters the state scripts keep: one read
    farm_device_memory_bytes{device}     gauge: torch.cuda.memory_allocated on a GPU, the
                                         process's resident memory on CPU
    farm_models_warm                     gauge: models this worker holds warm
    farm_worker_pipeline_bytes{side}     gauge: decoded inputs claimed ahead (`ahead`) and
                                         renders waiting to be stored (`behind`), in bytes
                                         (`workers.pipeline`)

Each process has its own `CollectorRegistry`, so tests can build several in one interpreter.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from farm.errors import PortInUse
from farm.queue.routing import FINETUNE_QUEUE, RENDER_QUEUE
from workers.presence import physical_device

log = logging.getLogger("farm.metrics")

SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


def device_memory(device: Any) -> int:
    """Bytes this process holds on its device: CUDA allocations, or resident memory on CPU."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _LiveCollector(Collector):
    """Gauges read when Prometheus scrapes: queue depths from Redis, device memory."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "farm_queue_depth", "Messages waiting per Celery queue", labels=["queue"]
        )
        try:
            tracker = self.rt.tracker
            queues = {RENDER_QUEUE, FINETUNE_QUEUE}
            queues |= tracker.workers.consumed_queues()
            for queue, n in tracker.queue_depths(queues).items():
                depth.add_metric([queue], n)
        except Exception as e:  # Redis away: the scrape still answers, without depths
            log.warning("queue depth: %s", e)
        yield depth
        states = GaugeMetricFamily(
            "farm_jobs_in_state", "The farm's jobs per state (ended states: ever)", labels=["state"]
        )
        try:
            for state, n in self.rt.tracker.counts().items():
                states.add_metric([state], n)
        except Exception as e:  # Redis away, as above
            log.warning("job counts: %s", e)
        yield states
        memory = GaugeMetricFamily(
            "farm_device_memory_bytes", "Bytes held on the device", labels=["device"]
        )
        memory.add_metric([physical_device(self.rt.device)], device_memory(self.rt.device))
        yield memory
        warm = GaugeMetricFamily("farm_models_warm", "Models this worker holds warm")
        with contextlib.suppress(RuntimeError):  # the cache changing this instant: skip it
            warm.add_metric([], len(self.rt.cache.held))
        yield warm
        held = GaugeMetricFamily(
            "farm_worker_pipeline_bytes",
            "Bytes of the batch claimed ahead and of the one waiting to be stored",
            labels=["side"],
        )
        for side, n in dict(getattr(self.rt, "pipeline_bytes", {})).items():
            held.add_metric([side], n)
        yield held


class WorkerMetrics:
    """The metrics of one worker; `serve(port)` starts the endpoint (a daemon thread)."""

    def __init__(self, rt: Any) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "farm_jobs",
            "Jobs this worker ended, by kind and final state",
            ["kind", "state"],
            registry=self.registry,
        )
        self.render_seconds = Histogram(
            "farm_render_seconds",
            "Seconds per pipeline call",
            ["kind"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "farm_pipeline_load_seconds",
            "Seconds to load a model",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "farm_batch_size",
            "Jobs per pipeline call",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(rt))
        self.port: int | None = None

    def serve(self, port: int) -> None:
        """Serve `/metrics` on `port` (all interfaces: Prometheus scrapes from elsewhere)."""
        try:
            start_http_server(port, registry=self.registry)
            self.port = port
        except OSError as e:  # a port in use must not keep the worker from rendering
            try:
                PortInUse.check(e, "metrics", "0.0.0.0", port, "FARM_METRICS_PORT")
                why: Exception = e
            except PortInUse as clash:
                why = clash
            log.error("metrics endpoint not started: %s", why)

    def ended(self, held: Iterable[Any], outcomes: Mapping[str, str]) -> None:
        for job in held:
            self.jobs.labels(job.record.kind, outcomes.get(job.id, "unknown")).inc()

    def rendered(self, kind: str, n_jobs: int, seconds: float) -> None:
        self.render_seconds.labels(kind).observe(seconds)
        self.batch_size.observe(n_jobs)

    def loaded(self, seconds: float) -> None:
        self.load_seconds.observe(seconds)
