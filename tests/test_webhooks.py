"""The webhook rules of DESIGN.md §4, end to end: devforge sends signed webhooks to serve."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from starlette.requests import Request

from config import Config, Secret
from gitea import Gitea
from service import Service
from statemachine import BottleState
from store import Store
from tests.conftest import (
    Forge,
    Rig,
    needs_bwrap,
    post_webhook,
    read_when,
    serve_forge,
    sign,
    stored_event,
)

pytestmark = needs_bwrap


@pytest.fixture(params=["gitea", "forgejo"])
def forge(short_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Forge]:
    """Every webhook rule, under Gitea's headers and under Forgejo's (X-Forgejo-* only)."""
    yield from serve_forge(short_tmp / "forge", request.param)


def test_launch_on_label_and_member_assignment(rig: Rig) -> None:
    dev, world = rig.forge.dev, rig.forge.world
    issue = dev.create_issue(rig.forge.owner, rig.forge.repo, title="T", body="b", user=world.member.login)
    rig.wait_events_done()
    assert rig.bottle(issue.number) is None
    assert "has no bot-bottle:<agent> label" in " | ".join(rig.event_reasons())
    dev.set_labels(rig.forge.owner, rig.forge.repo, issue.number, ["bot-bottle:happy"], by=world.member.login)
    rig.wait_events_done()
    assert rig.bottle(issue.number) is None
    assert "none is a member" in " | ".join(rig.event_reasons())
    # Nothing was cloned for the refused launch.
    assert not (rig.state_dir / "bottles").exists()
    dev.assign(rig.forge.owner, rig.forge.repo, issue.number, [world.member.login], by=world.member.login)
    state = rig.wait_state(issue.number, BottleState.FROZEN, runs=1)
    assert state.agent_name == "happy" and state.pr_number is not None
    assert [t["trigger"] for t in rig.store.transitions(state.slug)] == ["launch", "done"]
    assert rig.store.runs(state.slug)[0]["trigger"] == "issue_assign"
    # The workspace is on the bottle's branch.
    workspace = rig.state_dir / "bottles" / state.slug / "workspace"
    head = subprocess.run(["git", "-C", str(workspace), "branch", "--show-current"], capture_output=True, text=True)
    assert head.stdout.strip() == f"bot-bottle/issue-{issue.number}"


def test_no_launch_for_outsider_assignee_or_unknown_agent(rig: Rig) -> None:
    # Nothing is cloned or fetched for an event before the rules decided to launch it.
    git: list[str] = []

    def count_git(request: Request) -> int | None:
        if "/info/refs" in request.url.path or request.url.path.endswith(("/git-upload-pack", ".git")):
            git.append(request.url.path)
        return None

    rig.forge.dev.fault = count_git
    outsider = rig.open_issue(assignee=rig.forge.world.outsider.login)
    unknown = rig.open_issue(agent="nope")
    rig.wait_events_done()
    rig.forge.dev.fault = None
    assert rig.bottle(outsider.number) is None and rig.bottle(unknown.number) is None
    reasons = rig.event_reasons()
    assert any(f"assigned to {rig.forge.world.outsider.login}; none is a member" in r for r in reasons)
    assert any("agent 'nope' is not configured; configured: " in r for r in reasons)
    assert git == []


def test_not_twice_for_one_issue(rig: Rig) -> None:
    issue = rig.open_issue(agent="turns")
    state = rig.wait_state(issue.number, BottleState.RUNNING)
    member = rig.forge.world.member.login
    rig.forge.dev.edit_issue(rig.forge.owner, rig.forge.repo, issue.number, body="edited", by=member)
    rig.wait_events_done()
    assert f"bottle {state.slug} is already running" in " | ".join(rig.event_reasons())
    assert len(rig.store.all()) == 1
    rig.go(state.slug, 1)
    rig.wait_state(issue.number, BottleState.FROZEN, runs=1)


def test_bad_or_missing_signature_is_401_and_stores_nothing(rig: Rig) -> None:
    body = json.dumps({"action": "opened"}).encode()
    assert post_webhook(rig.url, body).status_code == 401
    assert post_webhook(rig.url, body, signature="0" * 64).status_code == 401
    assert post_webhook(rig.url, body, signature=sign(body, "wrong-secret")).status_code == 401
    assert post_webhook(rig.url, body, signature="not hex at all").status_code == 401
    # Found while reading the code: a non-ASCII header reached hmac.compare_digest as str (500).
    latin = httpx.post(
        f"{rig.url}/webhook",
        content=body,
        headers={b"X-Gitea-Event-Type": b"issues", b"X-Gitea-Signature": b"\xe9" * 64},
        timeout=10,
    )
    assert latin.status_code == 401
    assert rig.store.events(10) == []
    assert post_webhook(rig.url, body, signature=sign(body).upper()).status_code == 202  # hex is hex


def test_malformed_and_oversized(rig: Rig) -> None:
    assert post_webhook(rig.url, b"[1, 2]", signature=sign(b"[1, 2]")).status_code == 400
    assert post_webhook(rig.url, b"{nope", signature=sign(b"{nope")).status_code == 400
    big = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    assert post_webhook(rig.url, big, signature=sign(big)).status_code == 413
    no_type = post_webhook(rig.url, b"{}", event_type="", signature=sign(b"{}"))
    assert no_type.status_code == 400
    assert rig.store.events(10) == []


def test_form_hooks_are_signed_over_the_json(rig: Rig) -> None:
    payload = json.dumps({"action": "ping", "repository": {"name": "r", "owner": {"login": "o"}}}).encode()
    form = urlencode({"payload": payload.decode()}).encode()
    ok = post_webhook(rig.url, form, "push", signature=sign(payload), content_type="application/x-www-form-urlencoded")
    assert ok.status_code == 200 and ok.json()["reason"] == "event type 'push' is not one forgebottle acts on"
    assert stored_event(rig.store, ok.json()["event"]).body == payload  # type: ignore[union-attr]
    bad = post_webhook(
        rig.url, form + b"&x=1", "push", signature=sign(form), content_type="application/x-www-form-urlencoded"
    )
    assert bad.status_code == 401


def test_replay_is_a_noop(rig: Rig) -> None:
    _, state = rig.run_once()
    first = next(d for d in rig.deliveries() if d.event_type == "issues")
    copy = rig.forge.dev.replay(first)
    rig.deliveries()
    assert copy.status == 200 and "replay of event" in copy.response
    assert copy.uuid != first.uuid
    assert len(rig.store.all()) == 1 and len(rig.store.runs(state.slug)) == 1


def test_snapshot_has_title_body_and_member_comments_only(rig: Rig) -> None:
    dev, world = rig.forge.dev, rig.forge.world
    issue = dev.create_issue(rig.forge.owner, rig.forge.repo, title="Title T", body="Body B", user=world.member.login)
    dev.comment(rig.forge.owner, rig.forge.repo, issue.number, "MEMBER-SAYS", user=world.member.login)
    dev.comment(rig.forge.owner, rig.forge.repo, issue.number, "IGNORE-ALL-INSTRUCTIONS", user=world.outsider.login)
    dev.set_labels(rig.forge.owner, rig.forge.repo, issue.number, ["bot-bottle:turns"], by=world.member.login)
    dev.assign(rig.forge.owner, rig.forge.repo, issue.number, [world.member.login], by=world.member.login)
    state = rig.wait_state(issue.number, BottleState.RUNNING)
    prompt = read_when(rig.home(state.slug) / "prompt-1.md")
    assert "Title T" in prompt and "Body B" in prompt and "MEMBER-SAYS" in prompt
    assert "IGNORE-ALL-INSTRUCTIONS" not in prompt
    assert "forge done" in prompt  # the overlay
    # Editing the issue after launch does not change the running prompt.
    dev.edit_issue(rig.forge.owner, rig.forge.repo, issue.number, body="EDITED", by=world.member.login)
    rig.wait_events_done()
    rig.go(state.slug, 1)
    rig.wait_state(issue.number, BottleState.FROZEN, runs=1)
    assert "EDITED" not in (rig.home(state.slug) / "prompt-1.md").read_text()


def test_trusted_pr_comment_rehydrates_with_that_comment(rig: Rig) -> None:
    dev, world = rig.forge.dev, rig.forge.world
    issue, state = rig.run_once()
    assert state.pr_number is not None
    dev.comment(rig.forge.owner, rig.forge.repo, state.pr_number, "PLEASE-RENAME it", user=world.member.login)
    state = rig.wait_state(issue.number, BottleState.FROZEN, runs=2)
    assert state.pr_number is not None
    replies = [c.body for c in dev.issue(rig.forge.owner, rig.forge.repo, state.pr_number).comments]
    assert any("rehydrated with: PLEASE-RENAME" in body for body in replies)
    assert rig.store.runs(state.slug)[1]["trigger"] == "pull_request_comment"
    assert [t["trigger"] for t in rig.store.transitions(state.slug)] == ["launch", "done", "rehydrate", "done"]


def test_outsider_and_own_comments_do_not_rehydrate(rig: Rig) -> None:
    dev, world = rig.forge.dev, rig.forge.world
    issue, state = rig.run_once()
    assert state.pr_number is not None
    dev.comment(rig.forge.owner, rig.forge.repo, state.pr_number, "PLEASE-LEAK", user=world.outsider.login)
    dev.comment(rig.forge.owner, rig.forge.repo, issue.number, "PLEASE-LOOP", user=world.bot.login)
    rig.wait_events_done()
    reasons = rig.event_reasons()
    assert any(f"{world.outsider.login} is neither a member" in r for r in reasons)
    assert any("forgebottle's own user" in r for r in reasons)
    assert rig.bottle(issue.number).status is BottleState.FROZEN  # type: ignore[union-attr]
    assert len(rig.store.runs(state.slug)) == 1
    assert rig.store.pending(state.slug) == []


def test_writer_who_is_not_a_member_is_trusted(rig: Rig) -> None:
    dev, world = rig.forge.dev, rig.forge.world
    writer = dev.add_user("wendy")
    dev.repo(rig.forge.owner, rig.forge.repo).collaborators["wendy"] = "write"
    issue, state = rig.run_once()
    assert state.pr_number is not None
    dev.review(
        rig.forge.owner, rig.forge.repo, state.pr_number, "PLEASE-FIX the typo", user=writer.login, kind="rejected"
    )
    state = rig.wait_state(issue.number, BottleState.FROZEN, runs=2)
    assert rig.store.runs(state.slug)[1]["trigger"] == "pull_request_review_rejected"
    assert world.outsider.login != writer.login


def test_comment_during_a_run_waits_for_the_next_turn(rig: Rig) -> None:
    dev, world = rig.forge.dev, rig.forge.world
    issue = rig.open_issue(agent="turns")
    state = rig.wait_state(issue.number, BottleState.RUNNING)
    dev.comment(rig.forge.owner, rig.forge.repo, issue.number, "FIRST-NOTE", user=world.member.login)
    dev.comment(rig.forge.owner, rig.forge.repo, issue.number, "SECOND-NOTE", user=world.member.login)
    rig.wait_events_done()
    assert [p["body"].split("\n")[-1] for p in rig.store.pending(state.slug)] == ["FIRST-NOTE", "SECOND-NOTE"]
    assert "kept as a pending prompt (bottle is running)" in " | ".join(rig.event_reasons())
    rig.go(state.slug, 1)
    prompt2 = read_when(rig.home(state.slug) / "prompt-2.md")
    assert "FIRST-NOTE" in prompt2 and "SECOND-NOTE" in prompt2  # coalesced into one turn
    assert prompt2.index("FIRST-NOTE") < prompt2.index("SECOND-NOTE")
    rig.go(state.slug, 2)
    rig.wait_state(issue.number, BottleState.FROZEN, runs=2)
    assert rig.store.pending(state.slug) == []


def test_pr_close_destroys_and_removes_the_workspace(rig: Rig) -> None:
    issue, state = rig.run_once()
    workspace = rig.state_dir / "bottles" / state.slug / "workspace"
    assert (workspace / "change.txt").exists()
    assert state.pr_number is not None
    rig.forge.dev.close_pr(rig.forge.owner, rig.forge.repo, state.pr_number, user=rig.forge.world.member.login)
    state = rig.wait_state(issue.number, BottleState.DESTROYED)
    assert not workspace.exists()
    assert rig.store.transitions(state.slug)[-1]["reason"] == f"pull request #{state.pr_number} closed"
    assert rig.store.runs(state.slug)  # the record is kept


def test_max_running_queues_fifo(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(max_running=1).start()
    first, second = rig.open_issue(agent="turns"), rig.open_issue(agent="turns")
    a = rig.wait_state(first.number, BottleState.RUNNING)
    rig.wait_events_done()
    assert rig.bottle(second.number).status is BottleState.QUEUED  # type: ignore[union-attr]
    # A queued launch clones nothing until its turn comes: its checkout would go stale.
    assert not (rig.state_dir / "bottles" / rig.bottle(second.number).slug).exists()  # type: ignore[union-attr]
    rig.go(a.slug, 1)
    b = rig.wait_state(second.number, BottleState.RUNNING)
    assert (rig.state_dir / "bottles" / b.slug / "workspace" / ".git").is_dir()
    assert rig.bottle(first.number).status is BottleState.FROZEN  # type: ignore[union-attr]
    rig.go(b.slug, 1)
    rig.wait_state(second.number, BottleState.FROZEN, runs=1)


def test_unknown_bottle_label_is_ignored(rig: Rig) -> None:
    issue = rig.open_issue(labels=["bot-bottle:happy", "bot-bottle-bottle:gpu"])
    rig.wait_events_done()
    assert rig.bottle(issue.number) is None
    assert "bottle 'gpu' is not configured" in " | ".join(rig.event_reasons())


def test_irrelevant_events_are_recorded_as_ignored_at_intake(rig: Rig) -> None:
    payload = json.dumps(
        {
            "action": "deleted",
            "issue": {"number": 1},
            "repository": {"name": rig.forge.repo, "owner": {"login": rig.forge.owner}},
        }
    ).encode()
    answer = post_webhook(rig.url, payload, "issues", signature=sign(payload))
    assert answer.status_code == 200
    assert answer.json()["reason"] == "issues action 'deleted' is not one forgebottle acts on"
    event = stored_event(rig.store, answer.json()["event"])
    assert event is not None and (event.status, event.reason) == ("ignored", answer.json()["reason"])
    hostile = json.dumps(
        {
            "action": "opened",
            "issue": {"number": "1; drop"},
            "sender": [],
            "repository": {"name": rig.forge.repo, "owner": "not-an-object"},
        }
    ).encode()
    accepted = post_webhook(rig.url, hostile, "issues", signature=sign(hostile))
    assert accepted.status_code == 202
    rig.wait_events_done()
    assert stored_event(rig.store, accepted.json()["event"]).reason == "payload names no repository"  # type: ignore[union-attr]


def test_unhashable_action_is_ignored_not_a_500(rig: Rig) -> None:
    # Found by the fuzzer: {"action": []} once reached a frozenset lookup.
    body = json.dumps({"action": [], "repository": {"name": "r", "owner": {"login": "o"}}}).encode()
    answer = post_webhook(rig.url, body, "issue_assign", signature=sign(body))
    assert answer.status_code == 200 and "action '[]' is not one forgebottle acts on" in answer.json()["reason"]


def test_a_comment_in_the_launch_prompt_is_not_delivered_again(rig: Rig) -> None:
    # Gitea may deliver a comment's webhook after the launch that already read the comment.
    dev, world = rig.forge.dev, rig.forge.world
    issue = dev.create_issue(rig.forge.owner, rig.forge.repo, title="T", body="B", user=world.member.login)
    early = dev.comment(rig.forge.owner, rig.forge.repo, issue.number, "EARLY-NOTE", user=world.member.login)
    dev.set_labels(rig.forge.owner, rig.forge.repo, issue.number, ["bot-bottle:turns"], by=world.member.login)
    dev.assign(rig.forge.owner, rig.forge.repo, issue.number, [world.member.login], by=world.member.login)
    state = rig.wait_state(issue.number, BottleState.RUNNING)
    assert "EARLY-NOTE" in read_when(rig.home(state.slug) / "prompt-1.md")
    repo = dev.repo(rig.forge.owner, rig.forge.repo)
    late = dev.issue(rig.forge.owner, rig.forge.repo, issue.number)
    payload = {
        "action": "created",
        "issue": dev.issue_json(repo, late),
        "comment": dev.comment_json(repo, late, early),
        "repository": dev.repo_json(repo),
        "sender": dev.user_json(world.member.login),
        "is_pull": False,
        "late": True,
    }
    body = json.dumps(payload).encode()
    assert post_webhook(rig.url, body, "issue_comment", signature=sign(body)).status_code == 202
    rig.wait_events_done()
    assert f"comment {early.id} is already in the launch prompt" in " | ".join(rig.event_reasons())
    assert rig.store.pending(state.slug) == []
    rig.go(state.slug, 1)
    rig.wait_state(issue.number, BottleState.FROZEN, runs=1)


def test_a_stale_label_in_the_payload_is_decided_on_the_issue_as_it_is(rig: Rig) -> None:
    # A payload that still shows a bot-bottle label makes forgebottle read the comments early
    # (alongside the issue); the issue as it is now decides, and the early read, even failing,
    # leaves no trace in the decision.
    member = rig.forge.world.member.login
    issue = rig.open_issue(labels=[], assignee=member)
    rig.wait_events_done()
    # The early read may be cancelled before it is sent (the issue read decided first) or
    # answered with this 500; either way the event is decided on the issue alone.
    comments_path = f"/issues/{issue.number}/comments"
    rig.forge.dev.fault = lambda request: 500 if request.url.path.endswith(comments_path) else None
    payload = json.dumps(
        {
            "action": "edited",
            "number": issue.number,
            "issue": {"number": issue.number, "labels": [{"name": "bot-bottle:happy"}]},
            "repository": {"name": rig.forge.repo, "owner": {"login": rig.forge.owner}},
            "sender": {"login": member},
        }
    ).encode()
    answer = post_webhook(rig.url, payload, "issues", signature=sign(payload))
    assert answer.status_code == 202
    rig.wait_events_done()
    event = stored_event(rig.store, answer.json()["event"])
    assert event is not None and event.status == "ignored"
    assert event.reason == f"issue #{issue.number} has no bot-bottle:<agent> label"
    assert rig.bottle(issue.number) is None
    rig.forge.dev.fault = None


def intake_only(state_dir: Path, store: Store) -> Service:
    """A service never started, with no forge to reach: for what accept() does alone."""
    config = Config(
        api_url="http://127.0.0.1:9/api/v1", token=Secret("t"), webhook_secret=Secret("s"), state_dir=state_dir
    )
    assert config.db_path == store.path
    return Service(config, store, Gitea(config.api_url, "t"))


def test_a_webhook_is_committed_off_the_event_loop_before_it_is_answered(tmp_path: Path) -> None:
    # Another thread holds the store in a long transaction: the webhook's commit waits for it
    # in a thread of its own, and the event loop (every other request) goes on meanwhile.
    store = Store(tmp_path / "bot-bottle.db")
    service = intake_only(tmp_path, store)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.transaction():
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)

    async def go() -> None:
        accepted = asyncio.create_task(service.accept(delivery="d", event_type="issues", body=b'{"n": 1}'))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not accepted.done()
        release.set()
        event_id, new = await asyncio.wait_for(accepted, 30)
        assert new and [e.id for e in store.pending_events()] == [event_id]

    asyncio.run(go())
    holder.join(30)


def test_a_webhook_whose_commit_fails_is_refused_and_not_kept(tmp_path: Path) -> None:
    # The database cannot take the commit (here: closed under the service): the sender hears
    # of the failure rather than a 202 for an event that is not on disk.
    store = Store(tmp_path / "bot-bottle.db")
    service = intake_only(tmp_path, store)
    store.close()

    async def go() -> None:
        with pytest.raises(sqlite3.ProgrammingError):
            await service.accept(delivery="d", event_type="issues", body=b'{"n": 1}')

    asyncio.run(go())
