"""The lifecycle engine: intake, the worker that carries out each webhook's decision, the
operator's requests, start, stop and recovery. Running bottles (the scheduler, a run, the
watchdog, destroy) are ``runs.Runner``'s, which ``Service`` extends.

Each change follows one shape: load the bottle, let ``rules`` or the caller decide, carry out
the effects (workspace, sidecar, agent), then fire the trigger on ``statemachine`` and persist
the transition in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import metrics as m
from bottles import (
    BottlePaths,
)
from config import Config, ConfigError
from conversation import CI_FIX
from gitea import Forge, ForgeAuthError, ForgeError, ForgeUnavailable
from rules import CI_PROMPT, CiFailure, CiNote, Decision, Destroy, Ignore, Launch, Link, Prompt
from runs import Runner, install_tools, utcnow
from statemachine import BottleState, ForgeBottleError, Trigger
from store import ForgeState, InboxEvent, NewEvent, Store

log = logging.getLogger("forgebottle")

FORGE_PROBE_SECONDS = 30.0
# Gitea gives a delivery 5 s and never retries, while stored events can wait: the worker lets a
# burst of webhooks in first (no arrival for INTAKE_QUIET), but never waits past MAX_DEFERRAL.
INTAKE_QUIET = 0.02
MAX_DEFERRAL = 2.0


def sandbox_problem(config: Config, bwrap: str | None) -> str | None:
    """Without bwrap, a local bottle refuses to start unless it says sandbox = "none"."""
    for spec in config.bottles.values():
        if spec.backend == "local" and spec.sandbox == "bwrap" and bwrap is None:
            return (
                f'bottles.{spec.name}: bwrap not found; install bubblewrap, or set sandbox = "none" '
                "(agents then run unconfined)"
            )
    return None


class AdminError(ForgeBottleError):
    http_status = 409


class Intake:
    """Webhooks onto disk before they are answered, in group commits off the event loop."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: list[tuple[NewEvent, asyncio.Future[tuple[int, bool]]]] = []
        self._committer: asyncio.Task[None] | None = None
        self.last_arrival = float("-inf")  # monotonic
        self._arrived = asyncio.Event()

    async def quiet(self) -> None:
        """Return once no webhook has arrived for INTAKE_QUIET, or after MAX_DEFERRAL."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MAX_DEFERRAL):
                while time.monotonic() - self.last_arrival < INTAKE_QUIET:
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(INTAKE_QUIET):
                            await self._arrived.wait()

    async def add(self, event: NewEvent) -> tuple[int, bool]:
        """(event id, is new), once the event is committed at synchronous=FULL."""
        self.last_arrival = time.monotonic()
        self._arrived.set()
        future: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self._queue.append((event, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit(), name="intake-commit")
        return await future

    async def _commit(self) -> None:
        # Events that arrive while a commit is in flight share the next one (group commit).
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                results = await asyncio.to_thread(self.store.add_events, [event for event, _ in batch])
            except Exception as exc:  # the edge of intake: every waiter hears of the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class Service(Runner):
    """Turns webhook events and admin requests into bottle transitions (the runs: ``Runner``)."""

    def __init__(self, config: Config, store: Store, forge: Forge, *, bwrap: str | None = None) -> None:
        super().__init__(config, store, forge, bwrap=bwrap)
        self.intake = Intake(store)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Why the forge cannot be used right now (unreachable, token refused), or None: /healthz.
        self.forge_problem: str | None = "the forge has not been reached yet"

    # -- start and stop ------------------------------------------------------------

    def check_sandbox(self) -> None:
        problem = sandbox_problem(self.config, self.bwrap)
        if problem:
            raise ConfigError(problem)
        for spec in self.config.bottles.values():
            if spec.sandbox == "none":
                log.warning('bottle %r runs agents WITHOUT a sandbox (sandbox = "none")', spec.name)

    async def start(self) -> None:
        self.check_sandbox()
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.config.state_dir, 0o700)
        install_tools(self.config.state_dir / "tools")
        await self.recover()
        await self.check_forge()
        self._tasks = [
            asyncio.create_task(self._worker(), name="webhook-worker"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
            asyncio.create_task(self._probe_forge(), name="forge-probe"),
        ]
        await self.schedule()

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for active in list(self.active.values()):
            active.watchdog_reason = ""
            await self._stop_agent(active, grace=5.0)
            if active.monitor is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await active.monitor
        await self.conversation.close()
        await self.forge.aclose()

    async def recover(self) -> None:
        """After a restart: no agent of ours survives (--die-with-parent), so running means exited.
        A command bottle's launcher may have left resources running: it is asked to stop them."""
        stale = self.store.with_status(BottleState.RUNNING)
        for state in stale:
            last = self.store.last_run(state.slug)
            if last is not None and last["ended_at"] is None:
                self.store.update_run(state.slug, int(last["n"]), ended_at=utcnow(), error="orchestrator restarted")
            with contextlib.suppress(FileNotFoundError):
                BottlePaths(self.config.state_dir, state.slug).socket.unlink()
            self._transition(state, Trigger.EXITED, "orchestrator restarted")
        await asyncio.gather(*(self._release(state) for state in stale))
        for state in self.store.with_status(BottleState.DESTROYED):
            paths = BottlePaths(self.config.state_dir, state.slug)
            if paths.workspace.exists() or paths.home.exists():
                with contextlib.suppress(ForgeBottleError):
                    ctx = await self._context(state, offline=True)
                    await self.backend(ctx).destroy(ctx)

    async def _release(self, state: ForgeState) -> None:
        try:
            ctx = await self._context(state, offline=True)
            await self.backend(ctx).recovered(ctx)
        except (ForgeBottleError, OSError) as exc:
            log.warning("%s: could not release the interrupted run: %s", state.slug, exc, extra={"slug": state.slug})

    # -- webhooks --------------------------------------------------------------------

    async def accept(
        self, *, delivery: str, event_type: str, body: bytes, ignore: str | None = None
    ) -> tuple[int, bool]:
        """Store a webhook durably; (event id, is new) once it is on disk."""
        event_id, new = await self.intake.add(NewEvent(utcnow(), delivery, event_type, body, ignore or ""))
        if not new:
            self.count_webhook("replay")
        elif ignore:
            self.count_webhook("ignored")
            self._event_outcome(event_id, event_type, "ignored", ignore)
        else:
            self.count_webhook("queued")
            self._wake.set()
        return event_id, new

    def count_webhook(self, outcome: str) -> None:
        self.metrics.inc(m.WEBHOOKS, outcome=outcome)

    def _event_outcome(self, event_id: int, event_type: str, status: str, reason: str, slug: str = "") -> None:
        level = logging.WARNING if status == "failed" else logging.INFO
        extra = {"event_id": event_id, "event": event_type, "status": status, "slug": slug, "reason": reason}
        log.log(level, "event %d %s: %s", event_id, event_type, reason, extra=extra)

    def reload(self, new: Config) -> None:
        """Take a re-read config's agents and bottles (``SIGHUP``); running bottles go on with
        what they started with. Where the service listens, its state and secrets need a restart."""
        self.config = dataclasses.replace(self.config, agents=new.agents, bottles=new.bottles)
        self.rules.config = self.config
        log.info("config re-read: agents %s", ", ".join(new.agents) or "none")

    def sandbox_name(self) -> str:
        names = {spec.sandbox if spec.backend == "local" else "external" for spec in self.config.bottles.values()}
        return ", ".join(sorted(names)) + ("" if self.bwrap or "bwrap" not in names else " (bwrap not found)")

    async def check_forge(self) -> bool:
        """Ask the forge who the token is; keep what went wrong in ``forge_problem``."""
        try:
            user = await self.forge.current_user()
        except ForgeError as exc:
            problem = (
                f"the forge refused the token ({exc.status})"
                if isinstance(exc, ForgeAuthError)
                else f"the forge is unreachable: {exc}"
            )
            if problem != self.forge_problem:
                log.log(logging.ERROR if isinstance(exc, ForgeAuthError) else logging.WARNING, "%s", problem)
            self.forge_problem = problem
            return False
        if self.rules.bot is None:
            log.info("forge user is %s", user.login)
        elif self.forge_problem is not None:
            log.info("the forge answers again")
        self.rules.bot = user
        self.forge_problem = None
        return True

    async def _probe_forge(self) -> None:
        while True:
            await asyncio.sleep(FORGE_PROBE_SECONDS)
            await self.check_forge()

    async def _worker(self) -> None:
        while True:
            self._wake.clear()
            if self.rules.bot is None and not await self.check_forge():
                await asyncio.sleep(5)
                continue
            events = self.store.pending_events()
            for event in events:
                await self.intake.quiet()
                if not await self.process(event):
                    break  # the forge is unavailable: this event (and those after it) later
            if not events:
                await self._wake.wait()

    async def process(self, event: InboxEvent) -> bool:
        """Decide one event and carry the decision out; False if it must be tried again later."""
        try:
            payload = json.loads(event.body)
            decision: Decision = (
                await self.rules.decide(event.event_type, payload)
                if isinstance(payload, dict)
                else Ignore("payload is not an object")
            )
            status = "ignored" if isinstance(decision, Ignore) else "done"
            if self.forge_problem is not None and self.forge_problem.startswith("the forge is unreachable"):
                self.forge_problem = None  # deciding read the forge: it answers again
        except (ValueError, RecursionError):
            decision, status = Ignore("body is not JSON"), "ignored"
        except ForgeUnavailable as exc:
            self.forge_problem = f"the forge is unreachable: {exc}"
            attempts = self.store.bump_attempts(event.id, str(exc))
            self.metrics.inc(m.FORGE_ERRORS, kind="unavailable")
            if attempts < self.config.event_retries:
                delay = min(30.0, 0.5 * 2**attempts)
                log.warning(
                    "event %d: forge unavailable, retry %d in %.1fs: %s",
                    event.id,
                    attempts,
                    delay,
                    exc,
                    extra={"event_id": event.id},
                )
                await asyncio.sleep(delay)
                return False
            decision, status = Ignore(f"failed after {attempts} attempts: {exc}"), "failed"
        except ForgeError as exc:
            self.metrics.inc(m.FORGE_ERRORS, kind="error")
            decision, status = Ignore(f"forge error: {exc}"), "failed"
        await self.carry_out(decision, status, event)
        return True

    async def carry_out(self, decision: Decision, status: str, event: InboxEvent | None = None) -> str:
        """Write the decision's effects with the event's "done" mark, in one transaction (so a
        crash re-runs the event rather than losing or doubling it); returns the slug touched."""
        if isinstance(decision, Destroy):
            await self.destroy(decision.slug, decision.reason, event=event)
            return decision.slug
        at = utcnow()
        slug = getattr(decision, "slug", "")
        with self.store.transaction() as db:
            if isinstance(decision, Launch):
                slug = self._create(decision, at, db)
                reason = f"bottle {slug} queued for issue #{decision.issue} (agent {decision.agent})"
            elif isinstance(decision, Prompt):
                self.store.add_pending(
                    decision.slug, at=at, trigger=decision.trigger, source=decision.source, body=decision.body, db=db
                )
                reason = decision.reason
            elif isinstance(decision, Link):
                self.store.set_fields(decision.slug, db, pr_number=decision.pr, pr_url=decision.url)
                reason = f"linked pull request #{decision.pr} to {decision.slug}"
            elif isinstance(decision, CiFailure):
                self._ci_failure(decision, at, db)
                reason = decision.reason
            else:
                reason = decision.reason
            if event is not None:
                self.store.finish_event(event.id, status=status, reason=reason, slug=slug, at=at, db=db)
        if event is not None:
            self._event_outcome(event.id, event.event_type, status, reason, slug)
        await self._converse(decision, slug)
        if not isinstance(decision, Ignore):
            await self.schedule()
        return slug

    def _ci_failure(self, failure: CiFailure, at: str, db: Any) -> None:
        """One fix attempt for the PR head; a CI prompt still waiting is replaced (coalesced)."""
        state = self.known(failure.slug)
        self.store.note(state.owner, state.repo, state.issue_number, CI_FIX, failure.sha, failure.slug, at=at, db=db)
        self.store.drop_pending(failure.slug, CI_PROMPT, db)
        self.store.add_pending(failure.slug, at=at, trigger=CI_PROMPT, source=failure.source, body=failure.body, db=db)

    async def _converse(self, decision: Decision, slug: str) -> None:
        """What the decision makes the bot say on the forge (conversation.py)."""
        talk = self.conversation
        state = self.store.by_slug(slug) if slug else None
        if isinstance(decision, Launch):
            talk.acknowledge(decision.owner, decision.repo, issue=decision.issue, slug=slug)
        elif isinstance(decision, Prompt) and state is not None:
            issue, comment = decision.react_issue, decision.react_comment
            talk.acknowledge(state.owner, state.repo, issue=issue, comment_id=comment, slug=slug)
        elif isinstance(decision, Ignore) and decision.explain is not None:
            await talk.explain(decision.explain, slug)
        elif isinstance(decision, (CiFailure, CiNote)) and state is not None:
            talk.note_ci(state, decision.note)

    def _create(self, launch: Launch, at: str, db: Any) -> str:
        base = re.sub(r"[^a-z0-9._-]+", "-", f"{launch.owner}-{launch.repo}-{launch.issue}".lower())[:40]
        base = base.strip("-.") or "bottle"
        slug, k = base, 1
        while self.store.slug_taken(slug, db):
            k += 1
            slug = f"{base}-{k}"
        spec = self.config.bottle(launch.bottles)
        old = self.store.get(launch.owner, launch.repo, launch.issue)
        if old is not None:
            self.store.archive(old, at, db)
        state = ForgeState(
            owner=launch.owner,
            repo=launch.repo,
            issue_number=launch.issue,
            slug=slug,
            agent_name=launch.agent,
            status=BottleState.QUEUED,
            created_at=at,
            updated_at=at,
            bottle_names=launch.bottles,
            backend_name=spec.backend,
            agent_git_user=self.bot.login if self.bot else "",
            issue_url=launch.issue_url,
            sandbox=spec.sandbox if spec.backend == "local" else "external",
            queued_seq=self.store.next_queue_seq(db),
            api_url=self.config.api_url,
            org=self.config.org,
            seen_comment_id=launch.seen_comment_id,
        )
        self.store.upsert(state, db)
        self.store.add_pending(slug, at=at, trigger=launch.trigger, source=launch.source, body=launch.prompt, db=db)
        return slug

    # -- orchestrate (admin socket) ------------------------------------------------

    async def orchestrate_start(
        self, repo_full: str, issue: int, agent: str, bottles: Sequence[str], prompt: str
    ) -> str:
        owner, sep, repo = repo_full.partition("/")
        if not sep or not owner or not repo:
            raise AdminError("--repo must be OWNER/REPO")
        if agent not in self.config.agents:
            raise AdminError(f"agent {agent!r} is not configured")
        self.config.bottle(list(bottles) or ["local"])
        existing = self.store.get(owner, repo, issue)
        if existing is not None and existing.status.live:
            raise AdminError(f"bottle {existing.slug} is already {existing.status.value}")
        launch = await self.rules.operator_launch(owner, repo, issue, agent, bottles, prompt)
        return await self.carry_out(launch, "done")

    async def orchestrate_resume(self, slug: str, prompt: str) -> str:
        state = self.known(slug)
        if not state.status.live:
            raise AdminError(f"bottle {slug} is destroyed")
        body = f"### From the operator\n\n{prompt[: 32 * 1024]}"
        await self.carry_out(Prompt(slug, "orchestrate resume", "orchestrate resume", body, "operator prompt"), "done")
        return (self.store.by_slug(slug) or state).status.value

    def known(self, slug: str) -> ForgeState:
        return self.store.known(slug)
