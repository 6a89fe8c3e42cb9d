"""The forge sidecar: JSON-RPC 2.0 on a per-bottle Unix socket (DESIGN.md §7).

The socket identifies the bottle, so a request carries no credential. Every call, allowed,
denied or malformed, becomes one operation in the bottle's hash-chained log, as a sentence.

What an agent is told is ours alone: forge and git errors reach it as fixed sentences (their
text goes to the operator's log), and every answer passes through the one redaction of every
forgebottle secret on its way out (``answer``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bottles import BottleError, PushRefused, PushResult
from gitea import (
    MAX_TEXT_BYTES,
    ForgeAuthError,
    ForgeConflict,
    ForgeError,
    ForgeNotFound,
    ForgeUnavailable,
    OutOfScope,
    PullRequest,
    ScopedForge,
)
from serving import BodyTooSlow, read_bounded
from statemachine import ForgeBottleError

log = logging.getLogger("forgebottle.sidecar")

MAX_REQUEST_BYTES = 1024 * 1024
MAX_BATCH = 100
MAX_TITLE_BYTES = 1024
MAX_SUMMARY_BYTES = 16 * 1024
# An agent's call is at most MAX_REQUEST_BYTES over a local socket: 10 s is generous, and a
# dribbling client holds its connection no longer than that.
BODY_SECONDS = 10.0
WRITES = frozenset({"post_comment", "update_description", "push", "open_pr", "update_progress"})
DONE_STATUSES = ("success", "failure", "blocked")
# Texts an agent writes to the forge, by method: scanned for secrets like a push.
WRITTEN_TEXT = {
    "post_comment": ("body",),
    "update_description": ("body",),
    "open_pr": ("title", "body"),
    "update_progress": ("body",),
}
MAX_PROGRESS_BYTES = 16 * 1024

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


DENIALS = (OutOfScope, RateLimited, NotRunning, PushRefused)


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
    # The conversation on the forge and CI (§7, §12).
    "update_progress": {"body": (str, True, MAX_PROGRESS_BYTES)},
    "read_checks": {"ref": (str, False, 255)},
    "read_job_log": {"job_id": (int, True, 0), "tail_lines": (int, False, 0)},
    "refresh": {},
}


class BottleAccess(Protocol):
    """What the sidecar needs of the service for one bottle."""

    slug: str

    def is_running(self) -> bool: ...

    def scoped(self) -> ScopedForge: ...

    def whoami(self) -> dict[str, Any]: ...

    def default_branch(self) -> str: ...

    def writes_in_last_hour(self) -> int:
        """Writes attempted in the last hour: those that reached the forge or git, failed pushes
        included."""
        ...

    def write_limit(self) -> int: ...

    def check_text(self, text: str, where: str) -> None:
        """Raise PushRefused if ``text``, about to be written to the forge, holds a secret."""
        ...

    def redact(self, text: str) -> str: ...

    async def push(self) -> PushResult: ...

    async def pr_opened(self, pr: PullRequest) -> None: ...

    async def signal_done(self, status: str, summary: str) -> None: ...

    async def update_progress(self, body: str) -> str:
        """Show ``body`` as the progress part of the bottle's status comment; its URL."""
        ...

    async def read_checks(self, ref: str | None) -> list[dict[str, Any]]: ...

    async def read_job_log(self, job_id: int, tail_lines: int) -> dict[str, Any]: ...

    async def refresh(self) -> dict[str, str]:
        """Fetch the forge's bottle branch and base branch into the workspace as origin/*."""
        ...

    async def record(
        self,
        *,
        op: str,
        target: str,
        outcome: str,
        detail: str,
        duration_ms: float,
        code: int | None = None,
        failure: str = "",
    ) -> None:
        """Put the operation on the bottle's record (``failure``: the operator's detail of an
        error, for the log only); return once it is as durable as promised."""
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
            size = len(value.encode())
            if size > limit:
                raise RpcError(INVALID_PARAMS, f"param {name!r} is {size} bytes, over the limit of {limit}")
    if method == "signal_done" and params["status"] not in DONE_STATUSES:
        raise RpcError(INVALID_PARAMS, f"status must be one of {', '.join(DONE_STATUSES)}")
    if method == "open_pr" and not params["title"].strip():
        raise RpcError(INVALID_PARAMS, "title must not be empty")
    return params


def valid_unicode(value: Any) -> bool:
    """False if any string in ``value`` (keys included) cannot be UTF-8: JSON's ``\\ud800``
    escapes decode to lone surrogates, which neither SQLite nor a hash will take."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def target_of(method: str, params: dict[str, Any], branch: str) -> str:
    if "number" in params and isinstance(params["number"], int) and not isinstance(params["number"], bool):
        return f"#{params['number']}"
    if method in ("push", "open_pr", "refresh"):
        return branch
    if method == "read_job_log" and isinstance(params.get("job_id"), int):
        return f"job {params['job_id']}"
    if method == "read_checks":
        return str(params.get("ref") or "the PR head")[:64]
    if method == "update_progress":
        return "status comment"
    return ""


def told_agent(exc: ForgeBottleError) -> str:
    """What an agent hears of an error: never the forge's or git's own text."""
    if isinstance(exc, ForgeNotFound):
        return "not found on the forge"
    if isinstance(exc, ForgeAuthError):
        return "the forge refused forgebottle's request (permission)"
    if isinstance(exc, ForgeConflict):
        return "the forge reported a conflict"
    if isinstance(exc, ForgeUnavailable):
        return "the forge is unavailable; try again later"
    if isinstance(exc, ForgeError):
        return f"the forge refused the request (HTTP {exc.status})" if exc.status else "the forge refused the request"
    return str(exc)  # our own errors say only what we chose to say


def operator_detail(exc: ForgeBottleError) -> str:
    """What the operator's log gets of an error (redacted by the caller)."""
    detail = getattr(exc, "detail", "")
    return str(detail) if detail else str(exc)


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
    if method == "update_progress":
        return "updated progress in the status comment"
    if method == "read_checks":
        return f"read checks of {target}"
    if method == "read_job_log":
        return f"read the log of {target}"
    if method == "refresh":
        return f"refreshed {target} and its base from the forge"
    return method


class Dispatcher:
    """JSON-RPC for one bottle: validate, check scope and limits, call, record."""

    def __init__(self, access: BottleAccess) -> None:
        self.access = access
        # Writes allowed but not yet on the record: counted against the limit, so concurrent
        # calls cannot all pass the check before any of them is recorded. The ledger lock makes
        # a write's record and the release of its reservation one step for the check, which
        # would otherwise count a write twice (on the record and still reserved) in between.
        self.reserved = 0
        self._ledger = asyncio.Lock()

    async def handle_body(self, raw: bytes) -> Any:
        """The response document for a request body, or None when nothing is owed (notifications)."""
        try:
            request = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            await self._log("invalid", "", "error", f"rejected malformed request: parse error ({type(exc).__name__})")
            return _error(None, RpcError(PARSE_ERROR, "parse error: the body is not JSON"))
        if not valid_unicode(request):
            await self._log("invalid", "", "error", "rejected request: invalid Unicode (a lone surrogate)")
            return _error(None, RpcError(INVALID_PARAMS, "invalid Unicode in the request (a lone surrogate)"))
        if isinstance(request, list):
            if not request:
                await self._log("invalid", "", "error", "rejected empty batch")
                return _error(None, RpcError(INVALID_REQUEST, "empty batch"))
            if len(request) > MAX_BATCH:
                await self._log("invalid", "", "error", f"rejected batch of {len(request)} calls")
                return _error(None, RpcError(INVALID_REQUEST, f"batch over {MAX_BATCH} calls"))
            answers = [await self.call(item) for item in request]
            present = [a for a in answers if a is not None]
            return present or None
        return await self.call(request)

    async def call(self, obj: Any) -> dict[str, Any] | None:
        started = time.perf_counter()
        if not isinstance(obj, dict):
            await self._log("invalid", "", "error", "rejected invalid request: not an object")
            return _error(None, RpcError(INVALID_REQUEST, "a request must be a JSON object"))
        rid = obj.get("id")
        if "id" in obj and (isinstance(rid, bool) or not isinstance(rid, (str, int, type(None)))):
            await self._log("invalid", "", "error", "rejected invalid request: bad id")
            return _error(None, RpcError(INVALID_REQUEST, "id must be a string, a number or null"))
        notification = "id" not in obj
        method = obj.get("method")
        params: Any = obj.get("params", {})
        name = method if isinstance(method, str) and method in METHODS else "invalid"
        target = ""
        reserved = False
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
            if method in WRITES:
                limit = self.access.write_limit()
                async with self._ledger:
                    if self.access.writes_in_last_hour() + self.reserved >= limit:
                        raise RateLimited(f"rate limited ({limit} writes/hour)")
                    self.reserved += 1
                reserved = True
            result = await self.invoke(method, params)
        except ForgeBottleError as exc:
            code = exc.code if isinstance(exc, RpcError) else exc.rpc_code
            outcome = "denied" if isinstance(exc, DENIALS) else "error"
            message = told_agent(exc)
            detail = sentence(name, target, outcome, None, message)
            if name == "invalid":
                detail = f"rejected {str(method)[:64] if isinstance(method, str) else 'request'}: {message}"
            failure = operator_detail(exc) if isinstance(exc, (ForgeError, BottleError)) else ""
            failure = "" if failure == message else failure
            await self._settle(reserved, name, target, outcome, detail, _ms(started), code, failure)
            data = None
            if isinstance(exc, PushRefused):
                data = {"findings": [dataclasses.asdict(f) for f in exc.findings]}
            elif isinstance(exc, RpcError):
                data = exc.data
            return None if notification else _error(rid, RpcError(code, message, data))
        if method == "signal_done":
            detail = sentence(method, target, "ok", result, f"{params['status']}: {params['summary'][:200]}")
        else:
            detail = sentence(method, target, "ok", result, "")
        await self._settle(reserved, method, target, "ok", detail, _ms(started))
        return None if notification else {"jsonrpc": "2.0", "id": rid, "result": result}

    async def invoke(self, method: str, params: dict[str, Any]) -> Any:
        scoped = self.access.scoped()
        for field in WRITTEN_TEXT.get(method, ()):
            if field in params:
                self.access.check_text(params[field], f"{method} {field}")
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
            default = self.access.default_branch()
            base = params.get("base") or default
            if base != default:
                raise OutOfScope(f"pull request into {base}: out of scope (base: {default})")
            pr = await scoped.open_pr(
                title=params["title"], body=params.get("body", ""), base=base, head=params.get("head")
            )
            await self.access.pr_opened(pr)
            return {"number": pr.number, "html_url": pr.html_url}
        if method == "signal_done":
            await self.access.signal_done(params["status"], params["summary"])
            return {"acknowledged": True}
        if method == "update_progress":
            return {"html_url": await self.access.update_progress(params["body"])}
        if method == "read_checks":
            return await self.access.read_checks(params.get("ref"))
        if method == "read_job_log":
            return await self.access.read_job_log(params["job_id"], params.get("tail_lines", 200))
        if method == "refresh":
            return await self.access.refresh()
        raise RpcError(METHOD_NOT_FOUND, f"unknown method {method!r}")

    async def _settle(self, reserved: bool, *record: Any) -> None:
        """Record a call; a reserved write's reservation ends as its record lands."""
        if not reserved:
            await self._log(*record)
            return
        async with self._ledger:
            try:
                await self._log(*record)
            finally:
                self.reserved -= 1

    async def _log(
        self,
        op: str,
        target: str,
        outcome: str,
        detail: str,
        duration_ms: float = 0.0,
        code: int | None = None,
        failure: str = "",
    ) -> None:
        await self.access.record(
            op=op, target=target, outcome=outcome, detail=detail, duration_ms=duration_ms, code=code, failure=failure
        )


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _error(rid: Any, exc: RpcError) -> dict[str, Any]:
    error: dict[str, Any] = {"code": exc.code, "message": str(exc)}
    if exc.data is not None:
        error["data"] = exc.data
    return {"jsonrpc": "2.0", "id": rid, "error": error}


def sidecar_app(access: BottleAccess) -> Starlette:
    dispatcher = Dispatcher(access)

    async def rejected(detail: str, status: int, message: str) -> Response:
        await access.record(op="invalid", target="", outcome="error", detail=detail, duration_ms=0.0)
        return answer(access, _error(None, RpcError(INVALID_REQUEST, message)), status)

    async def rpc(request: Request) -> Response:
        try:
            raw = await read_bounded(request, MAX_REQUEST_BYTES, seconds=BODY_SECONDS)
        except BodyTooSlow as exc:
            return await rejected(f"rejected request: {exc}", BodyTooSlow.http_status, str(exc))
        if raw is None:
            message = f"request over {MAX_REQUEST_BYTES} bytes"
            return await rejected(f"rejected {message}", 413, message)
        document = await dispatcher.handle_body(raw)
        if document is None:
            return Response(status_code=204)
        return answer(access, document)

    return Starlette(routes=[Route("/rpc", rpc, methods=["POST"])])


def answer(access: BottleAccess, document: Any, status: int = 200) -> Response:
    """The one way out to an agent: JSON with every forgebottle secret redacted."""
    body = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(access.redact(body).encode(), status, media_type="application/json")
