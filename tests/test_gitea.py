"""gitea.Gitea against devforge over real loopback HTTP (and MockTransport for odd answers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx
import pytest

from gitea import (
    CommitStatus,
    ForgeAuthError,
    ForgeConflict,
    ForgeError,
    ForgeNotFound,
    ForgeUnavailable,
    Gitea,
    Label,
    OrgNotVisible,
    OutOfScope,
    ScopedForge,
    closes,
    hook_from_json,
    job_from_json,
    label_from_json,
    status_from_json,
)
from tests.conftest import Forge

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def client(forge: Forge, token: str | None = None) -> Gitea:
    return Gitea(forge.api, token or forge.world.bot.token)


def test_reads_map_fields_and_quirks(forge: Forge) -> None:
    dev, world = forge.dev, forge.world
    dev.create_issue(forge.owner, forge.repo, title="T", body="", user=world.member.login, labels=["bot-bottle:x"])

    async def go() -> None:
        g = client(forge)
        issue = await g.read_issue(forge.owner, forge.repo, 1)
        assert issue.number == 1 and issue.title == "T"
        assert issue.body == ""  # Gitea may send null or "" bodies: always a str
        assert issue.assignees == ()  # Gitea sends null for no assignees
        assert issue.labels == ("bot-bottle:x",)
        assert issue.html_url.endswith(f"/{forge.owner}/{forge.repo}/issues/1")
        assert issue.user == world.member.login and not issue.is_pull
        me = await g.current_user()
        assert me.login == world.bot.login
        await g.aclose()

    run(go())


def test_membership_204_404_and_303(forge: Forge) -> None:
    async def go() -> None:
        g = client(forge)
        assert await g.is_org_member(forge.world.org, forge.world.member.login) is True
        assert await g.is_org_member(forge.world.org, forge.world.outsider.login) is False
        await g.aclose()
        outsider = client(forge, forge.world.outsider.token)
        with pytest.raises(OrgNotVisible, match="303"):
            await outsider.is_org_member(forge.world.org, forge.world.member.login)
        await outsider.aclose()

    run(go())


def test_writes_send_the_right_requests(forge: Forge) -> None:
    dev, world = forge.dev, forge.world
    dev.create_issue(forge.owner, forge.repo, title="T", body="b", user=world.member.login)

    async def go() -> None:
        g = client(forge)
        comment = await g.post_comment(forge.owner, forge.repo, 1, "hello <&>")
        assert comment.body == "hello <&>" and comment.user == world.bot.login
        assert comment.html_url.endswith(f"#issuecomment-{comment.id}")
        await g.update_description(forge.owner, forge.repo, 1, "new body")  # Gitea answers 201
        assert (await g.read_issue(forge.owner, forge.repo, 1)).body == "new body"
        comments = await g.read_comments(forge.owner, forge.repo, 1)
        assert [c.body for c in comments] == ["hello <&>"]
        await g.aclose()

    run(go())


def test_create_pr_409_then_find_by_head(forge: Forge) -> None:
    dev = forge.dev
    dev.commit_files(forge.owner, forge.repo, "bot-bottle/issue-1", {"a.txt": "a"}, "a")

    async def go() -> None:
        g = client(forge)
        pr = await g.create_pr(forge.owner, forge.repo, head="bot-bottle/issue-1", base="main", title="t", body="")
        assert (pr.head, pr.base, pr.merged, pr.state) == ("bot-bottle/issue-1", "main", False, "open")
        with pytest.raises(ForgeConflict, match="already exists"):
            await g.create_pr(forge.owner, forge.repo, head="bot-bottle/issue-1", base="main", title="t", body="")
        found = await g.find_pr_by_head(forge.owner, forge.repo, "bot-bottle/issue-1")
        assert found is not None and found.number == pr.number
        assert await g.find_pr_by_head(forge.owner, forge.repo, "nope") is None
        await g.aclose()

    run(go())


def test_find_pr_follows_pagination(forge: Forge) -> None:
    dev, world = forge.dev, forge.world
    for n in range(60):
        dev.commit_files(forge.owner, forge.repo, f"b{n}", {"f": str(n)}, "x")
        dev.create_pr(forge.owner, forge.repo, head=f"b{n}", base="main", title=str(n), body="", user=world.bot.login)

    async def go() -> None:
        g = client(forge)
        found = await g.find_pr_by_head(forge.owner, forge.repo, "b0")  # the oldest: on page 2 of 50
        assert found is not None and found.title == "0"
        await g.aclose()

    run(go())


def test_errors_are_typed_and_carry_giteas_message(forge: Forge) -> None:
    async def go() -> None:
        g = client(forge)
        with pytest.raises(ForgeNotFound, match="404"):
            await g.read_issue(forge.owner, forge.repo, 999)
        with pytest.raises(ForgeUnavailable, match="500"):
            await g.read_comments(forge.owner, forge.repo, 999)  # Gitea: 500 for an unknown index
        await g.aclose()
        bad = client(forge, "not-a-token")
        with pytest.raises(ForgeAuthError, match="invalid username, password or token"):
            await bad.current_user()
        await bad.aclose()
        gone = Gitea("http://127.0.0.1:9/api/v1", "t", timeout=2)
        with pytest.raises(ForgeUnavailable, match="unreachable"):
            await gone.current_user()
        await gone.aclose()

    run(go())


def test_auth_header_and_paths_on_the_wire() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "PATCH":
            return httpx.Response(201, json={})
        if request.url.path.endswith("/members/u"):
            return httpx.Response(418, json={"message": "teapot", "url": "x"})
        return httpx.Response(200, json={"number": 3, "title": None, "body": None, "head": {}, "base": {}})

    async def go() -> None:
        g = Gitea("https://git.example.com/api/v1/", "s3cret", transport=httpx.MockTransport(handler))
        await g.update_description("o w", "r", 3, "text")
        pr = await g.read_pr("o", "r", 3)
        assert pr.merged is False and pr.title == "" and pr.body == ""
        with pytest.raises(ForgeError, match="418 teapot"):
            await g.is_org_member("org", "u")
        await g.aclose()
        assert "s3cret" not in repr(g)

    run(go())
    patch, get, member = seen
    assert patch.url == "https://git.example.com/api/v1/repos/o%20w/r/issues/3"
    assert json.loads(patch.content) == {"body": "text"}
    assert patch.headers["authorization"] == "token s3cret"
    assert get.url.path == "/api/v1/repos/o/r/pulls/3"
    assert member.url.path == "/api/v1/orgs/org/members/u"


def test_scoped_forge_writes_only_in_scope(forge: Forge) -> None:
    dev, world = forge.dev, forge.world
    for _ in range(3):
        dev.create_issue(forge.owner, forge.repo, title="T", body="b", user=world.member.login)

    async def go() -> None:
        g = client(forge)
        scoped = ScopedForge(g, owner=forge.owner, repo=forge.repo, issue=1, prs=[2])
        assert (await scoped.read_issue(3)).number == 3  # reads go anywhere
        await scoped.post_comment(1, "ok")
        await scoped.post_comment(2, "ok")
        with pytest.raises(OutOfScope, match=r"^out of scope \(writable: 1, 2\)$") as info:
            await scoped.post_comment(3, "no")
        assert isinstance(info.value, PermissionError)
        with pytest.raises(OutOfScope):
            await scoped.update_description(3, "no")
        with pytest.raises(OutOfScope, match="own branch"):
            await scoped.open_pr(title="t", body="", base="main", head="someone-else")
        await g.aclose()

    run(go())
    assert [c.body for c in dev.issue(forge.owner, forge.repo, 3).comments] == []
    assert dev.issue(forge.owner, forge.repo, 3).body == "b"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("Closes #4", True),
        ("fixes: #4", True),
        ("(resolved #4)", True),
        ("closes #40", False),
        ("see #4", False),
        ("xcloses #4", False),
        ("Fixed #4 and #5", True),
    ],
)
def test_closing_keywords(body: str, expected: bool) -> None:
    assert closes(body, 4) is expected


def test_open_pr_adds_closing_keyword_and_joins_scope(forge: Forge) -> None:
    forge.dev.create_issue(forge.owner, forge.repo, title="T", body="b", user=forge.world.member.login)
    forge.dev.commit_files(forge.owner, forge.repo, "bot-bottle/issue-1", {"a": "a"}, "a")

    async def go() -> Any:
        g = client(forge)
        scoped = ScopedForge(g, owner=forge.owner, repo=forge.repo, issue=1)
        pr = await scoped.open_pr(title="t", body="A change.", base="main")
        again = await scoped.open_pr(title="t", body="A change.", base="main")
        await g.aclose()
        return scoped, pr, again

    scoped, pr, again = run(go())
    assert again.number == pr.number
    assert pr.body.endswith("Closes #1")
    assert scoped.writable == [1, pr.number]


def test_devforge_answers_401_to_a_token_with_non_ascii_bytes(forge: Forge) -> None:
    # As Gitea does; the comparison once raised TypeError (a 500) for such a header.
    answer = httpx.get(f"{forge.api}/user", headers={b"Authorization": b"token \xe9\xe9"}, timeout=10)
    assert answer.status_code == 401


def test_ci_entities_are_parsed_defensively() -> None:
    # The API says "status", a webhook says "state"; Go's nulls and missing keys become "".
    assert status_from_json({"id": 3, "status": "failure", "context": "c", "target_url": None}) == CommitStatus(
        3, "c", "failure", "", ""
    )
    webhook = status_from_json({"id": 4, "state": "error", "context": None, "description": None})
    assert (webhook.state, webhook.context, webhook.failed) == ("error", "", True)
    assert not status_from_json({"id": 5, "status": "warning"}).failed  # not a failure: any other state
    job = job_from_json({"id": 9, "run_id": None, "name": "t", "status": "in_progress", "conclusion": None})
    assert (job.run_id, job.conclusion, job.failed) == (0, "", False)
    assert job_from_json({"id": 9, "status": "completed", "conclusion": "failure"}).failed
    hook = hook_from_json({"id": 1, "config": None, "events": None, "active": "yes"})
    assert (hook.url, hook.events, hook.active) == ("", (), False)  # only JSON true is active
    assert label_from_json({"id": 2, "name": "x", "color": "#00aabb", "description": None}) == Label(2, "x", "00aabb")


def test_lists_refuse_odd_pages_and_runs_are_filtered_by_sha_here_too() -> None:
    sha, other = "a" * 40, "b" * 40
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        path = request.url.path
        if path.endswith("/actions/runs"):
            # An older forge ignores head_sha and lists every run.
            runs = [{"id": 1, "head_sha": other}, {"id": 2, "head_sha": sha}, {"id": 3, "head_sha": sha}]
            return httpx.Response(200, json={"workflow_runs": runs, "total_count": 3})
        if path.endswith("/jobs"):
            run_id = int(path.split("/")[-2])
            return httpx.Response(200, json={"jobs": [{"id": run_id * 10, "run_id": run_id, "name": f"j{run_id}"}]})
        if path.endswith("/labels"):
            return httpx.Response(200, json={"message": "not a list"})
        if path.endswith("/hooks"):
            return httpx.Response(200, json=[1, 2])
        return httpx.Response(404, json={"message": "not found"})

    async def go() -> None:
        g = Gitea("http://forge.test/api/v1", "t", transport=httpx.MockTransport(handler))
        try:
            jobs = await g.workflow_jobs("o", "r", sha)
            assert [(j.id, j.run_id) for j in jobs] == [(30, 3), (20, 2)]  # never run 1's, newest first
            for call in (g.list_labels("o", "r"), g.list_hooks("o", "r")):
                with pytest.raises(ForgeError, match="no list of objects"):
                    await call
            with pytest.raises(ForgeNotFound):
                await g.commit_statuses("o", "r", "bot-bottle/issue-1")
        finally:
            await g.aclose()

    run(go())
    assert f"head_sha={sha}&page=1&limit=50" in seen[0]
    # A branch with a slash is one path segment in /commits/{ref}/statuses.
    assert seen[-1].endswith("/commits/bot-bottle%2Fissue-1/statuses?page=1&limit=50")
