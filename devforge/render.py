"""JSON as Gitea 1.26 renders it: the API's bodies and the webhooks' payloads, quirks included."""

from __future__ import annotations

from typing import Any

from .records import CommentRec, IssueRec, OrgRec, RepoRec
from .world import World


class GiteaJson(World):
    """The world, rendered: every ``*_json`` is what Gitea's API answers for that record."""

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
