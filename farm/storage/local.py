"""`LocalStore`: the farm's storage in a folder, with atomic writes and first-writer-wins
creates.

Every write goes to a temp file in one folder of its own, `<root>/.farm-tmp/`
(`TMP_DIR`, on the same filesystem as the objects, and a name no key may take), is fsynced,
then is moved into place:

    put      `os.replace(tmp, path)`: readers see the old bytes or the new, never half a file
    put_new  `os.link(tmp, path)`: the link fails with `FileExistsError` when the key exists,
             so of two writers of one key exactly one wins, atomically, and the loser's
             bytes are dropped with its temp file (POSIX `link(2)` never replaces a file;
             `O_EXCL` alone would let a reader see a half-written object)

`put_many` (a submit's inputs) writes and fsyncs every temp file at once, in parallel, moves
each into place, then fsyncs each folder once: one round of fsyncs, not a file's and its
folder's per object. `put_new_in_turn` (a worker's results: outputs, then meta.json) stages
the same way, links the first group and fsyncs their folders, then links the second: each
object is still visible only complete, and meta.json only once the outputs it names are
stored.

A process killed mid-write leaves its temp file behind; opening the store removes temp
files older than `STALE_TMP_SECONDS` (a write in flight is never that old), and because they
all live in one folder that costs one directory listing, not a walk of the store.
"""

from __future__ import annotations

import builtins
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import unquote, urlsplit

from farm.errors import InvalidJob, TransientError
from farm.storage.base import (
    DEFAULT_URL_EXPIRES,
    PUT_MANY_THREADS,
    TMP_DIR,
    TMP_PREFIX,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    _check_prefix,
    check_key,
)

STALE_TMP_SECONDS = 3600.0
"""A temp file this old belongs to a writer that died: opening the store removes it."""


class LocalStore(ObjectStore):
    """A directory (created if missing). Writes are atomic (a temp file, fsync, then
    `os.replace` or `os.link`: see the module docstring), so a reader sees the old bytes or
    the new ones, never half a file."""

    def __init__(self, root: Path | str, allow_foreign: bool = False) -> None:
        self.root = Path(root).expanduser().resolve()
        self.allow_foreign = allow_foreign
        self.tmp = self.root / TMP_DIR
        with suppress(OSError):  # a read-only client may not create it; `put` reports why
            self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temp_files()

    def remove_stale_temp_files(self, older_than: float = STALE_TMP_SECONDS) -> int:
        """Delete temp files left by writers that died mid-write; how many were removed."""
        removed = 0
        cutoff = time.time() - older_than
        with suppress(OSError), os.scandir(self.tmp) as entries:
            for entry in entries:
                with suppress(OSError):
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed

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
        with self._errors("put", key), self._temp_file(path, data) as tmp:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        return self.uri(key)

    def put_new(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        path = self._path(key)
        with self._errors("put", key), self._temp_file(path, data) as tmp:
            try:
                os.link(tmp, path)  # never replaces: the first writer of the key wins
            except FileExistsError:
                return False
            _fsync_dir(path.parent)
        return True

    def put_many(
        self, items: Mapping[str, bytes], content_type: str | None = None
    ) -> builtins.list[str]:  # `list` is a method in this class's scope
        """`put` for every item, in one round of fsyncs: every temp file written and fsynced
        in parallel, each moved into place, then each folder synced once (not once per
        object). Each object is still replaced atomically. URIs in `items` order."""
        for key in items:
            check_key(key)
        if len(items) <= 1:
            return super().put_many(items, content_type)
        with self._staged(items) as staged:
            folders = set()
            for key, tmp in staged.items():
                path = self._path(key)
                with self._errors("put", key):
                    os.replace(tmp, path)
                folders.add(path.parent)
            for folder in folders:
                _fsync_dir(folder)
        return [self.uri(key) for key in items]

    def put_new_in_turn(
        self, first: Mapping[str, bytes], then: Mapping[str, bytes]
    ) -> dict[str, bool]:
        for key in [*first, *then]:
            check_key(key)
        items = {**first, **then}
        if len(items) <= 1:
            return super().put_new_in_turn(first, then)
        # 1. Every temp file written and fsynced, in parallel: one round for all.
        with self._staged(items) as staged:
            # 2. The first group linked into place (never replacing), their folders synced;
            #    then the second group.
            stored: dict[str, bool] = {}
            for group in (first, then):
                folders = set()
                for key in group:
                    path = self._path(key)
                    with self._errors("put", key):
                        try:
                            os.link(staged[key], path)
                            stored[key] = True
                            folders.add(path.parent)
                        except FileExistsError:
                            stored[key] = False
                for folder in folders:
                    _fsync_dir(folder)
            return stored

    @contextmanager
    def _staged(self, items: Mapping[str, bytes]) -> Iterator[dict[str, Path]]:
        """Every item in a fsynced temp file, written in parallel (key → temp path); all are
        waited for, then the first failure (in `items` order) raised. Temp files left when
        the block ends (not moved) are removed."""
        staged: dict[str, Path] = {}
        try:
            with ThreadPoolExecutor(min(len(items), PUT_MANY_THREADS), "farm-put") as pool:
                futures = {k: pool.submit(self._stage, self._path(k), v) for k, v in items.items()}
            failed: tuple[str, BaseException] | None = None
            for key, future in futures.items():
                try:
                    staged[key] = future.result()
                except BaseException as e:  # every temp file kept, to be removed below
                    failed = failed or (key, e)
            if failed:
                with self._errors("put", failed[0]):
                    raise failed[1]
            yield staged
        finally:
            for tmp in staged.values():
                with suppress(OSError):
                    os.unlink(tmp)

    def _stage(self, path: Path, data: bytes) -> Path:
        """`data` in a fsynced temp file for `path` (the caller moves or links it, and
        removes it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        tmp = self.tmp / f"{TMP_PREFIX}{path.name}.{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp

    @contextmanager
    def _temp_file(self, path: Path, data: bytes) -> Iterator[Path]:
        """`data` in a fsynced temp file (in `TMP_DIR`), removed when the block ends."""
        tmp = self._stage(path, data)
        try:
            yield tmp
        finally:
            with suppress(OSError):
                os.unlink(tmp)  # moved by `put` already, or linked (or not) by `put_new`

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
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if not d.startswith(TMP_DIR)]  # the temp folder
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix) and not name.startswith(TMP_DIR):
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
        path = file_path(uri)
        root = self.root.as_posix().rstrip("/") + "/"
        if path is None or not path.startswith(root):
            return None
        try:
            return check_key(path[len(root) :])
        except InvalidJob:
            return None

    def _get_foreign(self, uri: str, field: str | None) -> bytes:
        path = file_path(uri)
        if path is None:
            raise InvalidJob(f"{field or 'uri'}: {uri!r} is not a file:///path URI", field=field)
        with self._errors("get", path):
            return Path(path).read_bytes()


def file_path(uri: str) -> str | None:
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
