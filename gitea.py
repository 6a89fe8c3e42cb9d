"""The forge as forgebottle sees it: a small ABC, a scope-enforcing wrapper, and Gitea.

Errors raised here::

    ForgeBottleError (statemachine)
    ├── ForgeError               any failed forge call; carries Gitea's ``message``; rpc -32002
    │   ├── ForgeNotFound        404
    │   ├── ForgeAuthError       401/403: the token is wrong or lacks a scope
    │   ├── ForgeConflict        409
    │   ├── ForgeUnavailable     network error, timeout, or 5xx
    │   └── OrgNotVisible        303 on a membership check: the token cannot see the org
    └── OutOfScope (also PermissionError)   a write outside the bottle's issue/branch/PRs; rpc -32001
"""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import dataclasses
import hmac
import http
import json as jsonlib
import re
import select
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

import httpx

from statemachine import ForgeBottleError

# Bodies we accept from agents and send to the forge (DESIGN.md §7).
MAX_TEXT_BYTES = 64 * 1024
# Gitea clamps page sizes to MAX_RESPONSE_ITEMS (50 by default).
PAGE_LIMIT = 50
MAX_PAGES = 200
# A forge answer bigger than this is refused (the largest real one is a page of 50 items).
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


class Secret:
    """A string that does not print itself (after starlette's ``Secret``)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def reveal(self) -> str:
        return self._value

    def matches(self, candidate: str) -> bool:
        """Constant-time comparison."""
        return hmac.compare_digest(self._value.encode(), candidate.encode())


class ForgeError(ForgeBottleError):
    http_status = 502
    rpc_code = -32002

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ForgeNotFound(ForgeError):
    http_status = 404


class ForgeAuthError(ForgeError):
    pass


class ForgeConflict(ForgeError):
    pass


class ForgeUnavailable(ForgeError):
    http_status = 503


class OrgNotVisible(ForgeError):
    """Gitea answered 303: the token's user is neither in the org nor a site admin."""


class OutOfScope(ForgeBottleError, PermissionError):
    http_status = 403
    rpc_code = -32001


# -- the data we use -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class User:
    login: str
    id: int = 0


@dataclasses.dataclass(frozen=True)
class Repo:
    owner: str
    name: str
    default_branch: str
    clone_url: str
    html_url: str


@dataclasses.dataclass(frozen=True)
class Issue:
    number: int
    title: str
    body: str
    state: str
    labels: tuple[str, ...]
    assignees: tuple[str, ...]
    html_url: str
    user: str = ""
    is_pull: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "title": self.title,
            "body": self.body,
            "state": self.state,
            "labels": list(self.labels),
            "assignees": list(self.assignees),
            "html_url": self.html_url,
        }


@dataclasses.dataclass(frozen=True)
class PullRequest:
    number: int
    title: str
    body: str
    state: str
    merged: bool
    head: str
    base: str
    html_url: str
    head_sha: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "title": self.title,
            "body": self.body,
            "state": self.state,
            "merged": self.merged,
            "head": self.head,
            "base": self.base,
            "html_url": self.html_url,
        }


@dataclasses.dataclass(frozen=True)
class Comment:
    id: int
    user: str
    body: str
    created_at: str
    html_url: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "user": self.user, "body": self.body, "created_at": self.created_at}


class Forge(abc.ABC):
    """Only the forge operations forgebottle calls. Every method may raise ForgeError."""

    @abc.abstractmethod
    async def current_user(self) -> User: ...

    @abc.abstractmethod
    async def org_exists(self, org: str) -> bool: ...

    @abc.abstractmethod
    async def is_org_member(self, org: str, user: str) -> bool: ...

    @abc.abstractmethod
    async def permission(self, owner: str, repo: str, user: str) -> str: ...

    @abc.abstractmethod
    async def get_repo(self, owner: str, repo: str) -> Repo: ...

    @abc.abstractmethod
    async def read_issue(self, owner: str, repo: str, number: int) -> Issue: ...

    @abc.abstractmethod
    async def read_pr(self, owner: str, repo: str, number: int) -> PullRequest: ...

    @abc.abstractmethod
    async def read_comments(self, owner: str, repo: str, number: int) -> list[Comment]: ...

    @abc.abstractmethod
    async def post_comment(self, owner: str, repo: str, number: int, body: str) -> Comment: ...

    @abc.abstractmethod
    async def update_description(self, owner: str, repo: str, number: int, body: str) -> None: ...

    @abc.abstractmethod
    async def create_pr(self, owner: str, repo: str, *, head: str, base: str, title: str, body: str) -> PullRequest: ...

    @abc.abstractmethod
    async def find_pr_by_head(self, owner: str, repo: str, head: str) -> PullRequest | None: ...

    async def get_pr_for_issue(self, owner: str, repo: str, issue: int) -> PullRequest | None:
        """The open PR forgebottle would have opened for ``issue`` (its branch), if any."""
        return await self.find_pr_by_head(owner, repo, branch_for(issue))

    async def is_pr_open(self, owner: str, repo: str, number: int) -> bool:
        return (await self.read_pr(owner, repo, number)).state == "open"

    async def aclose(self) -> None:
        return None


def branch_for(issue: int) -> str:
    return f"bot-bottle/issue-{issue}"


_CLOSING = re.compile(r"(?:^|[\s(\[])(close[sd]?|fix(?:e[sd])?|resolve[sd]?):?\s+#(\d+)", re.IGNORECASE)


def closes(body: str, issue: int) -> bool:
    """True if ``body`` carries a Gitea closing keyword for ``#issue``."""
    return any(int(m.group(2)) == issue for m in _CLOSING.finditer(body))


class ScopedForge:
    """Read anywhere in the repo; write only to the bottle's issue, its PRs and its branch."""

    def __init__(self, forge: Forge, *, owner: str, repo: str, issue: int, prs: Iterable[int] = ()) -> None:
        self.forge = forge
        self.owner = owner
        self.repo = repo
        self.issue = issue
        self.prs: set[int] = set(prs)
        self.branch = branch_for(issue)

    @property
    def writable(self) -> list[int]:
        return sorted({self.issue, *self.prs})

    def check_write(self, number: int, what: str) -> None:
        if number not in self.writable:
            raise OutOfScope(
                f"{what} to #{number}: out of scope (writable: {', '.join(str(n) for n in self.writable)})"
            )

    async def read_issue(self, number: int) -> Issue:
        return await self.forge.read_issue(self.owner, self.repo, number)

    async def read_pr(self, number: int) -> PullRequest:
        return await self.forge.read_pr(self.owner, self.repo, number)

    async def read_comments(self, number: int) -> list[Comment]:
        return await self.forge.read_comments(self.owner, self.repo, number)

    async def post_comment(self, number: int, body: str) -> Comment:
        self.check_write(number, "comment")
        return await self.forge.post_comment(self.owner, self.repo, number, body)

    async def update_description(self, number: int, body: str) -> None:
        self.check_write(number, "description")
        await self.forge.update_description(self.owner, self.repo, number, body)

    async def open_pr(self, *, title: str, body: str, base: str, head: str | None = None) -> PullRequest:
        if head is not None and head.split(":")[-1] != self.branch:
            raise OutOfScope(f"pull request from {head}: out of scope (own branch: {self.branch})")
        if not closes(body, self.issue):
            body = f"{body.rstrip()}\n\nCloses #{self.issue}".lstrip()
        try:
            pr = await self.forge.create_pr(self.owner, self.repo, head=self.branch, base=base, title=title, body=body)
        except ForgeConflict:
            # Gitea answers 409 when an open PR already has this head and base.
            existing = await self.forge.find_pr_by_head(self.owner, self.repo, self.branch)
            if existing is None:
                raise
            pr = existing
        self.prs.add(pr.number)
        return pr


# -- Gitea over HTTP ------------------------------------------------------------------

Origin = tuple[str, str, int]  # scheme, host, port: what a kept-alive connection is for


def origin(url: httpx.URL) -> Origin:
    return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


@dataclasses.dataclass(frozen=True)
class Answer:
    """A forge answer, read whole: the part of ``httpx.Response`` this module uses."""

    status_code: int
    headers: Mapping[str, str]  # names in lower case
    content: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    @property
    def reason_phrase(self) -> str:
        try:
            return http.HTTPStatus(self.status_code).phrase
        except ValueError:
            return ""


def _header_map(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Headers by lower-case name; a repeated one joined with ", ", as ``httpx.Headers.get`` does."""
    found: dict[str, str] = {}
    for key, value in raw:
        name, text = key.decode("latin-1").lower(), value.decode("latin-1")
        found[name] = f"{found[name]}, {text}" if name in found else text
    return found


class ForgeTransport:
    """HTTP/1.1 with keep-alive, for the forge's API: the default transport of :class:`Gitea`.

    httpx's own async transport (httpcore on anyio) cost ~0.6 ms a request here, most of what
    the sidecar adds to an agent's call; this one writes and parses HTTP/1.1 itself (below)
    and keeps a small pool. Used only when no proxy is configured (``Gitea`` falls back to httpx's
    client, which honours ``*_PROXY``). Bodies are read whole, up to ``max_body`` bytes.
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        max_idle: int = 10,
        idle_expiry: float = 5.0,
        max_body: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.max_idle = max_idle
        self.idle_expiry = idle_expiry
        self.max_body = max_body
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def send(
        self,
        key: Origin,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeouts: Mapping[str, float | None],
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One exchange with ``key``'s server: (status, headers, body read whole).

        ``headers`` go out as given (Host and framing included); failures raise httpx's
        exceptions, as its transports do."""
        if self._slots.locked():  # a timer only when there is something to wait for
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("every connection to the forge is busy") from None
        else:
            await self._slots.acquire()
        try:
            for attempt in (1, 2):
                connection = self._take(key) if attempt == 1 else None
                reused = connection is not None
                if connection is None:
                    connection = await self._connect(key, timeouts)
                try:
                    answer = await connection.exchange(method, target, headers, body, timeouts, self.max_body)
                except _Stale:
                    connection.abort()
                    # A kept-alive connection the forge had closed: the request never reached
                    # it, so one fresh attempt is safe, for reads (as Go's client does).
                    if reused and method in ("GET", "HEAD"):
                        continue
                    raise httpx.RemoteProtocolError("the forge closed the connection") from None
                except BaseException:
                    connection.abort()
                    raise
                self._give_back(key, connection)
                return answer
        finally:
            self._slots.release()
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        idle = [connection for connections in self._idle.values() for connection in connections]
        self._idle.clear()
        for connection in idle:
            connection.close()
        # A TLS connection closes with a close_notify exchange: let it finish while we run.
        for connection in idle:
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(1):
                    await connection.writer.wait_closed()

    def _take(self, key: Origin) -> _Connection | None:
        pool = self._idle.get(key, [])
        while pool:
            connection = pool.pop()
            try:
                if connection.usable(self.idle_expiry):
                    return connection
            except (OSError, ValueError):
                pass
            connection.close()
        return None

    def _give_back(self, key: Origin, connection: _Connection) -> None:
        pool = self._idle.setdefault(key, [])
        if connection.reusable() and len(pool) < self.max_idle:
            connection.idle_since = time.monotonic()
            pool.append(connection)
        else:
            connection.close()

    async def _connect(self, key: Origin, timeouts: Mapping[str, float | None]) -> _Connection:
        scheme, host, port = key
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}")
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()  # certifi, or SSL_CERT_FILE/SSL_CERT_DIR
            context = self._ssl
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=context, server_hostname=host if context else None, limit=2**20
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from None
        return _Connection(reader, writer)


class _Stale(Exception):
    """The connection ended before the forge sent a byte of its answer."""


# -- HTTP/1.1 framing ------------------------------------------------------------------------
# Written out rather than through h11: h11's general state machine and header validation were
# ~60 µs of every forge call (most of what the sidecar adds to an agent's read). A client talking
# to one kind of server needs much less: requests it composes itself, and answers parsed
# strictly, anything unexpected refused (RFC 9112 lets a client be that strict). The tests hold
# this parser to h11's results on generated answers.

MAX_HEAD_BYTES = 64 * 1024  # a status line and headers; the trailers of a chunked body, too
_MAX_CHUNK_LINE = 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")


def request_bytes(method: str, target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> bytes:
    """One HTTP/1.1 request as it goes on the wire; raises ``httpx.LocalProtocolError`` for
    anything that would not frame as meant (a header value with a line break in it, say)."""
    if not _TOKEN.fullmatch(method.encode("ascii", "replace")) or not _TARGET.fullmatch(target):
        raise httpx.LocalProtocolError(f"cannot send {method} {target!r}")
    lines = [b"%s %s HTTP/1.1" % (method.encode("ascii"), target)]
    length = None
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise httpx.LocalProtocolError(f"header {name!r} cannot be sent as given")
        if name.lower() == b"content-length":
            length = value
        elif name.lower() == b"transfer-encoding":
            raise httpx.LocalProtocolError("bodies are sent with a Content-Length")
        lines.append(name + b": " + value)
    if (body or length is not None) and length != b"%d" % len(body):
        raise httpx.LocalProtocolError("Content-Length does not match the body")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class ResponseParser:
    """One HTTP/1.1 answer, fed its bytes as they arrive; I/O is the caller's (as with h11).

    ``feed(data)`` returns True once the answer is whole; ``feed(b"")`` says the connection
    closed. Raises ``httpx.RemoteProtocolError`` for anything malformed, over its bounds, or
    outside what a forge sends (101, a transfer coding other than chunked, both a length and a
    coding), and ``_Stale`` for a close before the answer's first byte.
    """

    def __init__(self, method: str, *, max_body: int = MAX_RESPONSE_BYTES, max_head: int = MAX_HEAD_BYTES) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False  # may the connection carry another exchange, once done
        self.done = False
        self.received = False
        self._head_only = method == "HEAD"
        self._max_body = max_body
        self._max_head = max_head
        self._buffer = bytearray()
        self._chunks: list[bytes] = []
        self._size = 0
        self._remaining = 0
        self._trailer_bytes = 0
        self._searched = 0  # how much of the buffer is known to hold no end of head
        self._step: Callable[[], bool] = self._head

    @property
    def body(self) -> bytes:
        return b"".join(self._chunks)

    def feed(self, data: bytes) -> bool:
        if self.done:
            raise httpx.RemoteProtocolError("the forge sent more than its answer")
        if not data:
            if self._step == self._until_close:
                self.done = True
                return True
            if not self.received:
                raise _Stale()
            raise httpx.RemoteProtocolError("the forge closed the connection mid-answer")
        self.received = True
        self._buffer += data
        while not self.done and self._step():
            pass
        if self.done and self._buffer:
            self.keep_alive = False  # bytes past the answer: the connection is out of step
        return self.done

    def _broken(self, what: str) -> httpx.RemoteProtocolError:
        return httpx.RemoteProtocolError(f"the forge broke HTTP: {what}")

    def _head(self) -> bool:
        # Searched from where the last search stopped: a head dribbled a byte at a time is not
        # scanned again from its start for every byte.
        end = self._buffer.find(b"\r\n\r\n", max(0, self._searched - 3))
        if end < 0 or end > self._max_head:
            if len(self._buffer) > self._max_head:
                raise self._broken(f"status line and headers over {self._max_head} bytes")
            self._searched = len(self._buffer)
            return False
        lines = bytes(self._buffer[:end]).split(b"\r\n")
        del self._buffer[: end + 4]
        self._searched = 0
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None:
            raise self._broken(f"bad status line {lines[0][:80]!r}")
        status = int(status_line.group(2))
        headers = [self._field(line) for line in lines[1:]]
        if status < 200:
            if status == 101:
                raise self._broken("101 Switching Protocols, which was not asked for")
            return True  # an interim answer (103 Early Hints, say): the real one follows
        self.status, self.headers = status, headers
        self._frame(status_line.group(1) == b"1")
        return True

    def _field(self, line: bytes) -> tuple[bytes, bytes]:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        # Also refuses obsolete line folding (a line starting with white space): no forge sends it.
        if not colon or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise self._broken(f"bad header line {line[:80]!r}")
        return name, value

    def _values(self, name: bytes) -> list[bytes]:
        return [v.strip(b" \t").lower() for n, value in self.headers if n.lower() == name for v in value.split(b",")]

    def _frame(self, http11: bool) -> None:
        """How the body is delimited: RFC 9112 §6.3, in its order."""
        self.keep_alive = http11 and b"close" not in self._values(b"connection")
        codings = self._values(b"transfer-encoding")
        lengths = set(self._values(b"content-length"))
        if self._head_only or self.status in (204, 304):
            self.done = True
        elif codings:
            if lengths:
                raise self._broken("both Transfer-Encoding and Content-Length")
            if codings != [b"chunked"]:
                raise self._broken(f"unsupported transfer coding {b', '.join(codings)!r}")
            self._step = self._chunk_size
        elif lengths:
            length = lengths.pop()
            if lengths or not length.isdigit() or len(length) > 18:
                raise self._broken("bad Content-Length")
            self._remaining = int(length)
            self._take_size(self._remaining)
            self._step = self._length
            self.done = self._remaining == 0
        else:
            self.keep_alive = False  # the body runs to the end of the connection
            self._step = self._until_close

    def _take_size(self, size: int) -> None:
        if self._size + size > self._max_body:
            raise httpx.RemoteProtocolError(f"the forge's answer is over {self._max_body} bytes")
        self._size += size

    def _take(self) -> bool:
        """Up to ``_remaining`` bytes of body; True once they are all in."""
        if len(self._buffer) <= self._remaining:
            piece = bytes(self._buffer)
            self._buffer.clear()
        else:
            piece = bytes(self._buffer[: self._remaining])
            del self._buffer[: self._remaining]
        if piece:
            self._chunks.append(piece)
        self._remaining -= len(piece)
        return self._remaining == 0

    def _length(self) -> bool:
        self.done = self._take()
        return False

    def _chunk_size(self) -> bool:
        end = self._buffer.find(b"\r\n", 0, _MAX_CHUNK_LINE)
        if end < 0:
            if len(self._buffer) >= _MAX_CHUNK_LINE:
                raise self._broken("chunk size line too long")
            return False
        size_line = _CHUNK_SIZE.fullmatch(self._buffer, 0, end)
        if size_line is None:
            raise self._broken(f"bad chunk size line {bytes(self._buffer[: min(end, 80)])!r}")
        size = int(size_line.group(1), 16)
        del self._buffer[: end + 2]
        if size == 0:
            self._step = self._trailer
        else:
            self._take_size(size)
            self._remaining = size
            self._step = self._chunk_data
        return True

    def _chunk_data(self) -> bool:
        if not self._take():
            return False
        self._step = self._chunk_end
        return True

    def _chunk_end(self) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] != b"\r\n":
            raise self._broken("chunk data longer than its size")
        del self._buffer[:2]
        self._step = self._chunk_size
        return True

    def _trailer(self) -> bool:
        """Trailer fields after the last chunk, checked and dropped, up to the empty line."""
        end = self._buffer.find(b"\r\n", max(0, self._searched - 1))
        if end < 0:
            if self._trailer_bytes + len(self._buffer) > self._max_head:
                raise self._broken(f"trailers over {self._max_head} bytes")
            self._searched = len(self._buffer)
            return False
        self._searched = 0
        self._trailer_bytes += end + 2
        if self._trailer_bytes > self._max_head:
            raise self._broken(f"trailers over {self._max_head} bytes")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        if not line:
            self.done = True
            return False
        self._field(line)
        return True

    def _until_close(self) -> bool:
        self._take_size(len(self._buffer))
        self._chunks.append(bytes(self._buffer))
        self._buffer.clear()
        return False


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()
        self.idle = True  # between exchanges, each of which ended whole and kept the connection
        self.closed = False

    def usable(self, expiry: float) -> bool:
        """Idle, not too long, and not closed by the forge meanwhile."""
        if self.closed or not self.idle or time.monotonic() - self.idle_since > expiry:
            return False
        if self.reader.at_eof():
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        # An idle connection with something to read has been closed (or is out of step):
        # the same check httpcore makes before reusing one. poll, not select: a busy server
        # has descriptors past select's 1024.
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    def reusable(self) -> bool:
        return not self.closed and self.idle

    async def exchange(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeouts: Mapping[str, float | None],
        max_body: int,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        data = request_bytes(method, target, headers, body)
        self.idle = False
        try:
            self.writer.write(data)
            if self.writer.transport.get_write_buffer_size():  # a timer only if the kernel took less
                async with asyncio.timeout(timeouts.get("write")):
                    await self.writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("sending to the forge timed out") from None
        except OSError:
            raise _Stale() from None
        answer = ResponseParser(method, max_body=max_body)
        done = False
        while not done:
            try:
                async with asyncio.timeout(timeouts.get("read")):
                    data = await self.reader.read(65536)
            except TimeoutError:
                raise httpx.ReadTimeout("the forge did not answer in time") from None
            except OSError as exc:
                if not answer.received:
                    raise _Stale() from None
                raise httpx.ReadError(f"reading from the forge failed: {exc}") from None
            done = answer.feed(data)
        self.idle = answer.keep_alive
        return answer.status, answer.headers, answer.body

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    def abort(self) -> None:
        """Drop the connection at once: after a failed exchange, what it still buffers (a request
        the forge stopped reading, say) would keep it open, waiting to be sent."""
        self.closed = True
        self.writer.transport.abort()


def _proxy_configured() -> bool:
    """Whether the environment names a proxy (then httpx's transport, which honours it, is used)."""
    return bool(set(urllib.request.getproxies_environment()) & {"http", "https", "all"})


class Gitea(Forge):
    """Gitea's REST API v1.

    Usage::

        forge = Gitea("https://git.example.com/api/v1", token)
        issue = await forge.read_issue("acme", "widgets", 17)

    ``transport`` is for tests: a ``ForgeTransport`` with other limits, or an httpx transport
    (``MockTransport``, ``ASGITransport``) used through httpx's client.
    """

    kind: ClassVar[str] = "gitea"

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        transport: ForgeTransport | httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._token = token
        if transport is None and not _proxy_configured():
            transport = ForgeTransport()
        self._headers = {"Authorization": f"token {token}", "Accept": "application/json", "User-Agent": "forgebottle"}
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))
        self._timeouts = self._timeout.as_dict()  # per request, as the transport reads them
        url = httpx.URL(self.api_url)
        self._origin = origin(url)
        self._base = url.raw_path.split(b"?")[0].rstrip(b"/")
        self._raw_headers = [
            (b"Host", url.netloc),
            *((name.encode(), value.encode()) for name, value in self._headers.items()),
            (b"Accept-Encoding", b"identity"),  # a compressed body would need decoding we do not do
        ]
        # Exactly one of the two: our transport, or httpx's client (with a proxy configured,
        # transport None lets the client choose one that honours *_PROXY).
        self._forge: ForgeTransport | None = None
        self._client: httpx.AsyncClient | None = None
        if isinstance(transport, ForgeTransport):
            self._forge = transport
        else:
            self._client = httpx.AsyncClient(
                base_url=self.api_url + "/",
                headers=self._headers,
                timeout=self._timeout,
                transport=transport,
                follow_redirects=False,
            )

    def __repr__(self) -> str:
        return f"Gitea({self.api_url!r}, token=***)"

    async def aclose(self) -> None:
        if self._forge is not None:
            await self._forge.aclose()
        if self._client is not None:
            await self._client.aclose()  # closes its transport too

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> Answer:
        try:
            response = await self._send(method, path.lstrip("/"), json=json, params=params)
        except httpx.TimeoutException as exc:
            raise ForgeUnavailable(f"{method} {path}: forge timed out") from exc
        except httpx.HTTPError as exc:
            raise ForgeUnavailable(f"{method} {path}: forge unreachable ({type(exc).__name__})") from exc
        if response.status_code in ok:
            return response
        raise _error_for(method, path, response)

    async def _send(self, method: str, path: str, *, json: Any, params: Mapping[str, str | int] | None) -> Answer:
        if self._forge is None:
            assert self._client is not None
            response = await self._client.request(method, path, json=json, params=params)
            return Answer(response.status_code, response.headers, response.content)
        # Straight to our transport, without httpx's Request and Response objects: building
        # them (URL parsing, header normalising, body streams) was ~0.1 ms of a sidecar call.
        # Callers quote() every segment; quoting again (keeping "%") only guards the target
        # against a segment that was not, as httpx's URL parsing did.
        target = self._base + b"/" + quote(path, safe="/%").encode("ascii")
        if params:
            target += b"?" + urlencode(params, quote_via=quote).encode("ascii")
        headers = self._raw_headers
        body = b""
        if json is not None:  # as httpx encodes json=
            body = jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            headers = [*headers, (b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(body))]
        elif method not in ("GET", "HEAD"):
            headers = [*headers, (b"Content-Length", b"0")]
        status, raw, content = await self._forge.send(self._origin, method, target, headers, body, self._timeouts)
        return Answer(status, _header_map(raw), content)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise ForgeError(f"{method} {path}: forge sent invalid JSON", status=response.status_code) from exc

    @staticmethod
    def _repo_path(owner: str, repo: str) -> str:
        return f"repos/{quote(owner, safe='')}/{quote(repo, safe='')}"

    async def current_user(self) -> User:
        data = await self._json("GET", "user")
        return User(login=str(data.get("login") or ""), id=int(data.get("id") or 0))

    async def org_exists(self, org: str) -> bool:
        try:
            await self._request("GET", f"orgs/{quote(org, safe='')}")
        except ForgeNotFound:
            return False
        return True

    async def is_org_member(self, org: str, user: str) -> bool:
        path = f"orgs/{quote(org, safe='')}/members/{quote(user, safe='')}"
        response = await self._request("GET", path, ok=(204, 404, 303))
        if response.status_code == 303:
            raise OrgNotVisible(
                f"cannot check membership of {org!r}: the token's user is not a member of the org "
                "(Gitea answered 303); use a token of an org member",
                status=303,
            )
        return response.status_code == 204

    async def permission(self, owner: str, repo: str, user: str) -> str:
        path = f"{self._repo_path(owner, repo)}/collaborators/{quote(user, safe='')}/permission"
        try:
            data = await self._json("GET", path)
        except ForgeNotFound:
            return "none"
        return str(data.get("permission") or "none")

    async def get_repo(self, owner: str, repo: str) -> Repo:
        data = await self._json("GET", self._repo_path(owner, repo))
        return Repo(
            owner=owner,
            name=repo,
            default_branch=str(data.get("default_branch") or "main"),
            clone_url=str(data.get("clone_url") or ""),
            html_url=str(data.get("html_url") or ""),
        )

    async def read_issue(self, owner: str, repo: str, number: int) -> Issue:
        data = await self._json("GET", f"{self._repo_path(owner, repo)}/issues/{int(number)}")
        return issue_from_json(data)

    async def read_pr(self, owner: str, repo: str, number: int) -> PullRequest:
        data = await self._json("GET", f"{self._repo_path(owner, repo)}/pulls/{int(number)}")
        return pr_from_json(data)

    async def read_comments(self, owner: str, repo: str, number: int) -> list[Comment]:
        # Gitea returns every comment at once here: no page/limit (CONTRACT.md §3).
        data = await self._json("GET", f"{self._repo_path(owner, repo)}/issues/{int(number)}/comments")
        return [comment_from_json(c) for c in data or []]

    async def post_comment(self, owner: str, repo: str, number: int, body: str) -> Comment:
        data = await self._json(
            "POST",
            f"{self._repo_path(owner, repo)}/issues/{int(number)}/comments",
            json={"body": body},
            ok=(201,),
        )
        return comment_from_json(data)

    async def update_description(self, owner: str, repo: str, number: int, body: str) -> None:
        # PATCH on an issue answers 201, not 200 (CONTRACT.md §3); PRs are issues here too.
        await self._request(
            "PATCH", f"{self._repo_path(owner, repo)}/issues/{int(number)}", json={"body": body}, ok=(201,)
        )

    async def create_pr(self, owner: str, repo: str, *, head: str, base: str, title: str, body: str) -> PullRequest:
        data = await self._json(
            "POST",
            f"{self._repo_path(owner, repo)}/pulls",
            json={"head": head, "base": base, "title": title, "body": body},
            ok=(201,),
        )
        return pr_from_json(data)

    async def find_pr_by_head(self, owner: str, repo: str, head: str) -> PullRequest | None:
        for page in range(1, MAX_PAGES + 1):
            response = await self._request(
                "GET",
                f"{self._repo_path(owner, repo)}/pulls",
                params={"state": "open", "page": page, "limit": PAGE_LIMIT},
            )
            items = response.json() or []
            for item in items:
                pr = pr_from_json(item)
                if pr.head == head:
                    return pr
            if 'rel="next"' not in response.headers.get("link", "") or not items:
                return None
        return None


def _error_for(method: str, path: str, response: Answer) -> ForgeError:
    message = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            message = str(body.get("message") or "")
    except ValueError:
        message = response.text[:200]
    status = response.status_code
    text = f"{method} /{path.lstrip('/')}: {status} {message or response.reason_phrase}".strip()
    cls: type[ForgeError]
    if status == 404:
        cls = ForgeNotFound
    elif status in (401, 403):
        cls = ForgeAuthError
    elif status == 409:
        cls = ForgeConflict
    elif status >= 500:
        cls = ForgeUnavailable
    else:
        cls = ForgeError
    return cls(text, status=status)


def _login(user: Any) -> str:
    if isinstance(user, dict):
        return str(user.get("login") or user.get("username") or "")
    return ""


def issue_from_json(data: Mapping[str, Any]) -> Issue:
    return Issue(
        number=int(data["number"]),
        title=str(data.get("title") or ""),
        body=str(data.get("body") or ""),
        state=str(data.get("state") or "open"),
        labels=tuple(str(label.get("name", "")) for label in data.get("labels") or []),
        # Gitea sends null, not [], for an issue with no assignees.
        assignees=tuple(_login(u) for u in data.get("assignees") or []),
        html_url=str(data.get("html_url") or ""),
        user=_login(data.get("user")),
        is_pull=data.get("pull_request") is not None,
    )


def pr_from_json(data: Mapping[str, Any]) -> PullRequest:
    head = data.get("head") or {}
    base = data.get("base") or {}
    return PullRequest(
        number=int(data["number"]),
        title=str(data.get("title") or ""),
        body=str(data.get("body") or ""),
        state=str(data.get("state") or "open"),
        merged=bool(data.get("merged") or False),
        head=str(head.get("ref") or ""),
        base=str(base.get("ref") or ""),
        html_url=str(data.get("html_url") or ""),
        head_sha=str(head.get("sha") or ""),
    )


def comment_from_json(data: Mapping[str, Any]) -> Comment:
    return Comment(
        id=int(data["id"]),
        user=_login(data.get("user")),
        body=str(data.get("body") or ""),
        created_at=str(data.get("created_at") or ""),
        html_url=str(data.get("html_url") or ""),
    )


def basic_auth_header(user: str, token: str) -> str:
    """The header git sends to Gitea's smart HTTP: basic auth with the token as password."""
    raw = base64.b64encode(f"{user}:{token}".encode()).decode()
    return f"Authorization: Basic {raw}"
