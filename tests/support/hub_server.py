"""A local HTTP server that serves folders the way the Hugging Face Hub API does, for
`farm models pull` (huggingface_hub's own `snapshot_download`) pointed at it with `HF_ENDPOINT`.

The endpoints `snapshot_download` calls (huggingface_hub/_snapshot_download.py, hf_api.py,
file_download.py):

    GET  /api/models/<org>/<name>/revision/<rev>     repo info: {"sha": commit, "siblings": […]}
    GET  /api/models/<org>/<name>/tree/<commit>      the file list ({"type": "file", path, size, oid})
    HEAD /<org>/<name>/resolve/<commit>/<path>       X-Repo-Commit, ETag, Content-Length
    GET  /<org>/<name>/resolve/<commit>/<path>       the bytes

Every request is logged in `requests` as (method, path), so a test can see what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubServer:
    """`HubServer({"org/name": folder})`, started on a free loopback port; `url` is its endpoint."""

    def __init__(self, repos: dict[str, Path], commit: str = "c0ffee" * 6 + "c0ff") -> None:
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.commit = commit
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def downloads(self) -> list[str]:
        """The repo paths whose bytes were fetched (GET …/resolve/…)."""
        return [
            path.split("/resolve/", 1)[1].split("/", 1)[1]
            for m, path in self.requests
            if m == "GET" and "/resolve/" in path
        ]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo, what = "/".join(parts[2:4]), parts[4]
                    if repo not in hub.repos:
                        return self._json({"error": "Repository not found"}, 404, body)
                    files = hub.files(repo)
                    if what == "revision":
                        info = {
                            "id": repo,
                            "sha": hub.commit,
                            "siblings": [{"rfilename": name} for name in files],
                        }
                        return self._json(info, 200, body)
                    if what == "tree":
                        tree = [
                            {"type": "file", "path": name, "size": p.stat().st_size, "oid": _oid(p)}
                            for name, p in files.items()
                        ]
                        return self._json(tree, 200, body)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                    file = hub.files(repo).get(name) if repo in hub.repos else None
                    if file is None:
                        return self._json({"error": "Entry not found"}, 404, body)
                    data = file.read_bytes()
                    self.send_response(200)
                    self.send_header("X-Repo-Commit", hub.commit)
                    self.send_header("ETag", f'"{_oid(file)}"')
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if body:
                        self.wfile.write(data)
                    return None
                return self._json({"error": "not found"}, 404, body)

            def _json(self, value: object, status: int, body: bool) -> None:
                data = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 404:
                    self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler


def _oid(path: Path) -> str:
    """The git blob id of a file, as the Hub gives it for files not in LFS."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
