#!/usr/bin/env python3
"""forge: the agent's only way to the forge. Standard library only; copied into each bottle.

Talks JSON-RPC 2.0 to the bottle's sidecar over the Unix socket in $FORGE_SIDECAR_SOCKET.
Prints the result as JSON on stdout; on error prints one line on stderr and exits 1.

  forge whoami
  forge read-issue N          forge read-pr N          forge comments N
  forge comment N [TEXT|-]    forge describe N [TEXT|-]
  forge push
  forge open-pr --title T [--body TEXT|-] [--base BRANCH] [--head YOUR-BRANCH]
  forge done success|failure|blocked SUMMARY
  forge progress [TEXT|-]     forge checks [REF]       forge job-log ID [--tail N]
  forge refresh
  forge mcp                   the same calls as MCP tools, on stdin/stdout (DESIGN.md §11)
  forge relay --listen 127.0.0.1:3128 --socket /run/forge/egress.sock -- AGENT ARGV...
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio  # imported where the relay runs: every other forge command starts without it

DEFAULT_SOCKET = "/run/forge/forge.sock"
_ids = itertools.count(1)


class SidecarError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def exchange(path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """One ``POST /rpc`` over the Unix socket: (HTTP status, response body).

    Written out rather than through http.client, whose import (ssl, email) was 15 ms of each
    ~50 ms tool call. The sidecar is uvicorn: asked for ``Connection: close`` it sends one
    response with a Content-Length and closes, so the response is all there is to read.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        head = (
            "POST /rpc HTTP/1.1\r\nHost: forge\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    status_line, _, rest = b"".join(chunks).partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise SidecarError(-1, f"the sidecar at {path} did not answer in HTTP")
    return int(parts[1]), payload


def call(
    method: str, params: dict[str, Any] | None = None, *, socket_path: str | None = None, timeout: float = 600.0
) -> Any:
    """One JSON-RPC call; returns ``result`` or raises SidecarError."""
    path = socket_path or os.environ.get("FORGE_SIDECAR_SOCKET", DEFAULT_SOCKET)
    request = {"jsonrpc": "2.0", "id": next(_ids), "method": method, "params": params or {}}
    try:
        status, raw = exchange(path, json.dumps(request).encode(), timeout)
    except OSError as exc:
        raise SidecarError(-1, f"cannot reach the sidecar at {path}: {exc}") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        raise SidecarError(-1, f"the sidecar answered HTTP {status} without JSON") from None
    if not isinstance(answer, dict):
        raise SidecarError(-1, f"the sidecar answered HTTP {status} with something other than a JSON-RPC response")
    if "error" in answer:
        error = answer["error"]
        raise SidecarError(int(error.get("code", -1)), str(error.get("message", "error")))
    return answer.get("result")


def _text(value: str | None) -> str:
    if value is None or value == "-":
        return sys.stdin.read()
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forge", description="Reach the forge from inside a bottle.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("whoami", help="this bottle, its issue, PR and write scope")
    for name, helptext in (
        ("read-issue", "read an issue"),
        ("read-pr", "read a pull request"),
        ("comments", "read the comments on an issue or PR"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("number", type=int)
    for name, helptext in (("comment", "comment on your issue or PR"), ("describe", "replace a description")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("number", type=int)
        p.add_argument("text", nargs="?", default=None, help="the text, or - (default) for stdin")
    sub.add_parser("push", help="push your committed HEAD to your branch")
    p = sub.add_parser("open-pr", help="open (or find) the pull request from your branch")
    p.add_argument("--title", required=True)
    p.add_argument("--body", default="", help="the text, or - for stdin")
    p.add_argument("--base", default=None)
    p.add_argument("--head", default=None, help="must be your own branch (the default)")
    p = sub.add_parser("done", help="say you are finished")
    p.add_argument("status", choices=["success", "failure", "blocked"])
    p.add_argument("summary")
    add_later_commands(sub)
    return parser


def run(argv: list[str]) -> Any:
    args = build_parser().parse_args(argv)
    command = args.command
    if command in LATER_COMMANDS:
        return LATER_COMMANDS[command](args)
    if command == "whoami":
        return call("whoami")
    if command == "read-issue":
        return call("read_issue", {"number": args.number})
    if command == "read-pr":
        return call("read_pr", {"number": args.number})
    if command == "comments":
        return call("read_comments", {"number": args.number})
    if command == "comment":
        return call("post_comment", {"number": args.number, "body": _text(args.text)})
    if command == "describe":
        return call("update_description", {"number": args.number, "body": _text(args.text)})
    if command == "push":
        return call("push")
    if command == "open-pr":
        params: dict[str, Any] = {"title": args.title, "body": _text(args.body) if args.body == "-" else args.body}
        if args.base:
            params["base"] = args.base
        if args.head:
            params["head"] = args.head
        return call("open_pr", params)
    return call("signal_done", {"status": args.status, "summary": args.summary})


# -- the calls added after the first tool ------------------------------------------------


def add_later_commands(sub: Any) -> None:
    """progress, checks, job-log, refresh and mcp: kept apart so the list above stays as it was."""
    p = sub.add_parser("progress", help="replace the checklist in your bottle's status comment")
    p.add_argument("text", nargs="?", default=None, help="the text, or - (default) for stdin")
    p = sub.add_parser("checks", help="commit statuses and Actions jobs for a commit (default: your PR head)")
    p.add_argument("ref", nargs="?", default=None)
    p = sub.add_parser("job-log", help="the end of an Actions job's log")
    p.add_argument("job_id", type=int)
    p.add_argument("--tail", type=int, default=None, help="how many lines (default 200)")
    sub.add_parser("refresh", help="fetch your branch and its base from the forge as origin/*")
    sub.add_parser("mcp", help="serve these calls as MCP tools on stdin/stdout")


def _job_log(args: argparse.Namespace) -> Any:
    params: dict[str, Any] = {"job_id": args.job_id}
    if args.tail is not None:
        params["tail_lines"] = args.tail
    return call("read_job_log", params)


def _serve(args: argparse.Namespace) -> Any:
    # An MCP server owns stdout: nothing may follow its last answer, so it ends the process.
    raise SystemExit(serve_mcp(sys.stdin.buffer, sys.stdout.buffer))


LATER_COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "progress": lambda args: call("update_progress", {"body": _text(args.text)}),
    "checks": lambda args: call("read_checks", {"ref": args.ref} if args.ref else {}),
    "job-log": _job_log,
    "refresh": lambda args: call("refresh"),
    "mcp": _serve,
}


# -- forge mcp (DESIGN.md §11) -----------------------------------------------------------

# Newest first. A client asking for one of these gets it; any other gets the first, which the
# client may then accept or hang up on (the MCP lifecycle's version negotiation).
MCP_VERSIONS = ("2025-06-18", "2025-03-26", "2024-11-05")
# The sidecar refuses requests over 1 MiB; a line may be larger only by its JSON-RPC envelope
# and escaping, so twice that is room enough and bounds what one line can make us hold.
MAX_LINE_BYTES = 2 * 1024 * 1024
# The sidecar's limits in bytes, given here as characters: close enough for a schema, and
# the sidecar still enforces the bytes.
TEXT_MAX, TITLE_MAX, SUMMARY_MAX, NAME_MAX = 64 * 1024, 1024, 16 * 1024, 255
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602


def _number(what: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": 2**31 - 1, "description": what}


def _string(what: str, max_length: int, min_length: int = 0) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "maxLength": max_length, "description": what}
    if min_length:
        schema["minLength"] = min_length
    return schema


def _tool(name: str, description: str, required: tuple[str, ...] = (), **properties: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}
    return {"name": name, "description": description, "inputSchema": schema}


_BODY = _string("markdown", TEXT_MAX)
TOOLS = [
    _tool("whoami", "This bottle: its slug, repository, issue, pull request and the numbers it may write to."),
    _tool("read_issue", "Read an issue of this repository.", ("number",), number=_number("issue number")),
    _tool("read_pr", "Read a pull request of this repository.", ("number",), number=_number("pull request number")),
    _tool(
        "read_comments",
        "Read the comments on an issue or pull request.",
        ("number",),
        number=_number("issue or PR number"),
    ),
    _tool(
        "post_comment",
        "Comment on your issue or pull request (secret-scanned).",
        ("number", "body"),
        number=_number("your issue or PR number"),
        body=_BODY,
    ),
    _tool(
        "update_description",
        "Replace the description of your issue or pull request (secret-scanned).",
        ("number", "body"),
        number=_number("your issue or PR number"),
        body=_BODY,
    ),
    _tool("push", "Push the workspace's committed HEAD to your branch, after a secret scan of the change."),
    _tool(
        "open_pr",
        "Open the pull request from your branch, or return the one already open.",
        ("title",),
        title=_string("title", TITLE_MAX, 1),
        body=_BODY,
        base=_string("base branch (default: the repository's default branch)", NAME_MAX),
    ),
    _tool(
        "signal_done",
        "Say you are finished, with how it went and a summary.",
        ("status", "summary"),
        status={"type": "string", "enum": ["success", "failure", "blocked"], "description": "how it went"},
        summary=_string("what you did, or what blocks you", SUMMARY_MAX),
    ),
    _tool(
        "update_progress",
        "Replace the progress checklist in your bottle's status comment.",
        ("body",),
        body=_BODY,
    ),
    _tool(
        "read_checks",
        "Commit statuses and Actions jobs for a commit.",
        ref=_string("branch, tag or sha (default: your PR's head)", NAME_MAX),
    ),
    _tool(
        "read_job_log",
        "Read the end of an Actions job's log.",
        ("job_id",),
        job_id=_number("the job_id from read_checks"),
        tail_lines={
            "type": "integer",
            "minimum": 1,
            "maximum": 10000,
            "description": "lines from the end (default 200)",
        },
    ),
    _tool("refresh", "Fetch your branch and its base branch from the forge into the workspace as origin/*."),
]
TOOL_NAMES = frozenset(tool["name"] for tool in TOOLS)
INSTRUCTIONS = (
    "These tools are your only way to the forge. Commit with git, then push and open_pr; "
    "always finish with signal_done."
)


class McpError(Exception):
    """A JSON-RPC error of the MCP layer itself (never a sidecar error: those are tool results)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class McpServer:
    """The MCP methods over ``call``: one sidecar call per ``tools/call``, nothing else reaches it."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = socket_path
        self.methods: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "initialize": self.initialize,
            "ping": lambda params: {},
            "tools/list": lambda params: {"tools": TOOLS},
            "tools/call": self.tools_call,
        }

    def handle(self, line: bytes) -> dict[str, Any] | None:
        """The answer to one line, or None when none is owed (notifications, responses)."""
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return _rpc_error(None, PARSE_ERROR, "parse error: the line is not JSON")
        if not isinstance(message, dict):
            return _rpc_error(None, INVALID_REQUEST, "a message must be one JSON object")
        if "method" not in message:
            return None  # a response: this server sends no requests, so there is nothing to match
        rid = message.get("id")
        notification = "id" not in message
        method = message["method"]
        try:
            if message.get("jsonrpc") != "2.0" or not isinstance(method, str):
                raise McpError(INVALID_REQUEST, 'a request needs jsonrpc "2.0" and a string method')
            if not notification and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
                rid = None
                raise McpError(INVALID_REQUEST, "id must be a string or an integer")
            params = message.get("params")
            params = {} if params is None else params
            if not isinstance(params, dict):
                raise McpError(INVALID_PARAMS, "params must be an object")
            if notification:
                return None  # initialized, cancelled, ...: nothing to do, nothing owed
            handler = self.methods.get(method)
            if handler is None:
                raise McpError(METHOD_NOT_FOUND, f"unknown method {method[:64]!r}")
            return {"jsonrpc": "2.0", "id": rid, "result": handler(params)}
        except McpError as exc:
            return None if notification else _rpc_error(rid, exc.code, str(exc))

    def initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        asked = params.get("protocolVersion")
        return {
            "protocolVersion": asked if asked in MCP_VERSIONS else MCP_VERSIONS[0],
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "forge", "title": "forgebottle forge", "version": "1"},
            "instructions": INSTRUCTIONS,
        }

    def tools_call(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        arguments = params.get("arguments")
        arguments = {} if arguments is None else arguments
        if not isinstance(name, str) or name not in TOOL_NAMES:
            raise McpError(INVALID_PARAMS, f"unknown tool {str(name)[:64]!r}")
        if not isinstance(arguments, dict):
            raise McpError(INVALID_PARAMS, "arguments must be an object")
        try:
            result = call(name, arguments, socket_path=self.socket_path)
        except SidecarError as exc:
            # The sidecar's refusal is the tool's answer, for the model to read and act on.
            return {"content": [{"type": "text", "text": f"{exc} (code {exc.code})"}], "isError": True}
        answer: dict[str, Any] = {
            "content": [{"type": "text", "text": json.dumps(result, ensure_ascii=False)}],
            "isError": False,
        }
        if isinstance(result, dict):
            answer["structuredContent"] = result
        return answer


def _rpc_error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


def read_lines(stream: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[bytes | None]:
    """Each line of ``stream`` without its newline; a line over ``limit`` bytes is skipped to its
    end and given as None, so no line costs more than ``limit`` bytes of memory."""
    while line := stream.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := stream.readline(65536)) and not rest.endswith(b"\n"):
                pass
            yield None
        elif line.strip():
            yield line


def serve_mcp(stdin: IO[bytes], stdout: IO[bytes], socket_path: str | None = None) -> int:
    """Answer newline-delimited JSON-RPC on ``stdin`` until it closes."""
    server = McpServer(socket_path)
    for line in read_lines(stdin):
        answer: dict[str, Any] | None = None
        if line is None:
            answer = _rpc_error(None, INVALID_REQUEST, f"message over {MAX_LINE_BYTES} bytes")
        else:
            answer = server.handle(line)
        if answer is not None:
            # ASCII escapes keep every answer valid UTF-8, lone surrogates from a result included.
            try:
                stdout.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
                stdout.flush()
            except BrokenPipeError:
                return 0  # the client hung up: nobody is left to answer
    return 0


# -- forge relay: the bottle's end of the egress gateway ------------------------------------


def relay(argv: list[str]) -> int:
    """Bind ``--listen``, then fork: this process becomes the agent (exec, so its exit code is
    the run's), the child relays each TCP connection to the gateway's Unix socket. The relay
    enforces nothing: the host side decides everything."""
    parser = argparse.ArgumentParser(prog="forge relay", description="Relay TCP to the egress gateway.")
    parser.add_argument("--listen", required=True, help="host:port to listen on, e.g. 127.0.0.1:3128")
    parser.add_argument("--socket", required=True, help="the gateway's Unix socket")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the agent's argv")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    host, _, port = args.listen.rpartition(":")
    if not command or not port.isdigit():
        parser.error("give --listen HOST:PORT and, after --, the command to run")
    # Bound before the agent starts: its first request finds the listener there.
    try:
        listener = socket.create_server((host.strip("[]") or "127.0.0.1", int(port)), backlog=1024)
    except OSError as exc:
        print(f"forge relay: cannot listen on {args.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    parent = os.getpid()
    if os.fork() == 0:
        import asyncio

        code = 0
        try:
            asyncio.run(_relay(listener, args.socket, parent))
        except BaseException:  # the relay's child must never return into the agent's code
            code = 1
        os._exit(code)
    listener.close()
    try:
        os.execvp(command[0], command)  # noqa: S606 - an argv, never a shell
    except OSError as exc:
        print(f"forge relay: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
    return 127


async def _relay(listener: socket.socket, path: str, parent: int) -> None:
    import asyncio

    running: set[asyncio.Task[None] | None] = set()  # held, so a waiting handler is never collected

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        running.add(task)
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(path)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 28\r\n\r\n")
            writer.write(b"the gateway is unreachable\r\n")
            writer.close()
            running.discard(task)
            return
        await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer), return_exceptions=True)
        writer.close()
        up_writer.close()
        running.discard(task)

    server = await asyncio.start_server(handle, sock=listener, limit=65536, backlog=1024)
    async with server:
        # Outside a sandbox nothing kills the relay with the agent: it leaves when orphaned.
        while os.getppid() == parent:  # noqa: ASYNC110 - nothing in the stdlib signals a parent's death
            await asyncio.sleep(1.0)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One direction until EOF, then half-close, so the other direction can still finish."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["relay"]:
        return relay(args[1:])
    try:
        result = run(args)
    except SidecarError as exc:
        print(f"forge: {exc} (code {exc.code})", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
