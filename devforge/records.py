"""The records devforge keeps in memory, and the one error it raises inside."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class DevForgeError(Exception):
    """A refusal with the HTTP status Gitea answers it with (mapped to a body by the API)."""

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
class ReactionRec:
    user: str
    content: str
    created_at: str


@dataclasses.dataclass
class CommentRec:
    id: int
    user: str
    body: str
    created_at: str
    updated_at: str
    reactions: list[ReactionRec] = dataclasses.field(default_factory=list)


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
    reactions: list[ReactionRec] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class HookRec:
    id: int
    url: str
    secret: str
    content_type: str = "json"
    events: frozenset[str] = frozenset({"issues", "pull_request"})
    active: bool = True
    created_at: str = dataclasses.field(default_factory=now)


@dataclasses.dataclass
class LabelRec:
    id: int
    name: str
    color: str = "e11d21"
    description: str = ""


@dataclasses.dataclass
class StatusRec:
    """A commit status, as ``POST /statuses/{sha}`` (or an Actions job) records it."""

    id: int
    sha: str
    state: str
    context: str
    description: str
    target_url: str
    creator: str
    created_at: str


@dataclasses.dataclass
class JobRec:
    """An Actions job: ``status`` queued/in_progress/completed, ``conclusion`` once completed."""

    id: int
    run_id: int
    index: int  # its place in the run, as the web UI's /jobs/<index> counts
    name: str
    conclusion_when_done: str
    log: bytes
    created_at: str
    status: str = "queued"
    conclusion: str = ""
    started_at: str = ""
    completed_at: str = ""


@dataclasses.dataclass
class RunRec:
    """An Actions workflow run of ``workflow`` (a file under .gitea/workflows) at ``head_sha``."""

    id: int
    workflow: str
    title: str
    head_sha: str
    head_branch: str
    event: str
    actor: str
    created_at: str
    jobs: list[JobRec] = dataclasses.field(default_factory=list)
    pull_number: int | None = None
    status: str = "queued"
    conclusion: str = ""
    started_at: str = ""
    completed_at: str = ""


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
    duplicate_labels: list[LabelRec] = dataclasses.field(default_factory=list)  # Gitea allows them
    hooks: list[HookRec] = dataclasses.field(default_factory=list)
    statuses: list[StatusRec] = dataclasses.field(default_factory=list)
    runs: list[RunRec] = dataclasses.field(default_factory=list)

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
