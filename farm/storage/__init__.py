"""Object storage for inputs, outputs, masks and adapters: S3 (or compatible) or a folder.

    >>> store = open_store(FarmSettings(storage="s3://renders/farm"))
    >>> uri = store.put("jobs/abc/out/0.png", png_bytes)   # 's3://renders/farm/jobs/abc/out/0.png'
    >>> store.get_uri(uri) == png_bytes
    True

base.py   `ObjectStore`, the key rules (`check_key`) and the storage errors
local.py  `LocalStore`: a folder, atomic writes, first-writer-wins creates (`os.link`)
s3.py     `S3Store`: AWS S3, MinIO, any S3-compatible server (boto3, imported only here);
          first-writer-wins creates with `If-None-Match: *`

`put` replaces; `put_new` stores only where the key holds nothing yet, atomically, and says
whether it did: results are written with it, so what a job stored is never replaced (a
superseded attempt's late writes lose; see `workers.results`).

This wing imports `farm.errors` and `farm.settings` only. `open_store` imports boto3 only for
an `s3://` store, so a `file://` farm never loads it.
"""

from __future__ import annotations

from pathlib import Path

from farm.errors import InvalidJob
from farm.settings import FarmSettings
from farm.storage.base import ObjectNotFound, ObjectStore, StorageError, check_key, split_s3
from farm.storage.local import LocalStore, file_path

__all__ = [
    "LocalStore",
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "check_key",
    "open_store",
    "split_s3",
]


def open_store(settings: FarmSettings, *, allow_foreign: bool | None = None) -> ObjectStore:
    """The store `settings.storage_url()` names: `s3://bucket/prefix` or `file:///path`.
    It reads URIs outside itself only with `FARM_ALLOW_FOREIGN_INPUTS`."""
    if allow_foreign is None:
        allow_foreign = settings.allow_foreign_inputs
    url = settings.storage_url()
    bucket, prefix = split_s3(url)
    path = file_path(url)
    try:
        if bucket:
            from farm.storage.s3 import S3Store  # boto3 only where S3 is used

            return S3Store(
                bucket,
                prefix,
                endpoint_url=settings.s3_endpoint_url,
                region=settings.s3_region,
                allow_foreign=allow_foreign,
                max_attempts=settings.s3_max_attempts,
            )
        if path is not None:
            return LocalStore(Path(path), allow_foreign=allow_foreign)
        why = "expected s3://bucket/prefix or file:///absolute/path"
    except InvalidJob as e:
        why = str(e)
    raise InvalidJob(f"FARM_STORAGE: {why}, got {url!r}", field="storage")
