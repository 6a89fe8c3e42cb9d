"""The conversation on the forge (DESIGN.md §12): what the bot says where people look.

* an ``eyes`` reaction on what triggered a launch or a rehydrate;
* one status comment per bottle (marker ``<!-- forgebottle:status <slug> -->``), edited as the
  bottle moves, at most once per ``status_edit_interval`` per bottle, the last state always
  landing; its id is kept in the store, and found again by its marker (the bot's own comments
  only) if the store lost it, so it is never posted twice;
* one explanation per issue and reason when a labelled issue is not launched or a run fails to
  start.

What goes into a comment is chosen here, never copied from the provenance record: no
operation, host, token count or hash (bar the opt-in anchor). A forge error here never breaks a
run: it is logged and the bottle goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

from config import Config, redact
from gitea import Forge, ForgeError, ForgeNotFound, ScopedForge
from statemachine import BottleState, branch_for
from store import ForgeState, Operation, Store, genesis

log = logging.getLogger("forgebottle.conversation")

STATUS = "status"  # conversation kinds in the store
PROGRESS = "progress"
CI_NOTE = "ci-note"
ANCHOR = "anchor"
PUSHED = "pushed"
EXPLAINED = "explained"
CI_FIX = "ci-fix"

MAX_PROGRESS_BYTES = 16 * 1024
ANCHOR_TITLE = "Provenance chain head at each freeze (`forgebottle provenance --verify` checks the record against it):"
_ANCHOR_LINE = re.compile(r"^- run (\d{1,9}): `([0-9a-f]{64})`$", re.MULTILINE)
MAX_SUMMARY_CHARS = 500
LOG_LINES = 40
MAX_LOG_LINE = 300
# ANSI escape sequences (CSI, OSC) and the other C0/C1 controls but tab: a job log is raw
# terminal output, and a comment or prompt wants plain text.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# How a missing agent binary shows at start: bwrap's execvp, a shell's 127, Python's ENOENT.
_NOT_FOUND = (
    re.compile(r"execvp (\S{1,200}): No such file or directory"),
    re.compile(r"(?:^|: )(\S{1,200}): (?:command )?not found\s*$", re.MULTILINE),
)


def marker(slug: str) -> str:
    return f"<!-- forgebottle:status {slug} -->"


def clean_lines(lines: Sequence[str], secrets: Sequence[str], *, limit: int = LOG_LINES) -> list[str]:
    """The last ``limit`` lines as plain text: no escape sequences or controls, each line
    bounded, every forgebottle secret redacted."""
    out = []
    for line in list(lines)[-max(1, limit) :]:
        plain = _CONTROL.sub("", _ANSI.sub("", line.split("\r")[-1]))
        plain = plain.encode("utf-8", "replace").decode("utf-8", "replace")
        out.append(redact(plain[:MAX_LOG_LINE], secrets))
    return out


def fence(lines: Sequence[str]) -> str:
    """``lines`` in a code block no line of theirs can close."""
    longest = max((len(m) for line in lines for m in re.findall(r"`{3,}", line)), default=2)
    ticks = "`" * (longest + 1)
    return f"{ticks}\n" + "\n".join(lines) + f"\n{ticks}"


def missing_command(log_text: str) -> str | None:
    """The command a run's log says could not be found, if that is how it ended."""
    for pattern in _NOT_FOUND:
        match = pattern.search(log_text)
        if match:
            return _CONTROL.sub("", match.group(1)).strip("'\"`")[:100] or None
    return None


def one_line(text: str, limit: int = MAX_SUMMARY_CHARS) -> str:
    flat = " ".join(_CONTROL.sub(" ", text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Why a labelled issue got no agent, said once per issue and ``key``."""

    owner: str
    repo: str
    issue: int
    key: str
    text: str


class Conversation:
    """The bot's voice on the forge, for one service."""

    def __init__(self, config: Config, forge: Forge, store: Store) -> None:
        self.config = config
        self.forge = forge
        self.store = store
        self._dirty: set[str] = set()
        self._flushers: dict[str, asyncio.Task[None]] = {}
        self._last_edit: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    # -- plumbing ------------------------------------------------------------------------

    def _background(self, what: str, slug: str, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(self._safely(what, slug, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _safely(self, what: str, slug: str, work: Awaitable[Any]) -> Any:
        try:
            return await work
        except ForgeError as exc:
            detail = redact(str(exc), self.config.secrets())
            log.warning("%s: could not %s on the forge: %s", slug or "-", what, detail, extra={"slug": slug})
        except Exception:  # the conversation never breaks a run
            log.exception("%s: could not %s", slug or "-", what, extra={"slug": slug})
        return None

    async def close(self) -> None:
        """Land every edit still waiting (at once, not after the interval), then return."""
        self._closing.set()
        waiting = [*self._flushers.values(), *self._tasks]
        if waiting:
            await asyncio.wait(waiting, timeout=2 * self.config.forge_timeout)

    # -- acknowledge -----------------------------------------------------------------------

    def acknowledge(self, owner: str, repo: str, *, issue: int = 0, comment_id: int = 0, slug: str = "") -> None:
        """React ``eyes`` to what triggered a launch or rehydrate (a comment, else the issue)."""
        if comment_id:
            work = self.forge.add_reaction(owner, repo, comment_id=comment_id, content="eyes")
        elif issue:
            work = self.forge.add_reaction(owner, repo, issue=issue, content="eyes")
        else:
            return
        self._background("react", slug, work)

    # -- the status comment ----------------------------------------------------------------

    def touch(self, slug: str) -> None:
        """The bottle moved: its status comment is edited, debounced."""
        self._dirty.add(slug)
        task = self._flushers.get(slug)
        if task is None or task.done():
            self._flushers[slug] = asyncio.ensure_future(self._flush(slug))

    async def _flush(self, slug: str) -> None:
        interval = self.config.status_edit_interval
        while slug in self._dirty:
            wait = self._last_edit.get(slug, float("-inf")) + interval - time.monotonic()
            if wait > 0 and not self._closing.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), wait)
            self._dirty.discard(slug)
            await self._safely("edit the status comment", slug, self.publish(slug))
            self._last_edit[slug] = time.monotonic()

    def _key(self, state: ForgeState) -> tuple[str, str, int]:
        return state.owner, state.repo, state.issue_number

    async def publish(self, slug: str) -> str:
        """Post or edit the status comment as the bottle is now; its URL."""
        state = self.store.by_slug(slug)
        if state is None:
            return ""
        async with self._locks[slug]:
            body = self.render(state)
            kept = self.store.noted(*self._key(state), STATUS, slug)
            known = json.loads(kept) if kept else {}
            comment = None
            if known.get("id"):
                with contextlib.suppress(ForgeNotFound):  # deleted by a person: post it again
                    comment = await self.forge.edit_comment(state.owner, state.repo, int(known["id"]), body)
            if comment is None:
                found = await self.forge.find_comment(state.owner, state.repo, state.issue_number, marker(slug))
                if found is not None:
                    comment = await self.forge.edit_comment(state.owner, state.repo, found.id, body)
                else:
                    comment = await self.forge.post_comment(state.owner, state.repo, state.issue_number, body)
                value = json.dumps({"id": comment.id, "url": comment.html_url})
                self.store.note(*self._key(state), STATUS, slug, value, at=_now())
            return comment.html_url or str(known.get("url") or "")

    def render(self, state: ForgeState) -> str:
        """The status comment: state, run, progress, PR, last outcome, CI, link. Nothing else."""
        key = self._key(state)
        runs = self.store.runs(state.slug)
        last = runs[-1] if runs else None
        status = state.status.value
        lines = [marker(state.slug), f"**forgebottle** · bottle `{state.slug}` · **{status}**"]
        if last is not None:
            lines[-1] += f" · run {last['n']}"
        progress = self.store.noted(*key, PROGRESS, state.slug)
        if progress:
            lines += ["", "**Progress**", "", progress]
        if state.pr_number:
            # The forge links #N itself.
            lines += ["", f"**Pull request:** #{state.pr_number}"]
        outcome = self.outcome(state, last)
        if outcome:
            lines += ["", f"**Last run:** {outcome}"]
        ci = self.store.noted(*key, CI_NOTE, state.slug)
        if ci:
            lines += ["", f"**CI:** {ci}"]
        anchors = self.anchors(state)
        if anchors:
            lines += ["", ANCHOR_TITLE, ""] + [f"- run {n}: `{head}`" for n, head in anchors]
        if self.config.public_url:
            lines += ["", f"[This bottle on forgebottle]({self.config.public_url}/bottles/{state.slug})"]
        return "\n".join(lines) + "\n"

    def outcome(self, state: ForgeState, run: dict[str, Any] | None) -> str:
        if run is None or (run["ended_at"] is None and state.status is BottleState.RUNNING):
            return ""
        n = run["n"]
        if run.get("error") == "orchestrator restarted":
            return f"run {n} was interrupted: forgebottle restarted."
        if run.get("error"):
            return f"run {n} could not start; the operator's log says why."
        if run.get("watchdog_fired"):
            return f"run {n} was stopped by the watchdog (no activity, or past its time limit)."
        if budget_ran_out(self.store.operations(state.slug), n):
            return f"run {n} was stopped: its token budget ran out."
        if run.get("signalled_status"):
            summary = one_line(redact(str(run.get("signalled_summary") or ""), self.config.secrets()))
            return f"run {n} ended: **{run['signalled_status']}**: {summary}"
        if run["ended_at"] is None:
            return f"run {n} was interrupted."
        transitions = self.store.transitions(state.slug)
        if transitions and transitions[-1]["reason"] == "orchestrator stopped":
            return f"run {n} was stopped: forgebottle stopped."
        return f"run {n}: the agent exited (code {run['exit_code']}) without saying it was done."

    async def progress(self, state: ForgeState, body: str) -> str:
        """The agent's ``update_progress``: kept, then shown (debounced); the comment's URL."""
        self.store.note(*self._key(state), PROGRESS, state.slug, body, at=_now())
        kept = self.store.noted(*self._key(state), STATUS, state.slug)
        if not kept:
            return await self.publish(state.slug)
        self.touch(state.slug)
        return str(json.loads(kept).get("url") or "")

    def note_ci(self, state: ForgeState, text: str) -> None:
        self.store.note(*self._key(state), CI_NOTE, state.slug, text, at=_now())
        self.touch(state.slug)

    def anchor(self, state: ForgeState) -> None:
        """``provenance.anchor = "forge"``: at a freeze, the chain head after that run goes into
        the status comment, so a copy lives off this host."""
        last = self.store.last_run(state.slug)
        if self.config.anchor == "forge" and last is not None:
            head = state.chain_head or genesis(state.slug)
            self.store.note(*self._key(state), ANCHOR, f"{state.slug}#{last['n']}", head, at=_now())

    def anchors(self, state: ForgeState) -> list[tuple[int, str]]:
        prefix = f"{state.slug}#"
        keys = [k for k in self.store.noted_keys(*self._key(state), ANCHOR) if k.startswith(prefix)]
        found = [(int(k[len(prefix) :]), self.store.noted(*self._key(state), ANCHOR, k) or "") for k in keys]
        return sorted(found)

    # -- explain -------------------------------------------------------------------------

    async def explain(self, why: Explanation, slug: str = "") -> bool:
        """Say ``why`` on the issue unless it was said there before; True if said now."""
        if self.store.noted(why.owner, why.repo, why.issue, EXPLAINED, why.key) is not None:
            return False
        body = f"<!-- forgebottle:explain -->\nforgebottle did not start an agent here: {why.text}\n"
        posted = await self._safely("explain", slug, self.forge.post_comment(why.owner, why.repo, why.issue, body))
        if posted is None:
            return False  # not said: the next such event tries again
        self.store.note(why.owner, why.repo, why.issue, EXPLAINED, why.key, at=_now(), once=True)
        return True

    async def start_failed(
        self, state: ForgeState, run: int, *, missing: str = "", log: Path | None = None, code: int | None = None
    ) -> bool:
        """A run that could not start because its command is not in the bottle: say so, once
        per issue and agent. ``missing`` names the command when the start itself said ENOENT;
        otherwise the run's log (bwrap's execvp, a shell's "not found") or exit 127 tell."""
        command: str | None = Path(missing).name if missing else None
        if command is None and log is not None:
            try:
                with open(log, "rb") as f:  # noqa: ASYNC230 - the first 4 KiB of a local run log
                    command = missing_command(f.read(4096).decode("utf-8", "replace"))
            except OSError:
                command = None
        if command is None and code != 127:
            return False
        what = f"`{command}`: command not found in the bottle" if command else "the agent's command was not found"
        text = (
            f"{what} (agent `{state.agent_name}`, run {run}). "
            "The operator needs to install it in the bottle or fix the agent's `command`."
        )
        return await self.explain(Explanation(*self._key(state), key=f"start:{state.agent_name}", text=text))

    # -- the branch ----------------------------------------------------------------------

    def pushed(self, state: ForgeState, sha: str) -> None:
        self.store.note(*self._key(state), PUSHED, state.slug, sha, at=_now())

    async def branch_moved(self, state: ForgeState) -> str:
        """A line for the rehydrate prompt when someone else pushed to the bot's branch."""
        ours = self.store.noted(*self._key(state), PUSHED, state.slug)
        if not ours:
            return ""
        branch = branch_for(state.issue_number)
        now = await self._safely("read the branch", state.slug, self.forge.branch_sha(state.owner, state.repo, branch))
        if not isinstance(now, str) or now == ours:
            return ""
        return (
            f"Note: {branch} moved on the forge since your last push ({ours[:12]} -> {now[:12]}): someone else "
            "pushed to it. Run `forge refresh`, then merge or rebase onto origin/" + branch + " before you push.\n"
        )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# -- what the sidecar reads for an agent (§7) ------------------------------------------------

MAX_TAIL_LINES = 1000


async def checks(scoped: ScopedForge, ref: str | None) -> list[dict[str, Any]]:
    """``read_checks``: commit statuses and Actions jobs of ``ref`` (default: the PR head, else
    the bottle's branch)."""
    forge, owner, repo = scoped.forge, scoped.owner, scoped.repo
    if not ref:
        if scoped.prs:
            ref = (await forge.read_pr(owner, repo, max(scoped.prs))).head_sha
        else:
            ref = await forge.branch_sha(owner, repo, scoped.branch)
        if not ref:
            raise ForgeNotFound("the bottle has no pull request or pushed branch yet", status=404)
    sha = ref if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", ref) else None
    statuses = await forge.commit_statuses(owner, repo, ref)
    jobs = await forge.workflow_jobs(owner, repo, sha) if sha else []
    by_url = {job.html_url: job.id for job in jobs if job.html_url}
    out: list[dict[str, Any]] = []
    for status in statuses:
        entry: dict[str, Any] = {
            "context": status.context,
            "state": status.state,
            "description": status.description,
            "target_url": status.target_url,
        }
        if status.target_url in by_url:
            entry["job_id"] = by_url.pop(status.target_url)
        out.append(entry)
    seen = {entry.get("job_id") for entry in out}
    for job in jobs:  # jobs that set no status (yet)
        if job.id not in seen:
            state = job.conclusion or job.status
            out.append(
                {"context": job.name, "state": state, "description": "", "target_url": job.html_url, "job_id": job.id}
            )
    return out


async def job_log(scoped: ScopedForge, job_id: int, tail_lines: int, secrets: Sequence[str]) -> dict[str, Any]:
    """``read_job_log``: the end of one Actions job's log in the bottle's repository, bounded,
    as plain text with forgebottle's secrets redacted."""
    tail = max(1, min(tail_lines, MAX_TAIL_LINES))
    job = await scoped.forge.job(scoped.owner, scoped.repo, job_id)
    raw = await scoped.forge.job_log_tail(scoped.owner, scoped.repo, job_id, lines=tail)
    return {
        "job_id": job.id,
        "name": job.name,
        "conclusion": job.conclusion,
        "lines": clean_lines(raw, secrets, limit=tail),
    }


async def verify_anchor(forge: Forge, store: Store, slug: str) -> list[str]:
    """Compare the stored chain with the heads anchored in the bot's own status comment; what
    disagrees, by run ([] when all agree). Forge errors are the caller's to report."""
    state = store.known(slug)
    comment = await forge.find_comment(state.owner, state.repo, state.issue_number, marker(slug))
    if comment is None:
        return [f"no status comment for {slug} on {state.owner}/{state.repo}#{state.issue_number}"]
    anchored = [(int(n), head) for n, head in _ANCHOR_LINE.findall(comment.body)]
    if not anchored:
        return [f"the status comment of {slug} holds no anchor"]
    ops = store.operations(slug)
    problems = []
    for n, head in anchored:
        upto = [op for op in ops if op.run <= n]
        stored = upto[-1].hash if upto else genesis(slug)
        if stored != head:
            problems.append(f"run {n}: the record's chain head {stored[:16]} is not the forge's anchor {head[:16]}")
    return problems


def budget_ran_out(ops: Sequence[Operation], run: int) -> bool:
    """Whether the gateway refused a model call of ``run`` on a token budget (DESIGN.md §10)."""
    return any(
        op.run == run and op.op == "model" and op.outcome == "denied" and op.data and "budget" in op.data for op in ops
    )
