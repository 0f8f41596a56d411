"""The storage interface: `ObjectStore`, its key rules and its errors.

Keys are relative to the store's root (a bucket prefix or a folder) and are checked the same
way on every store (`check_key`), so a key that works locally works on S3 and can never leave
the root.

Errors, all `farm.errors.FarmError`:

    InvalidJob          a bad key, or a URI outside this store (unless `allow_foreign`)
    TransientError      storage unreachable, timed out, throttled or 5xx: a retry may cure it
    StorageError        permanent trouble: no such bucket, access denied, no credentials
     └── ObjectNotFound  no object under that key (also a `KeyError`)
"""

from __future__ import annotations

import builtins
import mimetypes
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from farm.errors import FarmError, InvalidJob

DEFAULT_URL_EXPIRES = 900
"""Seconds a presigned GET URL stays valid by default (short: URLs leak into logs)."""

MAX_URL_EXPIRES = 3600
"""Presigned URLs are GET-only and short-lived: an hour at most."""

PUT_MANY_THREADS = 16
"""Parallel uploads in `put_many` (kept below the S3 client's connection pool)."""

TMP_PREFIX = ".farm-tmp-"
"""LocalStore's in-flight temp files start with this; keys may not."""

TMP_DIR = ".farm-tmp"
"""LocalStore's folder of in-flight temp files; no key segment may start with it."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
"""Control characters, refused in keys."""


class StorageError(FarmError):
    """Storage refused for good (no such bucket, access denied, no credentials)."""


class ObjectNotFound(StorageError, KeyError):
    """No object under that key. Also a `KeyError`, so `except KeyError` works."""

    def __str__(self) -> str:  # KeyError.__str__ would quote the message
        msg = str(self.args[0]) if self.args else ""
        return f"job {self.job_id}: {msg}" if self.job_id else msg


# --------------------------------------------------------------------------- keys


def check_key(key: str) -> str:
    """`key` if it is a safe relative key, else `InvalidJob` naming it.

    Refused: empty, a leading `/`, a backslash, an empty, `.` or `..` segment, a control
    character, or a segment starting with `.farm-tmp` (LocalStore's temp files and their folder).
    """
    if not isinstance(key, str) or not key:
        raise InvalidJob(f"storage key must be a non-empty string, got {key!r}", field="key")
    why = None
    if key.startswith("/"):
        why = "starts with '/'"
    elif "\\" in key:
        why = "contains a backslash"
    elif _CONTROL.search(key):
        why = "contains a control character"
    else:
        for seg in key.split("/"):
            if seg in ("", ".", ".."):
                why = f"has an empty, '.' or '..' segment ({seg!r})"
                break
            if seg.startswith(TMP_DIR):
                why = f"has a segment starting with {TMP_DIR!r} (reserved)"
                break
    if why:
        raise InvalidJob(f"storage key {key!r} {why}", field="key")
    return key


def _check_prefix(prefix: str) -> str:
    """A listing prefix: like a key, but may be empty or end with '/'."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _content_type(key: str, content_type: str | None) -> str:
    return content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"


# --------------------------------------------------------------------------- the interface


class ObjectStore(ABC):
    """Bytes under relative keys, addressable by URI. Safe to share between threads."""

    allow_foreign: bool = False

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Store `data` under `key` (replacing it); return its URI. Type guessed from the key."""

    @abstractmethod
    def put_new(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """Store `data` under `key` only if no object is there yet; True if this call wrote
        it, False if the key existed (the bytes are dropped). Atomic: of writers racing for
        one key exactly one wins, so an object once stored is never replaced (S3
        `If-None-Match: *`, `os.link` on a folder). What a worker's results are written with:
        a superseded attempt can never replace what the current one stored."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes under `key`, or `ObjectNotFound`."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to the root) starting with `prefix` (a string prefix, as S3)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    @abstractmethod
    def url(self, key: str, expires: int = DEFAULT_URL_EXPIRES) -> str:
        """A URL a browser or `curl` can fetch: presigned GET on S3, `file://` locally."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """The canonical URI of `key`: `s3://bucket/prefix/key` or `file:///root/key`."""

    @abstractmethod
    def key_of(self, uri: str) -> str | None:
        """The key of `uri` if it lies inside this store, else None."""

    @abstractmethod
    def _get_foreign(self, uri: str, field: str | None) -> bytes:
        """Read a URI outside this store (only reached when `allow_foreign`)."""

    def owns(self, uri: str) -> bool:
        return self.key_of(uri) is not None

    def get_uri(self, uri: str, *, field: str | None = None) -> bytes:
        """The bytes at `uri`. A URI outside this store is `InvalidJob` unless `allow_foreign`."""
        key = self.key_of(uri)
        if key is not None:
            return self.get(key)
        if not self.allow_foreign:
            where = f"{field}: " if field else ""
            raise InvalidJob(
                f"{where}{uri!r} is outside this farm's storage ({self.uri('')!r})", field=field
            )
        return self._get_foreign(uri, field)

    def put_many(
        self, items: Mapping[str, bytes], content_type: str | None = None
    ) -> builtins.list[str]:  # `list` is a method in this class's scope
        """Store every item in parallel; URIs in `items` order. Every key is checked first.

        All uploads are waited for; then the first failure (in `items` order) is raised.
        """
        for key in items:
            check_key(key)
        if len(items) <= 1:
            return [self.put(k, v, content_type) for k, v in items.items()]
        with ThreadPoolExecutor(min(len(items), PUT_MANY_THREADS), "farm-put") as pool:
            futures = [pool.submit(self.put, k, v, content_type) for k, v in items.items()]
        return [f.result() for f in futures]

    def put_many_new(self, items: Mapping[str, bytes]) -> dict[str, bool]:
        """`put_new` for every item, in parallel: key → True where this call wrote it, False
        where the key held an object already. All are waited for; then the first failure (in
        `items` order) is raised."""
        for key in items:
            check_key(key)
        if len(items) <= 1:
            return {k: self.put_new(k, v) for k, v in items.items()}
        with ThreadPoolExecutor(min(len(items), PUT_MANY_THREADS), "farm-put") as pool:
            futures = {k: pool.submit(self.put_new, k, v) for k, v in items.items()}
        return {k: f.result() for k, f in futures.items()}

    def put_new_in_turn(
        self, first: Mapping[str, bytes], then: Mapping[str, bytes]
    ) -> dict[str, bool]:
        """`put_many_new(first)`, then `put_many_new(then)`: no object of `then` is visible
        before every one of `first` is stored (a job's meta.json after its outputs). Key →
        True where this call wrote it, for both. A store may do it in fewer rounds
        (`LocalStore`: one round of fsyncs for both)."""
        stored = self.put_many_new(first)
        return stored | self.put_many_new(then)

    def put_missing(self, items: Mapping[str, bytes]) -> int:
        """Store the content-addressed `items` not stored yet; how many were uploaded.

        The existence checks (a HEAD each on S3) run in parallel, then the uploads do
        (`put_many`): an input that a thousand jobs share is stored once.
        """
        keys = builtins.list(items)
        if len(keys) > 1:
            with ThreadPoolExecutor(min(len(keys), PUT_MANY_THREADS), "farm-exists") as pool:
                stored = builtins.list(pool.map(self.exists, keys))
        else:
            stored = [self.exists(k) for k in keys]
        missing = {k: items[k] for k, there in zip(keys, stored, strict=True) if not there}
        if missing:
            self.put_many(missing)
        return len(missing)


def split_s3(uri: str) -> tuple[str | None, str]:
    """(bucket, key) of an `s3://` URI, (None, '') for anything else. Keys are not unquoted."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        return None, ""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key
