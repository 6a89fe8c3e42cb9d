"""Running bottles: the scheduler (FIFO under ``server.max_running``), a run from its start to
its freeze (workspace, sidecar, gateway, agent), the watchdog, destroy, and what the sidecar
asks of a run (``RunAccess``). ``service.Service`` extends ``Runner`` with the webhook side.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import forge_client
import metrics as m
from backends import BACKENDS, Backend, RunHandle
from bottles import (
    BottleContext,
    BottlePaths,
    PushRefused,
    PushResult,
    TextRefused,
    check_text,
    find_bwrap,
)
from config import Config, ConfigError, redact
from conversation import Conversation, checks, job_log
from egress import EgressEvent, Gateway
from gitea import Forge, ForgeError, PullRequest, Repo, ScopedForge, User
from metrics import Metrics
from rules import Rules
from serving import UnixServer
from sidecar import WRITES, sidecar_app
from statemachine import Bottle, BottleState, ForgeBottleError, Trigger, branch_for, fire
from store import ForgeState, InboxEvent, Store, StoreError

log = logging.getLogger("forgebottle")

MAX_PROMPT_BYTES = 96 * 1024  # one argv element may hold 128 KiB
# A run that fails within this many seconds may have failed to start (its command missing).
START_WINDOW = 30.0

OVERLAY = """\
You are an agent working in a forgebottle bottle on {owner}/{repo}, issue #{issue}.
Your workspace (the current directory) is a git checkout on branch {branch}.
You hold no forge credentials: reach the forge only with the `forge` tool on your PATH.

  forge whoami                     your bottle, issue, PR and what you may write to
  forge read-issue N | read-pr N | comments N
  forge comment N TEXT             comment on your issue or PR (TEXT or - for stdin)
  forge describe N TEXT            replace your issue's or PR's description
  forge push                       push your committed HEAD to {branch} (secret-scanned)
  forge open-pr --title T --body TEXT
  forge progress TEXT              show your progress (e.g. a checklist) in the bot's status comment
  forge checks [REF]               CI results of your PR's head; forge job-log ID: the end of a job's log
  forge refresh                    fetch your branch and its base from the forge as origin/*
  forge done success|failure|blocked "summary"

The same calls are MCP tools: /run/forge/mcp.json configures any MCP client to run `forge mcp`.
Commit your work with git, `forge push`, `forge open-pr`, then always finish with `forge done`.
"""


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclasses.dataclass
class ActiveRun:
    ctx: BottleContext
    run: int
    scoped: ScopedForge
    started: float
    deadline: float | None
    last_call: float
    signalled: tuple[str, str] | None = None
    watchdog_reason: str = ""
    destroying: bool = False
    monitor: asyncio.Task[None] | None = None
    grace: asyncio.Task[None] | None = None
    sidecar: UnixServer | None = None
    handle: RunHandle | None = None
    gateway: Gateway | None = None

    def last_activity(self) -> float:
        """A sidecar call, gateway traffic or output from the agent, whichever came last."""
        output = self.handle.last_output if self.handle is not None else 0.0
        traffic = self.gateway.last_activity if self.gateway is not None else 0.0
        return max(self.last_call, output, traffic)


class Runner:
    """Runs bottles: starts them when a slot is free, watches them, freezes and destroys them."""

    def __init__(self, config: Config, store: Store, forge: Forge, *, bwrap: str | None = None) -> None:
        self.config = config
        self.store = store
        self.forge = forge
        self.bwrap = bwrap if bwrap is not None else find_bwrap()
        self.metrics = Metrics()
        self.rules = Rules(config, forge, store)
        self.conversation = Conversation(config, forge, store)
        self.active: dict[str, ActiveRun] = {}
        self.secrets = config.secrets()
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._schedule_lock = asyncio.Lock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._stopping = False

    @property
    def bot(self) -> User | None:
        return self.rules.bot

    # -- the scheduler: FIFO over everything waiting for a slot ---------------------

    async def schedule(self) -> None:
        async with self._schedule_lock:
            while True:
                free = self.config.max_running - len(self.store.with_status(BottleState.RUNNING))
                if free <= 0:
                    return
                candidate = None
                for slug in self.store.slugs_with_pending():
                    state = self.store.by_slug(slug)
                    waiting = state is not None and state.status in (BottleState.QUEUED, BottleState.FROZEN)
                    if waiting and slug not in self.active:
                        candidate = state
                        break
                if candidate is None:
                    return
                await self._start_run(candidate, free)

    async def _start_run(self, state: ForgeState, free: int) -> None:
        """Effect (workspace, sidecar, agent), then trigger and persist in one transaction."""
        slug = state.slug
        async with self._locks[slug]:
            trigger = Trigger.LAUNCH if state.status is BottleState.QUEUED else Trigger.REHYDRATE
            pending = self.store.pending(slug)
            last = self.store.last_run(slug)
            n = int(last["n"]) + 1 if last else 1
            prompt = compose_prompt(state, pending, first=n == 1)
            if trigger is Trigger.REHYDRATE:
                prompt += await self.conversation.branch_moved(state)
            error = ""
            missing = ""
            active: ActiveRun | None = None
            try:
                ctx = await self._context(state)
                active = await self._spawn(ctx, state, prompt, n, resume=trigger is Trigger.REHYDRATE)
            except (ForgeBottleError, OSError) as exc:
                error = redact(str(exc), self.secrets)
                missing = str(exc.filename or "") if isinstance(exc, FileNotFoundError) else ""
                log.warning("%s: could not start run %d: %s", slug, n, error, extra={"slug": slug})
            at = utcnow()
            with self.store.transaction() as db:
                bottle = Bottle(slug, state.status)
                record = fire(bottle, trigger, at=at, reason=run_reason(pending, trigger), free_slots=free)
                self.store.apply(state, record, db)
                self.store.start_run(
                    slug,
                    trigger=pending[0]["trigger"] if pending else trigger.value,
                    prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest(),
                    started_at=at,
                    network=self._network(state),
                    sandbox=state.sandbox,
                    db=db,
                )
                self.store.take_pending(slug, [int(p["id"]) for p in pending], db)
                if error:
                    record = fire(bottle, Trigger.EXITED, at=at, reason=f"failed to start: {error}")
                    self.store.apply(state, record, db)
                    self.store.end_run(slug, n, at=at, error=error, db=db)
            self._log_transition(slug, trigger.value, f"run {n}")
            if active is not None and active.ctx.agent.budget_tokens is not None:
                self.store.update_run(slug, n, budget_tokens=active.ctx.agent.budget_tokens)
            if missing:
                await self.conversation.start_failed(state, n, missing=missing)
            if active is not None:
                self.active[slug] = active
                active.monitor = asyncio.create_task(self._monitor(active), name=f"monitor:{slug}")

    def _network(self, state: ForgeState) -> str:
        agent = self.config.agents.get(state.agent_name)
        return agent.network if agent else "none"

    async def _repo(self, owner: str, repo: str) -> Repo:
        key = (owner, repo)
        if key not in self._repos:
            self._repos[key] = await self.forge.get_repo(owner, repo)
        return self._repos[key]

    async def _context(self, state: ForgeState, *, offline: bool = False) -> BottleContext:
        agent = self.config.agents.get(state.agent_name)
        if agent is None:
            raise ConfigError(f"agent {state.agent_name!r} of {state.slug} is no longer configured")
        bottle = self.config.bottle(state.bottle_names)
        repo = Repo(state.owner, state.repo, "main", "", "") if offline else await self._repo(state.owner, state.repo)
        return BottleContext(
            slug=state.slug,
            owner=state.owner,
            repo=state.repo,
            issue=state.issue_number,
            pr=state.pr_number,
            agent=agent,
            bottle=bottle,
            paths=BottlePaths(self.config.state_dir, state.slug),
            clone_url=repo.clone_url,
            default_branch=repo.default_branch,
            git_user=state.agent_git_user or (self.bot.login if self.bot else "forgebottle"),
            token=self.config.token,
            bwrap=self.bwrap,
            model_api=route.api if (route := self.config.models.get(agent.model or "")) else None,
        )

    def backend(self, ctx: BottleContext) -> Backend:
        return BACKENDS[ctx.bottle.backend]()

    async def _spawn(self, ctx: BottleContext, state: ForgeState, prompt: str, n: int, *, resume: bool) -> ActiveRun:
        backend = self.backend(ctx)
        prs = [state.pr_number] if state.pr_number else []
        scoped = ScopedForge(self.forge, owner=state.owner, repo=state.repo, issue=state.issue_number, prs=prs)
        now = time.monotonic()
        deadline = now + ctx.agent.timeout if ctx.agent.timeout else None
        active = ActiveRun(ctx=ctx, run=n, scoped=scoped, started=now, deadline=deadline, last_call=now)
        sidecar = UnixServer(sidecar_app(RunAccess(self, active)), ctx.paths.socket)
        active.sidecar = sidecar
        active.gateway = self._gateway(active)
        # The sockets come up while the workspace is cloned; the agent starts once all are ready.
        prepared, started, *gateway = await asyncio.gather(
            backend.prepare(ctx),
            sidecar.start(),
            *([self._start_gateway(active)] if active.gateway else []),
            return_exceptions=True,
        )
        for outcome in (prepared, started, *gateway):
            if isinstance(outcome, BaseException):
                await sidecar.stop()
                if active.gateway is not None:
                    await active.gateway.stop()
                raise outcome
        ctx.paths.prompt.write_text(prompt)
        (ctx.paths.root / f"prompt-{n}.md").write_text(prompt)
        self.active[ctx.slug] = active
        try:
            active.handle = await backend.start(ctx, prompt=prompt, run=n, resume=resume)
        except BaseException:
            self.active.pop(ctx.slug, None)
            await sidecar.stop()
            if active.gateway is not None:
                await active.gateway.stop()
            raise
        log.info("%s: run %d started (pid %d)", ctx.slug, n, active.handle.pid, extra={"slug": ctx.slug})
        if ctx.bottle.backend == "local" and not ctx.sandboxed:
            log.warning(
                '%s: run %d is NOT sandboxed (bottle %r has sandbox = "none")',
                ctx.slug,
                n,
                ctx.bottle.name,
                extra={"slug": ctx.slug},
            )
        return active

    def _gateway(self, active: ActiveRun) -> Gateway | None:
        """The run's egress gateway, for agents with ``network = "gateway"`` (DESIGN.md §10)."""
        ctx = active.ctx
        if ctx.agent.network != "gateway":
            return None

        def record(event: EgressEvent) -> None:
            detail = redact(event.detail, self.secrets)
            try:
                self.store.append_operation(
                    ctx.slug,
                    run=active.run,
                    at=utcnow(),
                    op=event.op,
                    target=event.target,
                    outcome=event.outcome,
                    detail=detail,
                    duration_ms=event.duration_ms,
                    data=event.data,
                )
            except StoreError as exc:
                log.warning("%s: egress record lost: %s", ctx.slug, exc, extra={"slug": ctx.slug})

        used = self.store.model_tokens(ctx.slug)
        return Gateway.for_agent(self.config, ctx.agent, slug=ctx.slug, record=record, issue_used=used)

    async def _start_gateway(self, active: ActiveRun) -> None:
        assert active.gateway is not None
        active.ctx.paths.sidecar_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await active.gateway.start(active.ctx.paths.egress_socket)

    async def _monitor(self, active: ActiveRun) -> None:
        assert active.handle is not None and active.sidecar is not None
        code = await active.handle.wait()
        slug = active.ctx.slug
        async with self._locks[slug]:
            self.active.pop(slug, None)
            # Whatever fails below, the bottle must leave `running`: a bottle left there would
            # hold a slot with no agent and no watchdog, for good.
            try:
                if active.grace is not None:
                    active.grace.cancel()
                await active.sidecar.stop()
                if active.gateway is not None:
                    await active.gateway.stop()
                with contextlib.suppress(FileNotFoundError):
                    active.ctx.paths.prompt.unlink()
                self.store.update_run(slug, active.run, ended_at=utcnow(), exit_code=code)
                self.metrics.observe(m.RUN_SECONDS, time.monotonic() - active.started)
            except Exception:
                log.exception("%s: cleaning up run %d failed", slug, active.run, extra={"slug": slug})
            if not active.destroying:
                trigger, reason = self._ending(active, code)
                state = self.store.by_slug(slug)
                if state is not None and state.status is BottleState.RUNNING:
                    self._transition(state, trigger, reason)
                    quick = time.monotonic() - active.started < START_WINDOW
                    if trigger is Trigger.EXITED and code != 0 and quick and not self._stopping:
                        await self.conversation.start_failed(
                            state, active.run, log=active.ctx.paths.run_log(active.run), code=code
                        )
        await self.schedule()

    def _ending(self, active: ActiveRun, code: int) -> tuple[Trigger, str]:
        if active.watchdog_reason:
            return Trigger.WATCHDOG, active.watchdog_reason
        if active.signalled:
            return Trigger.DONE, f"agent signalled {active.signalled[0]}: {active.signalled[1][:200]}"
        if self._stopping:
            return Trigger.EXITED, "orchestrator stopped"
        return Trigger.EXITED, f"agent exited with {code} without signal_done"

    def _transition(self, state: ForgeState, trigger: Trigger, reason: str) -> None:
        record = fire(Bottle(state.slug, state.status), trigger, at=utcnow(), reason=reason)
        self.store.apply(state, record)
        self._log_transition(state.slug, trigger.value, reason)

    def _log_transition(self, slug: str, trigger: str, reason: str) -> None:
        state = self.store.by_slug(slug)
        status = state.status.value if state else "?"
        if state is not None:
            if state.status is BottleState.FROZEN:
                self.conversation.anchor(state)
            self.conversation.touch(slug)
        self.metrics.inc(m.TRANSITIONS, trigger=trigger)
        extra = {"slug": slug, "trigger": trigger, "dest": status, "reason": reason}
        log.info("%s: %s -> %s (%s)", slug, trigger, status, reason, extra=extra)

    async def _stop_agent(self, active: ActiveRun, grace: float) -> None:
        if active.handle is not None:
            await self.backend(active.ctx).stop(active.ctx, active.handle, grace)

    # -- destroy ---------------------------------------------------------------------

    async def destroy(self, slug: str, reason: str, *, event: InboxEvent | None = None) -> None:
        """Effects first (kill, remove the workspace), then the transition, with the event if any."""
        state = self.store.known(slug)
        active = self.active.get(slug)
        if active is not None:
            active.destroying = True
            await self._stop_agent(active, grace=2.0)
            if active.monitor is not None:
                await active.monitor
        async with self._locks[slug]:
            state = self.store.known(slug)
            live = state.status.live
            if live:
                with contextlib.suppress(ForgeBottleError):
                    ctx = await self._context(state, offline=True)
                    await self.backend(ctx).destroy(ctx)
                shutil.rmtree(BottlePaths(self.config.state_dir, slug).sidecar_dir, ignore_errors=True)
            at = utcnow()
            with self.store.transaction() as db:
                if live:
                    record = fire(Bottle(slug, state.status), Trigger.DESTROY, at=at, reason=reason)
                    self.store.apply(state, record, db)
                if event is not None:
                    done = f"destroyed {slug}: {reason}" if live else f"{slug} was already destroyed"
                    self.store.finish_event(event.id, status="done", reason=done, slug=slug, at=at, db=db)
            if live:
                self._log_transition(slug, Trigger.DESTROY.value, reason)
        await self.schedule()

    # -- the watchdog ----------------------------------------------------------------

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.config.watchdog_interval)
            await self.check_watchdog()

    async def check_watchdog(self) -> None:
        now = time.monotonic()
        for active in list(self.active.values()):
            if active.watchdog_reason or active.destroying or active.signalled:
                continue
            quiet = now - active.last_activity()
            if quiet > self.config.watchdog_timeout:
                limit = self.config.watchdog_timeout
                active.watchdog_reason = f"no activity (sidecar call or output) for {quiet:.0f}s (limit {limit:.0f}s)"
            elif active.deadline is not None and now > active.deadline:
                active.watchdog_reason = f"run passed its timeout of {active.ctx.agent.timeout:.0f}s"
            else:
                continue
            self.metrics.inc(m.WATCHDOG)
            self.store.update_run(active.ctx.slug, active.run, watchdog_fired=1)
            log.warning("%s: watchdog: %s", active.ctx.slug, active.watchdog_reason, extra={"slug": active.ctx.slug})
            await self._stop_agent(active, grace=2.0)

    # -- what the sidecar asks of a run ------------------------------------------------

    async def signal_done(self, active: ActiveRun, status: str, summary: str) -> None:
        active.signalled = (status, summary)
        self.store.update_run(active.ctx.slug, active.run, signalled_status=status, signalled_summary=summary)
        if active.grace is None:
            active.grace = asyncio.create_task(self._grace(active), name=f"grace:{active.ctx.slug}")

    async def _grace(self, active: ActiveRun) -> None:
        await asyncio.sleep(self.config.done_grace)
        log.info(
            "%s: agent still running %.0fs after signal_done; stopping it",
            active.ctx.slug,
            self.config.done_grace,
            extra={"slug": active.ctx.slug},
        )
        await self._stop_agent(active, grace=5.0)

    async def push(self, active: ActiveRun) -> PushResult:
        try:
            return await self.backend(active.ctx).push(active.ctx, forbidden=self.secrets)
        except PushRefused as exc:
            self.store.update_run(active.ctx.slug, active.run, secret_findings=len(exc.findings))
            raise


class RunAccess:
    """The sidecar's view of one running bottle (``sidecar.BottleAccess``)."""

    def __init__(self, service: Runner, active: ActiveRun) -> None:
        self.service = service
        self.active = active
        self.slug = active.ctx.slug

    def is_running(self) -> bool:
        return self.service.active.get(self.slug) is self.active and not self.active.destroying

    def scoped(self) -> ScopedForge:
        return self.active.scoped

    def whoami(self) -> dict[str, Any]:
        ctx, scoped = self.active.ctx, self.active.scoped
        return {
            "slug": ctx.slug,
            "owner": ctx.owner,
            "repo": ctx.repo,
            "issue": ctx.issue,
            "pr": max(scoped.prs) if scoped.prs else None,
            "writable": scoped.writable,
        }

    def default_branch(self) -> str:
        return self.active.ctx.default_branch

    def writes_in_last_hour(self) -> int:
        since = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat(timespec="milliseconds")
        return self.service.store.count_writes(self.slug, sorted(WRITES), since=since)

    def write_limit(self) -> int:
        return self.service.config.writes_per_hour

    def check_text(self, text: str, where: str) -> None:
        try:
            check_text(text, self.service.secrets, where=where)
        except TextRefused as exc:
            self.service.store.update_run(self.slug, self.active.run, secret_findings=len(exc.findings))
            raise

    def redact(self, text: str) -> str:
        secrets = self.service.secrets
        # A secret with characters JSON escapes appears escaped in an answer: redact both forms.
        return redact(text, [*secrets, *(json.dumps(s)[1:-1] for s in secrets)])

    async def push(self) -> PushResult:
        pushed = await self.service.push(self.active)
        state = self.service.store.by_slug(self.slug)
        if state is not None:
            self.service.conversation.pushed(state, pushed.sha)
        return pushed

    async def update_progress(self, body: str) -> str:
        return await self.service.conversation.progress(self.service.store.known(self.slug), body)

    async def read_checks(self, ref: str | None) -> list[dict[str, Any]]:
        return await checks(self.active.scoped, ref)

    async def read_job_log(self, job_id: int, tail_lines: int) -> dict[str, Any]:
        return await job_log(self.active.scoped, job_id, tail_lines, self.service.secrets)

    async def refresh(self) -> dict[str, str]:
        ctx = self.active.ctx
        return await self.service.backend(ctx).refresh(ctx)

    async def pr_opened(self, pr: PullRequest) -> None:
        self.service.store.set_fields(self.slug, pr_number=pr.number, pr_url=pr.html_url)

    async def signal_done(self, status: str, summary: str) -> None:
        await self.service.signal_done(self.active, status, summary)

    async def record(
        self,
        *,
        op: str,
        target: str,
        outcome: str,
        detail: str,
        duration_ms: float,
        code: int | None = None,
        failure: str = "",
    ) -> None:
        service = self.service
        detail = redact(detail, service.secrets)
        self.active.last_call = time.monotonic()
        fields: dict[str, Any] = {
            "run": self.active.run,
            "at": utcnow(),
            "op": op,
            "target": target,
            "outcome": outcome,
            "detail": detail,
            "duration_ms": duration_ms,
        }
        # What wrote, or tried to write, to the forge is on disk before the agent hears back;
        # a read's record reaches the disk with the next durable commit.
        if op in WRITES or op == "signal_done" or outcome != "ok":
            await asyncio.to_thread(service.store.append_operation, self.slug, **fields, durable=True)
        else:
            service.store.append_operation(self.slug, **fields)
        service.metrics.inc(m.SIDECAR_CALLS, method=op, outcome=outcome)
        if code == ForgeError.rpc_code:
            service.metrics.inc(m.FORGE_ERRORS, kind="sidecar")
        service.metrics.observe(m.SIDECAR_SECONDS, duration_ms / 1000, method=op)
        extra = {"slug": self.slug, "op": op, "outcome": outcome}
        if failure:
            log.warning("%s: %s (%s)", self.slug, detail, redact(failure, service.secrets), extra=extra)
        else:
            log.info("%s: %s", self.slug, detail, extra=extra)


def run_reason(pending: Sequence[Mapping[str, Any]], trigger: Trigger) -> str:
    if not pending:
        return trigger.value
    sources = "; ".join(str(p["source"]) for p in pending[:5])
    more = f" (+{len(pending) - 5} more)" if len(pending) > 5 else ""
    return f"{sources}{more}"


def compose_prompt(state: ForgeState, pending: Sequence[Mapping[str, Any]], *, first: bool) -> str:
    """The overlay, then the waiting prompts coalesced, oldest first, within the argv limit."""
    overlay = OVERLAY.format(
        owner=state.owner, repo=state.repo, issue=state.issue_number, branch=branch_for(state.issue_number)
    )
    parts = [overlay, "## Your task" if first else "## New input since your last run", ""]
    budget = MAX_PROMPT_BYTES - len("\n".join(parts).encode())
    for item in pending:
        body = str(item["body"])
        if len(body.encode()) + 2 > budget:
            parts.append(f"[{len(pending)} prompts in all; the rest did not fit]")
            break
        parts += [body, ""]
        budget -= len(body.encode()) + 2
    return "\n".join(parts)


def install_tools(directory: Path) -> None:
    """Put the agent-side ``forge`` tool (stdlib only) where bottles bind it."""
    directory.mkdir(parents=True, exist_ok=True)
    source = Path(forge_client.__file__).read_text()
    target = directory / "forge"
    if not target.exists() or target.read_text() != source:
        tmp = directory / ".forge.tmp"
        tmp.write_text(source)
        tmp.chmod(0o755)
        tmp.replace(target)
