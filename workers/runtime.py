"""What a worker process loads once (`Runtime`), and the jobs it holds a claim on (`Held`)."""

from __future__ import annotations

import platform
import socket
from dataclasses import dataclass
from typing import Any

from farm.inputs import images
from farm.jobs.record import JobRecord
from farm.queue.app import make_celery
from farm.settings import FarmSettings
from farm.state.tracker import Tracker
from farm.storage import open_store
from workers.heartbeat import CancelListener


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from farm import __version__

    return {
        "farm": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


class Runtime:
    """What a worker process loads once: settings, Redis, storage, device, warm pipelines."""

    def __init__(
        self,
        settings: FarmSettings,
        device: str = "cpu",
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        from workers.models.device import pin_device
        from workers.models.pipelines import PipelineCache
        from workers.models.precision import check_offload

        self.settings = settings
        self.device = pin_device(device, threads)
        check_offload(settings.offload, self.device)  # before anything connects
        self.name = name or f"{device}@{socket.gethostname()}"
        self.tracker = Tracker.from_settings(settings)
        self.cancels = CancelListener(self.tracker)
        self.cancels.start()
        self.store = open_store(settings)
        self.cache = PipelineCache(
            str(self.device),
            settings.dtype,  # FARM_DTYPE: auto picks per family and device at each load
            max_models=2,
            models_dir=settings.models_dir,
            max_gb=settings.model_cache_gb,
            offload=settings.offload,
            vae_tiling=settings.vae_tiling,
        )
        from workers.models.optimize import from_settings

        self.cache.prepare = from_settings(settings)
        self.celery = make_celery(settings)
        from workers.render.loras import AdapterCache

        self.adapters = AdapterCache(self.store)
        """LoRA adapters, loaded on the warm pipelines per job (`workers.render.loras`)."""
        self.versions = versions()
        self.jobs_done = 0
        self.stopping = False
        self.pipeline_bytes = {"ahead": 0, "behind": 0}
        """Bytes of decoded inputs claimed ahead and of renders waiting to be stored
        (`workers.pipeline`)."""
        """Set on SIGTERM/SIGINT: running jobs stop at the next step and are handed back."""
        from farm.queue.routing import RENDER_QUEUE
        from workers.metrics import WorkerMetrics
        from workers.presence import Presence

        self.metrics = WorkerMetrics(self)
        self.presence = Presence(self, [RENDER_QUEUE])
        """Its registry entry and its affinity queues (`run_worker` sets the base queues)."""


def load_input(rt: Runtime, uri: str, field: str) -> Any:
    """An input image as the client saw it when it validated the job (EXIF orientation
    applied, RGB), so a URI used as it is decodes the same on both sides; one that declares
    more than `FARM_MAX_INPUT_PIXELS` is refused from its header, before it is decoded."""
    data = rt.store.get_uri(uri, field=field)
    return images.load_image_input(data, field=field, max_pixels=rt.settings.max_input_pixels)


@dataclass
class Held:
    """A job this worker holds a claim on: its record and attempt, then its spec and inputs."""

    record: JobRecord
    token: str
    attempt: int
    spec: Any = None
    image: Any = None
    mask: Any = None
    style_image: Any = None
    """A style job's reference image (`ip_adapter_image`)."""
    inputs_s: float = 0.0

    @property
    def id(self) -> str:
        return self.record.id
