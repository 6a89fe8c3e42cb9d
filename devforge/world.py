"""The in-memory world of a devforge: users, orgs, repositories, and who may do what there."""

from __future__ import annotations

import threading
from pathlib import Path

from .gitcmd import git_out
from .records import CommentRec, DevForgeError, IssueRec, OrgRec, RepoRec, UserRec


class World:
    """What a devforge knows. ``base_url`` is where it is served (set once the port is known).

    One re-entrant lock guards it all: the API's handlers run on the server's event loop while
    tests and the demo change the world from their own threads.
    """

    def __init__(self, root: Path, base_url: str = "http://127.0.0.1:3000/") -> None:
        self.root = Path(root)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.domain = "devforge.local"
        self.lock = threading.RLock()
        self._ids = 0
        self.users: dict[str, UserRec] = {}
        self.orgs: dict[str, OrgRec] = {}
        self.repos: dict[tuple[str, str], RepoRec] = {}

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    # -- lookups ---------------------------------------------------------------------

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

    def comment_by_id(self, repo: RepoRec, comment_id: int) -> tuple[IssueRec, CommentRec]:
        for issue in repo.issues.values():
            for rec in issue.comments:
                if rec.id == comment_id:
                    return issue, rec
        raise DevForgeError(404, "not found")

    def branch_sha(self, repo: RepoRec, branch: str) -> str:
        return git_out(["-C", str(repo.path), "rev-parse", "--verify", "-q", f"refs/heads/{branch}"], check=False)

    def heads(self, repo: RepoRec) -> dict[str, str]:
        """Every branch and the commit it points at."""
        out = git_out(
            ["-C", str(repo.path), "for-each-ref", "--format=%(refname:lstrip=2) %(objectname)", "refs/heads"]
        )
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    def read_file(self, owner: str, name: str, ref: str, path: str) -> str:
        return git_out(["-C", str(self.repo(owner, name).path), "show", f"{ref}:{path}"])

    # -- permissions -----------------------------------------------------------------

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
