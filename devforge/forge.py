"""``DevForge``: a devforge's world with the setup API tests and the demo drive, which fires
the webhooks a real Gitea would for each change."""

from __future__ import annotations

import re
import secrets
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from starlette.requests import Request

from .api import DevForgeApi
from .ci import CiForge
from .gitcmd import git, git_env, git_out
from .records import (
    CommentRec,
    Delivery,
    DevForgeError,
    HookRec,
    IssueRec,
    LabelRec,
    OrgRec,
    PullRec,
    ReactionRec,
    RepoRec,
    UserRec,
    now,
)
from .webhooks import FLAVORS, Flavor, Outbox

# Gitea's default [ui] REACTIONS.
REACTIONS = ("+1", "-1", "laugh", "hooray", "confused", "heart", "rocket", "eyes")


class DevForge(CiForge):
    """An in-memory Gitea. ``base_url`` is where it is served (set once the port is known).

    ``app`` is its HTTP face (``DevForgeApi``); the methods below change the world directly.
    ``flavor="forgejo"`` makes it send Forgejo's webhook headers instead of Gitea's.
    """

    def __init__(self, root: Path, base_url: str = "http://127.0.0.1:3000/", *, flavor: Flavor = "gitea") -> None:
        super().__init__(root, base_url)
        if flavor not in FLAVORS:
            raise ValueError(f"flavor is one of {FLAVORS}, not {flavor!r}")
        self.flavor = flavor
        self.outbox = Outbox()
        # Failure injection for outage tests: a callable returning a status to answer, or None;
        # and a stall, seconds every API request waits before it is answered.
        self.fault: Callable[[Request], int | None] | None = None
        self.stall = 0.0
        # Called as (owner, repo, branch, sha, pusher) for each branch a push over smart HTTP
        # moved: how a test or the demo runs CI on pushes (see ``scripted_ci``).
        self.on_push: Callable[[str, str, str, str, str], None] | None = None
        self.app = DevForgeApi(self).app

    # -- setup API (also fires webhooks where Gitea would) --------------------------

    def add_user(self, login: str, *, admin: bool = False, token: str | None = None) -> UserRec:
        with self.lock:
            rec = UserRec(self._next_id(), login, token or secrets.token_hex(20), is_admin=admin)
            self.users[login.lower()] = rec
            return rec

    def add_org(self, name: str, members: Iterable[str] = (), *, public: Iterable[str] = ()) -> OrgRec:
        with self.lock:
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
        with self.lock:
            path = self.root / "repos" / owner.lower() / f"{name.lower()}.git"
            path.parent.mkdir(parents=True, exist_ok=True)
            git(["init", "-q", "--bare", f"--initial-branch={default_branch}", str(path)])
            git(["-C", str(path), "config", "http.receivepack", "true"])
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
            env = {**git_env(), "GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if parent:
                git(["-C", git_dir, "read-tree", parent], env=env)
            for path, content in files.items():
                blob = git_out(["-C", git_dir, "hash-object", "-w", "--stdin"], stdin=content.encode())
                git(["-C", git_dir, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}"], env=env)
            tree = git_out(["-C", git_dir, "write-tree"], env=env)
            args = ["-C", git_dir, "commit-tree", tree, "-m", message]
            if parent:
                args += ["-p", parent]
            sha = git_out(args)
        git(["-C", git_dir, "update-ref", f"refs/heads/{branch}", sha])
        return sha

    def add_label(self, owner: str, name: str, label: str, *, color: str = "e11d21", description: str = "") -> LabelRec:
        """The label ``label``, created if the repository has none of that name."""
        with self.lock:
            repo = self.repo(owner, name)
            rec = repo.labels.get(label)
            if rec is None:
                rec = repo.labels[label] = LabelRec(self._next_id(), label, color, description)
            return rec

    def create_label(self, owner: str, name: str, label: str, *, color: str, description: str = "") -> LabelRec:
        """``POST /labels``: Gitea creates a second label of a name it already has."""
        with self.lock:
            repo = self.repo(owner, name)
            if label not in repo.labels:
                return self.add_label(owner, name, label, color=color, description=description)
            rec = LabelRec(self._next_id(), label, color, description)
            repo.duplicate_labels.append(rec)
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
        active: bool = True,
    ) -> HookRec:
        with self.lock:
            hook = HookRec(self._next_id(), url, secret, content_type, frozenset(events), active)
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
        with self.lock:
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
        with self.lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            for label in labels:
                self.add_label(owner, name, label)
            issue.labels = list(labels)
            event = "pull_request_label" if issue.pull else "issue_label"
            action = "label_updated" if issue.labels else "label_cleared"
            if issue.pull is None:
                self._emit(repo, event, self._issue_payload(repo, issue, action, by))

    def assign(self, owner: str, name: str, number: int, assignees: Iterable[str], *, by: str) -> None:
        with self.lock:
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
        with self.lock:
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
        with self.lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            stamp = now()
            rec = CommentRec(self._next_id(), self.user(user).login, body, stamp, stamp)
            issue.comments.append(rec)
            self._comment_event(repo, issue, rec, "created", user)
            return rec

    def edit_comment(self, owner: str, name: str, comment_id: int, body: str, *, user: str) -> CommentRec:
        """A comment's new body, and the ``edited`` webhook with the old one in ``changes``."""
        with self.lock:
            repo = self.repo(owner, name)
            issue, rec = self.comment_by_id(repo, comment_id)
            old, rec.body, rec.updated_at = rec.body, body, now()
            if old != body:
                self._comment_event(repo, issue, rec, "edited", user, changes={"body": {"from": old}})
            return rec

    def _comment_event(
        self,
        repo: RepoRec,
        issue: IssueRec,
        rec: CommentRec,
        action: str,
        user: str,
        changes: dict[str, Any] | None = None,
    ) -> None:
        """IssueCommentPayload: pull_request only on PRs, changes only on an edit."""
        payload: dict[str, Any] = {"action": action, "issue": self.issue_json(repo, issue)}
        if issue.pull is not None:
            payload["pull_request"] = self.pr_json(repo, issue)
        payload["comment"] = self.comment_json(repo, issue, rec)
        if changes:
            payload["changes"] = changes
        payload |= {"repository": self.repo_json(repo, user), "sender": self.user_json(user)}
        payload["is_pull"] = issue.pull is not None
        self._emit(repo, "pull_request_comment" if issue.pull else "issue_comment", payload)

    def react(
        self, owner: str, name: str, *, user: str, content: str, issue: int | None = None, comment_id: int | None = None
    ) -> tuple[ReactionRec, bool]:
        """A reaction on an issue or a comment, and whether it is new (Gitea sends no webhook)."""
        if content not in REACTIONS:
            raise DevForgeError(403, f"'{content[:40]}' is not an allowed reaction")
        with self.lock:
            repo = self.repo(owner, name)
            if comment_id is not None:
                target = self.comment_by_id(repo, comment_id)[1].reactions
            else:
                target = self.issue(owner, name, int(issue or 0)).reactions
            login = self.user(user).login
            for rec in target:
                if rec.user == login and rec.content == content:
                    return rec, False
            rec = ReactionRec(login, content, now())
            target.append(rec)
            return rec, True

    def review(self, owner: str, name: str, number: int, body: str, *, user: str, kind: str = "comment") -> None:
        """A submitted review: ``kind`` is ``comment``, ``approved`` or ``rejected``."""
        with self.lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            if issue.pull is None:
                raise DevForgeError(404, "not a pull request")
            event = f"pull_request_review_{kind}"
            payload = self._pr_payload(repo, issue, "reviewed", user)
            payload["review"] = {"type": event, "content": body}
            payload["requested_reviewer"] = self.user_json(user)
            self._emit(repo, event, payload)

    def create_pr(self, owner: str, name: str, *, head: str, base: str, title: str, body: str, user: str) -> IssueRec:
        with self.lock:
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
        with self.lock:
            repo, issue = self.repo(owner, name), self.issue(owner, name, number)
            if issue.pull is None:
                raise DevForgeError(404, "not found")
            if issue.pull.merged or issue.state != "open":
                raise DevForgeError(405, "The PR is already merged or closed")
            git_dir = str(repo.path)
            base_sha = self.branch_sha(repo, issue.pull.base)
            head_sha = self.branch_sha(repo, issue.pull.head)
            tree = git_out(["-C", git_dir, "merge-tree", "--write-tree", base_sha, head_sha], check=False)
            if not re.fullmatch(r"[0-9a-f]{40}", tree or ""):
                raise DevForgeError(409, "merge conflict")
            sha = git_out(
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
            git(["-C", git_dir, "update-ref", f"refs/heads/{issue.pull.base}", sha])
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

    # -- webhooks -------------------------------------------------------------------

    @property
    def deliveries(self) -> list[Delivery]:
        """Every delivery made so far, oldest first (the status filled in once sent)."""
        return self.outbox.deliveries

    def replay(self, delivery: Delivery) -> Delivery:
        """Gitea's UI Replay: the stored payload again, under a new UUID."""
        return self.outbox.replay(delivery)

    def wait_deliveries(self, timeout: float = 10.0) -> list[Delivery]:
        """Block until every queued webhook was delivered (or failed); return them all."""
        return self.outbox.wait(timeout)

    def close(self) -> None:
        self.outbox.close()
