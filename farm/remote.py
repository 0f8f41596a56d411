"""The SDK over HTTP: `Farm(url=..., token=...)` for a machine without the farm's Redis URL or
storage credentials.

    >>> farm = Farm(url="http://farm.example:8000", token="farm_…")   # or FARM_API_URL/TOKEN
    >>> job = farm.submit(Inpaint(model="tiny-inpaint", prompt="a cat",
    ...                           image="dog.png", mask_image="mask.png"))
    >>> job.wait(timeout=600); job.download("out/")

The same calls as the Redis-backed `Farm` (`submit`, `submit_many`, `wait`, `get`, `cancel`,
`download`, and `Batch`/`submit_batch` through `farm.batches.remote`), spoken to the API
(`farm.api`): a spec is checked here by the same pydantic models first (the same
`InvalidJob`), local pictures are uploaded to `POST /v1/inputs` once each and named by the URI
it returns, and the API's answers become the SDK's own errors:

    422, 413            InvalidJob (its `field`)         404   JobNotFound
    503, 429, no answer TransientError (retry later)     401, 403, 409   FarmError
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

from farm.client import Farm, JobHandle, raise_unless_succeeded
from farm.errors import (
    FarmError,
    InvalidJob,
    JobFailed,
    JobNotFound,
    TransientError,
    WaitTimeout,
)
from farm.inputs import images
from farm.inputs.resolver import is_uri
from farm.jobs.masks import MaskGenerator
from farm.jobs.record import JobRecord
from farm.jobs.specs import Finetune, parse_spec
from farm.jobs.state import JobState
from farm.settings import FarmSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def raise_for(resp: httpx.Response) -> None:
    """The SDK's error for an answer of the API that is not 2xx."""
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
    except ValueError:
        body = {"detail": resp.text.strip()}
    detail = str(body.get("detail") or resp.reason_phrase)
    status = resp.status_code
    if status in (413, 422, 400):
        raise InvalidJob(detail, field=body.get("field"))
    if status == 404:
        raise JobNotFound(detail)
    if status in (429, 503):
        wait = resp.headers.get("Retry-After")
        raise TransientError(detail + (f" (retry after {wait}s)" if wait else ""))
    raise FarmError(f"the farm's API answered {status}: {detail}")


class RemoteFarm(Farm):
    """A `Farm` whose every call goes to the farm's HTTP API (see the module doc)."""

    remote = True

    def __init__(
        self,
        settings: FarmSettings | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        **overrides: Any,
    ) -> None:
        if getattr(self, "http", None) is not None:  # `Farm.__new__` made it already
            return
        self.settings = settings or FarmSettings(**overrides)
        self.url = (url or self.settings.api_url or "").rstrip("/") + "/"
        token = token or self.settings.api_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=60)
        self._uploaded: dict[tuple[str, bool], str] = {}

    def __repr__(self) -> str:
        return f"RemoteFarm({self.url!r})"

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise TransientError(
                f"the farm's API at {self.url} did not answer ({type(e).__name__}: {e})"
            ) from e
        raise_for(resp)
        return resp

    # ------------------------------------------------------------------ submit

    def submit_many(self, specs: Iterable[Any]) -> list[JobHandle]:
        """Check every spec here, upload the local pictures they name, then submit them all in
        one `POST /v1/jobs:batch` (all checked by the farm before any is written)."""
        parsed = [parse_spec(s) for s in specs]
        bodies = [self.uploaded(spec).model_dump(mode="json", exclude_none=True) for spec in parsed]
        handles: list[JobHandle] = []
        for start in range(0, len(bodies), 10_000):
            resp = self.call("POST", "v1/jobs:batch", json={"jobs": bodies[start : start + 10_000]})
            handles += [JobHandle(self, j["id"]) for j in resp.json()["jobs"]]
        return handles

    def uploaded(self, spec: Any) -> Any:
        """`spec` with each local picture (a path, bytes, a PIL image) replaced by the URI the
        API stored it at."""
        updates: dict[str, Any] = {}
        if isinstance(spec, Finetune):
            items = spec.images if isinstance(spec.images, list) else _folder(spec.images)
            updates["images"] = [self.input(v, "images") for v in items]
        for field in ("image", "ip_adapter_image"):
            value = getattr(spec, field, None)
            if value is not None:
                updates[field] = self.input(value, field)
        mask = getattr(spec, "mask_image", None)
        if mask is not None and not isinstance(mask, MaskGenerator):
            updates["mask_image"] = self.input(mask, "mask_image", mask=True)
        return spec.model_copy(update=updates) if updates else spec

    def input(self, value: Any, field: str, *, mask: bool = False) -> str:
        if is_uri(value):
            return str(value)
        if isinstance(value, str | os.PathLike):
            key = (os.fspath(value), mask)
            if key not in self._uploaded:
                data = (
                    Path(value).expanduser().read_bytes()
                    if Path(value).expanduser().is_file()
                    else None
                )
                if data is None:
                    raise InvalidJob(f"{field}: no such file {os.fspath(value)!r}", field=field)
                self._uploaded[key] = self._upload(data, mask)
            return self._uploaded[key]
        if hasattr(value, "getpixel"):
            value = images.encode_png(value)
        return self._upload(bytes(value), mask)

    def _upload(self, data: bytes, mask: bool) -> str:
        resp = self.call(
            "POST", "v1/inputs", content=data, params={"mask": "true"} if mask else None
        )
        return str(resp.json()["uri"])

    def check_model(self, ref: str) -> None:
        """The farm checks models where it can see them."""

    # ------------------------------------------------------------------ follow

    def get(self, job_id: str) -> JobRecord:
        return JobRecord.model_validate(self.call("GET", f"v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> JobState:
        try:
            state = self.call("DELETE", f"v1/jobs/{job_id}").json()["state"]
        except FarmError as e:
            if "already" not in str(e):
                raise
            return self.get(job_id).state
        return JobState.RUNNING if state == "cancelling" else JobState(state)

    def wait(
        self,
        job_ids: Sequence[str],
        timeout: float | None = None,
        *,
        raise_on_failure: bool = False,
        on_progress: Callable[[list[tuple[str, str | None, int, int]]], None] | None = None,
        poll: float = 0.5,
        on_unavailable: Callable[[str | None], None] | None = None,
    ) -> list[JobRecord]:
        """Block until every job ends (polling the API); their records, in order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        patience = self.patience(on_unavailable)
        records: dict[str, JobRecord] = {}
        while True:
            for job_id in job_ids:
                if job_id not in records or not records[job_id].done:
                    records[job_id] = patience.run(self.get, job_id)
            if on_progress:
                on_progress(
                    [
                        (
                            i,
                            records[i].state.value,
                            records[i].progress.step,
                            records[i].progress.total,
                        )
                        for i in job_ids
                    ]
                )
            pending = [i for i in job_ids if not records[i].done]
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"{len(pending)} job(s) still not done after {timeout}s: {', '.join(pending[:5])}",
                    job_id=pending[0] if len(pending) == 1 else None,
                )
            time.sleep(poll)
        out = [records[i] for i in job_ids]
        if raise_on_failure:
            raise_unless_succeeded(out)
        return out

    # ------------------------------------------------------------------ fetch

    def download(self, job_id: str, directory: str | Path) -> list[Path]:
        """Write a finished job's outputs, mask and meta.json into `directory` (presigned URLs
        are fetched without the token: it is for the API only)."""
        listed = self.call("GET", f"v1/jobs/{job_id}/outputs").json()
        if listed["state"] != JobState.SUCCEEDED:
            raise JobFailed(f"nothing to download: the job is {listed['state']}", job_id=job_id)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for item in listed["outputs"]:
            if item["url"].startswith(self.url):
                data = self.call("GET", item["url"]).content
            else:
                try:
                    resp = httpx.get(item["url"], timeout=60)
                except httpx.HTTPError as e:
                    raise TransientError(f"{item['name']}: download failed ({e})") from e
                raise_for(resp)
                data = resp.content
            path = out / item["name"]
            path.write_bytes(data)
            written.append(path)
        return written


def _folder(images_dir: str) -> list[str]:
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise InvalidJob(f"images: no such folder {images_dir!r}", field="images")
    files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidJob(f"images: no .png, .jpg, .jpeg or .webp in {images_dir!r}", field="images")
    return files
