"""The forge sidecar: JSON-RPC 2.0 on a per-bottle Unix socket (DESIGN.md §7).

The socket identifies the bottle, so a request carries no credential. Every call, allowed,
denied or malformed, becomes one operation in the bottle's hash-chained log, as a sentence.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from bottles import PushRefused, PushResult
from gitea import MAX_TEXT_BYTES, OutOfScope, PullRequest, ScopedForge
from statemachine import ForgeBottleError

log = logging.getLogger("forgebottle.sidecar")

MAX_REQUEST_BYTES = 1024 * 1024
MAX_BATCH = 100
MAX_TITLE_BYTES = 1024
MAX_SUMMARY_BYTES = 16 * 1024
WRITES = frozenset({"post_comment", "update_description", "push", "open_pr"})
DONE_STATUSES = ("success", "failure", "blocked")

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL = -32700, -32600, -32601, -32602, -32603


class RpcError(ForgeBottleError):
    """A JSON-RPC error with its code; ``data`` goes to the caller as is."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


class RateLimited(ForgeBottleError):
    rpc_code = -32003


class NotRunning(ForgeBottleError):
    rpc_code = -32004


# name -> (type, required, max bytes for strings)
Param = tuple[type, bool, int]
METHODS: dict[str, dict[str, Param]] = {
    "whoami": {},
    "read_issue": {"number": (int, True, 0)},
    "read_pr": {"number": (int, True, 0)},
    "read_comments": {"number": (int, True, 0)},
    "post_comment": {"number": (int, True, 0), "body": (str, True, MAX_TEXT_BYTES)},
    "update_description": {"number": (int, True, 0), "body": (str, True, MAX_TEXT_BYTES)},
    "push": {},
    "open_pr": {
        "title": (str, True, MAX_TITLE_BYTES),
        "body": (str, False, MAX_TEXT_BYTES),
        "base": (str, False, 255),
        "head": (str, False, 255),
    },
    "signal_done": {"status": (str, True, 16), "summary": (str, True, MAX_SUMMARY_BYTES)},
}


class BottleAccess(Protocol):
    """What the sidecar needs of the service for one bottle."""

    slug: str

    def is_running(self) -> bool: ...

    def scoped(self) -> ScopedForge: ...

    def whoami(self) -> dict[str, Any]: ...

    def default_branch(self) -> str: ...

    def writes_in_last_hour(self) -> int: ...

    def write_limit(self) -> int: ...

    async def push(self) -> PushResult: ...

    async def pr_opened(self, pr: PullRequest) -> None: ...

    async def signal_done(self, status: str, summary: str) -> None: ...

    async def record(
        self, *, op: str, target: str, outcome: str, detail: str, duration_ms: float, code: int | None = None
    ) -> None:
        """Put the operation on the bottle's record; return once it is as durable as promised."""
        ...


def check_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    spec = METHODS[method]
    extra = sorted(set(params) - set(spec))
    if extra:
        raise RpcError(INVALID_PARAMS, f"unknown param(s) for {method}: {', '.join(extra)}")
    for name, (kind, required, limit) in spec.items():
        if name not in params:
            if required:
                raise RpcError(INVALID_PARAMS, f"{method} needs param {name!r}")
            continue
        value = params[name]
        # bool is an int to Python, not to an agent.
        if kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise RpcError(INVALID_PARAMS, f"param {name!r} must be an integer")
            if not 0 < value < 2**31:
                raise RpcError(INVALID_PARAMS, f"param {name!r} must be a positive issue or PR number")
        else:
            if not isinstance(value, str):
                raise RpcError(INVALID_PARAMS, f"param {name!r} must be a string")
            size = len(value.encode(errors="surrogatepass"))
            if size > limit:
                raise RpcError(INVALID_PARAMS, f"param {name!r} is {size} bytes, over the limit of {limit}")
    if method == "signal_done" and params["status"] not in DONE_STATUSES:
        raise RpcError(INVALID_PARAMS, f"status must be one of {', '.join(DONE_STATUSES)}")
    if method == "open_pr" and not params["title"].strip():
        raise RpcError(INVALID_PARAMS, "title must not be empty")
    return params


def target_of(method: str, params: dict[str, Any], branch: str) -> str:
    if "number" in params and isinstance(params["number"], int) and not isinstance(params["number"], bool):
        return f"#{params['number']}"
    if method in ("push", "open_pr"):
        return branch
    return ""


_NOUNS = {
    "read_issue": "issue",
    "read_pr": "pull request",
    "read_comments": "comments on",
    "post_comment": "comment to",
    "update_description": "description of",
}


def sentence(method: str, target: str, outcome: str, result: Any, error: str) -> str:
    """The operation as a person would say it."""
    noun = _NOUNS.get(method, method.replace("_", " "))
    if outcome == "denied":
        return f"denied {noun} {target}: {error}".replace("  ", " ")
    if outcome == "error":
        return f"failed {method.replace('_', ' ')} {target}: {error}".replace("  ", " ").rstrip()
    if method == "whoami":
        return "asked who it is"
    if method in ("read_issue", "read_pr", "read_comments"):
        return f"read {noun} {target}"
    if method == "post_comment":
        return f"posted comment to {target}"
    if method == "update_description":
        return f"updated description of {target}"
    if method == "push":
        return f"pushed {result['sha'][:12]} to {result['branch']}"
    if method == "open_pr":
        return f"opened pull request #{result['number']} from {target}"
    if method == "signal_done":
        return f"signalled done: {error}"
    return method


class Dispatcher:
    """JSON-RPC for one bottle: validate, check scope and limits, call, log."""

    def __init__(self, access: BottleAccess) -> None:
        self.access = access

    async def handle_body(self, raw: bytes) -> Any:
        """The response document for a request body, or None when nothing is owed (notifications)."""
        try:
            request = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            await self._log(
                "invalid", "", "error", f"rejected malformed request: parse error ({type(exc).__name__})", 0
            )
            return _error(None, RpcError(PARSE_ERROR, "parse error: the body is not JSON"))
        if isinstance(request, list):
            if not request:
                await self._log("invalid", "", "error", "rejected empty batch", 0)
                return _error(None, RpcError(INVALID_REQUEST, "empty batch"))
            if len(request) > MAX_BATCH:
                await self._log("invalid", "", "error", f"rejected batch of {len(request)} calls", 0)
                return _error(None, RpcError(INVALID_REQUEST, f"batch over {MAX_BATCH} calls"))
            answers = [await self.call(item) for item in request]
            present = [a for a in answers if a is not None]
            return present or None
        return await self.call(request)

    async def call(self, obj: Any) -> dict[str, Any] | None:
        started = time.perf_counter()
        if not isinstance(obj, dict):
            await self._log("invalid", "", "error", "rejected invalid request: not an object", 0)
            return _error(None, RpcError(INVALID_REQUEST, "a request must be a JSON object"))
        rid = obj.get("id")
        if "id" in obj and (isinstance(rid, bool) or not isinstance(rid, (str, int, type(None)))):
            await self._log("invalid", "", "error", "rejected invalid request: bad id", 0)
            return _error(None, RpcError(INVALID_REQUEST, "id must be a string, a number or null"))
        notification = "id" not in obj
        method = obj.get("method")
        params: Any = obj.get("params", {})
        name = method if isinstance(method, str) and method in METHODS else "invalid"
        target = ""
        try:
            if obj.get("jsonrpc") != "2.0":
                raise RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"')
            if not isinstance(method, str):
                raise RpcError(INVALID_REQUEST, "method must be a string")
            if method not in METHODS:
                raise RpcError(METHOD_NOT_FOUND, f"unknown method {method[:64]!r}")
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "params must be named (a JSON object)")
            target = target_of(method, params, self.access.scoped().branch)
            check_params(method, params)
            if not self.access.is_running():
                raise NotRunning("bottle is not running")
            if method in WRITES and self.access.writes_in_last_hour() >= self.access.write_limit():
                raise RateLimited(f"rate limited ({self.access.write_limit()} writes/hour)")
            result = await self.invoke(method, params)
        except ForgeBottleError as exc:
            code = exc.code if isinstance(exc, RpcError) else exc.rpc_code
            outcome = "denied" if isinstance(exc, (OutOfScope, RateLimited, NotRunning, PushRefused)) else "error"
            detail = sentence(name, target, outcome, None, str(exc))
            if name == "invalid":
                detail = f"rejected {str(method)[:64] if isinstance(method, str) else 'request'}: {exc}"
            await self._log(name, target, outcome, detail, _ms(started), code)
            data = None
            if isinstance(exc, PushRefused):
                data = {"findings": [dataclasses.asdict(f) for f in exc.findings]}
            elif isinstance(exc, RpcError):
                data = exc.data
            return None if notification else _error(rid, RpcError(code, str(exc), data))
        if method == "signal_done":
            detail = sentence(method, target, "ok", result, f"{params['status']}: {params['summary'][:200]}")
        else:
            detail = sentence(method, target, "ok", result, "")
        await self._log(method, target, "ok", detail, _ms(started))
        return None if notification else {"jsonrpc": "2.0", "id": rid, "result": result}

    async def invoke(self, method: str, params: dict[str, Any]) -> Any:
        scoped = self.access.scoped()
        if method == "whoami":
            return self.access.whoami()
        if method == "read_issue":
            return (await scoped.read_issue(params["number"])).as_json()
        if method == "read_pr":
            return (await scoped.read_pr(params["number"])).as_json()
        if method == "read_comments":
            return [c.as_json() for c in await scoped.read_comments(params["number"])]
        if method == "post_comment":
            comment = await scoped.post_comment(params["number"], params["body"])
            return {"id": comment.id, "html_url": comment.html_url}
        if method == "update_description":
            await scoped.update_description(params["number"], params["body"])
            return {}
        if method == "push":
            pushed = await self.access.push()
            return {"branch": pushed.branch, "sha": pushed.sha}
        if method == "open_pr":
            pr = await scoped.open_pr(
                title=params["title"],
                body=params.get("body", ""),
                base=params.get("base") or self.access.default_branch(),
                head=params.get("head"),
            )
            await self.access.pr_opened(pr)
            return {"number": pr.number, "html_url": pr.html_url}
        if method == "signal_done":
            await self.access.signal_done(params["status"], params["summary"])
            return {"acknowledged": True}
        raise RpcError(METHOD_NOT_FOUND, f"unknown method {method!r}")

    async def _log(
        self, op: str, target: str, outcome: str, detail: str, duration_ms: float, code: int | None = None
    ) -> None:
        await self.access.record(
            op=op, target=target, outcome=outcome, detail=detail, duration_ms=duration_ms, code=code
        )


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _error(rid: Any, exc: RpcError) -> dict[str, Any]:
    error: dict[str, Any] = {"code": exc.code, "message": str(exc)}
    if exc.data is not None:
        error["data"] = exc.data
    return {"jsonrpc": "2.0", "id": rid, "error": error}


class BodyTooSlow(ForgeBottleError):
    """The client did not send its body in time (a slowloris, or a dead peer)."""

    http_status = 408


BODY_TICK = 0.25
# An agent's call is at most MAX_REQUEST_BYTES over a local socket: 10 s is generous, and a
# dribbling client holds its connection no longer than that.
BODY_SECONDS = 10.0


class _Deadlines:
    """Body deadlines of one event loop, checked every BODY_TICK by one timer.

    What ``asyncio.timeout(seconds)`` does, without a timer per request: under a webhook burst
    each timer was a heap push and, once cancelled, a dead handle for the loop to sift out
    (about 10 µs of every webhook in the profile). A deadline here fires up to BODY_TICK late.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[asyncio.Timeout, float] = {}
        self.ticking = False

    def add(self, timeout: asyncio.Timeout, seconds: float) -> None:
        self.pending[timeout] = self.loop.time() + seconds
        if not self.ticking:
            self.ticking = True
            self.loop.call_later(BODY_TICK, self.tick)

    def tick(self) -> None:
        now = self.loop.time()
        for timeout, when in list(self.pending.items()):
            if when <= now:
                del self.pending[timeout]
                timeout.reschedule(now)  # expires it now: the reader gets TimeoutError
        self.ticking = bool(self.pending)
        if self.ticking:
            self.loop.call_later(BODY_TICK, self.tick)


_DEADLINES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = weakref.WeakKeyDictionary()


async def read_bounded(request: Request, limit: int, *, seconds: float = 30.0) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (read no further).

    Raises BodyTooSlow when the whole body has not arrived within ``seconds`` (give or take
    BODY_TICK).
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    loop = asyncio.get_running_loop()
    deadlines = _DEADLINES.get(loop)
    if deadlines is None:
        deadlines = _DEADLINES[loop] = _Deadlines(loop)
    timeout = asyncio.timeout(None)
    try:
        async with timeout:
            deadlines.add(timeout, seconds)
            try:
                return await _receive_body(request, limit)
            finally:
                deadlines.pending.pop(timeout, None)
    except TimeoutError:
        raise BodyTooSlow(f"the request body did not arrive within {seconds:.0f}s") from None


async def _receive_body(request: Request, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the usual case: the whole body in one message, no copy
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


def sidecar_app(access: BottleAccess) -> Starlette:
    dispatcher = Dispatcher(access)

    async def rejected(detail: str, status: int, message: str) -> Response:
        await access.record(op="invalid", target="", outcome="error", detail=detail, duration_ms=0)
        return JSONResponse(_error(None, RpcError(INVALID_REQUEST, message)), status_code=status)

    async def rpc(request: Request) -> Response:
        try:
            raw = await read_bounded(request, MAX_REQUEST_BYTES, seconds=BODY_SECONDS)
        except BodyTooSlow as exc:
            return await rejected(f"rejected request: {exc}", BodyTooSlow.http_status, str(exc))
        if raw is None:
            message = f"request over {MAX_REQUEST_BYTES} bytes"
            return await rejected(f"rejected {message}", 413, message)
        answer = await dispatcher.handle_body(raw)
        if answer is None:
            return Response(status_code=204)
        return JSONResponse(answer)

    return Starlette(routes=[Route("/rpc", rpc, methods=["POST"])])


# -- serving an ASGI app on a Unix socket inside the service's event loop -------------------


class QuietServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    # The service's own uvicorn server owns SIGINT/SIGTERM; a second server capturing them
    # would swallow the service's shutdown.
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
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
        os.chmod(self.path, 0o600)
        # An agent may fire many calls at once; past the backlog its connects would fail.
        sock.listen(self.limit_concurrency)
        sock.setblocking(False)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,  # a Unix socket: no proxy, no forwarded headers to trust
            timeout_graceful_shutdown=2,
            limit_concurrency=self.limit_concurrency,
            h11_max_incomplete_event_size=64 * 1024,
        )
        self._server = QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=f"unix:{self.path}")
        ready = asyncio.create_task(self._server.ready.wait())
        # A launch waits for this, so wait for the event rather than poll for it.
        await asyncio.wait([ready, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not self._server.started:
            ready.cancel()
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
