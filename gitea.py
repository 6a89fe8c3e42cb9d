"""The forge as forgebottle sees it: a small ABC, a scope-enforcing wrapper, and Gitea.

``Gitea`` speaks to the API through one ``httpx.AsyncClient``: keep-alive, proxies and TLS
verification are httpx's; it adds the token, a cap on answers and the mapping of errors below.

Errors raised here::

    ForgeBottleError (statemachine)
    ├── ForgeError               any failed forge call; carries Gitea's ``message``; rpc -32002
    │   │                        (also: a redirect, an answer over the cap, text JSON cannot carry)
    │   ├── ForgeNotFound        404
    │   ├── ForgeAuthError       401/403: the token is wrong or lacks a scope
    │   ├── ForgeConflict        409
    │   ├── ForgeUnavailable     network error, timeout, or 5xx
    │   └── OrgNotVisible        303 on a membership check: the token cannot see the org
    └── OutOfScope (also PermissionError)   a write outside the bottle's issue/branch/PRs; rpc -32001
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import json as jsonlib
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from statemachine import ForgeBottleError, branch_for

# Bodies we accept from agents and send to the forge (DESIGN.md §7).
MAX_TEXT_BYTES = 64 * 1024
# Gitea clamps page sizes to MAX_RESPONSE_ITEMS (50 by default).
PAGE_LIMIT = 50
MAX_PAGES = 200
# A forge answer bigger than this is refused (the largest real one is a page of 50 items).
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
# A job log's tail is read from at most this many bytes at its end...
MAX_LOG_TAIL_BYTES = 64 * 1024
# ...and a forge that ignores the Range asked for is read no further than this.
MAX_LOG_BYTES = 64 * 1024 * 1024


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
    user: str = ""  # the login of whoever opened it
    head_repo: str = ""  # the head branch's repository, "owner/name" ("" when Gitea has none, a deleted fork)

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


@dataclasses.dataclass(frozen=True)
class CommitStatus:
    """The latest status of one ``context`` on a commit. ``state`` is as the forge sent it."""

    id: int
    context: str
    state: str  # pending, success, error, failure, warning, skipped
    description: str
    target_url: str
    created_at: str = ""

    @property
    def failed(self) -> bool:
        return self.state in ("failure", "error")


@dataclasses.dataclass(frozen=True)
class Job:
    """An Actions job. ``conclusion`` is "" until it completes."""

    id: int
    run_id: int
    name: str
    status: str  # queued, waiting, in_progress, completed
    conclusion: str  # success, failure, cancelled, skipped
    head_sha: str
    html_url: str  # also the target_url of the commit status the job sets

    @property
    def failed(self) -> bool:
        return self.status == "completed" and self.conclusion == "failure"


@dataclasses.dataclass(frozen=True)
class Hook:
    id: int
    url: str
    content_type: str
    events: tuple[str, ...]
    active: bool
    type: str = "gitea"


@dataclasses.dataclass(frozen=True)
class Label:
    id: int
    name: str
    color: str  # hex without '#'
    description: str = ""


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
    # the conversation on the forge and CI (DESIGN.md §12)
    @abc.abstractmethod
    async def add_reaction(
        self, owner: str, repo: str, *, issue: int | None = None, comment_id: int | None = None, content: str = "eyes"
    ) -> bool: ...
    @abc.abstractmethod
    async def edit_comment(self, owner: str, repo: str, comment_id: int, body: str) -> Comment: ...
    @abc.abstractmethod
    async def find_comment(self, owner: str, repo: str, issue: int, marker: str) -> Comment | None: ...
    @abc.abstractmethod
    async def commit_statuses(self, owner: str, repo: str, ref: str) -> list[CommitStatus]: ...
    @abc.abstractmethod
    async def workflow_jobs(self, owner: str, repo: str, head_sha: str) -> list[Job]: ...
    @abc.abstractmethod
    async def job(self, owner: str, repo: str, job_id: int) -> Job: ...
    @abc.abstractmethod
    async def job_log_tail(self, owner: str, repo: str, job_id: int, lines: int = 200) -> list[str]: ...
    @abc.abstractmethod
    async def list_hooks(self, owner: str, repo: str) -> list[Hook]: ...
    @abc.abstractmethod
    async def create_hook(self, owner: str, repo: str, url: str, secret: str, events: Iterable[str]) -> Hook: ...
    @abc.abstractmethod
    async def list_labels(self, owner: str, repo: str) -> list[Label]: ...
    @abc.abstractmethod
    async def create_label(self, owner: str, repo: str, name: str, color: str, description: str = "") -> Label: ...
    @abc.abstractmethod
    async def branch_sha(self, owner: str, repo: str, branch: str) -> str | None: ...

    async def aclose(self) -> None:
        return None


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

    def check_write(self, number: int) -> None:
        if number not in self.writable:
            raise OutOfScope(f"out of scope (writable: {', '.join(str(n) for n in self.writable)})")

    async def read_issue(self, number: int) -> Issue:
        return await self.forge.read_issue(self.owner, self.repo, number)

    async def read_pr(self, number: int) -> PullRequest:
        return await self.forge.read_pr(self.owner, self.repo, number)

    async def read_comments(self, number: int) -> list[Comment]:
        return await self.forge.read_comments(self.owner, self.repo, number)

    async def post_comment(self, number: int, body: str) -> Comment:
        self.check_write(number)
        return await self.forge.post_comment(self.owner, self.repo, number, body)

    async def update_description(self, number: int, body: str) -> None:
        self.check_write(number)
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


class Gitea(Forge):
    """Gitea's REST API v1, over one ``httpx.AsyncClient``.

    Usage::

        forge = Gitea("https://git.example.com/api/v1", token)
        issue = await forge.read_issue("acme", "widgets", 17)

    The client keeps connections alive, honours ``*_PROXY`` and verifies TLS with httpx's
    defaults (certifi, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``); it never follows redirects.
    ``transport`` is for tests (``MockTransport``, ``ASGITransport``, a transport with other
    limits). Answers are read in chunks and refused past ``MAX_RESPONSE_BYTES``.
    """

    kind: ClassVar[str] = "gitea"

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.api_url + "/",
            headers={
                "Authorization": f"token {token}",
                "Accept": "application/json",
                "User-Agent": "forgebottle",
                # Uncompressed, so the bytes counted against the cap are the bytes on the wire.
                "Accept-Encoding": "identity",
            },
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=10, keepalive_expiry=5.0),
            # Gitea's one redirect, 303 on a membership check, is an answer to read; any other is a
            # misconfiguration, and following it could carry a request somewhere unintended.
            follow_redirects=False,
            transport=transport,
        )

        self._me: User | None = None

    def __repr__(self) -> str:
        return f"Gitea({self.api_url!r}, token=***)"

    async def aclose(self) -> None:
        await self._client.aclose()  # closes its transport too

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        ok: tuple[int, ...] = (200,),
        headers: Mapping[str, str] | None = None,
        tail: int | None = None,
    ) -> tuple[httpx.Response, bytes]:
        """The answer (status and headers; its stream is closed) and its body, read whole (or
        only its end: see ``_read_body``)."""
        path = path.lstrip("/")
        try:
            request = self._client.build_request(method, path, json=json, params=params, headers=headers)
        except UnicodeEncodeError:
            # Text an agent sent may hold a lone surrogate: JSON cannot carry it as UTF-8.
            raise ForgeError(f"{method} /{path}: the text is not valid Unicode (a lone surrogate)") from None
        try:
            response = await self._client.send(request, stream=True)
            try:
                body = await _read_body(method, path, response, tail=tail)
            finally:
                await response.aclose()  # before the body's end, this drops the connection
        except httpx.TimeoutException as exc:
            raise ForgeUnavailable(f"{method} {path}: forge timed out") from exc
        except httpx.HTTPError as exc:
            raise ForgeUnavailable(f"{method} {path}: forge unreachable ({type(exc).__name__})") from exc
        if response.status_code in ok:
            return response, body
        raise _error_for(method, path, response, body)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response, body = await self._request(method, path, **kwargs)
        return _parse(method, path, response, body)

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
        response, _ = await self._request("GET", path, ok=(204, 404, 303))
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

    async def _pages(
        self, path: str, params: Mapping[str, str] | None = None, *, key: str | None = None
    ) -> AsyncIterator[list[Any]]:
        """Each page of a paginated list (the list under ``key`` when the page is an object)."""
        for page in range(1, MAX_PAGES + 1):
            response, body = await self._request(
                "GET", path, params={**(params or {}), "page": page, "limit": PAGE_LIMIT}
            )
            data = _parse("GET", path, response, body)
            items = (data.get(key) if isinstance(data, dict) else None) if key else data
            items = [] if items is None else items  # Go's nil slice
            if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                raise ForgeError(f"GET /{path}: forge sent no list of objects", status=response.status_code)
            yield items
            if 'rel="next"' not in response.headers.get("link", "") or not items:
                return

    async def find_pr_by_head(self, owner: str, repo: str, head: str) -> PullRequest | None:
        async for items in self._pages(f"{self._repo_path(owner, repo)}/pulls", {"state": "open"}):
            for item in items:
                pr = pr_from_json(item)
                # A fork's PR may use the same branch name: only this repository's branch counts.
                if pr.head == head and pr.head_repo.lower() == f"{owner}/{repo}".lower():
                    return pr
        return None

    # -- the conversation on the forge and CI (DESIGN.md §12) --------------------------

    async def _me_login(self) -> str:
        if self._me is None:
            self._me = await self.current_user()
        return self._me.login

    async def add_reaction(
        self, owner: str, repo: str, *, issue: int | None = None, comment_id: int | None = None, content: str = "eyes"
    ) -> bool:
        """React to an issue (or PR) or to a comment; True if new, False if it was already there."""
        if (issue is None) == (comment_id is None):
            raise ValueError("react to an issue or to a comment, not both or neither")
        target = f"comments/{int(comment_id)}" if comment_id is not None else str(int(issue or 0))
        response, _ = await self._request(
            "POST",
            f"{self._repo_path(owner, repo)}/issues/{target}/reactions",
            json={"content": content},
            ok=(200, 201),
        )
        return response.status_code == 201

    async def edit_comment(self, owner: str, repo: str, comment_id: int, body: str) -> Comment:
        path = f"{self._repo_path(owner, repo)}/issues/comments/{int(comment_id)}"
        return comment_from_json(await self._json("PATCH", path, json={"body": body}))

    async def find_comment(self, owner: str, repo: str, issue: int, marker: str) -> Comment | None:
        """The token user's oldest comment on ``issue`` whose body holds ``marker``: anyone can
        write the marker, so comments by others never count."""
        if not marker:
            raise ValueError("an empty marker matches every comment")
        me = (await self._me_login()).lower()
        for comment in await self.read_comments(owner, repo, issue):
            if comment.user.lower() == me and marker in comment.body:
                return comment
        return None

    async def commit_statuses(self, owner: str, repo: str, ref: str) -> list[CommitStatus]:
        """The latest status of each context on the commit ``ref`` (a sha or a branch) names."""
        latest: dict[str, CommitStatus] = {}
        path = f"{self._repo_path(owner, repo)}/commits/{_segment(ref)}/statuses"
        async for items in self._pages(path):
            for status in map(status_from_json, items):
                if status.context not in latest or status.id > latest[status.context].id:
                    latest[status.context] = status
        return sorted(latest.values(), key=lambda s: s.context)

    async def workflow_jobs(self, owner: str, repo: str, head_sha: str) -> list[Job]:
        """The Actions jobs of every run at ``head_sha``, newest run first."""
        base = f"{self._repo_path(owner, repo)}/actions/runs"
        runs: list[int] = []
        async for items in self._pages(base, {"head_sha": head_sha}, key="workflow_runs"):
            # A forge that ignores the filter (an older Gitea) lists every run: keep only ours.
            runs += [r["id"] for r in items if r.get("head_sha") == head_sha and isinstance(r.get("id"), int)]
        jobs: list[Job] = []
        for run in sorted(set(runs), reverse=True):
            async for items in self._pages(f"{base}/{run}/jobs", key="jobs"):
                jobs += [job_from_json(j) for j in items]
        return jobs

    async def job(self, owner: str, repo: str, job_id: int) -> Job:
        return job_from_json(await self._json("GET", f"{self._repo_path(owner, repo)}/actions/jobs/{int(job_id)}"))

    async def job_log_tail(
        self, owner: str, repo: str, job_id: int, lines: int = 200, *, max_bytes: int = MAX_LOG_TAIL_BYTES
    ) -> list[str]:
        """The last ``lines`` lines of a job's log, from at most its last ``max_bytes`` bytes.

        Asks for only the end (a suffix Range); a forge that sends the whole log anyway is read
        in chunks keeping only the end, and refused past ``MAX_LOG_BYTES``.
        """
        path = f"{self._repo_path(owner, repo)}/actions/jobs/{int(job_id)}/logs"
        max_bytes = max(1, max_bytes)
        headers = {"Range": f"bytes=-{max_bytes}", "Accept": "text/plain"}
        # 416: a Range past an empty log, nothing logged yet.
        response, body = await self._request("GET", path, headers=headers, ok=(200, 206, 416), tail=max_bytes)
        if response.status_code == 416:
            return []
        cut = len(body) > max_bytes or not response.headers.get("content-range", "bytes 0-").startswith("bytes 0-")
        text = body[-max_bytes:].decode("utf-8", errors="replace").splitlines()
        if cut and len(text) > 1:
            text = text[1:]  # the first line was cut: its start is before the tail
        return text[-max(1, lines) :]

    async def list_hooks(self, owner: str, repo: str) -> list[Hook]:
        path = f"{self._repo_path(owner, repo)}/hooks"
        return [hook_from_json(hook) async for items in self._pages(path) for hook in items]

    async def create_hook(self, owner: str, repo: str, url: str, secret: str, events: Iterable[str]) -> Hook:
        # Gitea creates an inactive hook unless asked for an active one.
        config = {"url": url, "content_type": "json", "secret": secret}
        payload = {"type": "gitea", "config": config, "events": list(events), "active": True}
        data = await self._json("POST", f"{self._repo_path(owner, repo)}/hooks", json=payload, ok=(201,))
        return hook_from_json(data)

    async def list_labels(self, owner: str, repo: str) -> list[Label]:
        path = f"{self._repo_path(owner, repo)}/labels"
        return [label_from_json(label) async for items in self._pages(path) for label in items]

    async def create_label(self, owner: str, repo: str, name: str, color: str, description: str = "") -> Label:
        payload = {"name": name, "color": color, "description": description}
        data = await self._json("POST", f"{self._repo_path(owner, repo)}/labels", json=payload, ok=(201,))
        return label_from_json(data)

    async def branch_sha(self, owner: str, repo: str, branch: str) -> str | None:
        """The commit ``branch`` points at, or None if there is no such branch."""
        path = "/".join(_segment(part) for part in branch.split("/"))  # Gitea's route is /branches/*
        try:
            data = await self._json("GET", f"{self._repo_path(owner, repo)}/branches/{path}")
        except ForgeNotFound:
            return None
        commit = data.get("commit") if isinstance(data, dict) else None
        sha = commit.get("id") if isinstance(commit, dict) else None
        return str(sha) if sha else None


async def _read_body(method: str, path: str, response: httpx.Response, *, tail: int | None = None) -> bytes:
    """The answer's body, refused as soon as it is known to be over ``MAX_RESPONSE_BYTES``; with
    ``tail``, only its last ``tail + 1`` bytes (one more than asked says it was cut), refused past
    ``MAX_LOG_BYTES``."""
    cap = MAX_RESPONSE_BYTES if tail is None else MAX_LOG_BYTES
    too_big = ForgeError(f"{method} /{path}: the forge's answer is over {cap} bytes", status=response.status_code)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_big
    body = bytearray()
    seen = 0
    async for chunk in response.aiter_bytes():  # as the transport reads them: 64 KiB at most
        seen += len(chunk)
        if seen > cap:
            raise too_big
        body += chunk
        if tail is not None:
            del body[: -(tail + 1)]
    return bytes(body)


def _parse(method: str, path: str, response: httpx.Response, body: bytes) -> Any:
    try:
        return jsonlib.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ForgeError(f"{method} {path}: forge sent invalid JSON", status=response.status_code) from exc


def _error_for(method: str, path: str, response: httpx.Response, body: bytes) -> ForgeError:
    message = ""
    try:
        answer = jsonlib.loads(body)
        if isinstance(answer, dict):
            message = str(answer.get("message") or "")
    except (ValueError, RecursionError):
        message = body[:200].decode("utf-8", errors="replace")
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


def _segment(value: str) -> str:
    """``value`` as one URL path segment; refused if it is not one (an agent may choose it)."""
    if value in ("", ".", "..") or len(value) > 1024:
        raise ForgeError(f"not a name the forge can look up: {value[:100]!r}")
    try:
        return quote(value, safe="")
    except UnicodeEncodeError:
        raise ForgeError("not a name the forge can look up: it is not valid Unicode") from None


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
    head_repo = head.get("repo")
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
        user=_login(data.get("user")),
        head_repo=str(head_repo.get("full_name") or "") if isinstance(head_repo, dict) else "",
    )


def comment_from_json(data: Mapping[str, Any]) -> Comment:
    return Comment(
        id=int(data["id"]),
        user=_login(data.get("user")),
        body=str(data.get("body") or ""),
        created_at=str(data.get("created_at") or ""),
        html_url=str(data.get("html_url") or ""),
    )


def status_from_json(data: Mapping[str, Any]) -> CommitStatus:
    return CommitStatus(
        id=int(data.get("id") or 0),
        context=str(data.get("context") or ""),
        # The API says "status"; a webhook's CommitStatusPayload says "state".
        state=str(data.get("status") or data.get("state") or ""),
        description=str(data.get("description") or ""),
        target_url=str(data.get("target_url") or ""),
        created_at=str(data.get("created_at") or ""),
    )


def job_from_json(data: Mapping[str, Any]) -> Job:
    return Job(
        id=int(data["id"]),
        run_id=int(data.get("run_id") or 0),
        name=str(data.get("name") or ""),
        status=str(data.get("status") or ""),
        conclusion=str(data.get("conclusion") or ""),
        head_sha=str(data.get("head_sha") or ""),
        html_url=str(data.get("html_url") or ""),
    )


def hook_from_json(data: Mapping[str, Any]) -> Hook:
    config = data.get("config")
    config = config if isinstance(config, dict) else {}
    return Hook(
        id=int(data["id"]),
        url=str(config.get("url") or ""),
        content_type=str(config.get("content_type") or ""),
        events=tuple(str(e) for e in data.get("events") or []),
        active=data.get("active") is True,
        type=str(data.get("type") or ""),
    )


def label_from_json(data: Mapping[str, Any]) -> Label:
    return Label(
        id=int(data["id"]),
        name=str(data.get("name") or ""),
        color=str(data.get("color") or "").lstrip("#"),
        description=str(data.get("description") or ""),
    )


def basic_auth_header(user: str, token: str) -> str:
    """The header git sends to Gitea's smart HTTP: basic auth with the token as password."""
    raw = base64.b64encode(f"{user}:{token}".encode()).decode()
    return f"Authorization: Basic {raw}"
