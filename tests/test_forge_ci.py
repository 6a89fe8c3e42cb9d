"""Issue 19's forge side: the new ``Gitea`` methods against a served devforge (real loopback
HTTP), the CI webhooks as a receiving server sees them, hook ``events`` filtering, and the
Forgejo flavour's headers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import devforge as df
from devforge.gitcmd import git_env
from gitea import MAX_LOG_BYTES, ForgeAuthError, ForgeError, ForgeNotFound, Gitea
from tests.conftest import Forge, wait_until

T = TypeVar("T")
SECRET = "hook-secret-" + "7" * 20


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class Receiver:
    """A webhook receiver on loopback that records each request's headers and body."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        self.server = df.ServerThread(Starlette(routes=[Route("/hook/{name}", self._hook, methods=["POST"])]))
        self.server.start()

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            self.got.append(({k.lower(): v for k, v in request.headers.items()} | {"path": request.url.path}, body))
        return Response(status_code=204)

    def url(self, name: str) -> str:
        return f"{self.server.url}/hook/{name}"

    def to(self, name: str) -> list[tuple[dict[str, str], dict[str, Any]]]:
        with self._lock:
            return [(h, json.loads(b)) for h, b in self.got if h["path"] == f"/hook/{name}"]

    def bodies(self, name: str) -> list[bytes]:
        with self._lock:
            return [b for h, b in self.got if h["path"] == f"/hook/{name}"]

    def events(self, name: str) -> list[str]:
        return [h.get("x-gitea-event-type") or h.get("x-forgejo-event-type", "?") for h, _ in self.to(name)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.server.stop()


def gitea(forge: Forge, token: str | None = None) -> Gitea:
    return Gitea(forge.api, token or forge.world.bot.token)


def raw(forge: Forge, method: str, path: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"token {token or forge.world.bot.token}"}
    return httpx.request(method, f"{forge.api}{path}", headers=headers, timeout=10, **kwargs)


# -- reactions and the status comment ------------------------------------------------------


def test_reactions_are_made_once_on_issues_and_comments(forge: Forge) -> None:
    dev, world, o, r = forge.dev, forge.world, forge.owner, forge.repo
    dev.create_issue(o, r, title="I", user=world.member.login)
    comment = dev.comment(o, r, 1, "please", user=world.member.login)

    async def go() -> None:
        g = gitea(forge)
        try:
            assert await g.add_reaction(o, r, issue=1) is True
            assert await g.add_reaction(o, r, issue=1) is False  # Gitea answers 200: it was there
            assert await g.add_reaction(o, r, comment_id=comment.id, content="rocket") is True
            with pytest.raises(ForgeError) as refused:
                await g.add_reaction(o, r, issue=1, content="<script>")
            assert refused.value.status == 403
            with pytest.raises(ForgeNotFound):
                await g.add_reaction(o, r, comment_id=999999)
            with pytest.raises(ValueError):
                await g.add_reaction(o, r, issue=1, comment_id=comment.id)
        finally:
            await g.aclose()

    run(go())
    listed = raw(forge, "GET", f"/repos/{o}/{r}/issues/1/reactions").json()
    assert [(x["user"]["login"], x["content"]) for x in listed] == [(world.bot.login, "eyes")]
    listed = raw(forge, "GET", f"/repos/{o}/{r}/issues/comments/{comment.id}/reactions").json()
    assert [(x["user"]["login"], x["content"]) for x in listed] == [(world.bot.login, "rocket")]


def test_the_status_comment_is_found_by_its_marker_only_when_the_bot_wrote_it(forge: Forge) -> None:
    dev, world, o, r = forge.dev, forge.world, forge.owner, forge.repo
    marker = "<!-- forgebottle:status alice-demo-1 -->"
    dev.create_issue(o, r, title="I", user=world.member.login)
    # Anyone can type the marker: an outsider's copy, even posted first, is never the bot's.
    dev.comment(o, r, 1, f"{marker}\nfake status", user=world.outsider.login)

    async def go() -> None:
        g = gitea(forge)
        outsider = gitea(forge, world.outsider.token)
        member = gitea(forge, world.member.token)
        try:
            assert await g.find_comment(o, r, 1, marker) is None
            posted = await g.post_comment(o, r, 1, f"{marker}\n**state:** running")
            await g.post_comment(o, r, 1, "<!-- forgebottle:status alice-demo-10 -->")  # a longer slug
            found = await g.find_comment(o, r, 1, marker)
            assert found is not None and found.id == posted.id
            edited = await g.edit_comment(o, r, posted.id, f"{marker}\n**state:** frozen")
            assert edited.id == posted.id and edited.body.endswith("frozen") and edited.user == world.bot.login
            again = await g.find_comment(o, r, 1, marker)
            assert again is not None and again.body == edited.body
            # Only the author, or someone who may write issues, edits a comment (Gitea: empty 403).
            with pytest.raises(ForgeAuthError):
                await outsider.edit_comment(o, r, posted.id, "defaced")
            assert (await member.edit_comment(o, r, posted.id, f"{marker}\nby the owner")).body.endswith("owner")
            with pytest.raises(ForgeNotFound):
                await g.edit_comment(o, r, 999999, "x")
            with pytest.raises(ValueError):
                await g.find_comment(o, r, 1, "")
        finally:
            for client in (g, outsider, member):
                await client.aclose()

    run(go())
    bodies = [c.body for c in forge.dev.issue(o, r, 1).comments]
    assert sum(marker in b for b in bodies) == 2  # the outsider's and the bot's: one each, no duplicate


# -- commit statuses and Actions -----------------------------------------------------------


def test_commit_statuses_are_the_latest_per_context_by_sha_or_branch(forge: Forge) -> None:
    dev, world, o, r = forge.dev, forge.world, forge.owner, forge.repo
    sha = dev.commit_files(o, r, "bot-bottle/issue-1", {"f": "x"}, "f")
    bot = world.bot.login
    dev.create_status(o, r, sha, state="pending", context="ci/test", user=bot)
    dev.create_status(o, r, sha, state="failure", context="ci/test", target_url="http://ci/9", user=bot)
    dev.create_status(o, r, sha, state="success", context="ci/lint", user=bot)
    for n in range(55):  # more than one page of 50
        dev.create_status(o, r, sha, state="success", context=f"many/{n:02}", user=bot)
    main_sha = dev.branch_sha(dev.repo(o, r), "main")
    dev.create_status(o, r, main_sha, state="error", context="ci/test", user=bot)

    async def go() -> None:
        g = gitea(forge)
        try:
            for ref in (sha, "bot-bottle/issue-1"):
                statuses = await g.commit_statuses(o, r, ref)
                assert len(statuses) == 57
                test = next(s for s in statuses if s.context == "ci/test")
                assert (test.state, test.target_url, test.failed) == ("failure", "http://ci/9", True)
                assert not next(s for s in statuses if s.context == "ci/lint").failed
            assert [s.state for s in await g.commit_statuses(o, r, "main")] == ["error"]
            # No option or revision syntax reaches git; unknown refs are 404.
            for hostile in ("--output=/tmp/x", "main^{tree}", "main~1", "../main", "HEAD", "nope", sha[:39] + "g"):
                with pytest.raises(ForgeNotFound):
                    await g.commit_statuses(o, r, hostile)
            # Refused before any request: no dot segment to climb the path, no lone surrogate.
            for hostile in ("..", ".", "", "\udc80", "x" * 5000):
                with pytest.raises(ForgeError, match="not a name"):
                    await g.commit_statuses(o, r, hostile)
        finally:
            await g.aclose()

    run(go())
    assert not Path("/tmp/x").exists()
    created = raw(forge, "POST", f"/repos/{o}/{r}/statuses/{sha}", json={"state": "success", "context": "api"})
    assert created.status_code == 201 and created.json()["status"] == "success"
    denied = raw(forge, "POST", f"/repos/{o}/{r}/statuses/{sha}", world.outsider.token, json={"state": "success"})
    assert denied.status_code == 403


def test_workflow_jobs_are_those_of_runs_at_the_sha(forge: Forge) -> None:
    dev, o, r = forge.dev, forge.owner, forge.repo
    old = dev.commit_files(o, r, "bot-bottle/issue-1", {"f": "1"}, "one")
    dev.run_workflow(o, r, old, {"test": "failure"}, log="old failure\n")
    head = dev.commit_files(o, r, "bot-bottle/issue-1", {"f": "2"}, "two")
    done = dev.run_workflow(o, r, head, {"test": "failure", "lint": "success"}, log={"test": "E   assert 1 == 2\n"})
    running = dev.start_workflow(o, r, head, {"e2e": "success"}, workflow="e2e.yml")

    async def go() -> None:
        g = gitea(forge)
        try:
            jobs = await g.workflow_jobs(o, r, head)
            assert [(j.name, j.status, j.conclusion) for j in jobs] == [
                ("e2e", "in_progress", ""),  # the newest run first
                ("test", "completed", "failure"),
                ("lint", "completed", "success"),
            ]
            assert [j.failed for j in jobs] == [False, True, False]
            assert {j.head_sha for j in jobs} == {head}
            assert {j.run_id for j in jobs} == {done.id, running.id}
            test = jobs[1]
            assert test.html_url.endswith(f"/{o}/{r}/actions/runs/{done.id}/jobs/0")
            assert await g.job(o, r, test.id) == test
            assert await g.job_log_tail(o, r, test.id) == ["E   assert 1 == 2"]
            assert await g.job_log_tail(o, r, jobs[2].id) == []  # an empty log
            assert [j.name for j in await g.workflow_jobs(o, r, old)] == ["test"]
            assert await g.workflow_jobs(o, r, "0" * 40) == []
            with pytest.raises(ForgeNotFound):
                await g.job(o, r, 999999)
        finally:
            await g.aclose()

    run(go())
    dev.finish_workflow(o, r, running.id)
    # Each job also set a commit status whose target_url is the job's page, as Gitea's Actions do.
    statuses = {s.context: s for s in reversed(dev.statuses(dev.repo(o, r), head))}  # newest wins
    assert statuses["e2e / e2e (push)"].state == "success"
    assert statuses["ci / test (push)"].target_url.endswith(f"/actions/runs/{done.id}/jobs/0")


def test_the_job_log_tail_is_bounded_cut_at_a_line_and_survives_bad_bytes(forge: Forge) -> None:
    dev, o, r = forge.dev, forge.owner, forge.repo
    sha = dev.commit_files(o, r, "b", {"f": "1"}, "one")
    big = b"".join(b"line %06d of a long build log\n" % n for n in range(100_000))  # 3.3 MB
    hostile = b"ok\n\xff\xfe\xed\xa0\x80 not utf-8\n" + b"x" * 300_000  # a last line over the cap
    run_ = dev.run_workflow(o, r, sha, {"big": "failure", "bad": "failure"}, log={"big": big, "bad": hostile})
    big_id, bad_id = (j.id for j in run_.jobs)

    async def go() -> None:
        g = gitea(forge)
        try:
            tail = await g.job_log_tail(o, r, big_id, lines=3)
            assert tail == [f"line {n:06d} of a long build log" for n in (99_997, 99_998, 99_999)]
            many = await g.job_log_tail(o, r, big_id, lines=100_000, max_bytes=1000)
            # Only whole lines from the last 1,000 bytes: the cut one is dropped.
            assert 0 < len(many) <= 1000 // 31 and all(line.startswith("line ") for line in many)
            assert many[-1] == "line 099999 of a long build log"
            last = await g.job_log_tail(o, r, bad_id, lines=5)
            assert len(last) == 1 and set(last[0]) == {"x"} and len(last[0]) <= 64 * 1024
            small = await g.job_log_tail(o, r, bad_id, lines=5, max_bytes=len(hostile))
            assert small[:2] == ["ok", "\ufffd\ufffd\ufffd\ufffd\ufffd not utf-8"]  # replaced, never raised
        finally:
            await g.aclose()

    run(go())


class _LogForge:
    """A forge whose job log endpoint ignores Range and sends ``size`` bytes of log."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ranges: list[str] = []
        path = "/api/v1/repos/o/r/actions/jobs/{job}/logs"
        self.server = df.ServerThread(Starlette(routes=[Route(path, self._log, methods=["GET"])])).start()

    async def _log(self, request: Request) -> Response:
        self.ranges.append(request.headers.get("range", ""))

        async def chunks() -> AsyncIterator[bytes]:
            line = b"0123456789abcdef" * 4 + b"\n"
            block = line * 1024  # 65 KiB
            sent = 0
            while sent < self.size:
                yield block
                sent += len(block)
            yield b"the end\n"

        return StreamingResponse(chunks(), media_type="text/plain")


def test_a_forge_ignoring_range_is_read_keeping_only_the_tail_and_refused_past_the_cap() -> None:
    small, endless = _LogForge(4 * 1024 * 1024), _LogForge(MAX_LOG_BYTES + 1)

    async def go() -> None:
        for forge in (small, endless):
            g = Gitea(forge.server.url + "/api/v1", "tok")
            try:
                if forge is small:
                    tail = await g.job_log_tail("o", "r", 1, lines=2)
                    assert tail == ["0123456789abcdef" * 4, "the end"]
                else:
                    with pytest.raises(ForgeError, match="over"):
                        await g.job_log_tail("o", "r", 1)
            finally:
                await g.aclose()

    try:
        run(go())
    finally:
        small.server.stop()
        endless.server.stop()
    assert small.ranges == ["bytes=-65536"]


# -- hooks, labels, branches ---------------------------------------------------------------


def test_hooks_created_through_the_api_deliver_and_never_show_their_secret(forge: Forge, receiver: Receiver) -> None:
    dev, world, o, r = forge.dev, forge.world, forge.owner, forge.repo

    async def go() -> None:
        g = gitea(forge)
        outsider = gitea(forge, world.outsider.token)
        try:
            hook = await g.create_hook(o, r, receiver.url("api"), SECRET, ["issues", "status"])
            assert hook.active and hook.url == receiver.url("api") and set(hook.events) == {"issues", "status"}
            assert hook.content_type == "json" and hook.type == "gitea"
            assert await g.list_hooks(o, r) == [hook]
            with pytest.raises(ForgeAuthError):
                await outsider.create_hook(o, r, receiver.url("evil"), "s", ["issues"])
            with pytest.raises(ForgeAuthError):
                await outsider.list_hooks(o, r)
        finally:
            await g.aclose()
            await outsider.aclose()

    run(go())
    listed = raw(forge, "GET", f"/repos/{o}/{r}/hooks")
    assert listed.status_code == 200 and SECRET not in listed.text
    # Gitea's default is an inactive hook: one made without "active": true delivers nothing.
    quiet = {"type": "gitea", "config": {"url": receiver.url("quiet"), "content_type": "json"}, "events": ["issues"]}
    made = raw(forge, "POST", f"/repos/{o}/{r}/hooks", json=quiet)
    assert made.status_code == 201 and made.json()["active"] is False
    for bad in ({"type": "gitea", "config": {"url": "file:///etc/passwd", "content_type": "json"}}, {"type": "x"}):
        assert raw(forge, "POST", f"/repos/{o}/{r}/hooks", json=bad).status_code == 422
    dev.create_issue(o, r, title="hello", user=world.member.login)
    dev.wait_deliveries()
    ((headers, payload),) = receiver.to("api")
    body = json.dumps(payload)  # only to show the secret is not in the payload either
    assert SECRET not in body and headers["x-gitea-event-type"] == "issues"
    assert receiver.to("quiet") == []


def test_labels_are_listed_and_created_and_a_second_create_duplicates_as_gitea_does(forge: Forge) -> None:
    o, r = forge.owner, forge.repo

    async def go() -> None:
        g = gitea(forge)
        outsider = gitea(forge, forge.world.outsider.token)
        try:
            assert await g.list_labels(o, r) == []
            made = await g.create_label(o, r, "bot-bottle:claude", "#1D76DB", "run the claude agent")
            assert (made.name, made.color, made.description) == ("bot-bottle:claude", "1d76db", "run the claude agent")
            assert await g.list_labels(o, r) == [made]
            await g.create_label(o, r, "bot-bottle:claude", "1d76db")
            # Gitea keeps both: a setup that creates without listing first makes duplicates.
            assert [label.name for label in await g.list_labels(o, r)] == ["bot-bottle:claude"] * 2
            with pytest.raises(ForgeError) as bad:
                await g.create_label(o, r, "x", "not-a-color")
            assert bad.value.status == 422
            with pytest.raises(ForgeAuthError):
                await outsider.create_label(o, r, "y", "ffffff")
        finally:
            await g.aclose()
            await outsider.aclose()

    run(go())


def test_branch_sha(forge: Forge) -> None:
    dev, o, r = forge.dev, forge.owner, forge.repo
    sha = dev.commit_files(o, r, "bot-bottle/issue-3", {"f": "x"}, "f")

    async def go() -> None:
        g = gitea(forge)
        try:
            assert await g.branch_sha(o, r, "bot-bottle/issue-3") == sha
            assert await g.branch_sha(o, r, "main") == dev.branch_sha(dev.repo(o, r), "main")
            assert await g.branch_sha(o, r, "bot-bottle/issue-4") is None
            for hostile in ("../hooks", "a//b", "./main", "main/\udc80", "/main"):
                with pytest.raises(ForgeError):
                    await g.branch_sha(o, r, hostile)
            assert await g.branch_sha(o, r, "main^{tree}") is None
        finally:
            await g.aclose()

    run(go())


# -- the CI webhooks, filtering and Forgejo ------------------------------------------------


def signed(headers: dict[str, str], body: dict[str, Any], family: str, raw_body: bytes) -> bool:
    expected = hmac.new(SECRET.encode(), raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers[f"x-{family}-signature"], expected) and bool(body)


def test_ci_webhooks_arrive_signed_with_their_event_types_and_gitea_payloads(forge: Forge, receiver: Receiver) -> None:
    dev, world, o, r = forge.dev, forge.world, forge.owner, forge.repo
    dev.add_hook(o, r, receiver.url("ci"), SECRET, events=["status", "workflow_run", "workflow_job"])
    sha = dev.commit_files(o, r, "bot-bottle/issue-1", {"f": "x"}, "f")
    pr = dev.create_pr(o, r, head="bot-bottle/issue-1", base="main", title="Fix", body="", user=world.bot.login)
    run_ = dev.run_workflow(o, r, sha, {"test": "failure"}, log="boom")
    dev.wait_deliveries()
    got = receiver.to("ci")
    assert receiver.events("ci") == [
        "workflow_run",
        "workflow_job",
        "workflow_run",
        "status",
        "workflow_job",
        "status",
        "workflow_job",
        "workflow_run",
    ]
    raw_bodies = receiver.bodies("ci")
    for (headers, payload), body in zip(got, raw_bodies, strict=True):
        event = headers["x-gitea-event-type"]
        assert headers["x-gitea-event"] == event  # CI events are their own coarse event
        assert signed(headers, payload, "gitea", body)
        assert payload["repository"]["full_name"] == f"{o}/{r}" and "login" in payload["sender"]
    runs = [p for h, p in got if h["x-gitea-event-type"] == "workflow_run"]
    assert [p["action"] for p in runs] == ["requested", "in_progress", "completed"]
    final = runs[-1]["workflow_run"]
    assert (final["id"], final["head_sha"], final["status"], final["conclusion"]) == (
        run_.id,
        sha,
        "completed",
        "failure",
    )
    assert final["event"] == "pull_request" and runs[-1]["pull_request"]["number"] == pr.number
    jobs = [p for h, p in got if h["x-gitea-event-type"] == "workflow_job"]
    assert [(p["action"], p["workflow_job"]["status"], p["workflow_job"]["conclusion"]) for p in jobs] == [
        ("queued", "queued", ""),
        ("in_progress", "in_progress", ""),
        ("completed", "completed", "failure"),
    ]
    assert jobs[-1]["workflow_job"]["id"] == run_.jobs[0].id and jobs[-1]["workflow_job"]["head_sha"] == sha
    statuses = [p for h, p in got if h["x-gitea-event-type"] == "status"]
    assert [(p["state"], p["sha"], p["context"]) for p in statuses] == [
        ("pending", sha, "ci / test (pull_request)"),
        ("failure", sha, "ci / test (pull_request)"),
    ]
    assert statuses[-1]["target_url"] == jobs[-1]["workflow_job"]["html_url"]
    assert statuses[-1]["commit"]["id"] == sha and statuses[-1]["commit"]["message"] == "f\n"


def test_hook_events_filter_deliveries(forge: Forge, receiver: Receiver) -> None:
    dev, world, o, r = forge.dev, forge.world, forge.owner, forge.repo

    async def make_hooks() -> None:
        g = gitea(forge)
        try:
            for name, events in {
                "status": ["status"],
                "jobs": ["workflow_job"],
                "issues": ["issues"],
                "comments": ["issue_comment"],
                "prs": ["pull_request"],
            }.items():
                await g.create_hook(o, r, receiver.url(name), SECRET, events)
        finally:
            await g.aclose()

    run(make_hooks())
    member = world.member.login
    dev.create_issue(o, r, title="I", user=member)
    dev.comment(o, r, 1, "on the issue", user=member)
    sha = dev.commit_files(o, r, "bot-bottle/issue-1", {"f": "x"}, "f")
    dev.create_pr(o, r, head="bot-bottle/issue-1", base="main", title="Fix", body="", user=world.bot.login)
    dev.comment(o, r, 2, "on the PR", user=member)
    dev.run_workflow(o, r, sha, {"test": "success"})
    dev.create_status(o, r, sha, state="failure", context="ext", user=world.bot.login)
    dev.wait_deliveries()
    assert receiver.events("status") == ["status"] * 3
    assert receiver.events("jobs") == ["workflow_job"] * 3
    assert receiver.events("issues") == ["issues", "issue_comment"]
    # issue_comment is not comments on PRs; the pull_request group includes them.
    assert receiver.events("comments") == ["issue_comment"]
    assert receiver.events("prs") == ["pull_request", "pull_request_comment"]


@pytest.fixture
def forgejo(short_tmp: Path) -> Iterator[Forge]:
    dev = df.DevForge(short_tmp / "forgejo", flavor="forgejo")
    world = df.seed(dev)
    server = df.ServerThread(dev.app)
    dev.base_url = server.url + "/"
    server.start()
    yield Forge(dev, world, server)
    server.stop()
    dev.close()


def test_forgejo_sends_its_own_headers_and_no_gitea_ones(forgejo: Forge, receiver: Receiver) -> None:
    dev, world, o, r = forgejo.dev, forgejo.world, forgejo.owner, forgejo.repo

    async def make_hook() -> None:
        g = gitea(forgejo)  # the same client speaks to Forgejo's API
        try:
            await g.create_hook(o, r, receiver.url("fj"), SECRET, ["issues", "status", "workflow_job", "workflow_run"])
        finally:
            await g.aclose()

    run(make_hook())
    dev.create_issue(o, r, title="I", user=world.member.login)
    sha = dev.commit_files(o, r, "b", {"f": "x"}, "f")
    dev.run_workflow(o, r, sha, {"test": "failure"})
    dev.wait_deliveries()
    got = receiver.to("fj")
    # Forgejo's Actions send other events than Gitea's workflow_*: the statuses carry CI.
    assert receiver.events("fj") == ["issues", "status", "status"]
    raw_bodies = receiver.bodies("fj")
    for (headers, payload), body in zip(got, raw_bodies, strict=True):
        assert not [k for k in headers if k.startswith(("x-gitea-", "x-gogs-"))]
        event = headers["x-forgejo-event-type"]
        assert headers["x-forgejo-event"] == event and len(headers["x-forgejo-delivery"]) == 36
        assert signed(headers, payload, "forgejo", body)
    assert [p["state"] for _, p in got[1:]] == ["pending", "failure"]
    with pytest.raises(ValueError):
        df.DevForge(forgejo.dev.root / "other", flavor="gitlab")  # type: ignore[arg-type]


def test_a_gitea_forge_still_sends_every_header_family(forge: Forge, receiver: Receiver) -> None:
    forge.dev.add_hook(forge.owner, forge.repo, receiver.url("g"), SECRET)
    forge.dev.create_issue(forge.owner, forge.repo, title="I", user=forge.world.member.login)
    forge.dev.wait_deliveries()
    ((headers, _),) = receiver.to("g")
    for family in ("gitea", "gogs"):
        assert headers[f"x-{family}-event-type"] == "issues"
    assert headers["x-gitea-hook-installation-target-type"] == "repository"
    assert not [k for k in headers if k.startswith("x-forgejo-")]
    wait_until(lambda: forge.dev.deliveries[0].status == 204, what="the delivery's status")


def test_scripted_ci_fails_the_first_push_and_passes_the_second(forge: Forge, short_tmp: Path) -> None:
    dev, world, o, r = forge.dev, forge.world, forge.owner, forge.repo
    dev.on_push = df.scripted_ci(dev, ["failure", "success"], logs={"failure": "E   assert 1 == 2\n"})
    work = short_tmp / "work"
    env = {**git_env(), "GIT_TERMINAL_PROMPT": "0"}
    remote = forge.server.url.replace("http://", f"http://{world.bot.login}:{world.bot.token}@") + f"/{o}/{r}.git"

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(work), *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    subprocess.run(["git", "clone", "-q", remote, str(work)], env=env, check=True, capture_output=True, timeout=60)
    shas = []
    for n in (1, 2):
        (work / "f.txt").write_text(f"try {n}\n")
        git("add", "f.txt")
        git("commit", "-q", "-m", f"try {n}")
        git("push", "-q", "origin", "HEAD:refs/heads/bot-bottle/issue-1")
        shas.append(git("rev-parse", "HEAD"))
    git("push", "-q", "origin", "HEAD:refs/heads/main")  # the default branch runs nothing

    async def go() -> list[list[tuple[str, str]]]:
        g = gitea(forge)
        try:
            out = []
            for sha in shas:
                jobs = await g.workflow_jobs(o, r, sha)
                out.append([(j.conclusion, " ".join(await g.job_log_tail(o, r, j.id))) for j in jobs])
            return out
        finally:
            await g.aclose()

    assert run(go()) == [[("failure", "E   assert 1 == 2")], [("success", "test: success")]]
    assert len(dev.repo(o, r).runs) == 2
