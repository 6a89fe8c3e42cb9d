"""The conversation on the forge (DESIGN.md §12), end to end: signed webhooks from a devforge
(Gitea's headers and Forgejo's), real bottles, and what the bot then says on the issue."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

import devforge as df
from config import AgentSpec, BottleSpec
from statemachine import BottleState
from store import chain_hash, genesis
from tests.conftest import HAVE_BWRAP, ROOT, Forge, Rig, open_issue, serve_forge, verified_chain, wait_until

MARK = "<!-- forgebottle:status "
EXPLAIN = "<!-- forgebottle:explain -->"


@pytest.fixture(params=["gitea", "forgejo"])
def forge(short_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Forge]:
    yield from serve_forge(short_tmp / "forge", request.param)


def status_comments(rig: Rig, issue: int) -> list[df.CommentRec]:
    comments = rig.forge.dev.issue(rig.forge.owner, rig.forge.repo, issue).comments
    return [c for c in comments if c.body.startswith(MARK)]


def the_status(rig: Rig, issue: int, *, says: str, timeout: float = 30.0) -> str:
    """The one status comment's body once it says ``says``; fails on a second status comment."""

    def check() -> str | None:
        found = status_comments(rig, issue)
        assert len(found) <= 1, [c.body for c in found]
        return found[0].body if found and says in found[0].body else None

    body = wait_until(check, timeout=timeout, what=f"the status comment of #{issue} to say {says!r}")
    assert body is not None
    return body


def explanations(rig: Rig, issue: int) -> list[str]:
    comments = rig.forge.dev.issue(rig.forge.owner, rig.forge.repo, issue).comments
    return [c.body for c in comments if c.body.startswith(EXPLAIN)]


def reactions(rig: Rig, issue: int, comment_id: int | None = None) -> list[tuple[str, str]]:
    rec = rig.forge.dev.issue(rig.forge.owner, rig.forge.repo, issue)
    if comment_id is not None:
        rec_reactions = next(c for c in rec.comments if c.id == comment_id).reactions
    else:
        rec_reactions = rec.reactions
    return [(r.user, r.content) for r in rec_reactions]


def assert_nothing_of_the_record(body: str, rig: Rig) -> None:
    """The provenance record stays behind the API: no operation, host, token count or hash."""
    for sentence in ("posted comment", "read issue", "pushed ", "opened pull request", "asked who it is"):
        assert sentence not in body, body
    assert "127.0.0.1" not in body and "localhost" not in body, body
    assert not re.search(r"\btokens?\b", body, re.IGNORECASE), body
    assert not re.search(r"[0-9a-f]{40,}", body), body
    assert rig.forge.world.bot.token not in body


@pytest.fixture
def quick(rig_factory: Callable[..., Rig]) -> Rig:
    return rig_factory(status_edit_interval=0.3, public_url="https://bots.example.org").start()


def test_eyes_and_one_status_comment_edited_through_two_runs_and_a_restart(
    quick: Rig, rig_factory: Callable[..., Rig]
) -> None:
    rig = quick
    dev, world, owner, repo = rig.forge.dev, rig.forge.world, rig.forge.owner, rig.forge.repo
    issue, state = rig.run_once("happy")
    assert (world.bot.login, "eyes") in reactions(rig, issue.number)
    body = the_status(rig, issue.number, says="**frozen**")
    assert f"{MARK}{state.slug} -->" in body
    assert "run 1" in body and "opened a PR" in body
    assert f"**Pull request:** #{state.pr_number}" in body
    assert f"https://bots.example.org/bottles/{state.slug}" in body
    assert_nothing_of_the_record(body, rig)

    # A review comment on the PR rehydrates it: eyes on that comment, the same status comment.
    assert state.pr_number is not None
    comment = dev.comment(owner, repo, state.pr_number, "PLEASE-AGAIN", user=world.member.login)
    rig.wait_state(issue.number, BottleState.FROZEN, runs=2)
    wait_until(lambda: (world.bot.login, "eyes") in reactions(rig, state.pr_number or 0, comment.id), what="eyes")
    body = the_status(rig, issue.number, says="answered review")
    assert "**frozen** · run 2" in body
    assert_nothing_of_the_record(body, rig)
    rig.server.stop()

    # A restart that lost its note of the comment finds it again by its marker.
    with rig.store.transaction() as db:
        db.execute("DELETE FROM conversation WHERE kind = 'status'")
    again = Rig(rig.forge, rig.state_dir, status_edit_interval=0.3)
    try:
        again.start()
        dev.comment(owner, repo, state.pr_number, "PLEASE-THIRD", user=world.member.login)
        again.wait_state(issue.number, BottleState.FROZEN, runs=3)
        body = the_status(again, issue.number, says="**frozen** · run 3")
        assert "answered review" in body
        assert len(status_comments(again, issue.number)) == 1
        # Nothing explained: the launch was a good one.
        assert explanations(again, issue.number) == []
    finally:
        again.stop()


def test_status_edits_are_debounced_and_the_last_state_lands(rig_factory: Callable[..., Rig]) -> None:
    interval = 1.5
    rig = rig_factory(status_edit_interval=interval).start()
    issue = rig.open_issue("turns")
    state = rig.wait_state(issue.number, BottleState.RUNNING, runs=1)
    seen: list[tuple[float, str]] = []

    def watch(until: str) -> None:
        def changed() -> bool:
            found = status_comments(rig, issue.number)
            if found and (not seen or seen[-1][1] != found[0].body):
                seen.append((time.monotonic(), found[0].body))
            return bool(found) and until in found[0].body

        wait_until(changed, timeout=30, what=f"status saying {until!r}")

    watch("**running**")
    for turn in (1, 2):  # each turn: frozen, then a comment rehydrates it
        rig.go(state.slug, turn)
        rig.wait_state(issue.number, BottleState.FROZEN, runs=turn)
        rig.forge.dev.comment(rig.forge.owner, rig.forge.repo, issue.number, "next", user=rig.forge.world.member.login)
        rig.wait_state(issue.number, BottleState.RUNNING, runs=turn + 1)
    rig.go(state.slug, 3)
    rig.wait_state(issue.number, BottleState.FROZEN, runs=3)
    watch("turn 3")
    assert "**frozen** · run 3" in seen[-1][1]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
    # Five transitions in all, but never two edits within the interval (polling jitter aside).
    assert gaps and min(gaps) > interval - 0.3, gaps
    assert len(status_comments(rig, issue.number)) == 1


def test_progress_from_the_agent_lands_in_the_status_comment_only(rig_factory: Callable[..., Rig]) -> None:
    agent = """#!/bin/sh
set -eu
forge progress "- [x] read the issue
- [ ] write the fix" > "$HOME/progress.json"
forge done success "made progress"
"""
    rig = rig_factory(scripts={"progress": agent}, status_edit_interval=0.3).start()
    issue, state = rig.run_once("progress")
    body = the_status(rig, issue.number, says="made progress")
    assert "**Progress**\n\n- [x] read the issue\n- [ ] write the fix" in body
    answer = (rig.home(state.slug) / "progress.json").read_text()
    comment = status_comments(rig, issue.number)[0]
    assert f"issuecomment-{comment.id}" in answer or f"#{comment.id}" in answer or str(comment.id) in answer
    # The one comment is the status: progress posts nothing else.
    assert [c.body for c in rig.forge.dev.issue(rig.forge.owner, rig.forge.repo, issue.number).comments] == [
        comment.body
    ]
    ops = [op for op in rig.store.operations(state.slug) if op.op == "update_progress"]
    assert [(op.outcome, op.detail) for op in ops] == [("ok", "updated progress in the status comment")]


# -- explanations ------------------------------------------------------------------------


def test_an_unknown_agent_is_explained_once_and_an_outsiders_issue_never(quick: Rig) -> None:
    rig = quick
    dev, world, owner, repo = rig.forge.dev, rig.forge.world, rig.forge.owner, rig.forge.repo
    issue = open_issue(rig.forge, "nope")
    wait_until(lambda: explanations(rig, issue.number), what="an explanation")
    text = explanations(rig, issue.number)
    assert len(text) == 1
    assert "agent `nope` is not configured; configured: exit, happy, sleep, turns" in text[0]
    # The same label again, by the same member: nothing more is said.
    dev.set_labels(owner, repo, issue.number, ["bot-bottle:nope"], by=world.member.login)
    rig.wait_events_done()
    dev.assign(owner, repo, issue.number, [world.member.login], by=world.member.login)
    rig.wait_events_done()
    assert len(explanations(rig, issue.number)) == 1

    # An outsider's issue with the same label, and her relabelling: silence.
    theirs = dev.create_issue(
        owner,
        repo,
        title="T",
        body="b",
        user=world.outsider.login,
        labels=["bot-bottle:nope"],
        assignees=[world.member.login],
    )
    dev.set_labels(owner, repo, theirs.number, ["bot-bottle:other"], by=world.outsider.login)
    dev.comment(owner, repo, theirs.number, "hello?", user=world.outsider.login)
    rig.wait_events_done()
    assert any("agent 'nope' is not configured" in r for r in rig.event_reasons())
    assert explanations(rig, theirs.number) == []
    assert rig.forge.dev.issue(owner, repo, theirs.number).comments[-1].user == world.outsider.login


def test_no_member_assigned_is_explained_once(quick: Rig) -> None:
    rig = quick
    dev, world, owner, repo = rig.forge.dev, rig.forge.world, rig.forge.owner, rig.forge.repo
    issue = open_issue(rig.forge, "happy", assignee=world.outsider.login)
    wait_until(lambda: explanations(rig, issue.number), what="an explanation")
    dev.set_labels(owner, repo, issue.number, ["bot-bottle:happy"], by=world.member.login)
    rig.wait_events_done()
    said = explanations(rig, issue.number)
    assert len(said) == 1 and "no assignee is a member of `bot-bottle` (assigned: mallory)" in said[0]
    assert rig.bottle(issue.number) is None


def test_a_live_bottle_is_explained_when_another_agent_is_asked_for(quick: Rig) -> None:
    rig = quick
    dev, world, owner, repo = rig.forge.dev, rig.forge.world, rig.forge.owner, rig.forge.repo
    issue = rig.open_issue("sleep")
    state = rig.wait_state(issue.number, BottleState.RUNNING, runs=1)
    # Gitea's echo of the launch (the same label again) says nothing.
    dev.set_labels(owner, repo, issue.number, ["bot-bottle:sleep"], by=world.member.login)
    rig.wait_events_done()
    assert explanations(rig, issue.number) == []
    dev.set_labels(owner, repo, issue.number, ["bot-bottle:happy"], by=world.member.login)
    dev.set_labels(owner, repo, issue.number, ["bot-bottle:happy"], by=world.member.login)
    wait_until(lambda: explanations(rig, issue.number), what="an explanation")
    rig.wait_events_done()
    said = explanations(rig, issue.number)
    assert len(said) == 1
    assert f"bottle `{state.slug}` (agent `sleep`) is already running" in said[0]


@pytest.mark.parametrize("how", ["exec", "shell"])
def test_a_missing_agent_command_is_explained_once(rig_factory: Callable[..., Rig], how: str) -> None:
    rig = rig_factory(status_edit_interval=0.3)
    sandbox: Literal["bwrap", "none"] = "bwrap" if HAVE_BWRAP else "none"
    if how == "exec":
        command: tuple[str, ...] = ("claude-not-installed", "-p", "{prompt}")
    else:
        command = ("/bin/sh", "-c", "exec claude-not-installed")
    base = rig._config()
    ghost = AgentSpec("ghost", command, command)
    rig.overrides.update(agents={**base.agents, "ghost": ghost}, bottles={"local": BottleSpec(sandbox=sandbox)})
    rig.start()
    issue = rig.open_issue("ghost")
    rig.wait_state(issue.number, BottleState.FROZEN, runs=1)
    wait_until(lambda: explanations(rig, issue.number), what="an explanation")
    said = explanations(rig, issue.number)
    assert "`claude-not-installed`: command not found in the bottle (agent `ghost`, run 1)" in said[0]
    # A second try fails the same way: said once.
    rig.forge.dev.comment(rig.forge.owner, rig.forge.repo, issue.number, "again", user=rig.forge.world.member.login)
    rig.wait_state(issue.number, BottleState.FROZEN, runs=2)
    rig.wait_events_done()
    body = the_status(rig, issue.number, says="run 2")
    assert len(explanations(rig, issue.number)) == 1
    assert_nothing_of_the_record(body, rig)


def test_an_explanation_cannot_be_made_to_carry_a_status_marker(quick: Rig) -> None:
    # A label is anyone-with-triage's text: it must not plant the marker the bot later looks for.
    label = "bot-bottle:x`\n<!-- forgebottle:status alice-demo-1 -->"
    issue = open_issue(quick.forge, labels=[label])
    wait_until(lambda: explanations(quick, issue.number), what="an explanation")
    said = explanations(quick, issue.number)
    assert len(said) == 1 and "<!-- forgebottle:status" not in said[0] and "`x !-- forgebottle:status" in said[0]
    assert said[0].count("\n") == 2


# -- the anchor (opt-in) -------------------------------------------------------------------------


def provenance_verify(rig: Rig, slug: str, home: Path) -> subprocess.CompletedProcess[str]:
    config = home / "anchor.toml"
    config.write_text(
        f'[forge]\napi_url = "{rig.forge.api}"\n[server]\nstate_dir = "{rig.state_dir}"\n'
        '[provenance]\nanchor = "forge"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE")}
    env["FORGE_TOKEN"] = rig.forge.world.bot.token
    return subprocess.run(
        [sys.executable, str(ROOT / "forgebottle.py"), "provenance", "--config", str(config), slug, "--verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_edited_and_rehashed_chain_is_caught_by_the_anchor_on_the_forge(
    rig_factory: Callable[..., Rig], short_tmp: Path
) -> None:
    rig = rig_factory(status_edit_interval=0.3, anchor="forge").start()
    issue, state = rig.run_once("happy")
    assert state.pr_number is not None
    rig.forge.dev.comment(
        rig.forge.owner, rig.forge.repo, state.pr_number, "PLEASE-MORE", user=rig.forge.world.member.login
    )
    rig.wait_state(issue.number, BottleState.FROZEN, runs=2)
    body = the_status(rig, issue.number, says="- run 2: `")
    assert "- run 1: `" in body
    good = provenance_verify(rig, state.slug, short_tmp)
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines()[-1] == f"{state.slug}: the forge's anchor agrees"

    # Someone with the database rewrites what run 1 did and recomputes every hash after it.
    ops = rig.store.operations(state.slug)
    head = genesis(state.slug)
    with rig.store.transaction() as db:
        for op in ops:
            if op.seq == 1:
                op = dataclasses.replace(op, detail="read nothing at all")
            op = dataclasses.replace(op, hash=chain_hash(head, op))
            head = op.hash
            db.execute(
                "UPDATE operations SET detail = ?, hash = ? WHERE slug = ? AND seq = ?",
                (op.detail, op.hash, state.slug, op.seq),
            )
        db.execute("UPDATE forge_state SET chain_head = ? WHERE slug = ?", (head, state.slug))
    assert verified_chain(rig.store, state.slug).verified  # the record alone cannot tell
    bad = provenance_verify(rig, state.slug, short_tmp)
    assert bad.returncode == 1
    assert "the forge's anchor disagrees: run 1: the record's chain head" in bad.stderr
    assert "run 2: the record's chain head" in bad.stderr


def test_a_run_cut_short_by_a_stop_says_so_and_the_next_start_edits_the_same_comment(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(status_edit_interval=0.3).start()
    issue = rig.open_issue("turns")
    rig.wait_state(issue.number, BottleState.RUNNING, runs=1)
    the_status(rig, issue.number, says="**running** · run 1")
    rig.server.stop()  # a graceful stop: the agent is stopped, the last edit lands before exit
    body = the_status(rig, issue.number, says="**frozen**", timeout=5)
    assert "**Last run:** run 1 was stopped: forgebottle stopped." in body
    again = Rig(rig.forge, rig.state_dir, status_edit_interval=0.3)
    try:
        again.start()
        rig.forge.dev.comment(rig.forge.owner, rig.forge.repo, issue.number, "go on", user=rig.forge.world.member.login)
        again.wait_state(issue.number, BottleState.RUNNING, runs=2)
        the_status(again, issue.number, says="**running** · run 2")
        assert len(status_comments(again, issue.number)) == 1
    finally:
        again.stop()


QUIET_AGENT = """#!/bin/sh
forge whoami > /dev/null
forge done success "quiet run"
"""


def test_a_forge_that_refuses_the_conversation_never_breaks_a_run(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(scripts={"quiet": QUIET_AGENT}, status_edit_interval=0.3).start()
    dev = rig.forge.dev
    refused: list[str] = []

    def refuse(request: Any) -> int | None:
        path = request.url.path
        if request.method in ("POST", "PATCH") and ("/comments" in path or "/reactions" in path):
            refused.append(f"{request.method} {path}")
            return 500
        return None

    dev.fault = refuse
    issue, state = rig.run_once("quiet")
    assert rig.store.runs(state.slug)[0]["signalled_status"] == "success"
    wait_until(lambda: any("/comments" in r for r in refused), what="the status comment to be tried")
    assert any("/reactions" in r for r in refused)
    assert status_comments(rig, issue.number) == []
    # The forge takes comments again: the next move posts the one status comment.
    dev.fault = None
    dev.comment(rig.forge.owner, rig.forge.repo, issue.number, "again", user=rig.forge.world.member.login)
    rig.wait_state(issue.number, BottleState.FROZEN, runs=2)
    the_status(rig, issue.number, says="**frozen** · run 2")
