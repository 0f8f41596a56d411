"""Batches over the HTTP API: `Batch(farm, name)` and `submit_batch(farm, ...)` where `farm` is
a `RemoteFarm` (`Farm(url=..., token=...)`).

    >>> farm = Farm(url="http://farm:8000", token="farm_…")
    >>> submit_batch(farm, "cats.jsonl", "cats", variations=4)   # local pictures uploaded once
    >>> Batch(farm, "cats").wait(timeout=3600).counts

The manifest is read here (JSONL or CSV, as `farm batch submit` reads it); each local picture
it names (relative to the manifest) is uploaded once (`POST /v1/inputs`) and named by its
URI; the rows then go to `POST /v1/batches`, where the farm validates every row before it
writes anything and submits them as `farm batch submit` would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from farm.batches.batch import BatchStatus, check_name, wait_settled
from farm.batches.manifest import read_rows
from farm.errors import InvalidJob
from farm.inputs.resolver import is_uri
from farm.jobs.masks import parse_generator


class RemoteBatch:
    """A batch by name on a farm reached over its API: the calls `Batch` has."""

    def __init__(self, farm: Any, name: str) -> None:
        self.farm = farm
        self.name = check_name(name)

    def __repr__(self) -> str:
        return f"RemoteBatch({self.name!r})"

    def info(self) -> dict[str, Any]:
        """The API's answer: counts, images, rate, ETA, and failed jobs with their reasons."""
        return self.farm.call("GET", f"v1/batches/{self.name}").json()

    def status(self) -> BatchStatus:
        d = self.info()
        return BatchStatus(
            d["name"],
            d["total"],
            d["counts"],
            d["images_done"],
            d["images_total"],
            d["rate"],
            d["eta"],
        )

    def wait(
        self,
        timeout: float | None = None,
        *,
        on_status: Callable[[BatchStatus], None] | None = None,
        poll: float = 1.0,
        on_unavailable: Callable[[str | None], None] | None = None,
    ) -> BatchStatus:
        patience = self.farm.patience(on_unavailable)
        return wait_settled(
            self.name, lambda: patience.run(self.status), time.sleep, timeout, poll, on_status
        )

    def retry(self, *, cancelled: bool = False) -> list[str]:
        resp = self.farm.call(
            "POST", f"v1/batches/{self.name}/retry", json={"cancelled": cancelled}
        )
        return list(resp.json()["jobs"])

    def cancel(self) -> int:
        return int(self.farm.call("POST", f"v1/batches/{self.name}/cancel").json()["cancelled"])

    def job_ids(self) -> list[str]:
        out, cursor = [], None
        while True:
            params: dict[str, Any] = {"batch": self.name, "limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = self.farm.call("GET", "v1/jobs", params=params).json()
            out += [j["id"] for j in page["jobs"]]
            cursor = page["cursor"]
            if not cursor:
                return out[::-1]


def submit_remote(
    farm: Any,
    manifest: str | Path,
    name: str,
    *,
    defaults: dict[str, Any] | None = None,
    variations: int | None = None,
    seed: int | None = None,
) -> Any:
    """`submit_batch` over the API (see the module doc); a `SubmitResult`."""
    from farm.batches.submit import SubmitResult

    t0 = time.monotonic()
    path = Path(manifest)
    block, raw_rows = read_rows(path)
    rows = []
    for line, row in raw_rows:
        if isinstance(row, str):
            raise InvalidJob(f"{path.name}:{line}: {row}", field="manifest")
        rows.append(_uploaded(farm, row, path.parent, f"{path.name}:{line}"))
    merged = {**block, **(defaults or {})}
    body: dict[str, Any] = {
        "name": check_name(name),
        "rows": rows,
        "defaults": _uploaded(farm, merged, path.parent, "defaults"),
    }
    if variations is not None:
        body["variations"] = variations
    if seed is not None:
        body["seed"] = seed
    d = farm.call("POST", "v1/batches", json=body).json()
    return SubmitResult(
        d["name"],
        d["rows"],
        d["variations"],
        d["jobs"],
        d["new"],
        d["present"],
        0,
        time.monotonic() - t0,
    )


def _uploaded(farm: Any, row: dict[str, Any], folder: Path, where: str) -> dict[str, Any]:
    out = dict(row)
    for field, mask in (("image", False), ("mask", True)):
        value = out.get(field)
        if value is None or is_uri(value) or (mask and parse_generator(value) is not None):
            continue
        p = Path(str(value)).expanduser()
        p = p if p.is_absolute() else folder / p
        if not p.is_file():
            raise InvalidJob(f"{where}: {field}: no such file {str(value)!r}", field=field)
        out[field] = farm.input(str(p), field, mask=mask)
    return out
