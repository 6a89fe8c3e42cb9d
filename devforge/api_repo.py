"""devforge's repository routes beyond issues and pulls: reactions, comments by id, commit
statuses, Actions runs/jobs/logs, hooks, labels and branches, as Gitea 1.26 answers them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .records import DevForgeError, HookRec, LabelRec, ReactionRec, RepoRec, UserRec

if TYPE_CHECKING:
    from .api import DevForgeApi

T = TypeVar("T")
WRITE = ("write", "admin", "owner")
HOOK_TYPES = ("gitea", "gogs")  # the types whose deliveries devforge makes
_COLOR = re.compile(r"#?([0-9a-fA-F]{6})")


def paginate(request: Request, items: Sequence[T], base: str) -> tuple[Sequence[T], dict[str, str]]:
    """A page of ``items`` by ``page``/``limit`` (default 30, at most 50) and Gitea's headers."""
    try:
        page = max(1, int(request.query_params.get("page", "1")))
        limit = min(50, max(1, int(request.query_params.get("limit", "30"))))
    except ValueError as exc:
        raise DevForgeError(422, "invalid page or limit") from exc
    headers = {"X-Total-Count": str(len(items))}
    query = {k: v for k, v in request.query_params.items() if k not in ("page", "limit")}
    links = []
    if page * limit < len(items):
        links.append(f'<{base}?{urlencode({**query, "limit": limit, "page": page + 1})}>; rel="next"')
    if page > 1:
        links.append(f'<{base}?{urlencode({**query, "limit": limit, "page": page - 1})}>; rel="prev"')
    if links:
        headers["Link"] = ",".join(links)
    return items[(page - 1) * limit : page * limit], headers


class RepoRoutes:
    """Handlers over the API's forge; each authenticates, then works under the forge's lock."""

    def __init__(self, api: DevForgeApi) -> None:
        self.api = api
        self.forge = api.forge

    def routes(self, prefix: str) -> list[Route]:
        p = prefix
        return [
            Route(f"{p}/issues/{{index:int}}/reactions", self._issue_reactions, methods=["GET", "POST"]),
            Route(f"{p}/issues/comments/{{id:int}}", self._comment, methods=["GET", "PATCH"]),
            Route(f"{p}/issues/comments/{{id:int}}/reactions", self._comment_reactions, methods=["GET", "POST"]),
            Route(f"{p}/statuses/{{sha}}", self._create_status, methods=["POST"]),
            Route(f"{p}/commits/{{ref:path}}/statuses", self._statuses, methods=["GET"]),
            Route(f"{p}/actions/runs", self._runs, methods=["GET"]),
            Route(f"{p}/actions/runs/{{run:int}}/jobs", self._run_jobs, methods=["GET"]),
            Route(f"{p}/actions/jobs/{{job_id:int}}", self._job, methods=["GET"]),
            Route(f"{p}/actions/jobs/{{job_id:int}}/logs", self._job_log, methods=["GET"]),
            Route(f"{p}/hooks", self._hooks, methods=["GET", "POST"]),
            Route(f"{p}/labels", self._labels, methods=["GET", "POST"]),
            Route(f"{p}/branches/{{branch:path}}", self._branch, methods=["GET"]),
        ]

    # -- shared ----------------------------------------------------------------------------

    def _repo(self, request: Request, need: tuple[str, ...] = ()) -> tuple[UserRec, RepoRec]:
        """The caller and the repository; 404 if they may not see it, 403 if ``need`` is unmet."""
        doer = self.api.doer(request)
        repo = self.forge.repo(request.path_params["owner"], request.path_params["repo"])
        perm = self.forge.permission(repo, doer.login)
        if perm == "none":
            raise DevForgeError(404, "not found")
        if need and perm not in need:
            raise DevForgeError(403, "user does not have the permission this needs on the repository")
        return doer, repo

    def _api_base(self, repo: RepoRec) -> str:
        return f"{self.forge.base_url}api/v1/repos/{repo.full_name}"

    def reaction_json(self, rec: ReactionRec) -> dict[str, Any]:
        return {"user": self.forge.user_json(rec.user), "content": rec.content, "created_at": rec.created_at}

    def hook_json(self, hook: HookRec) -> dict[str, Any]:
        # The secret is write-only: Gitea never returns it.
        return {
            "id": hook.id,
            "type": "gitea",
            "name": "",
            "branch_filter": "*",
            "config": {"url": hook.url, "content_type": hook.content_type},
            "events": sorted(hook.events),
            "authorization_header": "",
            "active": hook.active,
            "updated_at": hook.created_at,
            "created_at": hook.created_at,
        }

    def label_rec_json(self, repo: RepoRec, rec: LabelRec) -> dict[str, Any]:
        data = self.forge.label_json(repo, rec.name)
        return {**data, "id": rec.id, "color": rec.color, "description": rec.description}

    # -- reactions and comments ------------------------------------------------------------

    async def _issue_reactions(self, request: Request) -> Response:
        return await self._reactions(request, issue=request.path_params["index"])

    async def _comment_reactions(self, request: Request) -> Response:
        return await self._reactions(request, comment_id=request.path_params["id"])

    async def _reactions(
        self, request: Request, *, issue: int | None = None, comment_id: int | None = None
    ) -> Response:
        data = await self.api.read_json(request) if request.method == "POST" else {}
        with self.forge.lock:
            doer, repo = self._repo(request)
            if request.method == "POST":
                content = data.get("content")
                if not isinstance(content, str):
                    raise DevForgeError(422, "[Content]: Required")
                rec, created = self.forge.react(
                    repo.owner, repo.name, user=doer.login, content=content, issue=issue, comment_id=comment_id
                )
                return JSONResponse(self.reaction_json(rec), status_code=201 if created else 200)
            if comment_id is not None:
                recs = self.forge.comment_by_id(repo, comment_id)[1].reactions
            else:
                recs = self.forge.issue(repo.owner, repo.name, int(issue or 0)).reactions
            return JSONResponse([self.reaction_json(r) for r in recs])

    async def _comment(self, request: Request) -> Response:
        data = await self.api.read_json(request) if request.method == "PATCH" else {}
        with self.forge.lock:
            doer, repo = self._repo(request)
            issue, rec = self.forge.comment_by_id(repo, request.path_params["id"])
            if request.method == "PATCH":
                body = data.get("body")
                if not isinstance(body, str):
                    raise DevForgeError(422, "[Body]: Required")
                # Gitea: the author, or anyone who may write issues; refused with an empty 403.
                if doer.login != rec.user and self.forge.permission(repo, doer.login) not in WRITE:
                    return Response(status_code=403)
                self.forge.edit_comment(repo.owner, repo.name, rec.id, body, user=doer.login)
            return JSONResponse(self.forge.comment_json(repo, issue, rec))

    # -- commit statuses -------------------------------------------------------------------

    async def _create_status(self, request: Request) -> Response:
        data = await self.api.read_json(request)
        with self.forge.lock:
            doer, repo = self._repo(request, WRITE)
            rec = self.forge.create_status(
                repo.owner,
                repo.name,
                request.path_params["sha"],
                state=str(data.get("state") or ""),
                context=str(data.get("context") or "default"),
                description=str(data.get("description") or ""),
                target_url=str(data.get("target_url") or ""),
                user=doer.login,
            )
            return JSONResponse(self.forge.status_json(repo, rec), status_code=201)

    async def _statuses(self, request: Request) -> Response:
        with self.forge.lock:
            _, repo = self._repo(request)
            ref = request.path_params["ref"]
            found = self.forge.statuses(repo, ref)
            state = request.query_params.get("state")
            if state:
                found = [s for s in found if s.state == state]
            page, headers = paginate(request, found, f"{self._api_base(repo)}/commits/{ref}/statuses")
            return JSONResponse([self.forge.status_json(repo, s) for s in page], headers=headers)

    # -- Actions ---------------------------------------------------------------------------

    async def _runs(self, request: Request) -> Response:
        query = request.query_params
        with self.forge.lock:
            _, repo = self._repo(request)
            runs = [
                r
                for r in sorted(repo.runs, key=lambda r: -r.id)
                if query.get("head_sha", r.head_sha) == r.head_sha
                and query.get("branch", r.head_branch) == r.head_branch
                and query.get("event", r.event) == r.event
                and query.get("status", r.status) in (r.status, r.conclusion)
            ]
            page, headers = paginate(request, runs, f"{self._api_base(repo)}/actions/runs")
            body = {"workflow_runs": [self.forge.run_json(repo, r) for r in page], "total_count": len(runs)}
            return JSONResponse(body, headers=headers)

    async def _run_jobs(self, request: Request) -> Response:
        with self.forge.lock:
            _, repo = self._repo(request)
            run = next((r for r in repo.runs if r.id == request.path_params["run"]), None)
            if run is None:
                raise DevForgeError(404, "not found")
            page, headers = paginate(request, run.jobs, f"{self._api_base(repo)}/actions/runs/{run.id}/jobs")
            body = {"jobs": [self.forge.job_json(repo, run, j) for j in page], "total_count": len(run.jobs)}
            return JSONResponse(body, headers=headers)

    async def _job(self, request: Request) -> Response:
        with self.forge.lock:
            _, repo = self._repo(request)
            run, job = self.forge.job_rec(repo, request.path_params["job_id"])
            return JSONResponse(self.forge.job_json(repo, run, job))

    async def _job_log(self, request: Request) -> Response:
        with self.forge.lock:
            _, repo = self._repo(request)
            _, job = self.forge.job_rec(repo, request.path_params["job_id"])
            log = job.log
        # A suffix range ("bytes=-N", what a tail reader asks for) is honoured, as Go's
        # http.ServeContent does; anything else gets the whole log.
        wanted = re.fullmatch(r"bytes=-(\d{1,18})", request.headers.get("range", ""))
        if wanted and not log:  # nothing overlaps an empty file
            return Response(status_code=416, headers={"Content-Range": "bytes */0"})
        if wanted and int(wanted.group(1)) > 0:
            start = max(0, len(log) - int(wanted.group(1)))
            headers = {"Content-Range": f"bytes {start}-{len(log) - 1}/{len(log)}"}
            return Response(log[start:], status_code=206, headers=headers, media_type="text/plain; charset=utf-8")
        return Response(log, media_type="text/plain; charset=utf-8")

    # -- hooks, labels, branches -----------------------------------------------------------

    async def _hooks(self, request: Request) -> Response:
        if request.method == "GET":
            with self.forge.lock:
                _, repo = self._repo(request, ("admin", "owner"))
                page, headers = paginate(request, repo.hooks, f"{self._api_base(repo)}/hooks")
                return JSONResponse([self.hook_json(h) for h in page], headers=headers)
        data = await self.api.read_json(request)
        config = data.get("config")
        if data.get("type") not in HOOK_TYPES:
            raise DevForgeError(422, "Invalid hook type")
        if not isinstance(config, dict) or not all(isinstance(v, str) for v in config.values()):
            raise DevForgeError(422, "[Config]: Required")
        if "url" not in config or "content_type" not in config:
            raise DevForgeError(422, "Missing config option: url or content_type")
        url = urlsplit(config["url"])
        if url.scheme not in ("http", "https") or not url.netloc:
            raise DevForgeError(422, "Invalid url")
        if config["content_type"] not in ("json", "form"):
            raise DevForgeError(422, "Invalid content type")
        events = data.get("events") or ["push"]
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise DevForgeError(422, "[Events]: must be a list of strings")
        with self.forge.lock:
            _, repo = self._repo(request, ("admin", "owner"))
            hook = self.forge.add_hook(
                repo.owner,
                repo.name,
                config["url"],
                config.get("secret", ""),
                content_type=config["content_type"],
                events=events,
                # Gitea's default is an inactive hook: a client must ask for "active": true.
                active=data.get("active") is True,
            )
            return JSONResponse(self.hook_json(hook), status_code=201)

    async def _labels(self, request: Request) -> Response:
        if request.method == "GET":
            with self.forge.lock:
                _, repo = self._repo(request)
                labels = [*repo.labels.values(), *repo.duplicate_labels]
                page, headers = paginate(request, labels, f"{self._api_base(repo)}/labels")
                return JSONResponse([self.label_rec_json(repo, rec) for rec in page], headers=headers)
        data = await self.api.read_json(request)
        name, color = data.get("name"), _COLOR.fullmatch(str(data.get("color") or ""))
        if not isinstance(name, str) or not name.strip():
            raise DevForgeError(422, "[Name]: Required")
        if color is None:
            raise DevForgeError(422, "[Color]: invalid color")
        with self.forge.lock:
            _, repo = self._repo(request, WRITE)
            rec = self.forge.create_label(
                repo.owner,
                repo.name,
                name.strip(),
                color=color.group(1).lower(),
                description=str(data.get("description") or ""),
            )
            return JSONResponse(self.label_rec_json(repo, rec), status_code=201)

    async def _branch(self, request: Request) -> Response:
        with self.forge.lock:
            doer, repo = self._repo(request)
            branch = request.path_params["branch"]
            if not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or ".." in branch or branch.startswith("-"):
                raise DevForgeError(404, "not found")
            sha = self.forge.branch_sha(repo, branch)
            if not sha:
                raise DevForgeError(404, "not found")
            perm = self.forge.permission(repo, doer.login)
            return JSONResponse(
                {
                    "name": branch,
                    "commit": self.forge.payload_commit(repo, sha),
                    "protected": False,
                    "required_approvals": 0,
                    "enable_status_check": False,
                    "status_check_contexts": [],
                    "user_can_push": perm in WRITE,
                    "user_can_merge": perm in WRITE,
                    "effective_branch_protection_name": "",
                }
            )
