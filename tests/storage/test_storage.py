"""ObjectStore on both backends: a folder, and S3 over HTTP (moto in server mode)."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError

from farm.errors import FarmError, InvalidJob, TransientError
from farm.settings import FarmSettings
from farm.storage import ObjectNotFound, ObjectStore, StorageError, check_key, open_store
from farm.storage.local import LocalStore
from farm.storage.s3 import S3Store
from tests.support.s3_server import S3Server

BAD_KEYS = [
    "",
    "/abs.png",
    "a/../b.png",
    "..",
    "a/./b.png",
    "a//b.png",
    "a/",
    "a\\b.png",
    "a/\nb.png",
    "a/.farm-tmp-x",
]


# --------------------------------------------------------------------------- both stores


def test_put_get_exists_delete(store: ObjectStore) -> None:
    uri = store.put("jobs/j1/out/0.png", b"\x89PNG one")

    assert uri == store.uri("jobs/j1/out/0.png")
    assert store.get("jobs/j1/out/0.png") == b"\x89PNG one"
    assert store.exists("jobs/j1/out/0.png")
    assert not store.exists("jobs/j1/out/1.png")

    store.put("jobs/j1/out/0.png", b"two")  # replaces
    assert store.get("jobs/j1/out/0.png") == b"two"

    store.delete("jobs/j1/out/0.png")
    assert not store.exists("jobs/j1/out/0.png")
    store.delete("jobs/j1/out/0.png")  # deleting a missing key is not an error


def test_put_new_first_writer_wins_and_the_loser_drops_its_bytes(store: ObjectStore) -> None:
    assert store.put_new("jobs/j1/out/0.png", b"first") is True
    assert store.put_new("jobs/j1/out/0.png", b"second") is False
    assert store.get("jobs/j1/out/0.png") == b"first"
    assert store.put_many_new({"jobs/j1/out/0.png": b"third", "jobs/j1/meta.json": b"{}"}) == {
        "jobs/j1/out/0.png": False,
        "jobs/j1/meta.json": True,
    }
    assert store.get("jobs/j1/out/0.png") == b"first"
    assert store.list("jobs/j1/") == ["jobs/j1/meta.json", "jobs/j1/out/0.png"]


def test_put_new_racing_writers_exactly_one_wins(store: ObjectStore) -> None:
    n = 8
    barrier = threading.Barrier(n)
    won: list[bytes] = []

    def write(i: int) -> None:
        data = f"writer {i}".encode() * 1000
        barrier.wait()
        if store.put_new("jobs/race/out/0.png", data):
            won.append(data)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert store.get("jobs/race/out/0.png") == won[0]


def test_put_new_in_turn_keeps_what_is_there_in_both_groups(store: ObjectStore) -> None:
    store.put_new("jobs/t/out/1.png", b"earlier attempt")
    stored = store.put_new_in_turn(
        {f"jobs/t/out/{i}.png": b"out %d" % i for i in range(3)},
        {"jobs/t/meta.json": b"{}", "jobs/u/meta.json": b"{}"},
    )
    assert stored == {
        "jobs/t/out/0.png": True,
        "jobs/t/out/1.png": False,
        "jobs/t/out/2.png": True,
        "jobs/t/meta.json": True,
        "jobs/u/meta.json": True,
    }
    assert store.get("jobs/t/out/1.png") == b"earlier attempt"
    assert store.get("jobs/t/out/2.png") == b"out 2"
    assert store.put_new_in_turn({"jobs/t/out/0.png": b"x"}, {"jobs/t/meta.json": b"y"}) == {
        "jobs/t/out/0.png": False,
        "jobs/t/meta.json": False,
    }
    assert store.get("jobs/t/meta.json") == b"{}"


def test_empty_and_binary_payloads_round_trip(store: ObjectStore) -> None:
    payload = bytes(range(256)) * 1000
    store.put("a/empty.bin", b"")
    store.put("a/all-bytes.bin", payload)
    assert store.get("a/empty.bin") == b""
    assert store.get("a/all-bytes.bin") == payload


def test_missing_key_is_object_not_found_and_a_key_error(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound, match="nope.png") as info:
        store.get("inputs/nope.png")
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, FarmError)
    assert not str(info.value).startswith("'")  # not KeyError's quoting


def test_list_returns_sorted_keys_relative_to_the_root(store: ObjectStore) -> None:
    for key in ["jobs/b/out/0.png", "jobs/a/meta.json", "jobs/ab/out/0.png", "inputs/x.png"]:
        store.put(key, b"x")

    assert store.list() == [
        "inputs/x.png",
        "jobs/a/meta.json",
        "jobs/ab/out/0.png",
        "jobs/b/out/0.png",
    ]
    assert store.list("jobs/a/") == ["jobs/a/meta.json"]
    assert store.list("jobs/a") == ["jobs/a/meta.json", "jobs/ab/out/0.png"]  # a string prefix
    assert store.list("jobs/b/out/0.png") == ["jobs/b/out/0.png"]
    assert store.list("nothing/") == []


def test_uri_names_the_backend_and_the_key(store: ObjectStore, settings: FarmSettings) -> None:
    uri = store.uri("inputs/abc.png")
    if isinstance(store, S3Store):
        assert uri == f"{settings.storage}/inputs/abc.png"
    else:
        assert isinstance(store, LocalStore)
        assert uri == (store.root / "inputs" / "abc.png").as_uri()


def test_get_uri_reads_a_uri_of_this_store(store: ObjectStore) -> None:
    uri = store.put("inputs/with space é.png", b"pixels")

    assert store.owns(uri)
    assert store.get_uri(uri) == b"pixels"


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_refused_by_every_method(store: ObjectStore, key: str) -> None:
    calls = [
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.url(key),
        lambda: store.put_many({"ok.png": b"x", key: b"x"}),
    ]
    for call in calls:
        with pytest.raises(InvalidJob, match="storage key") as info:
            call()
        assert info.value.field == "key"
    assert store.list() == []  # put_many checked every key before uploading any


def test_check_key_accepts_ordinary_keys() -> None:
    for key in ["a.png", "inputs/abc.png", "adapters/j1/pytorch_lora_weights.safetensors", "é/ü"]:
        assert check_key(key) == key


def test_uris_outside_the_store_are_refused(store: ObjectStore, tmp_path: Path) -> None:
    store.put("inputs/a.png", b"mine")
    root = store.uri("")
    foreign = [
        "s3://some-other-bucket/inputs/a.png",
        root + "../escape.png",
        root + "inputs/../../escape.png",
        (tmp_path / "outside.png").as_uri(),
        "file:///etc/passwd",
        "http://example.com/a.png",
        "inputs/a.png",
    ]
    for uri in foreign:
        assert not store.owns(uri), uri
        with pytest.raises(InvalidJob, match="outside this farm's storage") as info:
            store.get_uri(uri, field="image")
        assert info.value.field == "image"


def test_put_many_uploads_in_parallel(store: ObjectStore, monkeypatch) -> None:
    # The first four puts meet at a barrier: a sequential put_many would time out here.
    barrier = threading.Barrier(4, timeout=20)
    real_put = store.put
    seen = 0
    lock = threading.Lock()

    def put_meeting_at_the_barrier(key, data, content_type=None):
        nonlocal seen
        with lock:
            seen += 1
            first_four = seen <= 4
        if first_four:
            barrier.wait()
        return real_put(key, data, content_type)

    monkeypatch.setattr(store, "put", put_meeting_at_the_barrier)
    items = {f"jobs/j/out/{i}.png": f"image {i}".encode() for i in range(40)}

    uris = store.put_many(items)

    assert uris == [store.uri(k) for k in items]
    assert store.list("jobs/j/out/") == sorted(items)
    assert all(store.get(k) == v for k, v in items.items())


def test_url_can_be_fetched(store: ObjectStore) -> None:
    store.put("jobs/j/out/0.png", b"result")

    url = store.url("jobs/j/out/0.png")

    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"result"


# --------------------------------------------------------------------------- S3 specifics


@pytest.fixture
def s3_store(s3_server: S3Server, request) -> S3Store:
    bucket = "s3-" + request.node.name.lower().replace("_", "-")[:50]
    store = S3Store(bucket, "pre/fix", endpoint_url=s3_server.endpoint_url, region="us-east-1")
    store.ensure_bucket()
    return store


def test_s3_honours_conditional_writes(s3_store: S3Store) -> None:
    assert s3_store.conditional_writes_honoured() is True  # what a worker checks at start
    assert s3_store.list() == []


def test_s3_url_is_a_short_lived_presigned_get(s3_store: S3Store) -> None:
    url = s3_store.url("a.png")
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
    assert "X-Amz-Expires=900" in url
    assert "X-Amz-Expires=60" in s3_store.url("a.png", expires=60)
    with pytest.raises(InvalidJob, match="expires"):
        s3_store.url("a.png", expires=0)


def test_s3_content_type_is_guessed_or_given(s3_store: S3Store) -> None:
    s3_store.put("a.png", b"x")
    s3_store.put("meta.json", b"{}")
    s3_store.put("w.safetensors", b"x")
    s3_store.put("b.png", b"x", content_type="image/x-custom")

    def content_type(key: str) -> str:
        return s3_store.client.head_object(Bucket=s3_store.bucket, Key="pre/fix/" + key)[
            "ContentType"
        ]

    assert content_type("a.png") == "image/png"
    assert content_type("meta.json") == "application/json"
    assert content_type("w.safetensors") == "application/octet-stream"
    assert content_type("b.png") == "image/x-custom"


def test_s3_prefix_is_honoured_and_hidden(s3_store: S3Store) -> None:
    uri = s3_store.put("k.png", b"x")
    assert uri == f"s3://{s3_store.bucket}/pre/fix/k.png"
    keys = s3_store.client.list_objects_v2(Bucket=s3_store.bucket)["Contents"]
    assert [o["Key"] for o in keys] == ["pre/fix/k.png"]
    assert s3_store.list() == ["k.png"]
    assert not s3_store.owns(f"s3://{s3_store.bucket}/k.png")  # same bucket, outside the prefix


def test_s3_foreign_bucket_readable_only_when_allowed(s3_server: S3Server) -> None:
    other = S3Store("other-bucket", endpoint_url=s3_server.endpoint_url, region="us-east-1")
    other.ensure_bucket()
    uri = other.put("shared/cat.png", b"cat")
    ours = dict(endpoint_url=s3_server.endpoint_url, region="us-east-1")

    with pytest.raises(InvalidJob, match="other-bucket"):
        S3Store("our-bucket", **ours).get_uri(uri)
    assert S3Store("our-bucket", allow_foreign=True, **ours).get_uri(uri) == b"cat"


def test_s3_ensure_bucket_is_idempotent(s3_store: S3Store) -> None:
    s3_store.ensure_bucket()
    s3_store.ensure_bucket()


def test_s3_missing_bucket_is_a_storage_error_not_a_missing_key(s3_server: S3Server) -> None:
    store = S3Store("never-created", endpoint_url=s3_server.endpoint_url, region="us-east-1")
    with pytest.raises(StorageError, match="NoSuchBucket") as info:
        store.get("a.png")
    assert not isinstance(info.value, ObjectNotFound | TransientError)


def test_s3_server_stopped_is_transient_and_quick(aws_env) -> None:
    with S3Server() as server:
        store = S3Store(
            "fault", endpoint_url=server.endpoint_url, connect_timeout=1, max_attempts=2
        )
        store.ensure_bucket()
        store.put("a.png", b"x")
    started = time.monotonic()
    for call in [
        lambda: store.get("a.png"),
        lambda: store.put("b.png", b"x"),
        lambda: store.exists("a.png"),
        lambda: store.list(),
        lambda: store.put_many({"c.png": b"x", "d.png": b"x"}),
    ]:
        with pytest.raises(TransientError, match="storage unavailable") as info:
            call()
        assert isinstance(info.value.__cause__, EndpointConnectionError)
    assert time.monotonic() - started < 20


class _ErrorHandler(http.server.BaseHTTPRequestHandler):
    """An S3-shaped server that answers every request with one fixed error."""

    status = 503
    code = "SlowDown"

    def _answer(self) -> None:
        body = f"<Error><Code>{self.code}</Code><Message>no</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def error_server(request) -> Iterator[str]:
    status, code = request.param
    handler = type("Handler", (_ErrorHandler,), {"status": status, "code": code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "error_server, expected",
    [
        ((503, "SlowDown"), TransientError),
        ((500, "InternalError"), TransientError),
        ((403, "AccessDenied"), StorageError),
    ],
    indirect=["error_server"],
)
def test_s3_http_errors_map_onto_the_error_tree(error_server: str, expected, aws_env) -> None:
    store = S3Store("bucket", endpoint_url=error_server, region="us-east-1", max_attempts=2)
    with pytest.raises(expected) as info:
        store.get("a.png")
    assert "a.png" in str(info.value)
    if expected is StorageError:
        assert not isinstance(info.value, TransientError)


def test_s3_read_timeout_is_transient(aws_env) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        store = S3Store(
            "bucket",
            endpoint_url=f"http://127.0.0.1:{port}",
            region="us-east-1",
            read_timeout=0.5,
            max_attempts=1,
        )
        started = time.monotonic()
        with pytest.raises(TransientError):
            store.get("a.png")
        assert time.monotonic() - started < 10


# --------------------------------------------------------------------------- local specifics


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.put("jobs/j/out/0.png", b"old")

    with pytest.raises(TypeError):
        store.put("jobs/j/out/0.png", "not bytes")  # type: ignore[arg-type]  # fails mid-write

    assert store.get("jobs/j/out/0.png") == b"old"
    store.put_many({f"jobs/j/out/{i}.png": b"new" for i in range(20)})
    leftovers = [p for p in (tmp_path / "root").rglob("*") if p.name.startswith(".farm-tmp-")]
    assert leftovers == []


def _disk_events(monkeypatch, move: str, name=None) -> list[str]:
    """What the store does to the disk, in order: `file-sync`, `dir-sync`, and each `move`
    (`os.link` or `os.replace`), with `name(dst)` after it when given."""
    import stat

    events: list[str] = []
    real_fsync, real_move = os.fsync, getattr(os, move)

    def fsync(fd: int) -> None:
        events.append("dir-sync" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file-sync")
        real_fsync(fd)

    def moved(src, dst, **kw) -> None:
        real_move(src, dst, **kw)
        events.append(f"{move} {Path(name(dst)).as_posix()}" if name else move)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, move, moved)
    return events


def test_local_results_take_one_fsync_round_and_meta_json_is_linked_last(
    tmp_path: Path, monkeypatch
) -> None:
    """A worker's results on a folder: every temp file fsynced before anything is linked (one
    round, not one per object plus one for meta.json), the outputs linked and their folders
    synced before meta.json appears."""
    store = LocalStore(tmp_path / "root")
    events = _disk_events(monkeypatch, "link", lambda dst: Path(dst).relative_to(store.root))
    outputs = {f"jobs/{j}/out/{i}.png": b"png" for j in "ab" for i in range(2)}
    metas = {f"jobs/{j}/meta.json": b"{}" for j in "ab"}
    store.put_new_in_turn(outputs, metas)

    first_link = next(i for i, e in enumerate(events) if e.startswith("link"))
    assert events[:first_link] == ["file-sync"] * 6  # one round: all six, nothing linked yet
    assert "file-sync" not in events[first_link:]
    meta_links = [i for i, e in enumerate(events) if e.endswith("meta.json")]
    out_links = [i for i, e in enumerate(events) if e.startswith("link") and "/out/" in e]
    assert max(out_links) < min(meta_links)
    assert "dir-sync" in events[max(out_links) : min(meta_links)]
    assert events[-1] == "dir-sync"  # meta.json's folders synced too
    assert not any(p.name.startswith(".farm-tmp-") for p in store.root.rglob("*"))


def test_local_put_many_takes_one_fsync_round_and_one_sync_per_folder(
    tmp_path: Path, monkeypatch
) -> None:
    """A submit's inputs on a folder: every temp file fsynced before any is moved into place,
    then each folder synced once, not a file's and its folder's fsync per object. A failing
    item leaves no temp file behind and the others as they were."""
    store = LocalStore(tmp_path / "root")
    store.put("inputs/b/0.png", b"old")
    events = _disk_events(monkeypatch, "replace")
    items = {f"inputs/{d}/{i}.png": f"{d}{i}".encode() for d in "ab" for i in range(3)}
    uris = store.put_many(items)

    assert uris == [store.uri(k) for k in items]
    assert {k: store.get(k) for k in items} == items  # inputs/b/0.png replaced
    assert events == ["file-sync"] * 6 + ["replace"] * 6 + ["dir-sync"] * 2

    with pytest.raises(TypeError):
        store.put_many({"inputs/a/0.png": b"new", "inputs/a/9.png": "not bytes"})  # type: ignore[dict-item]
    assert store.get("inputs/a/0.png") == b"a0"  # nothing moved: the batch failed first
    assert not store.exists("inputs/a/9.png")
    assert not any(p.name.startswith(".farm-tmp-") for p in store.root.rglob("*"))


def test_local_readers_see_whole_files_only(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    a, b = b"a" * 1_000_000, b"b" * 1_000_001
    store.put("big.bin", a)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            store.put("big.bin", b)
            store.put("big.bin", a)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(200):
            assert store.get("big.bin") in (a, b)
    finally:
        stop.set()
        thread.join()


KILLED_WRITER = """
import sys
from farm.storage.local import LocalStore
LocalStore(sys.argv[1]).put("jobs/j/out/0.png", b"x" * (400 << 20))
"""


def test_local_store_killed_mid_write_leaves_no_temp_files_forever(tmp_path: Path) -> None:
    root = tmp_path / "root"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root)])
    tmp_dir = root / ".farm-tmp"
    deadline = time.monotonic() + 60
    while not (tmp_dir.is_dir() and any(tmp_dir.iterdir())):
        assert time.monotonic() < deadline and writer.poll() is None
        time.sleep(0.001)
    writer.kill()  # mid-write: the temp file stays behind
    writer.wait()
    (left,) = list(tmp_dir.iterdir())
    assert left.name.startswith(".farm-tmp-")
    store = LocalStore(root)  # a fresh one leaves a write that may still be in flight alone
    assert left.exists() and store.list() == []
    hour_ago = time.time() - 3601
    os.utime(left, (hour_ago, hour_ago))
    LocalStore(root)  # the next open: older than an hour is a dead writer's
    assert not left.exists()
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_local_list_skips_in_flight_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("jobs/j/meta.json", b"{}")
    (tmp_path / "jobs" / "j" / ".farm-tmp-meta.json.abc123").write_bytes(b"half")
    assert store.list() == ["jobs/j/meta.json"]


def test_local_link_out_of_the_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"secret")
    store = LocalStore(tmp_path / "root")
    store.put("inputs/ok.png", b"x")
    os.symlink(tmp_path / "secret", tmp_path / "root" / "inputs" / "link.png")
    with pytest.raises(StorageError, match="link"):
        store.get("inputs/link.png")


def test_local_foreign_file_readable_only_when_allowed(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "cat.png"
    outside.parent.mkdir()
    outside.write_bytes(b"cat")

    with pytest.raises(InvalidJob):
        LocalStore(tmp_path / "root").get_uri(outside.as_uri())
    assert LocalStore(tmp_path / "root", allow_foreign=True).get_uri(outside.as_uri()) == b"cat"


def test_local_url_is_a_file_uri(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.url("a b.png") == (tmp_path / "a b.png").as_uri()


def test_local_key_where_a_folder_is_is_a_storage_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("jobs/j/out/0.png", b"x")
    with pytest.raises(StorageError, match="jobs/j/out"):
        store.put("jobs/j/out", b"x")
    with pytest.raises(ObjectNotFound):
        store.get("jobs/j/out")


# --------------------------------------------------------------------------- open_store


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    local = open_store(FarmSettings(storage=(tmp_path / "s").as_uri()))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "s"

    s3 = open_store(FarmSettings(storage="s3://bucket/some/prefix", s3_endpoint_url="http://x:1"))
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("bucket", "some/prefix/", "http://x:1")

    default = open_store(FarmSettings(home=tmp_path / "home"))
    assert isinstance(default, LocalStore) and default.root == tmp_path / "home" / "storage"


@pytest.mark.parametrize(
    "value",
    ["http://example.com/bucket", "/plain/path", "s3://", "file://host/x", "gs://b/p", "s3://B_/"],
)
def test_open_store_refuses_other_urls(value: str) -> None:
    with pytest.raises(InvalidJob, match="FARM_STORAGE") as info:
        open_store(FarmSettings(storage=value))
    assert value.rstrip("/") in str(info.value)


def test_a_folder_store_never_loads_boto3(tmp_path):
    """`open_store` imports boto3 only for an s3:// store (it costs ~100 ms and a dependency a
    local farm does not need)."""
    code = (
        "import sys\n"
        "from farm.settings import FarmSettings\n"
        "from farm.storage import open_store\n"
        f"store = open_store(FarmSettings(storage={(tmp_path / 'store').as_uri()!r}))\n"
        "store.put('a/b.txt', b'x')\n"
        "assert store.get('a/b.txt') == b'x'\n"
        "loaded = {'boto3', 'botocore'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
