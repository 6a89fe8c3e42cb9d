"""gitea.Gitea's HTTP behaviour against forges that misbehave on purpose.

Each forge here is a real socket on loopback (or uvicorn, for TLS), scripted connection by
connection, so what is tested happens exactly, not by timing luck: a forge that never
accepts, never answers, stops reading, answers without end, refuses, redirects or hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trustme
import uvicorn

import gitea
from devforge import ServerThread
from gitea import MAX_RESPONSE_BYTES, ForgeError, ForgeUnavailable, Gitea, OrgNotVisible
from tests.conftest import Forge, wait_until

T = TypeVar("T")

USER = json.dumps({"login": "bot", "id": 1}).encode()
COMMENT = json.dumps({"id": 7, "body": "b", "user": {"login": "bot"}}).encode()


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def answer(body: bytes = b"", *, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


Script = Callable[["Loopback", socket.socket, int], None]


class Loopback:
    """A forge on a loopback socket: each accepted connection runs ``script`` (with its index)
    in a thread of its own. Every request read is recorded, whichever connection it came on."""

    def __init__(self, script: Script, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:  # inherited by accepted sockets; a fixed size also stops autotuning
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/api/v1"
        self.script = script
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.connections = 0
        self.finished = 0  # connections whose script has returned
        self.sent = 0  # body bytes the scripts reported sending
        self.release = threading.Event()  # scripts that wait, wait for this (set at teardown)
        self._handlers: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._serve, daemon=True)
        self._acceptor.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # shut down at teardown
                return
            handler = threading.Thread(target=self._run, args=(conn, self.connections), daemon=True)
            self.connections += 1
            self._handlers.append(handler)
            handler.start()

    def _run(self, conn: socket.socket, index: int) -> None:
        with conn:
            conn.settimeout(20)
            # The client hanging up mid-script is what several tests are about.
            with contextlib.suppress(OSError):
                self.script(self, conn, index)
        self.finished += 1

    def read(self, conn: socket.socket) -> bytes:
        """One request, read whole and recorded; its head is returned (b"" if the client hung up)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return b""
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        self.requests.append((head, body))
        return head

    def close(self) -> None:
        self.release.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        self.sock.close()
        self._acceptor.join(10)
        for handler in self._handlers:
            handler.join(10)


@pytest.fixture
def loopback() -> Iterator[Callable[..., Loopback]]:
    made: list[Loopback] = []

    def make(script: Script, **kwargs: Any) -> Loopback:
        server = Loopback(script, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


async def failure(call: Awaitable[Any]) -> ForgeError:
    """The ForgeError ``call`` raises (the test fails if it raises nothing)."""
    with pytest.raises(ForgeError) as info:
        await call
    return info.value


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error``'s chain of causes, itself first."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


# -- timeouts ------------------------------------------------------------------------


def test_a_forge_that_never_accepts_times_the_connect_out() -> None:
    # A listening socket whose accept queue is full drops further SYNs: connect() hangs.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))

    async def go() -> tuple[ForgeError, float]:
        g = Gitea(f"http://127.0.0.1:{port}/api/v1", "t", timeout=0.5)
        started = time.monotonic()
        try:
            return await failure(g.current_user()), time.monotonic() - started
        finally:
            await g.aclose()

    try:
        error, took = run(go())
    finally:
        for s in (*fillers, sock):
            s.close()
    assert isinstance(error, ForgeUnavailable) and str(error) == "GET user: forge timed out"
    assert isinstance(error.__cause__, httpx.ConnectTimeout)
    assert took < 5


def test_a_forge_that_never_answers_times_the_read_out(loopback: Callable[..., Loopback]) -> None:
    def silent(server: Loopback, conn: socket.socket, index: int) -> None:
        server.read(conn)
        server.release.wait(20)

    server = loopback(silent)

    async def go() -> ForgeError:
        g = Gitea(server.url, "t", timeout=0.3)
        try:
            return await failure(g.read_issue("o", "r", 1))
        finally:
            await g.aclose()

    error = run(go())
    assert isinstance(error, ForgeUnavailable) and str(error) == "GET repos/o/r/issues/1: forge timed out"
    assert isinstance(error.__cause__, httpx.ReadTimeout)
    assert [head.split(b"\r\n")[0] for head, _ in server.requests] == [b"GET /api/v1/repos/o/r/issues/1 HTTP/1.1"]


def test_a_forge_that_stops_reading_times_the_write_out(loopback: Callable[..., Loopback]) -> None:
    # The forge accepts and never reads: once its small receive buffer and ours are full,
    # nothing more can be sent. 16 MiB is far past what both buffer.
    server = loopback(lambda server, conn, index: server.release.wait(20), rcvbuf=4096)

    async def go() -> ForgeError:
        g = Gitea(server.url, "t", timeout=0.5)
        try:
            return await failure(g.update_description("o", "r", 1, "x" * (16 * 1024 * 1024)))
        finally:
            await g.aclose()

    error = run(go())
    assert isinstance(error, ForgeUnavailable) and str(error) == "PATCH repos/o/r/issues/1: forge timed out"
    assert isinstance(error.__cause__, httpx.WriteTimeout)


# -- answers too big -----------------------------------------------------------------


def test_an_answer_declared_over_the_cap_is_refused_unread(loopback: Callable[..., Loopback]) -> None:
    def declares_too_much(server: Loopback, conn: socket.socket, index: int) -> None:
        server.read(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n{" % (MAX_RESPONSE_BYTES + 1))
        # The rest never comes (a client that waited for it would time out): the client must hang up.
        hung_up.append(conn.recv(1) == b"")

    hung_up: list[bool] = []

    server = loopback(declares_too_much)

    async def go() -> ForgeError:
        g = Gitea(server.url, "t", timeout=5)
        try:
            return await failure(g.current_user())
        finally:
            await g.aclose()

    error = run(go())
    assert type(error) is ForgeError and error.status == 200
    assert str(error) == f"GET /user: the forge's answer is over {MAX_RESPONSE_BYTES} bytes"
    wait_until(lambda: server.finished == 1, what="the forge to see the client hang up")
    assert hung_up == [True] and server.connections == 1


@pytest.mark.parametrize("framing", ["chunked", "until-close"])
def test_an_endless_answer_is_refused_at_the_cap(loopback: Callable[..., Loopback], framing: str) -> None:
    piece = b"x" * 65536
    limit = 8 * MAX_RESPONSE_BYTES  # the test's own bound: far past the cap and what buffers hold

    def endless(server: Loopback, conn: socket.socket, index: int) -> None:
        server.read(conn)
        if framing == "chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            frame = b"%x\r\n%s\r\n" % (len(piece), piece)
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            frame = piece
        while server.sent < limit:
            conn.sendall(frame)  # fails once the client has hung up
            server.sent += len(piece)

    server = loopback(endless)

    async def go() -> ForgeError:
        g = Gitea(server.url, "t", timeout=10)
        try:
            return await failure(g.current_user())
        finally:
            await g.aclose()

    error = run(go())
    assert type(error) is ForgeError and str(error).endswith(f"is over {MAX_RESPONSE_BYTES} bytes")
    wait_until(lambda: server.finished == 1, what="the forge to see the client hang up")
    # It got past the cap, and then the client stopped reading and dropped the connection.
    assert MAX_RESPONSE_BYTES <= server.sent < limit


# -- refused, TLS --------------------------------------------------------------------


def test_a_refused_connection_is_unreachable() -> None:
    # Bound but not listening: the port stays ours, and the kernel answers a SYN with RST.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def go() -> ForgeError:
        g = Gitea(f"http://127.0.0.1:{port}/api/v1", "t", timeout=5)
        try:
            return await failure(g.post_comment("o", "r", 1, "hi"))
        finally:
            await g.aclose()

    try:
        error = run(go())
    finally:
        sock.close()
    assert isinstance(error, ForgeUnavailable)
    assert str(error) == "POST repos/o/r/issues/1/comments: forge unreachable (ConnectError)"
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert any(isinstance(exc, ConnectionRefusedError) for exc in causes(error))


@contextlib.contextmanager
def tls_forge(app: Any, cert: trustme.LeafCert, tmp: Path) -> Iterator[str]:
    """``app`` served over TLS with ``cert`` on loopback; yields its API URL."""
    pem = tmp / f"forge-{id(cert)}.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_config=None, access_log=False, ssl_certfile=str(pem), ssl_keyfile=str(pem))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, what="the TLS forge")
        yield f"https://127.0.0.1:{sock.getsockname()[1]}/api/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_tls_is_verified_against_the_trusted_cas(forge: Forge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    async def login(api: str) -> str | ForgeError:
        g = Gitea(api, forge.world.bot.token)  # reads SSL_CERT_FILE as it is made
        try:
            return (await g.current_user()).login
        except ForgeError as exc:
            return exc
        finally:
            await g.aclose()

    with (
        tls_forge(forge.dev.app, ca.issue_cert("127.0.0.1"), tmp_path) as right,
        tls_forge(forge.dev.app, ca.issue_cert("forge.example"), tmp_path) as misnamed,
    ):
        untrusted = run(login(right))  # the default trust store has never heard of this CA
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        trusted = run(login(right))
        wrong_name = run(login(misnamed))  # a certificate from the trusted CA, for another host
    assert isinstance(untrusted, ForgeUnavailable) and "unreachable (ConnectError)" in str(untrusted)
    assert "CERTIFICATE_VERIFY_FAILED" in str(untrusted.__cause__)
    assert trusted == forge.world.bot.login
    assert isinstance(wrong_name, ForgeUnavailable) and "CERTIFICATE_VERIFY_FAILED" in str(wrong_name.__cause__)


# -- redirects, writes that fail -----------------------------------------------------


@pytest.mark.parametrize("status", ["301 Moved Permanently", "302 Found", "307 Temporary Redirect"])
def test_a_redirect_is_not_followed(loopback: Callable[..., Loopback], status: str) -> None:
    def redirects(server: Loopback, conn: socket.socket, index: int) -> None:
        while server.read(conn):
            # To this same forge, so that a client following it would be seen doing so.
            conn.sendall(answer(status=status, extra=f"Location: {server.url}/elsewhere\r\n"))

    server = loopback(redirects)

    async def go() -> tuple[ForgeError, ForgeError]:
        g = Gitea(server.url, "tok")
        try:
            return await failure(g.current_user()), await failure(g.post_comment("o", "r", 1, "once"))
        finally:
            await g.aclose()

    get, post = run(go())
    code = int(status.split()[0])
    assert type(get) is ForgeError and get.status == code and str(get) == f"GET /user: {status}"
    assert type(post) is ForgeError and post.status == code
    assert [head.split(b" ")[:2] for head, _ in server.requests] == [
        [b"GET", b"/api/v1/user"],
        [b"POST", b"/api/v1/repos/o/r/issues/1/comments"],
    ]


def test_a_303_on_membership_is_org_not_visible_and_not_followed(loopback: Callable[..., Loopback]) -> None:
    def gitea_303(server: Loopback, conn: socket.socket, index: int) -> None:
        while server.read(conn):
            conn.sendall(answer(status="303 See Other", extra=f"Location: {server.url}/orgs/acme\r\n"))

    server = loopback(gitea_303)

    async def go() -> ForgeError:
        g = Gitea(server.url, "tok")
        try:
            return await failure(g.is_org_member("acme", "someone"))
        finally:
            await g.aclose()

    error = run(go())
    assert isinstance(error, OrgNotVisible) and error.status == 303
    assert len(server.requests) == 1


def test_a_post_the_forge_drops_is_sent_once(loopback: Callable[..., Loopback]) -> None:
    def reads_then_hangs_up(server: Loopback, conn: socket.socket, index: int) -> None:
        server.read(conn)  # it may have acted on it: only the caller may decide to send it again

    server = loopback(reads_then_hangs_up)

    async def go() -> ForgeError:
        g = Gitea(server.url, "t")
        try:
            return await failure(g.post_comment("o", "r", 1, "once"))
        finally:
            await g.aclose()

    error = run(go())
    assert isinstance(error, ForgeUnavailable)
    assert str(error) == "POST repos/o/r/issues/1/comments: forge unreachable (RemoteProtocolError)"
    # A retry would have come before the error was raised: what is counted now is final.
    assert len(server.requests) == 1 and json.loads(server.requests[0][1]) == {"body": "once"}


def test_a_post_on_a_kept_alive_connection_the_forge_drops_is_sent_once(loopback: Callable[..., Loopback]) -> None:
    def serves_one_then_drops_the_next(server: Loopback, conn: socket.socket, index: int) -> None:
        server.read(conn)
        conn.sendall(answer(USER))
        server.read(conn)

    server = loopback(serves_one_then_drops_the_next)

    async def go() -> ForgeError:
        g = Gitea(server.url, "t")
        try:
            assert (await g.current_user()).login == "bot"
            return await failure(g.post_comment("o", "r", 1, "once"))
        finally:
            await g.aclose()

    error = run(go())
    assert isinstance(error, ForgeUnavailable) and "unreachable" in str(error)
    assert server.connections == 1
    assert [head.split(b" ")[0] for head, _ in server.requests] == [b"GET", b"POST"]


def test_a_connection_the_forge_closed_while_idle_is_not_reused(loopback: Callable[..., Loopback]) -> None:
    def serves_and_closes(server: Loopback, conn: socket.socket, index: int) -> None:
        server.read(conn)
        conn.sendall(answer(COMMENT, status="201 Created"))

    server = loopback(serves_and_closes)

    async def go() -> None:
        g = Gitea(server.url, "t")
        try:
            await g.post_comment("o", "r", 1, "first")
            # Once the forge has hung up (on loopback its FIN is then already here), the next
            # write must go on a new connection, and succeed.
            await asyncio.to_thread(wait_until, lambda: server.finished == 1, what="the forge to hang up")
            assert (await g.post_comment("o", "r", 1, "second")).id == 7
        finally:
            await g.aclose()

    run(go())
    assert server.connections == 2 and len(server.requests) == 2


def test_text_with_a_lone_surrogate_is_refused_before_sending(loopback: Callable[..., Loopback]) -> None:
    server = loopback(lambda server, conn, index: None)

    async def go() -> ForgeError:
        g = Gitea(server.url, "t")
        try:
            return await failure(g.post_comment("o", "r", 1, "secret-ish \ud800 text"))
        finally:
            await g.aclose()

    error = run(go())
    assert type(error) is ForgeError
    assert str(error) == "POST /repos/o/r/issues/1/comments: the text is not valid Unicode (a lone surrogate)"
    assert server.connections == 0


# -- hostile or odd answers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "kind", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", ForgeUnavailable, "GET user: forge unreachable (RemoteProtocolError)"),
        (answer(b"{not json"), ForgeError, "GET user: forge sent invalid JSON"),
        (answer(b"[" * 100_000 + b"]" * 100_000), ForgeError, "GET user: forge sent invalid JSON"),
        (answer(b"\xff\xfe oops \xc3", status="418 Teapot"), ForgeError, "GET /user: 418 \ufffd\ufffd oops \ufffd"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", ForgeUnavailable, "RemoteProtocolError"),
    ],
    ids=["not-http", "not-json", "too-deep", "not-utf8-error", "cut-short"],
)
def test_hostile_answers_are_typed_errors(
    loopback: Callable[..., Loopback], reply: bytes, kind: type[ForgeError], message: str
) -> None:
    def replies(server: Loopback, conn: socket.socket, index: int) -> None:
        server.read(conn)
        conn.sendall(reply)

    server = loopback(replies)

    async def go() -> ForgeError:
        g = Gitea(server.url, "t")
        try:
            return await failure(g.current_user())
        finally:
            await g.aclose()

    error = run(go())
    assert type(error) is kind and message in str(error)


def test_requests_go_out_as_gitea_expects_them(loopback: Callable[..., Loopback]) -> None:
    other = json.dumps([{"number": 3, "head": {"ref": "someone-else"}}]).encode()

    def script(server: Loopback, conn: socket.socket, index: int) -> None:
        server.read(conn)
        conn.sendall(
            answer(json.dumps({"id": 5, "body": "h\u00e9", "user": {"login": "bot"}}).encode(), status="201 Created")
        )
        server.read(conn)
        conn.sendall(answer(other, extra='Link: <y>; rel="next"\r\nLink: <x>; rel="first"\r\n'))
        server.read(conn)
        # Chunked, in pieces that split the JSON anywhere.
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(b"1\r\n[\r\n1\r\n]\r\n0\r\n\r\n")

    server = loopback(script)
    port = server.url.split(":")[2].split("/")[0]

    async def go() -> None:
        g = Gitea(server.url + "/", "tok")  # a trailing slash on api_url changes nothing
        try:
            assert (await g.post_comment("o w", "r", 1, "h\u00e9")).id == 5
            # Gitea's two Link headers are read as one: "next" is seen, so page 2 is asked for.
            assert await g.find_pr_by_head("o", "r", "bot-bottle/issue-1") is None
        finally:
            await g.aclose()

    run(go())
    assert server.connections == 1  # kept alive across the three
    (post_head, post_body), (get_head, get_body), (page2_head, _) = server.requests
    lines = post_head.decode().split("\r\n")
    assert lines[0] == "POST /api/v1/repos/o%20w/r/issues/1/comments HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["authorization"] == "token tok"
    assert headers["accept"] == "application/json"
    assert headers["accept-encoding"] == "identity"
    assert headers["content-type"] == "application/json"
    assert json.loads(post_body) == {"body": "h\u00e9"} and headers["content-length"] == str(len(post_body))
    assert get_head.startswith(b"GET /api/v1/repos/o/r/pulls?state=open&page=1&limit=50 HTTP/1.1\r\n")
    assert get_body == b""
    assert page2_head.startswith(b"GET /api/v1/repos/o/r/pulls?state=open&page=2&limit=50 ")


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
            try:
                for _ in range(5):
                    assert (await g.current_user()).login == forge.world.bot.login
            finally:
                await g.aclose()

        run(go())
    finally:
        server.stop()
    assert len(ports) == 5 and len(set(ports)) == 1


def test_pull_requests_carry_their_author_and_head_repository(forge: Forge) -> None:
    dev, world = forge.dev, forge.world
    dev.commit_files(forge.owner, forge.repo, "bot-bottle/issue-1", {"a.txt": "a"}, "a")

    async def go() -> tuple[gitea.PullRequest, gitea.PullRequest]:
        g = Gitea(forge.api, world.bot.token)
        try:
            made = await g.create_pr(
                forge.owner, forge.repo, head="bot-bottle/issue-1", base="main", title="t", body=""
            )
            return made, await g.read_pr(forge.owner, forge.repo, made.number)
        finally:
            await g.aclose()

    made, read = run(go())
    assert made == read
    assert (read.user, read.head_repo) == (world.bot.login, f"{forge.owner}/{forge.repo}")
    # A PR whose head repository is gone (a deleted fork): Gitea sends "repo": null.
    orphan = gitea.pr_from_json({"number": 2, "head": {"ref": "x", "repo": None}, "user": None})
    assert (orphan.user, orphan.head_repo) == ("", "")
