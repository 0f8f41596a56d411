"""Object storage for inputs, outputs, masks and adapters: S3 (or compatible) or a folder.

    >>> store = open_store(FarmSettings(storage="s3://renders/farm"))
    >>> uri = store.put("jobs/abc/out/0.png", png_bytes)   # 's3://renders/farm/jobs/abc/out/0.png'
    >>> store.get_uri(uri) == png_bytes
    True

Keys are relative to the store's root (a bucket prefix or a folder) and are checked the same
way on both stores, so a key that works locally works on S3 and can never leave the root.

Errors, all `farm.errors.FarmError`:

    InvalidJob          a bad key, or a URI outside this store (unless `allow_foreign`)
    TransientError      storage unreachable, timed out, throttled or 5xx: a retry may cure it
    StorageError        permanent trouble: no such bucket, access denied, no credentials
     └── ObjectNotFound  no object under that key (also a `KeyError`)
"""

from __future__ import annotations

import builtins
import mimetypes
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import unquote, urlsplit

from farm.errors import FarmError, InvalidJob, TransientError
from farm.settings import FarmSettings

DEFAULT_URL_EXPIRES = 900
"""Seconds a presigned GET URL stays valid by default (short: URLs leak into logs)."""

MAX_URL_EXPIRES = 3600
"""Presigned URLs are GET-only and short-lived: an hour at most."""

PUT_MANY_THREADS = 16
"""Parallel uploads in `put_many` (kept below the S3 client's connection pool)."""

_TMP_PREFIX = ".farm-tmp-"
"""LocalStore's in-flight temp files start with this; keys may not."""

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
    character, or a segment starting with `.farm-tmp-` (LocalStore's temp files).
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
            if seg.startswith(_TMP_PREFIX):
                why = f"has a segment starting with {_TMP_PREFIX!r} (reserved)"
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


# --------------------------------------------------------------------------- S3


class LocalStore(ObjectStore):
    """A directory (created if missing). Writes are atomic (temp file in the same folder, fsync, `os.replace`), so a
    reader sees the old bytes or the new ones, never half a file."""

    def __init__(self, root: Path | str, allow_foreign: bool = False) -> None:
        self.root = Path(root).expanduser().resolve()
        self.allow_foreign = allow_foreign
        with suppress(OSError):  # a read-only client may not create it; `put` reports why
            self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    @contextmanager
    def _errors(self, what: str, key: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, IsADirectoryError) as e:
            if what != "get":  # e.g. putting a key where a folder is
                raise StorageError(f"{what} {key!r} in {self.root}: {e}") from e
            raise ObjectNotFound(f"{what} {key!r} in {self.root}: no such object") from e
        except (PermissionError, NotADirectoryError, FileExistsError) as e:
            raise StorageError(f"{what} {key!r} in {self.root}: {e}") from e
        except OSError as e:  # disk full, I/O error, stale NFS handle
            raise TransientError(f"{what} {key!r} in {self.root}: {e}") from e

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self._path(key)
        with self._errors("put", key):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{secrets.token_hex(6)}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(path.parent)
        return self.uri(key)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with self._errors("get", key):
            real = Path(os.path.realpath(path))
            if not real.is_relative_to(self.root):
                raise StorageError(f"get {key!r}: a link out of {self.root}")
            return real.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        base = self.root.joinpath(*prefix.split("/")[:-1])
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix) and not name.startswith(_TMP_PREFIX):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors("delete", key):
            path.unlink(missing_ok=True)

    def url(self, key: str, expires: int = DEFAULT_URL_EXPIRES) -> str:
        return self._path(key).as_uri()

    def uri(self, key: str) -> str:
        return self._path(key).as_uri() if key else self.root.as_uri() + "/"

    def key_of(self, uri: str) -> str | None:
        path = _file_path(uri)
        root = self.root.as_posix().rstrip("/") + "/"
        if path is None or not path.startswith(root):
            return None
        try:
            return check_key(path[len(root) :])
        except InvalidJob:
            return None

    def _get_foreign(self, uri: str, field: str | None) -> bytes:
        path = _file_path(uri)
        if path is None:
            raise InvalidJob(f"{field or 'uri'}: {uri!r} is not a file:///path URI", field=field)
        with self._errors("get", path):
            return Path(path).read_bytes()


def _file_path(uri: str) -> str | None:
    """The absolute path of a `file:///...` URI (percent-decoded), None for anything else."""
    if not isinstance(uri, str) or not uri.startswith("file:"):
        return None
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        return None
    return unquote(parts.path)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: some filesystems refuse fsync on a directory)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- choosing one


def open_store(settings: FarmSettings, *, allow_foreign: bool | None = None) -> ObjectStore:
    """The store `settings.storage_url()` names: `s3://bucket/prefix` or `file:///path`.
    It reads URIs outside itself only with `FARM_ALLOW_FOREIGN_INPUTS`."""
    if allow_foreign is None:
        allow_foreign = settings.allow_foreign_inputs
    url = settings.storage_url()
    from farm.s3 import S3Store, split_s3  # boto3 only where S3 is used

    bucket, prefix = split_s3(url)
    path = _file_path(url)
    try:
        if bucket:
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
