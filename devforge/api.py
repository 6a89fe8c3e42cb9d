"""devforge's HTTP face: the Gitea API routes forgebottle calls, and git smart HTTP.

Errors are raised as ``DevForgeError`` inside and rendered once, by ``DevForgeApi._error``, as
Gitea renders them: ``{"message", "url"}``, and a 404 adds ``"errors": null``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .api_repo import RepoRoutes
from .githttp import http_backend
from .records import DevForgeError, UserRec

if TYPE_CHECKING:
    from .forge import DevForge

GITEA_VERSION = "1.26.4"


class DevForgeApi:
    """The routes, over a ``DevForge`` (the model): each handler authenticates, then reads or
    changes the world under its lock through the same methods tests call."""

    def __init__(self, forge: DevForge) -> None:
        self.forge = forge
        self.app = self._build_app()

    def _build_app(self) -> Starlette:
        api = "/api/v1"
        r = "/repos/{owner}/{repo}"
        routes = [
            Route(f"{api}/version", self._version, methods=["GET"]),
            Route(f"{api}/user", self._me, methods=["GET"]),
            Route(f"{api}/orgs/{{org}}", self._org, methods=["GET"]),
            Route(f"{api}/orgs/{{org}}/members/{{username}}", self._member, methods=["GET"]),
            Route(f"{api}/orgs/{{org}}/public_members/{{username}}", self._public_member, methods=["GET"]),
            Route(f"{api}{r}", self._get_repo, methods=["GET"]),
            Route(f"{api}{r}/collaborators/{{collaborator}}/permission", self._permission, methods=["GET"]),
            Route(f"{api}{r}/issues", self._create_issue, methods=["POST"]),
            Route(f"{api}{r}/issues/{{index:int}}", self._issue, methods=["GET", "PATCH"]),
            Route(f"{api}{r}/issues/{{index:int}}/comments", self._comments, methods=["GET", "POST"]),
            Route(f"{api}{r}/issues/{{index:int}}/labels", self._labels, methods=["GET", "POST"]),
            Route(f"{api}{r}/pulls", self._pulls, methods=["GET", "POST"]),
            Route(f"{api}{r}/pulls/{{index:int}}", self._pull, methods=["GET"]),
            Route(f"{api}{r}/pulls/{{index:int}}/merge", self._merge, methods=["GET", "POST"]),
            *RepoRoutes(self).routes(f"{api}{r}"),
            Route("/{owner}/{repo}.git/{rest:path}", self._git_http, methods=["GET", "POST"]),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={DevForgeError: self._error},
            middleware=[Middleware(_Stall, forge=self.forge)],
        )

    async def _error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DevForgeError)
        return self.error_response(exc.status, exc.message)

    def error_response(self, status: int, message: str) -> JSONResponse:
        body: dict[str, Any] = {"message": message, "url": f"{self.forge.base_url}api/swagger"}
        if status == 404:
            body = {"errors": None, "message": "not found", "url": f"{self.forge.base_url}api/swagger"}
        return JSONResponse(body, status_code=status)

    def _auth(self, request: Request, *, required: bool = True) -> UserRec | None:
        if self.forge.fault is not None:
            status = self.forge.fault(request)
            if status is not None:
                raise DevForgeError(status, "" if status >= 500 else "injected fault")
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        token = ""
        if scheme.lower() in ("token", "bearer"):
            token = value.strip()
        elif scheme.lower() == "basic":
            try:
                _, _, token = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                token = ""
        if not token:
            if required:
                raise DevForgeError(401, "token is required")
            return None
        with self.forge.lock:
            for rec in self.forge.users.values():
                if hmac.compare_digest(rec.token.encode(), token.encode()):  # str would refuse non-ASCII
                    return rec
        raise DevForgeError(401, "invalid username, password or token")

    def doer(self, request: Request) -> UserRec:
        doer = self._auth(request)
        assert doer is not None
        return doer

    async def _version(self, request: Request) -> Response:
        return JSONResponse({"version": GITEA_VERSION})

    async def _me(self, request: Request) -> Response:
        doer = self.doer(request)
        data = self.forge.user_json(doer.login)
        data["is_admin"] = doer.is_admin
        return JSONResponse(data)

    async def _org(self, request: Request) -> Response:
        self.doer(request)
        org = self.forge.orgs.get(request.path_params["org"].lower())
        if org is None:
            raise DevForgeError(404, "not found")
        return JSONResponse(self.forge.org_json(org))

    async def _member(self, request: Request) -> Response:
        doer = self.doer(request)
        with self.forge.lock:
            org = self.forge.orgs.get(request.path_params["org"].lower())
            target = self.forge.users.get(request.path_params["username"].lower())
            if org is None or target is None:
                raise DevForgeError(404, "not found")
            if doer.is_admin or self.forge.is_member(org, doer.login):
                return Response(status_code=204 if self.forge.is_member(org, target.login) else 404)
            if doer.login.lower() == target.login.lower():
                return Response(status_code=404)
            location = f"{self.forge.base_url}api/v1/orgs/{org.name}/public_members/{target.login}"
            return Response(status_code=303, headers={"Location": location})

    async def _public_member(self, request: Request) -> Response:
        with self.forge.lock:
            org = self.forge.orgs.get(request.path_params["org"].lower())
            login = request.path_params["username"].lower()
            ok = org is not None and login in org.public
            return Response(status_code=204 if ok else 404)

    async def _get_repo(self, request: Request) -> Response:
        doer = self.doer(request)
        with self.forge.lock:
            repo = self.forge.repo(request.path_params["owner"], request.path_params["repo"])
            return JSONResponse(self.forge.repo_json(repo, doer.login))

    async def _permission(self, request: Request) -> Response:
        doer = self.doer(request)
        with self.forge.lock:
            repo = self.forge.repo(request.path_params["owner"], request.path_params["repo"])
            target = self.forge.user(request.path_params["collaborator"])
            if not (
                doer.is_admin
                or self.forge.permission(repo, doer.login) in ("admin", "owner")
                or doer.login.lower() == target.login.lower()
            ):
                raise DevForgeError(
                    403,
                    "Only admins can query all permissions, repo admins can query all repo "
                    "permissions, collaborators can query only their own",
                )
            perm = self.forge.permission(repo, target.login)
            return JSONResponse({"permission": perm, "role_name": perm, "user": self.forge.user_json(target.login)})

    async def read_json(self, request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            raise DevForgeError(422, f"invalid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise DevForgeError(422, "expected a JSON object")
        return data

    async def _create_issue(self, request: Request) -> Response:
        doer = self.doer(request)
        data = await self.read_json(request)
        if not data.get("title"):
            raise DevForgeError(422, "[Title]: Required")
        with self.forge.lock:
            issue = self.forge.create_issue(
                request.path_params["owner"],
                request.path_params["repo"],
                title=str(data["title"]),
                body=str(data.get("body") or ""),
                user=doer.login,
                assignees=data.get("assignees") or [],
            )
            repo = self.forge.repo(request.path_params["owner"], request.path_params["repo"])
            return JSONResponse(self.forge.issue_json(repo, issue), status_code=201)

    async def _issue(self, request: Request) -> Response:
        doer = self.doer(request)
        owner, name, number = request.path_params["owner"], request.path_params["repo"], request.path_params["index"]
        if request.method == "GET":
            with self.forge.lock:
                return JSONResponse(
                    self.forge.issue_json(self.forge.repo(owner, name), self.forge.issue(owner, name, number))
                )
        data = await self.read_json(request)
        with self.forge.lock:
            repo, issue = self.forge.repo(owner, name), self.forge.issue(owner, name, number)
            if doer.login.lower() != issue.user.lower() and self.forge.permission(repo, doer.login) not in (
                "write",
                "admin",
                "owner",
            ):
                return Response(status_code=403)  # Gitea: 403 with an empty body
            if issue.pull and issue.pull.merged and "state" in data:
                raise DevForgeError(412, "cannot change state of a merged pull request")
            state = data.get("state")
            self.forge.edit_issue(
                owner,
                name,
                number,
                by=doer.login,
                title=data.get("title"),
                body=data.get("body"),
                state=str(state) if state in ("open", "closed") else None,
            )
            # PATCH answers 201, not 200.
            return JSONResponse(self.forge.issue_json(repo, issue), status_code=201)

    async def _comments(self, request: Request) -> Response:
        doer = self.doer(request)
        owner, name, number = request.path_params["owner"], request.path_params["repo"], request.path_params["index"]
        if request.method == "GET":
            with self.forge.lock:
                repo = self.forge.repo(owner, name)
                issue = repo.issues.get(number)
                if issue is None:
                    # Gitea answers 500 for an unknown index here (CONTRACT.md §3).
                    raise DevForgeError(500, "")
                items = [self.forge.comment_json(repo, issue, c) for c in issue.comments]
                # No page/limit: everything at once, with a count and no Link.
                return JSONResponse(items, headers={"X-Total-Count": str(len(items))})
        data = await self.read_json(request)
        body = data.get("body")
        if not isinstance(body, str) or not body:
            raise DevForgeError(422, "[Body]: Required")
        with self.forge.lock:
            repo, issue = self.forge.repo(owner, name), self.forge.issue(owner, name, number)
            rec = self.forge.comment(owner, name, number, body, user=doer.login)
            return JSONResponse(self.forge.comment_json(repo, issue, rec), status_code=201)

    async def _labels(self, request: Request) -> Response:
        doer = self.doer(request)
        owner, name, number = request.path_params["owner"], request.path_params["repo"], request.path_params["index"]
        if request.method == "POST":
            data = await self.read_json(request)
            names = [str(n) for n in data.get("labels") or [] if isinstance(n, str)]
            with self.forge.lock:
                repo, issue = self.forge.repo(owner, name), self.forge.issue(owner, name, number)
                # Unknown names are silently skipped.
                known = [n for n in names if n in repo.labels and n not in issue.labels]
                self.forge.set_labels(owner, name, number, issue.labels + known, by=doer.login)
        with self.forge.lock:
            repo, issue = self.forge.repo(owner, name), self.forge.issue(owner, name, number)
            return JSONResponse([self.forge.label_json(repo, n) for n in issue.labels])

    async def _pulls(self, request: Request) -> Response:
        doer = self.doer(request)
        owner, name = request.path_params["owner"], request.path_params["repo"]
        if request.method == "POST":
            data = await self.read_json(request)
            if not data.get("title"):
                raise DevForgeError(422, "[Title]: Required")
            with self.forge.lock:
                repo = self.forge.repo(owner, name)
                if self.forge.permission(repo, doer.login) not in ("write", "admin", "owner"):
                    raise DevForgeError(403, "user should have permission to write to target branch")
                issue = self.forge.create_pr(
                    owner,
                    name,
                    head=str(data.get("head") or ""),
                    base=str(data.get("base") or repo.default_branch),
                    title=str(data["title"]),
                    body=str(data.get("body") or ""),
                    user=doer.login,
                )
                return JSONResponse(self.forge.pr_json(repo, issue), status_code=201)
        state = request.query_params.get("state", "open")
        try:
            page = max(1, int(request.query_params.get("page", "1")))
            limit = min(50, max(1, int(request.query_params.get("limit", "30"))))
        except ValueError as exc:
            raise DevForgeError(422, "invalid page or limit") from exc
        with self.forge.lock:
            repo = self.forge.repo(owner, name)
            pulls = [
                i
                for i in sorted(repo.issues.values(), key=lambda i: -i.number)
                if i.pull is not None and (state == "all" or i.state == state)
            ]
            chunk = pulls[(page - 1) * limit : page * limit]
            headers = {"X-Total-Count": str(len(pulls))}
            links = []
            base = f"{self.forge.base_url}api/v1/repos/{repo.full_name}/pulls"
            if page * limit < len(pulls):
                links.append(f'<{base}?limit={limit}&page={page + 1}&state={state}>; rel="next"')
            if page > 1:
                links.append(f'<{base}?limit={limit}&page={page - 1}&state={state}>; rel="prev"')
            if links:
                headers["Link"] = ",".join(links)
            return JSONResponse([self.forge.pr_json(repo, i) for i in chunk], headers=headers)

    async def _pull(self, request: Request) -> Response:
        self.doer(request)
        with self.forge.lock:
            repo = self.forge.repo(request.path_params["owner"], request.path_params["repo"])
            issue = repo.issues.get(request.path_params["index"])
            if issue is None or issue.pull is None:
                raise DevForgeError(404, "not found")
            return JSONResponse(self.forge.pr_json(repo, issue))

    async def _merge(self, request: Request) -> Response:
        doer = self.doer(request)
        owner, name, number = request.path_params["owner"], request.path_params["repo"], request.path_params["index"]
        with self.forge.lock:
            issue = self.forge.issue(owner, name, number)
            if request.method == "GET":
                merged = issue.pull is not None and issue.pull.merged
                return Response(status_code=204 if merged else 404)
            if self.forge.permission(self.forge.repo(owner, name), doer.login) not in ("write", "admin", "owner"):
                raise DevForgeError(403, "user does not have permission to merge")
            self.forge.merge_pr(owner, name, number, user=doer.login)
            return Response(status_code=200)

    async def _git_http(self, request: Request) -> Response:
        try:
            doer = self._auth(request)
        except DevForgeError as exc:
            if exc.status != 401:
                raise
            return Response("Unauthorized\n", status_code=401, headers={"WWW-Authenticate": 'Basic realm="Gitea"'})
        assert doer is not None
        owner, name, rest = request.path_params["owner"], request.path_params["repo"], request.path_params["rest"]
        with self.forge.lock:
            repo = self.forge.repo(owner, name)
            perm = self.forge.permission(repo, doer.login)
        service = request.query_params.get("service", "") or rest
        if "receive-pack" in service and perm not in ("write", "admin", "owner"):
            return Response("permission denied\n", status_code=403)
        if perm == "none":
            raise DevForgeError(404, "not found")
        pushing = request.method == "POST" and "receive-pack" in service
        before = await asyncio.to_thread(self.forge.heads, repo) if pushing else {}
        response = await http_backend(
            request,
            project_root=self.forge.root / "repos",
            path_info=f"/{repo.owner.lower()}/{repo.name.lower()}.git/{rest}",
            remote_user=doer.login,
        )
        if pushing and self.forge.on_push is not None:
            # Off the event loop: a callback may run a workflow, which runs git and fires webhooks.
            after = await asyncio.to_thread(self.forge.heads, repo)
            for branch, sha in sorted(after.items()):
                if before.get(branch) != sha:
                    await asyncio.to_thread(self.forge.on_push, repo.owner, repo.name, branch, sha, doer.login)
        return response


class _Stall:
    """ASGI middleware: API requests wait ``forge.stall`` seconds (a forge that hangs)."""

    def __init__(self, app: ASGIApp, forge: DevForge) -> None:
        self.app = app
        self.forge = forge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.forge.stall and scope["path"].startswith("/api/"):
            await asyncio.sleep(self.forge.stall)
        await self.app(scope, receive, send)
