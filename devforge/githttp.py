"""git smart HTTP through ``git http-backend`` (CGI). Who may fetch or push is the API's call."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from .gitcmd import git_env

MAX_GIT_BODY = 256 * 1024 * 1024


async def http_backend(request: Request, *, project_root: Path, path_info: str, remote_user: str) -> Response:
    """Answer ``request`` with what ``git http-backend`` answers for ``path_info``."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_GIT_BODY:
            return Response("request too large\n", status_code=413)
    env = {
        **git_env(),
        "GIT_PROJECT_ROOT": str(project_root),
        "GIT_HTTP_EXPORT_ALL": "1",
        "PATH_INFO": path_info,
        "QUERY_STRING": request.url.query,
        "REQUEST_METHOD": request.method,
        "CONTENT_TYPE": request.headers.get("content-type", ""),
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_USER": remote_user,
        "REMOTE_ADDR": request.client.host if request.client else "",
    }
    if request.headers.get("content-encoding"):
        env["HTTP_CONTENT_ENCODING"] = request.headers["content-encoding"]
    if request.headers.get("git-protocol"):
        env["GIT_PROTOCOL"] = request.headers["git-protocol"]
    proc = await asyncio.create_subprocess_exec(
        "git",
        "http-backend",
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _err = await proc.communicate(bytes(body))
    return _cgi_response(out)


def _cgi_response(out: bytes) -> Response:
    """A CGI reply (headers, a blank line, the body; ``Status:`` sets the code) as a Response."""
    head, sep, payload = out.partition(b"\r\n\r\n")
    if not sep:
        head, _, payload = out.partition(b"\n\n")
    status = 200
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines():
        key, _, value = line.partition(":")
        if key.lower() == "status":
            status = int(value.strip().split()[0])
        elif key:
            headers[key.strip()] = value.strip()
    return Response(payload, status_code=status, headers=headers)
