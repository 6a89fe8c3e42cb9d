"""Serving ASGI apps with bounds: request bodies, header time, connections, Unix sockets.

Every listener forgebottle opens (the webhook/read API, ``admin.sock``, each sidecar) is an
uvicorn server configured here, so a hostile or broken client meets the same limits everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from statemachine import ForgeBottleError

log = logging.getLogger("forgebottle")

# A client has this long to send a request's headers (after connecting, or after the last
# answer on a kept-alive connection). uvicorn bounds only the idle time between requests, so a
# connection that never sends a byte would otherwise hold a descriptor forever.
HEADER_SECONDS = 10.0
# Connections past this are closed at once: descriptors stay for SQLite, bottles and git.
MAX_CONNECTIONS = 4096
# The file descriptor soft limit serve asks for (systemd's default soft limit is 1,024).
WANTED_FILES = 65536


class BodyTooSlow(ForgeBottleError):
    """The client did not send its body in time (a slowloris, or a dead peer)."""

    http_status = 408


async def read_bounded(request: Request, limit: int, *, seconds: float = 30.0) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (read no further).

    Raises BodyTooSlow when the whole body has not arrived within ``seconds``.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTooSlow(f"the request body did not arrive within {seconds:.0f}s") from None
    return b"".join(chunks)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers and a cap on connections."""

    header_seconds = HEADER_SECONDS
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_seconds, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers arrived: the app has it now
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def raise_file_limit(wanted: int = WANTED_FILES) -> int:
    """Raise the soft file descriptor limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def server_config(app: ASGIApp, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn config every forgebottle listener uses."""
    settings: dict[str, Any] = {
        "http": BoundedH11Protocol,
        "log_config": None,
        "access_log": False,
        "proxy_headers": False,  # the read API's loopback check must see the real peer
        "timeout_graceful_shutdown": 10,
        "h11_max_incomplete_event_size": 64 * 1024,
    }
    return uvicorn.Config(app, **{**settings, **kwargs})


class QuietServer(uvicorn.Server):
    """An uvicorn server inside the service's loop: it leaves signals to the service's own."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class UnixServer:
    """An ASGI app on a 0600 Unix socket in a 0700 directory, started and stopped on demand."""

    def __init__(self, app: ASGIApp, path: Path, *, limit_concurrency: int = 1024) -> None:
        self.path = path
        self.app = app
        self.limit_concurrency = limit_concurrency
        self._server: QuietServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)  # the 0700 directory already keeps others out meanwhile
        sock.listen(self.limit_concurrency)  # an agent may fire many calls at once
        sock.setblocking(False)
        config = server_config(
            self.app, lifespan="off", timeout_graceful_shutdown=2, limit_concurrency=self.limit_concurrency
        )
        self._server = QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=f"unix:{self.path}")
        ready = asyncio.create_task(self._server.ready.wait())
        await asyncio.wait([ready, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not self._server.started:
            ready.cancel()
            sock.close()
            if self._task.done():
                self._task.result()
            raise ForgeBottleError(f"could not serve {self.path}")

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = None
        self._task = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def lock_state_dir(state_dir: Path) -> int:
    """Hold ``serve.lock`` in the state dir for as long as this process lives (the returned
    descriptor); a second ``serve`` on the same state is refused, naming the holder."""
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / "serve.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ForgeBottleError(f"another serve (pid {holder}) is using {state_dir}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def bind_listener(where: tuple[str, int] | str) -> socket.socket:
    """The service's listening socket, bound before anything is served, so that an address in
    use is one clear error rather than a server that announced itself and then died."""
    if isinstance(where, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            if Path(where).is_socket():
                Path(where).unlink()
        address: Any = where
    else:
        host, port = where
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, as socket.create_server does: asyncio turns Nagle off only for
        # sockets that say so, and with Nagle on, each answer waits out the peer's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        address = (host, port)
    try:
        sock.bind(address)
        if isinstance(where, str):
            os.chmod(where, 0o600)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        shown = where if isinstance(where, str) else f"{where[0]}:{where[1]}"
        raise ForgeBottleError(f"cannot listen on {shown}: {exc.strerror or exc}") from None
    return sock
