"""A TCP proxy on loopback that a test can take down and bring back (a storage outage), hold
(requests accepted but not passed on until released: a partition that delays a worker's PUTs),
and that can terminate TLS in front of a plain server."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading

from farm.local.embedded import free_port


class TcpProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target>. `down()` refuses and drops
    connections (as a dead server does) until `up()`. `hold()` keeps every byte sent to the
    server (`held_bytes` counts them) until `release()` passes them on, in order."""

    def __init__(self, target: int, tls: ssl.SSLContext | None = None) -> None:
        self.target = target
        self.tls = tls
        """Terminate TLS here (a `rediss://` front for a plain server)."""
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._holding = False
        self._pending: dict[socket.socket, list[bytes]] = {}
        self._send_lock = threading.Lock()
        self.held_bytes = 0
        """Bytes held since the last `hold()`."""
        self.requests = 0
        """Reads passed on to the server: each request a client sends and waits on is one
        (a small one, in one read), so their count is the client's round trips."""

    def hold(self) -> None:
        with self._send_lock:
            self._holding = True
            self.held_bytes = 0

    def release(self) -> None:
        with self._send_lock:
            self._holding = False
            pending, self._pending = self._pending, {}
            for dst, chunks in pending.items():
                for chunk in chunks:
                    with contextlib.suppress(OSError):
                        dst.sendall(chunk)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: down()
            try:
                if self.tls:
                    client = self.tls.wrap_socket(client, server_side=True)
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # ssl.SSLError included: a client that does not trust us
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, upstream), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if not upstream:
                    dst.sendall(data)
                    continue
                with self._send_lock:  # in order with what `release` passes on
                    self.requests += 1
                    if self._holding:
                        self._pending.setdefault(dst, []).append(data)
                        self.held_bytes += len(data)
                    else:
                        dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
