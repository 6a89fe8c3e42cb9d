"""gitea.ForgeTransport, Gitea's own HTTP/1.1 client, against servers that misbehave on purpose.

Each server here is a real socket on loopback, scripted connection by connection, so the
cases a pooled keep-alive client must survive happen exactly, not by timing luck.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn

from devforge import ServerThread
from gitea import ForgeTransport, ForgeUnavailable, Gitea, origin
from tests.conftest import Forge, wait_until

T = TypeVar("T")

ISSUE = {"number": 1, "title": "T", "body": "b", "state": "open", "labels": [], "assignees": None, "html_url": "u"}


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def answer(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def read_request(conn: socket.socket) -> bytes:
    """One request, read whole; its head is returned."""
    return read_message(conn)[0]


def read_message(conn: socket.socket) -> tuple[bytes, bytes]:
    """One request's head and body (the client sends Content-Length bodies only)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head, body


class Scripted:
    """A loopback server that runs one script per accepted connection, in order."""

    def __init__(self, *scripts: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/api/v1"
        self.scripts = list(scripts)
        self.accepted = 0
        self.hung_up = threading.Event()  # set each time a script's connection is closed
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for script in self.scripts:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed at teardown with scripts left: the test has failed already
                return
            self.accepted += 1
            with conn:
                script(conn)
            self.hung_up.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    made: list[Scripted] = []

    def make(*scripts: Callable[[socket.socket], None]) -> Scripted:
        server = Scripted(*scripts)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def silent_forge(scripted: Callable[..., Scripted]) -> Iterator[tuple[Scripted, threading.Event]]:
    """A forge that reads one request and never answers, until released (at teardown at the latest)."""
    release = threading.Event()

    def silent(conn: socket.socket) -> None:
        read_request(conn)
        release.wait(10)

    yield scripted(silent), release
    release.set()


def test_gitea_uses_it_unless_a_proxy_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(Gitea("https://git.example.com/api/v1", "t")._forge, ForgeTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.com:3128")
    # httpx's own transport, chosen by its client, honours the proxy.
    proxied = Gitea("https://git.example.com/api/v1", "t")
    assert proxied._forge is None and proxied._client is not None


def test_keeps_one_connection_alive_across_calls(forge: Forge) -> None:
    ports: list[int] = []
    inner = forge.dev.app

    async def spy(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            ports.append(scope["client"][1])
        await inner(scope, receive, send)

    server = ServerThread(spy).start()
    try:

        async def go() -> None:
            g = Gitea(f"{server.url}/api/v1", forge.world.bot.token)
            for _ in range(5):
                assert (await g.current_user()).login == forge.world.bot.login
            await g.aclose()

        run(go())
    finally:
        server.stop()
    assert len(ports) == 5 and len(set(ports)) == 1


def test_reads_chunked_answers(forge: Forge, scripted: Callable[..., Scripted]) -> None:
    body = json.dumps({**ISSUE, "body": "x" * 100_000}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:50_000], body[50_000:]))

    def chunked(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(chunks + b"0\r\n\r\n")

    server = scripted(chunked)

    async def go() -> None:
        g = Gitea(server.url, "t")
        assert (await g.read_issue("o", "r", 1)).body == "x" * 100_000
        await g.aclose()

    run(go())


def test_a_read_on_a_connection_the_forge_dropped_is_retried_once(scripted: Callable[..., Scripted]) -> None:
    def serves_one_then_drops_the_next(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(answer(json.dumps({"login": "bot", "id": 1}).encode()))
        read_request(conn)  # the second request arrives; the forge closes without a word

    def serves(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(answer(json.dumps({"login": "bot", "id": 1}).encode()))

    server = scripted(serves_one_then_drops_the_next, serves)

    async def go() -> None:
        g = Gitea(server.url, "t")
        assert (await g.current_user()).login == "bot"
        assert (await g.current_user()).login == "bot"  # dropped on connection 1, answered on 2
        await g.aclose()

    run(go())
    assert server.accepted == 2


def test_requests_go_out_as_gitea_expects_them(scripted: Callable[..., Scripted]) -> None:
    seen: list[tuple[bytes, bytes]] = []
    other = json.dumps([{"number": 3, "head": {"ref": "someone-else"}}]).encode()
    pulls = answer(other, extra='Link: <y>; rel="next"\r\nLink: <x>; rel="first"\r\n')

    def script(conn: socket.socket) -> None:
        seen.append(read_message(conn))
        conn.sendall(
            answer(json.dumps({"id": 5, "body": "h\u00e9", "user": {"login": "bot"}}).encode(), status="201 Created")
        )
        seen.append(read_message(conn))
        conn.sendall(pulls)
        seen.append(read_message(conn))
        conn.sendall(answer(b"[]"))
        seen.append(read_message(conn))
        conn.sendall(answer(b"", status="599 Whatever"))

    server = scripted(script)
    port = server.url.split(":")[2].split("/")[0]

    async def go() -> None:
        g = Gitea(server.url + "/", "tok")  # a trailing slash on api_url changes nothing
        assert (await g.post_comment("o w", "r", 1, "h\u00e9")).id == 5
        # Gitea's two Link headers are read as one, as httpx does: "next" is seen, so page 2 is asked for.
        assert await g.find_pr_by_head("o", "r", "bot-bottle/issue-1") is None
        with pytest.raises(ForgeUnavailable, match="599"):
            await g.read_issue("o", "r", 2)
        await g.aclose()

    run(go())
    (post_head, post_body), (get_head, get_body), (page2_head, _), (issue_head, _) = seen
    lines = post_head.decode().split("\r\n")
    assert lines[0] == "POST /api/v1/repos/o%20w/r/issues/1/comments HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["authorization"] == "token tok"
    assert headers["accept-encoding"] == "identity"
    assert headers["content-type"] == "application/json"
    assert json.loads(post_body) == {"body": "h\u00e9"} and headers["content-length"] == str(len(post_body))
    assert get_head.startswith(b"GET /api/v1/repos/o/r/pulls?state=open&page=1&limit=50 HTTP/1.1\r\n")
    assert b"content-length" not in get_head.lower() and get_body == b""
    assert page2_head.startswith(b"GET /api/v1/repos/o/r/pulls?state=open&page=2&limit=50 ")
    assert issue_head.startswith(b"GET /api/v1/repos/o/r/issues/2 ")


def test_a_write_on_a_dropped_connection_is_not_sent_twice(scripted: Callable[..., Scripted]) -> None:
    seen: list[bytes] = []

    def serves_one_then_drops_the_next(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(answer(json.dumps({"login": "bot", "id": 1}).encode()))
        seen.append(read_request(conn))

    server = scripted(serves_one_then_drops_the_next)

    async def go() -> None:
        g = Gitea(server.url, "t")
        await g.current_user()
        # The forge may have acted on it before dropping the connection: the caller decides.
        with pytest.raises(ForgeUnavailable, match="unreachable"):
            await g.post_comment("o", "r", 1, "once")
        await g.aclose()

    run(go())
    assert len(seen) == 1 and seen[0].startswith(b"POST ")


def test_a_closed_idle_connection_is_not_reused(scripted: Callable[..., Scripted]) -> None:
    def serves_and_closes(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(
            answer(json.dumps({"id": 7, "html_url": "h", "user": {"login": "bot"}}).encode(), status="201 Created")
        )

    server = scripted(serves_and_closes, serves_and_closes)

    async def go() -> None:
        g = Gitea(server.url, "t")
        await g.post_comment("o", "r", 1, "first")
        # Once the forge has hung up (on loopback its FIN is then already here), the next
        # write must go on a new connection.
        assert server.hung_up.wait(10)
        assert (await g.post_comment("o", "r", 1, "second")).id == 7
        await g.aclose()

    run(go())
    assert server.accepted == 2


def test_oversized_and_broken_answers_are_forge_errors(scripted: Callable[..., Scripted]) -> None:
    def huge(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)

    def garbage(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

    server = scripted(huge, garbage)

    async def go() -> None:
        g = Gitea(server.url, "t", transport=ForgeTransport(max_body=1000))
        with pytest.raises(ForgeUnavailable, match="RemoteProtocolError"):
            await g.current_user()
        with pytest.raises(ForgeUnavailable, match="RemoteProtocolError"):
            await g.current_user()
        await g.aclose()

    run(go())


def test_a_silent_forge_times_out(silent_forge: tuple[Scripted, threading.Event]) -> None:
    server, _ = silent_forge

    async def go() -> None:
        g = Gitea(server.url, "t", timeout=0.3)
        with pytest.raises(ForgeUnavailable, match="timed out"):
            await g.current_user()
        await g.aclose()

    run(go())


def test_https_verifies_the_forge_certificate(forge: Forge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(forge.dev.app, log_config=None, ssl_certfile=str(cert), ssl_keyfile=str(key))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="the TLS forge")
    api = f"https://127.0.0.1:{port}/api/v1"

    async def call() -> str:
        g = Gitea(api, forge.world.bot.token)
        try:
            return (await g.current_user()).login
        finally:
            await g.aclose()

    async def go() -> None:
        with pytest.raises(ForgeUnavailable, match="unreachable"):
            await call()  # a certificate nobody vouched for
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert await call() == forge.world.bot.login

    try:
        run(go())
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_waiting_for_a_busy_pool_times_out(silent_forge: tuple[Scripted, threading.Event]) -> None:
    server, release = silent_forge
    transport = ForgeTransport(max_connections=1)

    url = httpx.URL(f"{server.url}/user")

    async def request(pool: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        timeouts = {"connect": 5.0, "read": 10.0, "write": 5.0, "pool": pool}
        return await transport.send(origin(url), "GET", url.raw_path, [(b"Host", url.netloc)], b"", timeouts)

    async def go() -> None:
        first = asyncio.create_task(request(10.0))
        deadline = asyncio.get_running_loop().time() + 10
        while not server.accepted:  # the first call holds the only connection
            assert asyncio.get_running_loop().time() < deadline, "the first call never connected"
            await asyncio.sleep(0.01)
        with pytest.raises(httpx.PoolTimeout):
            await request(0.2)
        release.set()  # the silent forge hangs up: the first call ends too
        with pytest.raises(httpx.RemoteProtocolError):
            await first
        await transport.aclose()

    run(go())


def test_a_forge_that_stops_reading_times_the_write_out(scripted: Callable[..., Scripted]) -> None:
    release = threading.Event()
    server = scripted(lambda conn: release.wait(10))  # accepts, never reads
    transport = ForgeTransport()
    url = httpx.URL(f"{server.url}/repos/o/r/issues/1")
    body = b"x" * (32 * 1024 * 1024)  # far past what the kernel buffers on loopback
    headers = [(b"Host", url.netloc), (b"Content-Length", b"%d" % len(body))]

    async def go() -> None:
        timeouts = {"connect": 5.0, "read": 5.0, "write": 0.3, "pool": 5.0}
        with pytest.raises(httpx.WriteTimeout):
            await transport.send(origin(url), "PATCH", url.raw_path, headers, body, timeouts)
        await transport.aclose()

    try:
        run(go())
    finally:
        release.set()
