"""A helper process that stores a big batch's inputs while the submit prepares the next chunk.

Why a process: storing thousands of small inputs is a storm of short system calls (open,
write, fsync, rename; or HTTP round trips). In the submitting process those threads and the
chunk preparation (decoding, drawing masks, building records) take turns on the GIL and
both crawl; measured on 2 cores, overlapping them in threads was slower than doing one after
the other. In its own process the uploads run beside the preparation instead.

    with UploadHelper(settings) as helper:
        done = helper.submit({"inputs/<sha>.png": png, ...})   # a Future
        ...                                                     # prepare the next chunk
        done.result()                                           # uploaded count, or raises

Protocol on the helper's stdin: `PUT <key> <length>\\n<bytes>` frames, then `FLUSH\\n`, on
which it stores what it got (`ObjectStore.put_missing`) and answers `OK <n>\\n` or
`ERR <message>\\n` on stdout. It exits at end of input. Settings travel in the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

from farm.errors import TransientError
from farm.settings import FarmSettings

CLOSE_TIMEOUT = 30.0
"""Seconds the helper is given to exit once its input ends; then it is killed."""


class UploadHelper:
    """Parent side: one helper process, fed one chunk at a time from a writer thread."""

    def __init__(self, settings: FarmSettings) -> None:
        from farm.settings import settings_env

        env = settings_env(settings)
        # This `farm`, wherever it is imported from (an install, a checkout on sys.path).
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "farm.inputs.uploader"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._writer = ThreadPoolExecutor(1, "farm-upload-helper")

    def __enter__(self) -> UploadHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, items: dict[str, bytes]) -> Future[int]:
        return self._writer.submit(self._send, items)

    def _send(self, items: dict[str, bytes]) -> int:
        frames = [b"PUT %s %d\n%s" % (k.encode(), len(v), v) for k, v in items.items()]
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(b"".join(frames) + b"FLUSH\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline().decode().rstrip("\n")
        except (BrokenPipeError, ValueError) as e:
            raise TransientError(f"the upload helper process died ({e})") from e
        status, _, detail = reply.partition(" ")
        if status != "OK":
            raise TransientError(f"uploading inputs failed: {detail or 'the helper died'}")
        return int(detail)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self.proc.stdin:
            self.proc.stdin.close()  # end of input: the helper exits
        # Waited for from a thread: `Popen.wait(timeout=...)` polls, sleeping up to 50 ms
        # past the helper's exit; a join wakes when it exits.
        reaper = threading.Thread(target=self.proc.wait, name="farm-upload-reaper", daemon=True)
        reaper.start()
        reaper.join(CLOSE_TIMEOUT)
        if reaper.is_alive():
            self.proc.kill()
            reaper.join()
        if self.proc.stdout:
            self.proc.stdout.close()


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """Helper side: store each flushed group of frames, answer for each."""
    from farm.storage import open_store

    store = open_store(FarmSettings())
    items: dict[str, bytes] = {}
    while line := stdin.readline():
        command, *args = line.decode().split()
        if command == "PUT":
            key, length = args[0], int(args[1])
            items[key] = stdin.read(length)
            continue
        try:
            reply = f"OK {store.put_missing(items)}"
        except Exception as e:  # the parent raises it; this process carries on
            reply = f"ERR {type(e).__name__}: {e}".replace("\n", " ")
        items = {}
        stdout.write(reply.encode() + b"\n")
        stdout.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
    # Every reply is flushed and every object stored (fsynced) already: exit without the
    # interpreter's teardown, which took 60-100 ms that the submit waited for.
    os._exit(0)
