"""The webhook rules of DESIGN.md §4, as functions: what one event means.

``triage`` decides from the payload alone what can be ignored at intake. ``decide`` reads the
forge and the store and returns one decision; it writes nothing. The service carries the
decision out (``service.py``), in the event's own transaction.

Trust: only events whose sender is an org member or a writer (never the token's own user)
launch or rehydrate anything, and a prompt only ever holds text from such people.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from config import Config
from conversation import CI_FIX, Explanation, clean_lines, fence
from gitea import Forge, ForgeError, ForgeUnavailable, Issue, Job, User
from statemachine import BottleState, branch_for
from store import ForgeState, Store

MAX_PROMPT_PART = 32 * 1024

AGENT_LABEL = "bot-bottle:"
BOTTLE_LABEL = "bot-bottle-bottle:"

# What forgebottle acts on, by X-Gitea-Event-Type and action. Anything else is ignored from the
# payload alone, at intake, without waking the worker.
ACTIONS: dict[str, frozenset[str]] = {
    "issues": frozenset({"opened", "reopened", "edited"}),
    "issue_assign": frozenset({"assigned"}),
    "issue_label": frozenset({"label_updated"}),
    "issue_comment": frozenset({"created"}),
    "pull_request_comment": frozenset({"created"}),
    "pull_request_review_approved": frozenset({"reviewed"}),
    "pull_request_review_rejected": frozenset({"reviewed"}),
    "pull_request_review_comment": frozenset({"reviewed"}),
    "pull_request": frozenset({"opened", "closed"}),
    # CI (§4, §12): a status has no action; jobs and runs count once completed.
    "status": frozenset(),
    "workflow_job": frozenset({"completed"}),
    "workflow_run": frozenset({"completed"}),
}
CI_EVENTS = frozenset({"status", "workflow_job", "workflow_run"})
CI_FAILED = frozenset({"failure", "error"})
CI_PROMPT = "ci"
CI_LOG_LINES = 40  # the pending prompt's trigger: a newer failure replaces a waiting one
LAUNCH_EVENTS = frozenset({"issues", "issue_assign", "issue_label"})
VERDICTS = {
    "pull_request_review_approved": "Approval",
    "pull_request_review_rejected": "Changes requested",
    "pull_request_review_comment": "Review",
}
WRITE_PERMISSIONS = frozenset({"write", "admin", "owner"})


# -- decisions ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ignore:
    reason: str
    slug: str = ""
    explain: Explanation | None = None  # said on the issue once (a trusted sender's labelled issue)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Queue a new bottle for an issue, with its first prompt."""

    owner: str
    repo: str
    issue: int
    agent: str
    bottles: tuple[str, ...]
    trigger: str
    prompt: str
    issue_url: str
    source: str
    seen_comment_id: int = 0


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A trusted comment for a live bottle: rehydrates it, or waits while it runs."""

    slug: str
    trigger: str
    source: str
    body: str
    reason: str
    react_issue: int = 0  # what to react eyes to: the comment, else this issue or PR
    react_comment: int = 0


@dataclasses.dataclass(frozen=True)
class CiFailure:
    """A failed check on the head of a bottle's PR (or branch): one fix attempt for ``sha``,
    counted per bottle (its issue)."""

    slug: str
    issue: int
    sha: str
    source: str
    body: str
    reason: str
    note: str = ""  # for the status comment


@dataclasses.dataclass(frozen=True)
class CiNote:
    """What CI says of a PR the bot tried to fix, for the status comment: passing again, or
    failing with no fix attempt left."""

    slug: str
    sha: str
    note: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Link:
    slug: str
    pr: int
    url: str


@dataclasses.dataclass(frozen=True)
class Destroy:
    slug: str
    reason: str


Decision = Ignore | Launch | Prompt | Link | Destroy | CiFailure | CiNote


# -- reading untrusted payloads ---------------------------------------------------------


def triage(event_type: str, payload: Mapping[str, Any]) -> str | None:
    """Why this event can be ignored without looking further, or None if it needs deciding."""
    actions = ACTIONS.get(event_type)
    if actions is None:
        return f"event type {event_type!r} is not one forgebottle acts on"
    if event_type in CI_EVENTS:
        return triage_ci(event_type, payload)
    action = payload.get("action")
    if not isinstance(action, str) or action not in actions:
        return f"{event_type} action {str(action)[:64]!r} is not one forgebottle acts on"
    return None


def triage_ci(event_type: str, payload: Mapping[str, Any]) -> str | None:
    """Only a failure or a success of a check can matter; pending and running never do."""
    if event_type == "status":
        state = text(payload, "state")
        if state not in CI_FAILED and state != "success":
            return f"status {state[:32]!r} is neither a failure nor a success"
        return None
    action = text(payload, "action")
    if action not in ACTIONS[event_type]:
        return f"{event_type} action {action[:64]!r} is not one forgebottle acts on"
    conclusion = text(obj(payload, event_type), "conclusion")
    if conclusion not in ("failure", "success"):
        return f"{event_type} concluded {conclusion[:32]!r}, neither a failure nor a success"
    return None


@dataclasses.dataclass(frozen=True)
class Check:
    """One CI result from a ``status``, ``workflow_job`` or ``workflow_run`` payload."""

    sha: str
    name: str
    failed: bool
    url: str = ""
    description: str = ""
    job_id: int = 0
    run_id: int = 0
    pr: int = 0
    branch: str = ""


def ci_check(kind: str, payload: Mapping[str, Any]) -> Check | None:
    if kind == "status":
        sha, state = text(payload, "sha"), text(payload, "state")
        check = Check(
            sha,
            text(payload, "context") or "status",
            state in CI_FAILED,
            text(payload, "target_url"),
            text(payload, "description"),
        )
    else:
        entity = obj(payload, kind)
        job = kind == "workflow_job"
        check = Check(
            text(entity, "head_sha"),
            text(entity, "name") if job else text(obj(payload, "workflow"), "name") or "workflow",
            text(entity, "conclusion") == "failure",
            text(entity, "html_url"),
            job_id=number(entity, "id") if job else 0,
            run_id=number(entity, "run_id" if job else "id"),
            pr=number(obj(payload, "pull_request"), "number"),
            branch=text(entity, "head_branch"),
        )
    return check if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", check.sha) else None


def plain(value: str, limit: int = 200) -> str:
    """Forge text for one line of a prompt or comment: no controls, no backticks to break out
    of code, no angle brackets to forge a marker such as the status comment's."""
    return " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f`<>]", " ", value).split())[:limit]


def obj(data: Any, key: str) -> dict[str, Any]:
    """``data[key]`` if both are JSON objects, else {}: payloads are untrusted input."""
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def text(data: Any, key: str) -> str:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) else ""


def number(data: Any, key: str) -> int:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31 else 0


def labelled(names: Sequence[str], prefix: str) -> list[str]:
    """What follows ``prefix`` in the labels that have it: agents for ``bot-bottle:``."""
    return [name.removeprefix(prefix) for name in names if name.startswith(prefix)]


def cap(body: str, limit: int = MAX_PROMPT_PART) -> str:
    raw = body.encode(errors="replace")
    if len(raw) <= limit:
        return body
    return raw[:limit].decode(errors="ignore") + f"\n\n[truncated: {len(raw) - limit} more bytes]"


# -- the rules ----------------------------------------------------------------------------


@dataclasses.dataclass
class Rules:
    """§4 against one forge and one store. ``bot`` is the token's own user, once known."""

    config: Config
    forge: Forge
    store: Store
    bot: User | None = None

    def is_bot(self, login: str) -> bool:
        return self.bot is not None and login.lower() == self.bot.login.lower()

    async def decide(self, event_type: str, payload: Mapping[str, Any]) -> Decision:
        reason = triage(event_type, payload)
        if reason is not None:
            return Ignore(reason)
        repo = obj(payload, "repository")
        owner, name = text(obj(repo, "owner"), "login"), text(repo, "name")
        if not owner or not name:
            return Ignore("payload names no repository")
        sender = text(obj(payload, "sender"), "login")
        if event_type in CI_EVENTS:
            return await self.on_ci(event_type, owner, name, payload)
        if event_type in LAUNCH_EVENTS:
            return await self.on_issue(event_type, owner, name, payload, sender)
        if event_type == "pull_request":
            return self.on_pull_request(owner, name, payload, sender)
        return await self.on_comment(event_type, owner, name, payload, sender)

    async def is_member(self, user: str) -> bool:
        return await self.forge.is_org_member(self.config.org, user)

    async def trusted(self, owner: str, repo: str, user: str) -> bool:
        """An org member or a writer on the repository; never the token's own user."""
        if not user or self.is_bot(user):
            return False
        if await self.is_member(user):
            return True
        try:
            return await self.forge.permission(owner, repo, user) in WRITE_PERMISSIONS
        except ForgeUnavailable:
            raise
        except ForgeError:
            return False

    async def on_issue(self, kind: str, owner: str, repo: str, payload: Mapping[str, Any], sender: str) -> Decision:
        issue_number = number(obj(payload, "issue"), "number") or number(payload, "number")
        if not issue_number:
            return Ignore("payload names no issue")
        if self.is_bot(sender):
            return Ignore(f"sent by forgebottle's own user {sender}")
        # The payload may be a replay of an old state: decide on the issue as it is now.
        issue = await self.forge.read_issue(owner, repo, issue_number)
        refusal = self.refusal(owner, repo, issue)
        if refusal is not None:
            # Outsiders' events never make the bot speak.
            if refusal.explain is not None and not await self.trusted(owner, repo, sender):
                return dataclasses.replace(refusal, explain=None)
            return refusal
        agent = labelled(issue.labels, AGENT_LABEL)[0]
        bottles = labelled(issue.labels, BOTTLE_LABEL)[:1] or ["local"]
        # Who asked matters as much as what the issue says: an outsider who edits and reopens
        # a closed issue must not start an agent on her text.
        # The sender's trust and the assignees' membership are independent reads: made together.
        trusted, flags = await asyncio.gather(
            self.trusted(owner, repo, sender), asyncio.gather(*(self.is_member(a) for a in issue.assignees))
        )
        if not trusted:
            return Ignore(
                f"{sender or 'nobody'} is neither a member of {self.config.org} nor a writer on {owner}/{repo}"
            )
        members = [a for a, member in zip(issue.assignees, flags, strict=True) if member]
        if not members:
            who = ", ".join(issue.assignees) or "nobody"
            org = self.config.org
            why = f"no assignee is a member of `{org}` (assigned: {who}); assign the issue to a member."
            return Ignore(
                f"issue #{issue.number} is assigned to {who}; none is a member of {org}",
                explain=Explanation(owner, repo, issue.number, "no-member", why),
            )
        prompt, seen = await self.snapshot(owner, repo, issue)
        return Launch(
            owner,
            repo,
            issue.number,
            agent=agent,
            bottles=tuple(bottles),
            trigger=kind,
            prompt=prompt,
            issue_url=issue.html_url,
            source=f"issue #{issue.number} (assigned to {members[0]}, by {sender})",
            seen_comment_id=seen,
        )

    def refusal(self, owner: str, repo: str, issue: Issue) -> Ignore | None:
        """Why this issue, as it is, cannot launch a bottle (from its labels and the store)."""
        if issue.is_pull:
            return Ignore(f"#{issue.number} is a pull request")
        if issue.state != "open":
            return Ignore(f"issue #{issue.number} is {issue.state}")
        agents = sorted(set(labelled(issue.labels, AGENT_LABEL)))
        if not agents:
            return Ignore(f"issue #{issue.number} has no bot-bottle:<agent> label")
        if len(agents) > 1:
            return Ignore(f"issue #{issue.number} names several agents: {', '.join(agents)}")
        agent = agents[0]
        if agent not in self.config.agents:
            configured = ", ".join(sorted(self.config.agents)) or "none"
            why = f"agent `{plain(agent, 64)}` is not configured; configured: {configured}."
            return Ignore(
                f"agent {agent!r} is not configured; configured: {configured}",
                explain=Explanation(owner, repo, issue.number, f"agent:{plain(agent, 64)}", why),
            )
        for bottle in labelled(issue.labels, BOTTLE_LABEL)[:1]:
            if bottle not in self.config.bottles:
                return Ignore(f"bottle {bottle!r} is not configured")
        existing = self.store.get(owner, repo, issue.number)
        if existing is not None and existing.status.live:
            explain = None
            if existing.agent_name != agent:
                # The same agent's label again is Gitea's echo of the launch: nothing to say.
                why = (
                    f"bottle `{existing.slug}` (agent `{existing.agent_name}`) is already {existing.status.value} "
                    f"for this issue; `bot-bottle:{plain(agent, 64)}` can start once its pull request is closed."
                )
                explain = Explanation(owner, repo, issue.number, f"live:{existing.slug}:{plain(agent, 64)}", why)
            return Ignore(f"bottle {existing.slug} is already {existing.status.value}", existing.slug, explain)
        return None

    async def snapshot(self, owner: str, repo: str, issue: Issue) -> tuple[str, int]:
        """The trusted prompt: title, body, and comments by org members only; and the id of
        the newest comment read (its own webhook must not deliver it again)."""
        parts = [f"# {issue.title}", "", cap(issue.body)]
        found = await self.forge.read_comments(owner, repo, issue.number)
        authors = sorted({c.user for c in found})
        flags: Sequence[bool] = await asyncio.gather(*(self.is_member(a) for a in authors))
        trusted = dict(zip(authors, flags, strict=True))
        comments = [f"### Comment by @{c.user} ({c.created_at})\n\n{cap(c.body)}" for c in found if trusted[c.user]]
        if comments:
            parts += ["", "## Comments", "", *comments]
        return "\n".join(parts), max((c.id for c in found), default=0)

    async def on_comment(self, kind: str, owner: str, repo: str, payload: Mapping[str, Any], sender: str) -> Decision:
        if kind.startswith("pull_request_review_"):
            target = number(obj(payload, "pull_request"), "number")
            body = text(obj(payload, "review"), "content")
            comment_id = 0
        else:
            target = number(obj(payload, "issue"), "number")
            comment = obj(payload, "comment")
            body = text(comment, "body")
            comment_id = number(comment, "id")
        if not target:
            return Ignore("payload names no issue or pull request")
        state = self.store.by_pr(owner, repo, target) or self.store.get(owner, repo, target)
        if state is None or not state.status.live:
            return Ignore(f"no live bottle for #{target}")
        if self.is_bot(sender):
            return Ignore(f"comment by forgebottle's own user {sender}", state.slug)
        if comment_id and target == state.issue_number and comment_id <= state.seen_comment_id:
            # Posted before the launch but delivered after it: the launch prompt has it already.
            return Ignore(f"comment {comment_id} is already in the launch prompt", state.slug)
        if not await self.trusted(owner, repo, sender):
            return Ignore(
                f"{sender} is neither a member of {self.config.org} nor a writer on {owner}/{repo}", state.slug
            )
        verdict = VERDICTS.get(kind, "Comment")
        if not body.strip():
            if kind == "pull_request_review_approved":
                return Ignore("approval without a comment", state.slug)
            body = "(no text)"
        where = (
            "rehydrate queued"
            if state.status is BottleState.FROZEN
            else f"kept as a pending prompt (bottle is {state.status.value})"
        )
        return Prompt(
            state.slug,
            trigger=kind,
            source=f"{kind} {comment_id} by {sender}" if comment_id else f"{kind} by {sender}",
            body=f"### {verdict} from @{sender} on #{target}\n\n{cap(body)}",
            reason=f"{where}: {verdict.lower()} by {sender} on #{target}",
            react_issue=target,
            react_comment=comment_id,
        )

    def on_pull_request(self, owner: str, repo: str, payload: Mapping[str, Any], sender: str) -> Decision:
        pr = obj(payload, "pull_request")
        pr_number = number(pr, "number") or number(payload, "number")
        if not pr_number:
            return Ignore("payload names no pull request")
        action = text(payload, "action")
        if action == "opened":
            return self.link(owner, repo, pr, pr_number, sender)
        # closed (triage lets nothing else through): only the PR linked to a bottle counts.
        state = self.store.by_pr(owner, repo, pr_number)
        if state is None or not state.status.live:
            return Ignore(f"no live bottle for pull request #{pr_number}")
        how = "merged" if pr.get("merged") is True else "closed"
        return Destroy(state.slug, f"pull request #{pr_number} {how}")

    def link(self, owner: str, repo: str, pr: Mapping[str, Any], pr_number: int, sender: str) -> Decision:
        """Link a PR only when forgebottle opened it from the bottle's branch in the same
        repository: anyone can open a PR from a fork branch named ``bot-bottle/issue-N``, and
        closing a linked PR destroys the bottle."""
        head = obj(pr, "head")
        ref = text(head, "ref")
        match = re.fullmatch(r"bot-bottle/issue-(\d+)", ref)
        if not match:
            return Ignore(f"pull request #{pr_number} is not from a bot-bottle branch")
        head_repo = text(obj(head, "repo"), "full_name")
        if head_repo.lower() != f"{owner}/{repo}".lower():
            return Ignore(
                f"pull request #{pr_number} comes from {head_repo or 'another repository'}, not {owner}/{repo}"
            )
        if not self.is_bot(sender):
            return Ignore(f"pull request #{pr_number} was opened by {sender or 'nobody'}, not by forgebottle")
        state = self.store.get(owner, repo, int(match.group(1)))
        if state is None or not state.status.live:
            return Ignore(f"no live bottle for branch {ref}")
        if state.pr_number == pr_number:
            return Ignore(f"pull request #{pr_number} is already linked to {state.slug}", state.slug)
        return Link(state.slug, pr_number, text(pr, "html_url"))

    # -- CI (§4, §12) ----------------------------------------------------------------------

    async def on_ci(self, kind: str, owner: str, repo: str, payload: Mapping[str, Any]) -> Decision:
        """A failure on the head of a bottle's PR (its branch, before the PR is open) asks it
        for a fix; a success after a fix is noted. CI events may come from anyone (they are the
        forge's); only the bottle's own branch counts."""
        limit = self.config.ci_max_fix_attempts
        if limit <= 0:
            return Ignore("the CI loop is off (ci.max_fix_attempts = 0)")
        check = ci_check(kind, payload)
        if check is None:
            return Ignore(f"{kind} names no commit")
        sha = check.sha[:12]
        found = await self.bottle_for(owner, repo, check)
        if found is None:
            return Ignore(f"CI on {sha}: no live bottle's branch has this commit")
        state, head = found
        branch = branch_for(state.issue_number)
        if head != check.sha:
            return Ignore(
                f"CI on {sha} is for an old commit of {branch} (its head is {head[:12] or 'gone'})", state.slug
            )
        tried = self.store.noted_keys(owner, repo, state.issue_number, CI_FIX)
        if not check.failed:
            if not tried or check.sha in tried:
                return Ignore(f"CI passed on {sha}: no fix to note", state.slug)
            n = len(tried)
            note = f"passing on `{sha}` after {n} fix attempt{'s' if n > 1 else ''}."
            return CiNote(state.slug, check.sha, note, f"CI passed on {sha} after a fix ({state.slug})")
        if check.sha in tried:
            return Ignore(f"CI failure on {sha} was already sent to {state.slug}", state.slug)
        if len(tried) >= limit:
            return CiNote(
                state.slug,
                check.sha,
                f"`{plain(check.name)}` failed on `{sha}`; the {limit} fix attempt(s) are used up: over to a human.",
                f"CI failed on {sha} but {state.slug} has had its {limit} fix attempt(s) (ci.max_fix_attempts)",
            )
        job = await self.failed_job(owner, repo, check)
        lines: list[str] = []
        if job is not None:
            try:
                raw = await self.forge.job_log_tail(owner, repo, job.id, lines=CI_LOG_LINES)
            except ForgeUnavailable:
                raise
            except ForgeError:
                raw = []
            lines = clean_lines(raw, self.config.secrets(), limit=CI_LOG_LINES)
        name = plain(job.name if job is not None and job.name else check.name)
        url = check.url or (job.html_url if job is not None else "")
        attempt = len(tried) + 1
        where = f"your pull request #{state.pr_number}" if state.pr_number else f"your branch {branch}"
        said = f" It says: {plain(check.description)}" if check.description else ""
        parts = [f"### CI failed on {where}", "", f"The check `{name}` failed on `{sha}`, the head of {branch}.{said}"]
        if url:
            parts.append(f"Details: {plain(url, 500)}")
        if job is not None:
            parts += ["", f"The last lines of its log (job {job.id}; `forge job-log {job.id}` shows more):", ""]
            parts.append(fence(lines) if lines else "(the log is empty)")
        parts += ["", f"Fix it, push, and finish with `forge done` (fix attempt {attempt} of {limit})."]
        queued = "rehydrate queued" if state.status is BottleState.FROZEN else "kept as the pending CI prompt"
        return CiFailure(
            state.slug,
            state.issue_number,
            check.sha,
            source=f"{kind} {name} failed on {sha}",
            body="\n".join(parts),
            reason=f"{queued}: {name} failed on {sha} (fix attempt {attempt} of {limit} for {state.slug})",
            note=f"`{name}` failed on `{sha}`; fix attempt {attempt} of {limit}.",
        )

    async def head_of(self, state: ForgeState) -> str:
        """The commit CI must be about: the PR's head, or the branch's before the PR is open."""
        if state.pr_number:
            return (await self.forge.read_pr(state.owner, state.repo, state.pr_number)).head_sha
        return await self.forge.branch_sha(state.owner, state.repo, branch_for(state.issue_number)) or ""

    async def bottle_for(self, owner: str, repo: str, check: Check) -> tuple[ForgeState, str] | None:
        """The live bottle the check is about and its head: named by the payload's PR or branch,
        or (a status names neither) the one whose head, or an earlier failing head, is the
        check's commit."""
        state: ForgeState | None = None
        match = re.fullmatch(r"bot-bottle/issue-(\d+)", check.branch)
        if check.pr:
            state = self.store.by_pr(owner, repo, check.pr)
        elif match:
            state = self.store.get(owner, repo, int(match.group(1)))
        else:
            for candidate in self.store.all(live_only=True):
                if (candidate.owner, candidate.repo) != (owner, repo):
                    continue
                head = await self.head_of(candidate)
                # An old commit is known by the fix it already asked for.
                if check.sha in (head, *self.store.noted_keys(owner, repo, candidate.issue_number, CI_FIX)):
                    return candidate, head
            return None
        if state is None or not state.status.live:
            return None
        return state, await self.head_of(state)

    async def failed_job(self, owner: str, repo: str, check: Check) -> Job | None:
        """The Actions job behind a failed check, if it is one (for its log)."""
        if check.job_id:
            return await self.forge.job(owner, repo, check.job_id)
        try:
            jobs = await self.forge.workflow_jobs(owner, repo, check.sha)
        except ForgeUnavailable:
            raise
        except ForgeError:
            return None  # a forge without Actions: statuses only
        for job in jobs:
            if check.run_id and job.run_id == check.run_id and job.failed:
                return job
            if check.url and job.html_url == check.url:
                return job
        return None

    async def operator_launch(
        self, owner: str, repo: str, issue_number: int, agent: str, bottles: Sequence[str], extra: str
    ) -> Launch:
        """``orchestrate start``: the operator is trusted; the issue is read as it is now."""
        issue = await self.forge.read_issue(owner, repo, issue_number)
        prompt, seen = await self.snapshot(owner, repo, issue)
        if extra:
            prompt += f"\n\n## Instructions from the operator\n\n{cap(extra)}"
        return Launch(
            owner,
            repo,
            issue_number,
            agent=agent,
            bottles=tuple(bottles) or ("local",),
            trigger="orchestrate start",
            prompt=prompt,
            issue_url=issue.html_url,
            source="orchestrate start",
            seen_comment_id=seen,
        )
