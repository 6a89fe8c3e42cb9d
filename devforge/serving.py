"""Serving an ASGI app on loopback from a thread: for tests, benchmarks and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


def loopback_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound to ``port`` (default: a free one) on 127.0.0.1, not yet listening."""
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket's proto is IPPROTO_TCP, and without it Nagle plus delayed ACKs add
    # 40 ms to every keep-alive response.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class _NoSignals(uvicorn.Server):
    # Only a process's main server may own SIGINT/SIGTERM.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ServerThread:
    """An ASGI app on 127.0.0.1:<free port>, in a thread with its own event loop.

    The port is bound at once; the app may be given later, up to ``start()``.
    """

    def __init__(self, app: Any = None, port: int = 0) -> None:
        self.sock = loopback_socket(port)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server: uvicorn.Server | None = None
        self.thread = threading.Thread(target=self._run, name=f"server:{self.port}", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        assert self.server is not None
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # surfaced by start()
            self.error = exc

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.server = server = _NoSignals(uvicorn.Config(self.app, log_config=None, access_log=False))
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not server.started:
            raise RuntimeError(f"server did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=30)
