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
  forge relay --listen 127.0.0.1:3128 --socket /run/forge/egress.sock -- AGENT ARGV...
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

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
    return parser


def run(argv: list[str]) -> Any:
    args = build_parser().parse_args(argv)
    command = args.command
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
        while os.getppid() == parent:
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
