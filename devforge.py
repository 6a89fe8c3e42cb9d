"""A Gitea-compatible development forge: the API subset forgebottle calls, Gitea's quirks included.

What it reproduces from Gitea 1.26 (../shared/gitea/CONTRACT.md):

* error bodies ``{"message", "url"}`` (404 adds ``"errors": null``), 401 without a token;
* ``PATCH /issues/{n}`` answers 201; comments are not paginated; a duplicate PR is 409;
* ``assignees`` is ``null`` on an empty issue but ``[]`` on a PR; users carry ``username``;
* org membership: 204/404 for members and admins, 303 to ``public_members`` for others;
* webhooks signed as Gitea signs them (bare hex HMAC-SHA256 of the JSON, also for form hooks),
  every header of CONTRACT.md §1, the JSON indented by two spaces with ``<>&`` escaped, a 5 s
  timeout and no retry;
* git smart HTTP through ``git http-backend``, token required (basic auth or ``token`` header).

State lives in memory (git repositories on disk under ``root``). Tests and ``forgebottle demo``
set it up through the Python methods (``add_user``, ``create_repo``, ``create_issue`` ...), which
also fire the webhooks a real Gitea would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import os
import queue
import re
import secrets
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

GITEA_VERSION = "1.26.4"
MAX_GIT_BODY = 256 * 1024 * 1024
DELIVER_TIMEOUT = 5.0

# Which hook subscriptions include which fine event type (routers/api/v1/utils/hook.go).
SUBSCRIPTIONS: dict[str, set[str]] = {
    "issues": {"issues", "issues_only"},
    "issue_assign": {"issues", "issue_assign"},
    "issue_label": {"issues", "issue_label"},
    "issue_comment": {"issues", "issue_comment"},
    "pull_request": {"pull_request", "pull_request_only"},
    "pull_request_comment": {"pull_request", "pull_request_comment"},
    "pull_request_sync": {"pull_request", "pull_request_sync"},
    "pull_request_review_approved": {"pull_request", "pull_request_review"},
    "pull_request_review_rejected": {"pull_request", "pull_request_review"},
    "pull_request_review_comment": {"pull_request", "pull_request_review"},
}
# X-Gitea-Event (coarse) for each X-Gitea-Event-Type (fine). Note the review trap.
COARSE_EVENT = {
    "issues": "issues",
    "issue_assign": "issues",
    "issue_label": "issues",
    "issue_comment": "issue_comment",
    "pull_request": "pull_request",
    "pull_request_comment": "issue_comment",
    "pull_request_sync": "pull_request",
    "pull_request_review_approved": "pull_request_approved",
    "pull_request_review_rejected": "pull_request_rejected",
    "pull_request_review_comment": "pull_request_comment",
}


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def go_json(payload: Any) -> bytes:
    """Bytes as Go's json.MarshalIndent(p, "", "  ") writes them (escapes <, >, &)."""
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode()


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class DevForgeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class UserRec:
    id: int
    login: str
    token: str
    is_admin: bool = False
    full_name: str = ""


@dataclasses.dataclass
class OrgRec:
    id: int
    name: str
    members: set[str] = dataclasses.field(default_factory=set)
    public: set[str] = dataclasses.field(default_factory=set)
    owners: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class CommentRec:
    id: int
    user: str
    body: str
    created_at: str
    updated_at: str


@dataclasses.dataclass
class PullRec:
    id: int
    head: str
    base: str
    merged: bool = False
    merged_at: str | None = None
    merge_commit_sha: str | None = None
    merged_by: str | None = None


@dataclasses.dataclass
class IssueRec:
    id: int
    number: int
    title: str
    body: str
    user: str
    created_at: str
    updated_at: str
    state: str = "open"
    labels: list[str] = dataclasses.field(default_factory=list)
    assignees: list[str] = dataclasses.field(default_factory=list)
    comments: list[CommentRec] = dataclasses.field(default_factory=list)
    closed_at: str | None = None
    pull: PullRec | None = None


@dataclasses.dataclass
class HookRec:
    id: int
    url: str
    secret: str
    content_type: str = "json"
    events: frozenset[str] = frozenset({"issues", "pull_request"})


@dataclasses.dataclass
class LabelRec:
    id: int
    name: str
    color: str = "e11d21"
    description: str = ""


@dataclasses.dataclass
class RepoRec:
    id: int
    owner: str
    name: str
    path: Path
    default_branch: str = "main"
    private: bool = False
    collaborators: dict[str, str] = dataclasses.field(default_factory=dict)
    issues: dict[int, IssueRec] = dataclasses.field(default_factory=dict)
    labels: dict[str, LabelRec] = dataclasses.field(default_factory=dict)
    hooks: list[HookRec] = dataclasses.field(default_factory=list)

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclasses.dataclass
class Delivery:
    uuid: str
    event_type: str
    url: str
    body: bytes
    headers: dict[str, str]
    status: int | None = None
    response: str = ""
    error: str = ""


class DevForge:
    """An in-memory Gitea. ``base_url`` is where it is served (set once the port is known)."""

    def __init__(self, root: Path, base_url: str = "http://127.0.0.1:3000/") -> None:
        self.root = Path(root)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.domain = "devforge.local"
        self._lock = threading.RLock()
        self._ids = 0
        self.users: dict[str, UserRec] = {}
        self.orgs: dict[str, OrgRec] = {}
        self.repos: dict[tuple[str, str], RepoRec] = {}
        self.deliveries: list[Delivery] = []
        self._outbox: queue.Queue[Delivery | None] = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._sender: threading.Thread | None = None
        # Failure injection for outage tests: a callable returning a status to answer, or None;
        # and a stall, seconds every API request waits before it is answered.
        self.fault: Callable[[Request], int | None] | None = None
        self.stall = 0.0
        self.app = self._build_app()

    # -- ids and lookups ------------------------------------------------------------

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def user(self, login: str) -> UserRec:
        rec = self.users.get(login.lower())
        if rec is None:
            raise DevForgeError(404, "user does not exist")
        return rec

    def repo(self, owner: str, name: str) -> RepoRec:
        rec = self.repos.get((owner.lower(), name.lower()))
        if rec is None:
            raise DevForgeError(404, "not found")
        return rec

    def issue(self, owner: str, name: str, number: int) -> IssueRec:
        rec = self.repo(owner, name).issues.get(number)
        if rec is None:
            raise DevForgeError(404, "not found")
        return rec

    # -- setup API (also fires webhooks where Gitea would) --------------------------

    def add_user(self, login: str, *, admin: bool = False, token: str | None = None) -> UserRec:
        with self._lock:
            rec = UserRec(self._next_id(), login, token or secrets.token_hex(20), is_admin=admin)
            self.users[login.lower()] = rec
            return rec

    def add_org(self, name: str, members: Iterable[str] = (), *, public: Iterable[str] = ()) -> OrgRec:
        with self._lock:
            org = OrgRec(self._next_id(), name, {m.lower() for m in members}, {m.lower() for m in public})
            self.orgs[name.lower()] = org
            return org

    def create_repo(
        self,
        owner: str,
        name: str,
        files: Mapping[str, str] | None = None,
        *,
        default_branch: str = "main",
        collaborators: Mapping[str, str] | None = None,
    ) -> RepoRec:
        with self._lock:
            path = self.root / "repos" / owner.lower() / f"{name.lower()}.git"
            path.parent.mkdir(parents=True, exist_ok=True)
            _git(["init", "-q", "--bare", f"--initial-branch={default_branch}", str(path)])
            _git(["-C", str(path), "config", "http.receivepack", "true"])
            rec = RepoRec(self._next_id(), owner, name, path, default_branch)
            rec.collaborators.update({k.lower(): v for k, v in (collaborators or {}).items()})
            self.repos[(owner.lower(), name.lower())] = rec
        self.commit_files(owner, name, default_branch, files or {"README.md": f"# {name}\n"}, "initial commit")
        return rec

    def commit_files(self, owner: str, name: str, branch: str, files: Mapping[str, str], message: str) -> str:
        """Commit ``files`` on top of ``branch`` (plumbing only, no work tree); creates the branch."""
        repo = self.repo(owner, name)
        git_dir = str(repo.path)
        # A new branch starts from the default branch, as a branch made in Gitea's UI does.
        parent = self.branch_sha(repo, branch) or self.branch_sha(repo, repo.default_branch)
        with tempfile.TemporaryDirectory() as tmp:
            env = {**_git_env(), "GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if parent:
                _git(["-C", git_dir, "read-tree", parent], env=env)
            for path, content in files.items():
                blob = _git_out(["-C", git_dir, "hash-object", "-w", "--stdin"], stdin=content.encode())
                _git(["-C", git_dir, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}"], env=env)
            tree = _git_out(["-C", git_dir, "write-tree"], env=env)
            args = ["-C", git_dir, "commit-tree", tree, "-m", message]
            if parent:
                args += ["-p", parent]
            sha = _git_out(args)
        _git(["-C", git_dir, "update-ref", f"refs/heads/{branch}", sha])
        return sha

    def add_label(self, owner: str, name: str, label: str) -> LabelRec:
        with self._lock:
            repo = self.repo(owner, name)
            rec = repo.labels.get(label)
            if rec is None:
                rec = repo.labels[label] = LabelRec(self._next_id(), label)
            return rec

    def add_hook(
        self,
        owner: str,
        name: str,
        url: str,
        secret: str,
        *,
        content_type: str = "json",
        events: Iterable[str] = (
            "issues",
            "issue_comment",
            "pull_request",
            "pull_request_comment",
            "pull_request_review",
        ),
    ) -> HookRec:
        with self._lock:
            hook = HookRec(self._next_id(), url, secret, content_type, frozenset(events))
            self.repo(owner, name).hooks.append(hook)
            return hook

    def create_issue(
        self,
        owner: str,
        name: str,
        *,
        title: str,
        body: str = "",
        user: str,
        labels: Iterable[str] = (),
        assignees: Iterable[str] = (),
    ) -> IssueRec:
        with self._lock:
            repo = self.repo(owner, name)
            for label in labels:
                self.add_label(owner, name, label)
            issue = self._new_issue(repo, title, body, user)
            issue.labels = list(labels)
            issue.assignees = [self.user(a).login for a in assignees]
            self._emit(repo, "issues", self._issue_payload(repo, issue, "opened", user))
            return issue

    def _new_issue(self, repo: RepoRec, title: str, body: str, user: str) -> IssueRec:
        number = max(repo.issues, default=0) + 1
        stamp = now()
        issue = IssueRec(self._next_id(), number, title, body, self.user(user).login, stamp, stamp)
        repo.issues[number] = issue
        return issue

    def set_labels(self, owner: str, name: str, number: int, labels: Iterable[str], *, by: str) -> None:
        with self._lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            for label in labels:
                self.add_label(owner, name, label)
            issue.labels = list(labels)
            event = "pull_request_label" if issue.pull else "issue_label"
            action = "label_updated" if issue.labels else "label_cleared"
            if issue.pull is None:
                self._emit(repo, event, self._issue_payload(repo, issue, action, by))

    def assign(self, owner: str, name: str, number: int, assignees: Iterable[str], *, by: str) -> None:
        with self._lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            issue.assignees = [self.user(a).login for a in assignees]
            if issue.pull is None:
                self._emit(repo, "issue_assign", self._issue_payload(repo, issue, "assigned", by))

    def edit_issue(
        self,
        owner: str,
        name: str,
        number: int,
        *,
        by: str,
        title: str | None = None,
        body: str | None = None,
        state: str | None = None,
    ) -> IssueRec:
        with self._lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            changes: dict[str, Any] = {}
            if title is not None and title != issue.title:
                changes["title"] = {"from": issue.title}
                issue.title = title
            if body is not None and body != issue.body:
                changes["body"] = {"from": issue.body}
                issue.body = body
            issue.updated_at = now()
            if changes:
                if issue.pull:
                    self._emit(repo, "pull_request", self._pr_payload(repo, issue, "edited", by, changes=changes))
                else:
                    self._emit(repo, "issues", self._issue_payload(repo, issue, "edited", by, changes=changes))
            if state is not None and state != issue.state:
                self._set_state(repo, issue, state, by)
            return issue

    def _set_state(self, repo: RepoRec, issue: IssueRec, state: str, by: str, commit_id: str = "") -> None:
        issue.state = state
        issue.closed_at = now() if state == "closed" else None
        action = "closed" if state == "closed" else "reopened"
        if issue.pull:
            self._emit(repo, "pull_request", self._pr_payload(repo, issue, action, by))
        else:
            payload = self._issue_payload(repo, issue, action, by)
            payload["commit_id"] = commit_id
            self._emit(repo, "issues", payload)

    def comment(self, owner: str, name: str, number: int, body: str, *, user: str) -> CommentRec:
        with self._lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            stamp = now()
            rec = CommentRec(self._next_id(), self.user(user).login, body, stamp, stamp)
            issue.comments.append(rec)
            payload: dict[str, Any] = {
                "action": "created",
                "issue": self.issue_json(repo, issue),
                "comment": self.comment_json(repo, issue, rec),
                "repository": self.repo_json(repo, user),
                "sender": self.user_json(user),
                "is_pull": issue.pull is not None,
            }
            if issue.pull is not None:
                payload["pull_request"] = self.pr_json(repo, issue)
            self._emit(repo, "pull_request_comment" if issue.pull else "issue_comment", payload)
            return rec

    def review(self, owner: str, name: str, number: int, body: str, *, user: str, kind: str = "comment") -> None:
        """A submitted review: ``kind`` is ``comment``, ``approved`` or ``rejected``."""
        with self._lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            if issue.pull is None:
                raise DevForgeError(404, "not a pull request")
            event = f"pull_request_review_{kind}"
            payload = self._pr_payload(repo, issue, "reviewed", user)
            payload["review"] = {"type": event, "content": body}
            payload["requested_reviewer"] = self.user_json(user)
            self._emit(repo, event, payload)

    def create_pr(self, owner: str, name: str, *, head: str, base: str, title: str, body: str, user: str) -> IssueRec:
        with self._lock:
            repo = self.repo(owner, name)
            head = head.split(":")[-1]
            if head == base:
                raise DevForgeError(422, "Invalid PullRequest: There are no changes between the head and the base")
            for ref in (head, base):
                if not self.branch_sha(repo, ref):
                    raise DevForgeError(404, f"branch {ref} does not exist")
            for other in repo.issues.values():
                if other.pull and other.state == "open" and other.pull.head == head and other.pull.base == base:
                    raise DevForgeError(
                        409,
                        f"pull request already exists for these targets [id: {other.pull.id}, issue_id: {other.id}, "
                        f"head_repo_id: {repo.id}, base_repo_id: {repo.id}, head_branch: {head}, base_branch: {base}]",
                    )
            issue = self._new_issue(repo, title, body, user)
            issue.pull = PullRec(self._next_id(), head, base)
            self._emit(repo, "pull_request", self._pr_payload(repo, issue, "opened", user))
            return issue

    def merge_pr(self, owner: str, name: str, number: int, *, user: str) -> str:
        with self._lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            if issue.pull is None:
                raise DevForgeError(404, "not found")
            if issue.pull.merged or issue.state != "open":
                raise DevForgeError(405, "The PR is already merged or closed")
            git_dir = str(repo.path)
            base_sha = self.branch_sha(repo, issue.pull.base)
            head_sha = self.branch_sha(repo, issue.pull.head)
            tree = _git_out(["-C", git_dir, "merge-tree", "--write-tree", base_sha, head_sha], check=False)
            if not re.fullmatch(r"[0-9a-f]{40}", tree or ""):
                raise DevForgeError(409, "merge conflict")
            sha = _git_out(
                [
                    "-C",
                    git_dir,
                    "commit-tree",
                    tree,
                    "-p",
                    base_sha,
                    "-p",
                    head_sha,
                    "-m",
                    f"Merge pull request '{issue.title}' (#{issue.number})",
                ]
            )
            _git(["-C", git_dir, "update-ref", f"refs/heads/{issue.pull.base}", sha])
            issue.pull.merged, issue.pull.merged_at = True, now()
            issue.pull.merge_commit_sha, issue.pull.merged_by = sha, self.user(user).login
            issue.state, issue.closed_at = "closed", now()
            self._emit(repo, "pull_request", self._pr_payload(repo, issue, "closed", user))
            # Closing keywords in the PR close the referenced issues, with commit_id set.
            for match in re.finditer(r"(?i)(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?):?\s+#(\d+)", issue.body):
                target = repo.issues.get(int(match.group(1)))
                if target is not None and target.pull is None and target.state == "open":
                    self._set_state(repo, target, "closed", user, commit_id=sha)
            return sha

    def close_pr(self, owner: str, name: str, number: int, *, user: str) -> None:
        self.edit_issue(owner, name, number, by=user, state="closed")

    def branch_sha(self, repo: RepoRec, branch: str) -> str:
        return _git_out(["-C", str(repo.path), "rev-parse", "--verify", "-q", f"refs/heads/{branch}"], check=False)

    def read_file(self, owner: str, name: str, ref: str, path: str) -> str:
        return _git_out(["-C", str(self.repo(owner, name).path), "show", f"{ref}:{path}"])

    # -- JSON as Gitea renders it ----------------------------------------------------

    def user_json(self, login: str) -> dict[str, Any]:
        rec = self.user(login)
        return {
            "id": rec.id,
            "login": rec.login,
            "login_name": "",
            "source_id": 0,
            "full_name": rec.full_name,
            # Webhook users carry Gitea's placeholder address, never the real one.
            "email": f"{rec.id}+{rec.login.lower()}@noreply.{self.domain}",
            "avatar_url": f"{self.base_url}avatars/{rec.id}",
            "html_url": f"{self.base_url}{rec.login}",
            "language": "",
            "is_admin": False,
            "last_login": "0001-01-01T00:00:00Z",
            "created": "2026-01-01T00:00:00Z",
            "restricted": False,
            "active": True,
            "prohibit_login": False,
            "location": "",
            "website": "",
            "description": "",
            "visibility": "public",
            "followers_count": 0,
            "following_count": 0,
            "starred_repos_count": 0,
            "username": rec.login,
        }

    def org_json(self, org: OrgRec) -> dict[str, Any]:
        return {
            "id": org.id,
            "name": org.name,
            "username": org.name,
            "full_name": "",
            "email": "",
            "avatar_url": f"{self.base_url}avatars/{org.id}",
            "description": "",
            "website": "",
            "location": "",
            "visibility": "public",
            "repo_admin_change_team_access": False,
        }

    def repo_json(self, repo: RepoRec, viewer: str | None = None) -> dict[str, Any]:
        perm = self.permission(repo, viewer) if viewer else "read"
        owner_json = (
            self.org_json(self.orgs[repo.owner.lower()])
            if repo.owner.lower() in self.orgs
            else self.user_json(repo.owner)
        )
        open_issues = sum(1 for i in repo.issues.values() if i.pull is None and i.state == "open")
        open_prs = sum(1 for i in repo.issues.values() if i.pull is not None and i.state == "open")
        return {
            "id": repo.id,
            "owner": owner_json,
            "name": repo.name,
            "full_name": repo.full_name,
            "description": "",
            "empty": False,
            "private": repo.private,
            "fork": False,
            "template": False,
            "mirror": False,
            "size": 0,
            "language": "",
            "html_url": f"{self.base_url}{repo.full_name}",
            "url": f"{self.base_url}api/v1/repos/{repo.full_name}",
            "ssh_url": f"git@{self.domain}:{repo.full_name}.git",
            "clone_url": f"{self.base_url}{repo.full_name}.git",
            "website": "",
            "stars_count": 0,
            "forks_count": 0,
            "watchers_count": 0,
            "open_issues_count": open_issues,
            "open_pr_counter": open_prs,
            "release_counter": 0,
            "default_branch": repo.default_branch,
            "archived": False,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            "permissions": {
                "admin": perm in ("admin", "owner"),
                "push": perm in ("write", "admin", "owner"),
                "pull": True,
            },
            "has_issues": True,
            "has_pull_requests": True,
            "default_merge_style": "merge",
        }

    def label_json(self, repo: RepoRec, name: str) -> dict[str, Any]:
        rec = repo.labels[name]
        return {
            "id": rec.id,
            "name": rec.name,
            "exclusive": False,
            "is_archived": False,
            "color": rec.color,  # hex without '#'
            "description": rec.description,
            "url": f"{self.base_url}api/v1/repos/{repo.full_name}/labels/{rec.id}",
        }

    def issue_json(self, repo: RepoRec, issue: IssueRec) -> dict[str, Any]:
        kind = "pulls" if issue.pull else "issues"
        assignees = [self.user_json(a) for a in issue.assignees]
        return {
            "id": issue.id,
            "url": f"{self.base_url}api/v1/repos/{repo.full_name}/issues/{issue.number}",
            "html_url": f"{self.base_url}{repo.full_name}/{kind}/{issue.number}",
            "number": issue.number,
            "user": self.user_json(issue.user),
            "original_author": "",
            "original_author_id": 0,
            "title": issue.title,
            "body": issue.body,
            "ref": "",
            "assets": [],
            "labels": [self.label_json(repo, n) for n in issue.labels],
            "milestone": None,
            "assignee": assignees[0] if assignees else None,
            # Gitea quirk: a nil slice marshals to null on issues.
            "assignees": assignees or None,
            "state": issue.state,
            "is_locked": False,
            "comments": len(issue.comments),
            "created_at": issue.created_at,
            "updated_at": issue.updated_at,
            "closed_at": issue.closed_at,
            "due_date": None,
            "time_estimate": 0,
            "pull_request": None
            if issue.pull is None
            else {
                "merged": issue.pull.merged,
                "merged_at": issue.pull.merged_at,
                "draft": False,
                "html_url": f"{self.base_url}{repo.full_name}/pulls/{issue.number}",
            },
            "repository": {"id": repo.id, "name": repo.name, "owner": repo.owner, "full_name": repo.full_name},
            "pin_order": 0,
            "content_version": 0,
        }

    def _branch_json(self, repo: RepoRec, branch: str) -> dict[str, Any]:
        return {
            "label": branch,  # the bare branch name, not owner:branch
            "ref": branch,
            "sha": self.branch_sha(repo, branch),
            "repo_id": repo.id,
            "repo": self.repo_json(repo),
        }

    def pr_json(self, repo: RepoRec, issue: IssueRec) -> dict[str, Any]:
        assert issue.pull is not None
        pull = issue.pull
        web = f"{self.base_url}{repo.full_name}/pulls/{issue.number}"
        return {
            "id": pull.id,
            "url": web,  # Gitea quirk: url is the web URL, like html_url
            "number": issue.number,
            "user": self.user_json(issue.user),
            "title": issue.title,
            "body": issue.body,
            "labels": [self.label_json(repo, n) for n in issue.labels],
            "milestone": None,
            "assignee": None,
            "assignees": [self.user_json(a) for a in issue.assignees],
            "requested_reviewers": [],
            "requested_reviewers_teams": [],
            "state": issue.state,
            "draft": False,
            "is_locked": False,
            "comments": len(issue.comments),
            "review_comments": 0,
            "additions": 0,
            "deletions": 0,
            "changed_files": 0,
            "html_url": web,
            "diff_url": f"{web}.diff",
            "patch_url": f"{web}.patch",
            "mergeable": not pull.merged,
            "merged": pull.merged,
            "merged_at": pull.merged_at,
            "merge_commit_sha": pull.merge_commit_sha,
            "merged_by": self.user_json(pull.merged_by) if pull.merged_by else None,
            "allow_maintainer_edit": False,
            "base": self._branch_json(repo, pull.base),
            "head": self._branch_json(repo, pull.head),
            "merge_base": self.branch_sha(repo, pull.base),
            "due_date": None,
            "created_at": issue.created_at,
            "updated_at": issue.updated_at,
            "closed_at": issue.closed_at,
            "pin_order": 0,
        }

    def comment_json(self, repo: RepoRec, issue: IssueRec, rec: CommentRec) -> dict[str, Any]:
        kind = "pulls" if issue.pull else "issues"
        html = f"{self.base_url}{repo.full_name}/{kind}/{issue.number}"
        return {
            "id": rec.id,
            "html_url": f"{html}#issuecomment-{rec.id}",
            "pull_request_url": html if issue.pull else "",
            "issue_url": "" if issue.pull else html,
            "user": self.user_json(rec.user),
            "original_author": "",
            "original_author_id": 0,
            "body": rec.body,
            "assets": [],
            "created_at": rec.created_at,
            "updated_at": rec.updated_at,
        }

    def _issue_payload(
        self, repo: RepoRec, issue: IssueRec, action: str, sender: str, changes: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return self._payload(repo, issue, action, sender, changes, {"issue": self.issue_json(repo, issue)})

    def _pr_payload(
        self, repo: RepoRec, issue: IssueRec, action: str, sender: str, changes: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        entity = {"pull_request": self.pr_json(repo, issue), "requested_reviewer": None}
        return self._payload(repo, issue, action, sender, changes, entity, review=None)

    def _payload(
        self,
        repo: RepoRec,
        issue: IssueRec,
        action: str,
        sender: str,
        changes: dict[str, Any] | None,
        entity: dict[str, Any],
        **extra: Any,
    ) -> dict[str, Any]:
        """IssuePayload / PullRequestPayload, keys in Gitea's order (changes only when set)."""
        payload: dict[str, Any] = {"action": action, "number": issue.number}
        if changes:
            payload["changes"] = changes
        payload.update(entity)
        payload.update(
            {"repository": self.repo_json(repo, sender), "sender": self.user_json(sender), "commit_id": "", **extra}
        )
        return payload

    # -- permissions ---------------------------------------------------------------

    def permission(self, repo: RepoRec, login: str | None) -> str:
        if not login:
            return "none" if repo.private else "read"
        rec = self.users.get(login.lower())
        if rec is None:
            return "none"
        if rec.is_admin:
            return "admin"
        if rec.login.lower() == repo.owner.lower():
            return "owner"
        org = self.orgs.get(repo.owner.lower())
        if org is not None and rec.login.lower() in org.owners:
            return "owner"
        return repo.collaborators.get(rec.login.lower(), "none" if repo.private else "read")

    def is_member(self, org: OrgRec, login: str) -> bool:
        return login.lower() in org.members or login.lower() in org.owners

    # -- webhooks -------------------------------------------------------------------

    def _emit(self, repo: RepoRec, event_type: str, payload: dict[str, Any]) -> None:
        for hook in repo.hooks:
            if not (SUBSCRIPTIONS.get(event_type, {event_type}) & hook.events):
                continue
            body = go_json(payload)
            signature = sign(hook.secret, body) if hook.secret else ""
            delivery_id = str(uuid.uuid4())
            coarse = COARSE_EVENT.get(event_type, event_type)
            headers = {
                "User-Agent": "Go-http-client/1.1",
                "X-Gitea-Delivery": delivery_id,
                "X-Gitea-Event": coarse,
                "X-Gitea-Event-Type": event_type,
                "X-Gitea-Signature": signature,
                "X-Gogs-Delivery": delivery_id,
                "X-Gogs-Event": coarse,
                "X-Gogs-Event-Type": event_type,
                "X-Gogs-Signature": signature,
                "X-Hub-Signature-256": f"sha256={signature}",
                "X-Hub-Signature": "sha1="
                + (hmac.new(hook.secret.encode(), body, hashlib.sha1).hexdigest() if hook.secret else ""),
                "X-GitHub-Delivery": delivery_id,
                "X-GitHub-Event": coarse,
                "X-GitHub-Event-Type": event_type,
                "X-Gitea-Hook-Installation-Target-Type": "repository",
                "X-GitHub-Hook-Installation-Target-Type": "repository",
            }
            if hook.content_type == "form":
                wire = urlencode({"payload": body.decode()}).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                wire = body
                headers["Content-Type"] = "application/json"
            self._enqueue(Delivery(delivery_id, event_type, hook.url, wire, headers))

    def _enqueue(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)
            self._pending += 1
            if self._sender is None:
                self._sender = threading.Thread(target=self._deliver_loop, name="devforge-hooks", daemon=True)
                self._sender.start()
        self._outbox.put(delivery)

    def replay(self, delivery: Delivery) -> Delivery:
        """Gitea's UI Replay: the stored payload again, under a new UUID."""
        new_id = str(uuid.uuid4())
        headers = {k: (new_id if k.endswith("Delivery") else v) for k, v in delivery.headers.items()}
        copy = Delivery(new_id, delivery.event_type, delivery.url, delivery.body, headers)
        self._enqueue(copy)
        return copy

    def _deliver_loop(self) -> None:
        # At most once, no retry, 5 s for the whole request: as Gitea delivers.
        with httpx.Client(timeout=DELIVER_TIMEOUT) as client:
            while True:
                delivery = self._outbox.get()
                if delivery is None:
                    return
                try:
                    response = client.post(delivery.url, content=delivery.body, headers=delivery.headers)
                    delivery.status = response.status_code
                    delivery.response = response.text[: 1024 * 1024]
                except httpx.HTTPError as exc:
                    delivery.error = f"{type(exc).__name__}: {exc}"
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait_deliveries(self, timeout: float = 10.0) -> list[Delivery]:
        """Block until every queued webhook was delivered (or failed); return them all."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._pending == 0, timeout=timeout):
                raise TimeoutError(f"{self._pending} webhook deliveries still pending")
            return list(self.deliveries)

    def close(self) -> None:
        if self._sender is not None:
            self._outbox.put(None)
            self._sender.join(timeout=DELIVER_TIMEOUT + 1)

    # -- HTTP ------------------------------------------------------------------------

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
            Route("/{owner}/{repo}.git/{rest:path}", self._git_http, methods=["GET", "POST"]),
        ]
        return Starlette(
            routes=routes, exception_handlers={DevForgeError: self._error}, middleware=[Middleware(_Stall, forge=self)]
        )

    async def _error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DevForgeError)
        return self.error_response(exc.status, exc.message)

    def error_response(self, status: int, message: str) -> JSONResponse:
        body: dict[str, Any] = {"message": message, "url": f"{self.base_url}api/swagger"}
        if status == 404:
            body = {"errors": None, "message": "not found", "url": f"{self.base_url}api/swagger"}
        return JSONResponse(body, status_code=status)

    def _auth(self, request: Request, *, required: bool = True) -> UserRec | None:
        if self.fault is not None:
            status = self.fault(request)
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
        with self._lock:
            for rec in self.users.values():
                if hmac.compare_digest(rec.token.encode(), token.encode()):  # str would refuse non-ASCII
                    return rec
        raise DevForgeError(401, "invalid username, password or token")

    def _doer(self, request: Request) -> UserRec:
        doer = self._auth(request)
        assert doer is not None
        return doer

    async def _version(self, request: Request) -> Response:
        return JSONResponse({"version": GITEA_VERSION})

    async def _me(self, request: Request) -> Response:
        doer = self._doer(request)
        data = self.user_json(doer.login)
        data["is_admin"] = doer.is_admin
        return JSONResponse(data)

    async def _org(self, request: Request) -> Response:
        self._doer(request)
        org = self.orgs.get(request.path_params["org"].lower())
        if org is None:
            raise DevForgeError(404, "not found")
        return JSONResponse(self.org_json(org))

    async def _member(self, request: Request) -> Response:
        doer = self._doer(request)
        with self._lock:
            org = self.orgs.get(request.path_params["org"].lower())
            target = self.users.get(request.path_params["username"].lower())
            if org is None or target is None:
                raise DevForgeError(404, "not found")
            if doer.is_admin or self.is_member(org, doer.login):
                return Response(status_code=204 if self.is_member(org, target.login) else 404)
            if doer.login.lower() == target.login.lower():
                return Response(status_code=404)
            location = f"{self.base_url}api/v1/orgs/{org.name}/public_members/{target.login}"
            return Response(status_code=303, headers={"Location": location})

    async def _public_member(self, request: Request) -> Response:
        with self._lock:
            org = self.orgs.get(request.path_params["org"].lower())
            login = request.path_params["username"].lower()
            ok = org is not None and login in org.public
            return Response(status_code=204 if ok else 404)

    async def _get_repo(self, request: Request) -> Response:
        doer = self._doer(request)
        with self._lock:
            repo = self.repo(request.path_params["owner"], request.path_params["repo"])
            return JSONResponse(self.repo_json(repo, doer.login))

    async def _permission(self, request: Request) -> Response:
        doer = self._doer(request)
        with self._lock:
            repo = self.repo(request.path_params["owner"], request.path_params["repo"])
            target = self.user(request.path_params["collaborator"])
            if not (
                doer.is_admin
                or self.permission(repo, doer.login) in ("admin", "owner")
                or doer.login.lower() == target.login.lower()
            ):
                raise DevForgeError(
                    403,
                    "Only admins can query all permissions, repo admins can query all repo "
                    "permissions, collaborators can query only their own",
                )
            perm = self.permission(repo, target.login)
            return JSONResponse({"permission": perm, "role_name": perm, "user": self.user_json(target.login)})

    async def _read_json(self, request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError as exc:
            raise DevForgeError(422, f"invalid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise DevForgeError(422, "expected a JSON object")
        return data

    async def _create_issue(self, request: Request) -> Response:
        doer = self._doer(request)
        data = await self._read_json(request)
        if not data.get("title"):
            raise DevForgeError(422, "[Title]: Required")
        with self._lock:
            issue = self.create_issue(
                request.path_params["owner"],
                request.path_params["repo"],
                title=str(data["title"]),
                body=str(data.get("body") or ""),
                user=doer.login,
                assignees=data.get("assignees") or [],
            )
            repo = self.repo(request.path_params["owner"], request.path_params["repo"])
            return JSONResponse(self.issue_json(repo, issue), status_code=201)

    async def _issue(self, request: Request) -> Response:
        doer = self._doer(request)
        owner, name, number = request.path_params["owner"], request.path_params["repo"], request.path_params["index"]
        if request.method == "GET":
            with self._lock:
                return JSONResponse(self.issue_json(self.repo(owner, name), self.issue(owner, name, number)))
        data = await self._read_json(request)
        with self._lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            if doer.login.lower() != issue.user.lower() and self.permission(repo, doer.login) not in (
                "write",
                "admin",
                "owner",
            ):
                return Response(status_code=403)  # Gitea: 403 with an empty body
            if issue.pull and issue.pull.merged and "state" in data:
                raise DevForgeError(412, "cannot change state of a merged pull request")
            state = data.get("state")
            self.edit_issue(
                owner,
                name,
                number,
                by=doer.login,
                title=data.get("title"),
                body=data.get("body"),
                state=str(state) if state in ("open", "closed") else None,
            )
            # PATCH answers 201, not 200.
            return JSONResponse(self.issue_json(repo, issue), status_code=201)

    async def _comments(self, request: Request) -> Response:
        doer = self._doer(request)
        owner, name, number = request.path_params["owner"], request.path_params["repo"], request.path_params["index"]
        if request.method == "GET":
            with self._lock:
                repo = self.repo(owner, name)
                issue = repo.issues.get(number)
                if issue is None:
                    # Gitea answers 500 for an unknown index here (CONTRACT.md §3).
                    raise DevForgeError(500, "")
                items = [self.comment_json(repo, issue, c) for c in issue.comments]
                # No page/limit: everything at once, with a count and no Link.
                return JSONResponse(items, headers={"X-Total-Count": str(len(items))})
        data = await self._read_json(request)
        body = data.get("body")
        if not isinstance(body, str) or not body:
            raise DevForgeError(422, "[Body]: Required")
        with self._lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            rec = self.comment(owner, name, number, body, user=doer.login)
            return JSONResponse(self.comment_json(repo, issue, rec), status_code=201)

    async def _labels(self, request: Request) -> Response:
        doer = self._doer(request)
        owner, name, number = request.path_params["owner"], request.path_params["repo"], request.path_params["index"]
        if request.method == "POST":
            data = await self._read_json(request)
            names = [str(n) for n in data.get("labels") or [] if isinstance(n, str)]
            with self._lock:
                repo, issue = self.repo(owner, name), self.issue(owner, name, number)
                # Unknown names are silently skipped.
                known = [n for n in names if n in repo.labels and n not in issue.labels]
                self.set_labels(owner, name, number, issue.labels + known, by=doer.login)
        with self._lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            return JSONResponse([self.label_json(repo, n) for n in issue.labels])

    async def _pulls(self, request: Request) -> Response:
        doer = self._doer(request)
        owner, name = request.path_params["owner"], request.path_params["repo"]
        if request.method == "POST":
            data = await self._read_json(request)
            if not data.get("title"):
                raise DevForgeError(422, "[Title]: Required")
            with self._lock:
                repo = self.repo(owner, name)
                if self.permission(repo, doer.login) not in ("write", "admin", "owner"):
                    raise DevForgeError(403, "user should have permission to write to target branch")
                issue = self.create_pr(
                    owner,
                    name,
                    head=str(data.get("head") or ""),
                    base=str(data.get("base") or repo.default_branch),
                    title=str(data["title"]),
                    body=str(data.get("body") or ""),
                    user=doer.login,
                )
                return JSONResponse(self.pr_json(repo, issue), status_code=201)
        state = request.query_params.get("state", "open")
        try:
            page = max(1, int(request.query_params.get("page", "1")))
            limit = min(50, max(1, int(request.query_params.get("limit", "30"))))
        except ValueError as exc:
            raise DevForgeError(422, "invalid page or limit") from exc
        with self._lock:
            repo = self.repo(owner, name)
            pulls = [
                i
                for i in sorted(repo.issues.values(), key=lambda i: -i.number)
                if i.pull is not None and (state == "all" or i.state == state)
            ]
            chunk = pulls[(page - 1) * limit : page * limit]
            headers = {"X-Total-Count": str(len(pulls))}
            links = []
            base = f"{self.base_url}api/v1/repos/{repo.full_name}/pulls"
            if page * limit < len(pulls):
                links.append(f'<{base}?limit={limit}&page={page + 1}&state={state}>; rel="next"')
            if page > 1:
                links.append(f'<{base}?limit={limit}&page={page - 1}&state={state}>; rel="prev"')
            if links:
                headers["Link"] = ",".join(links)
            return JSONResponse([self.pr_json(repo, i) for i in chunk], headers=headers)

    async def _pull(self, request: Request) -> Response:
        self._doer(request)
        with self._lock:
            repo = self.repo(request.path_params["owner"], request.path_params["repo"])
            issue = repo.issues.get(request.path_params["index"])
            if issue is None or issue.pull is None:
                raise DevForgeError(404, "not found")
            return JSONResponse(self.pr_json(repo, issue))

    async def _merge(self, request: Request) -> Response:
        doer = self._doer(request)
        owner, name, number = request.path_params["owner"], request.path_params["repo"], request.path_params["index"]
        with self._lock:
            issue = self.issue(owner, name, number)
            if request.method == "GET":
                merged = issue.pull is not None and issue.pull.merged
                return Response(status_code=204 if merged else 404)
            if self.permission(self.repo(owner, name), doer.login) not in ("write", "admin", "owner"):
                raise DevForgeError(403, "user does not have permission to merge")
            self.merge_pr(owner, name, number, user=doer.login)
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
        with self._lock:
            repo = self.repo(owner, name)
            perm = self.permission(repo, doer.login)
        service = request.query_params.get("service", "") or rest
        if "receive-pack" in service and perm not in ("write", "admin", "owner"):
            return Response("permission denied\n", status_code=403)
        if perm == "none":
            raise DevForgeError(404, "not found")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_GIT_BODY:
                return Response("request too large\n", status_code=413)
        env = {
            **_git_env(),
            "GIT_PROJECT_ROOT": str(self.root / "repos"),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": f"/{repo.owner.lower()}/{repo.name.lower()}.git/{rest}",
            "QUERY_STRING": request.url.query,
            "REQUEST_METHOD": request.method,
            "CONTENT_TYPE": request.headers.get("content-type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": doer.login,
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
        head, _, payload = out.partition(b"\r\n\r\n")
        if not _:
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


class _Stall:
    """ASGI middleware: API requests wait ``forge.stall`` seconds (a forge that hangs)."""

    def __init__(self, app: ASGIApp, forge: DevForge) -> None:
        self.app = app
        self.forge = forge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.forge.stall and scope["path"].startswith("/api/"):
            await asyncio.sleep(self.forge.stall)
        await self.app(scope, receive, send)


def _git_env() -> dict[str, str]:
    # A clean, predictable git: no user or system config, fixed identity.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_AUTHOR_NAME": "devforge",
        "GIT_AUTHOR_EMAIL": "devforge@devforge.local",
        "GIT_COMMITTER_NAME": "devforge",
        "GIT_COMMITTER_EMAIL": "devforge@devforge.local",
        "LC_ALL": "C",
    }


def _git(args: list[str], *, env: Mapping[str, str] | None = None) -> None:
    subprocess.run(["git", *args], check=True, env=dict(env or _git_env()), capture_output=True, timeout=60)


def _git_out(
    args: list[str], *, env: Mapping[str, str] | None = None, stdin: bytes | None = None, check: bool = True
) -> str:
    proc = subprocess.run(
        ["git", *args], check=check, env=dict(env or _git_env()), input=stdin, capture_output=True, timeout=60
    )
    return proc.stdout.decode().strip() if proc.returncode == 0 else ""


def loopback_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound to ``port`` (default: a free one) on 127.0.0.1, not yet listening."""
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket's proto is IPPROTO_TCP, and without it Nagle plus delayed ACKs add
    # 40 ms to every keep-alive response.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class _NoSignals(uvicorn.Server):
    # Only a process's main server may own SIGINT/SIGTERM.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ServerThread:
    """An ASGI app on 127.0.0.1:<free port>, in a thread with its own event loop.

    For tests, benchmarks and the demo. The port is bound at once; the app may be given
    later, up to ``start()``.
    """

    def __init__(self, app: Any = None, port: int = 0) -> None:
        self.sock = loopback_socket(port)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server: uvicorn.Server | None = None
        self.thread = threading.Thread(target=self._run, name=f"server:{self.port}", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        assert self.server is not None
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # surfaced by start()
            self.error = exc

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.server = server = _NoSignals(uvicorn.Config(self.app, log_config=None, access_log=False))
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not server.started:
            raise RuntimeError(f"server did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=30)


@dataclasses.dataclass
class Seeded:
    forge: DevForge
    admin: UserRec
    bot: UserRec
    member: UserRec
    outsider: UserRec
    org: str
    owner: str
    repo: str


def seed(forge: DevForge, *, org: str = "bot-bottle", owner: str = "alice", repo: str = "demo") -> Seeded:
    """The small world ``forgebottle devforge`` and ``demo`` start from."""
    admin = forge.add_user("root", admin=True)
    member = forge.add_user(owner)
    bot = forge.add_user("bottle-bot")
    outsider = forge.add_user("mallory")
    forge.add_org(org, members=[member.login, bot.login])
    forge.create_repo(
        owner, repo, {"README.md": f"# {repo}\n\nA repository for forgebottle.\n"}, collaborators={bot.login: "admin"}
    )
    return Seeded(forge, admin, bot, member, outsider, org, owner, repo)
