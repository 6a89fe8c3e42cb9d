"""The forge sidecar over the real Unix socket of a running bottle (DESIGN.md §7)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bottles import git_env
from statemachine import BottleState
from store import ForgeState
from tests.conftest import Rig, needs_bwrap, wait_until

pytestmark = needs_bwrap
ROOT = Path(__file__).resolve().parents[1]


class Sidecar:
    def __init__(self, rig: Rig, state: ForgeState) -> None:
        self.rig = rig
        self.state = state
        self.path = rig.state_dir / "sidecars" / state.slug / "forge.sock"
        self.workspace = rig.state_dir / "bottles" / state.slug / "workspace"
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.path)), base_url="http://sidecar", timeout=60
        )
        self.ids = 0

    def raw(self, body: bytes) -> httpx.Response:
        return self.client.post("/rpc", content=body, headers={"Content-Type": "application/json"})

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.ids += 1
        answer = self.raw(json.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params}).encode())
        data: dict[str, Any] = answer.json()
        assert data["id"] == self.ids
        return data

    def ok(self, method: str, **params: Any) -> Any:
        answer = self.call(method, **params)
        assert "result" in answer, answer
        return answer["result"]

    def code(self, method: str, **params: Any) -> int:
        answer = self.call(method, **params)
        assert "error" in answer, answer
        return int(answer["error"]["code"])

    def commit(self, files: dict[str, str], message: str = "work") -> None:
        for name, text in files.items():
            (self.workspace / name).write_text(text)
        env = {
            **git_env(),
            "GIT_AUTHOR_NAME": "a",
            "GIT_AUTHOR_EMAIL": "a@x",
            "GIT_COMMITTER_NAME": "a",
            "GIT_COMMITTER_EMAIL": "a@x",
        }
        subprocess.run(["git", "-C", str(self.workspace), "add", "-A"], check=True, env=env)
        subprocess.run(["git", "-C", str(self.workspace), "commit", "-qm", message], check=True, env=env)

    def ops(self) -> list[tuple[str, str, str]]:
        return [(o.op, o.outcome, o.detail) for o in self.rig.store.operations(self.state.slug)]


@pytest.fixture
def running(rig_factory: Callable[..., Rig]) -> Iterator[Callable[..., Sidecar]]:
    made: list[Sidecar] = []

    def make(**overrides: Any) -> Sidecar:
        rig = rig_factory(**overrides).start()
        issue = rig.open_issue(agent="turns")
        state = rig.wait_state(issue.number, BottleState.RUNNING)
        sidecar = Sidecar(rig, state)
        # The agent's own first call (whoami) is logged before the test starts calling.
        wait_until(lambda: rig.store.operations(state.slug), what="the agent's first call")
        made.append(sidecar)
        return sidecar

    yield make
    for sidecar in made:
        sidecar.client.close()


def test_socket_is_private(running: Callable[..., Sidecar]) -> None:
    sc = running()
    assert stat.S_IMODE(sc.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sc.path.parent.stat().st_mode) == 0o700


def test_every_method_reaches_the_forge(running: Callable[..., Sidecar]) -> None:
    sc = running()
    dev, owner, repo = sc.rig.forge.dev, sc.rig.forge.owner, sc.rig.forge.repo
    issue = sc.state.issue_number
    me = sc.ok("whoami")
    assert me == {"slug": sc.state.slug, "owner": owner, "repo": repo, "issue": issue, "pr": None, "writable": [issue]}
    read = sc.ok("read_issue", number=issue)
    assert set(read) == {"number", "title", "body", "state", "labels", "assignees", "html_url"}
    assert read["labels"] == ["bot-bottle:turns"]
    posted = sc.ok("post_comment", number=issue, body="hello from the bottle")
    assert set(posted) == {"id", "html_url"}
    bodies = [c["body"] for c in sc.ok("read_comments", number=issue)]
    assert [b for b in bodies if "forgebottle:status" not in b] == ["hello from the bottle"]
    assert sc.ok("update_description", number=issue, body="new description") == {}
    assert dev.issue(owner, repo, issue).body == "new description"
    sc.commit({"feature.txt": "a feature\n"})
    pushed = sc.ok("push")
    assert pushed["branch"] == f"bot-bottle/issue-{issue}" and len(pushed["sha"]) == 40
    assert dev.read_file(owner, repo, pushed["branch"], "feature.txt") == "a feature"
    pr = sc.ok("open_pr", title="Add a feature", body="It adds a feature.")
    assert set(pr) == {"number", "html_url"}
    again = sc.ok("open_pr", title="Add a feature")
    assert again["number"] == pr["number"]  # the existing open PR is returned
    pull = sc.ok("read_pr", number=pr["number"])
    assert set(pull) == {"number", "title", "body", "state", "merged", "head", "base", "html_url"}
    assert (pull["head"], pull["base"], pull["merged"]) == (pushed["branch"], "main", False)
    assert f"Closes #{issue}" in pull["body"]
    assert sc.ok("whoami")["writable"] == [issue, pr["number"]]  # the PR joined the write scope
    sc.ok("post_comment", number=pr["number"], body="on the PR")
    assert sc.rig.store.by_slug(sc.state.slug).pr_number == pr["number"]  # type: ignore[union-attr]
    assert sc.ok("signal_done", status="success", summary="all done") == {"acknowledged": True}
    sc.rig.go(sc.state.slug, 1)
    sc.rig.wait_state(issue, BottleState.FROZEN, runs=1)
    assert not sc.path.exists()  # no socket while frozen
    run = sc.rig.store.runs(sc.state.slug)[0]
    assert (run["signalled_status"], run["signalled_summary"]) == ("success", "turn 1")  # the last word counts
    details = [d for _, _, d in sc.ops()]
    assert "signalled done: success: all done" in details
    assert f"posted comment to #{issue}" in details
    assert f"pushed {pushed['sha'][:12]} to bot-bottle/issue-{issue}" in details


def test_out_of_scope_writes_are_denied_and_logged(running: Callable[..., Sidecar]) -> None:
    sc = running()
    dev, owner, repo, world = sc.rig.forge.dev, sc.rig.forge.owner, sc.rig.forge.repo, sc.rig.forge.world
    other = dev.create_issue(owner, repo, title="Other", body="untouched", user=world.member.login)
    issue = sc.state.issue_number
    assert sc.code("post_comment", number=other.number, body="x") == -32001
    assert sc.code("update_description", number=other.number, body="x") == -32001
    assert sc.code("open_pr", title="t", head="main") == -32001
    assert sc.code("open_pr", title="t", head=f"{owner}:feature") == -32001
    assert dev.issue(owner, repo, other.number).comments == []
    assert dev.issue(owner, repo, other.number).body == "untouched"
    assert not any(i.pull for i in dev.repo(owner, repo).issues.values())
    denied = [(op, detail) for op, outcome, detail in sc.ops() if outcome == "denied"]
    assert denied[0] == (
        "post_comment",
        f"denied comment to #{other.number}: out of scope (writable: {issue})",
    )
    assert [op for op, _ in denied] == ["post_comment", "update_description", "open_pr", "open_pr"]
    assert sc.ok("read_issue", number=other.number)["title"] == "Other"  # reads go anywhere


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", -32700),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "whoami"}', -32600),
        (b'{"id": 1, "method": "whoami"}', -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": 7}', -32600),
        (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "whoami"}', -32600),
        (b'"just a string"', -32600),
        (b"[]", -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "rm_rf"}', -32601),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "read_issue", "params": [1]}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "read_issue", "params": {}}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "read_issue", "params": {"number": "1"}}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "read_issue", "params": {"number": true}}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "read_issue", "params": {"number": -4}}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "read_issue", "params": {"number": 1, "x": 2}}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "signal_done", "params": {"status": "meh", "summary": ""}}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "open_pr", "params": {"title": " "}}', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "read_issue", "params": {"number": 99999}}', -32002),
        (b"[" * 100_000, -32700),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "read_issue", "params": {"number": 1' + b"0" * 5000 + b"}}", -32700),
    ],
)
def test_protocol_errors_have_their_codes(running: Callable[..., Sidecar], body: bytes, code: int) -> None:
    sc = running()
    answer = sc.raw(body)
    assert answer.status_code == 200
    data = answer.json()
    assert data["jsonrpc"] == "2.0" and data["error"]["code"] == code and data["error"]["message"]
    assert "Traceback" not in answer.text
    assert sc.ok("whoami")["slug"] == sc.state.slug  # still up
    assert sc.ops()[-2][1] in ("error", "denied")  # the bad call is in the log too


def test_size_limits(running: Callable[..., Sidecar]) -> None:
    sc = running()
    issue = sc.state.issue_number
    answer = sc.raw(b'{"jsonrpc": "2.0", "id": 1, "method": "whoami", "params": {"x": "' + b"a" * 1_100_000 + b'"}}')
    assert answer.status_code == 413 and answer.json()["error"]["code"] == -32600
    assert sc.code("post_comment", number=issue, body="x" * (64 * 1024 + 1)) == -32602
    assert sc.code("post_comment", number=issue, body="é" * (32 * 1024 + 1)) == -32602  # bytes, not characters
    assert sc.ok("post_comment", number=issue, body="x" * (64 * 1024))["id"] > 0


def test_batches_and_notifications(running: Callable[..., Sidecar]) -> None:
    sc = running()
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "whoami"},
        {"jsonrpc": "2.0", "method": "whoami"},  # a notification: no answer
        {"jsonrpc": "2.0", "id": "c", "method": "nope"},
        5,
    ]
    answers = sc.raw(json.dumps(batch).encode()).json()
    assert [a["id"] for a in answers] == ["a", "c", None]
    assert "result" in answers[0] and answers[1]["error"]["code"] == -32601 and answers[2]["error"]["code"] == -32600
    only = sc.raw(json.dumps({"jsonrpc": "2.0", "method": "whoami"}).encode())
    assert only.status_code == 204 and only.content == b""


def test_rate_limit(running: Callable[..., Sidecar]) -> None:
    sc = running(writes_per_hour=3)
    issue = sc.state.issue_number
    for n in range(3):
        sc.ok("post_comment", number=issue, body=f"note {n}")
    assert sc.code("post_comment", number=issue, body="one too many") == -32003
    assert sc.ok("read_issue", number=issue)  # reads are not limited
    assert sc.ops()[-2] == ("post_comment", "denied", f"denied comment to #{issue}: rate limited (3 writes/hour)")
    comments = sc.rig.forge.dev.issue(sc.rig.forge.owner, sc.rig.forge.repo, issue).comments
    assert len([c for c in comments if "forgebottle:status" not in c.body]) == 3


AWS_KEY = 'aws_access_key_id = "AKIAIOSFODNN7EXAMPLE"\n'


def test_push_refuses_secrets_and_pushes_nothing(running: Callable[..., Sidecar]) -> None:
    sc = running()
    dev, owner, repo = sc.rig.forge.dev, sc.rig.forge.owner, sc.rig.forge.repo
    branch = f"bot-bottle/issue-{sc.state.issue_number}"
    sc.commit({"settings.py": "DEBUG = True\n" + AWS_KEY})
    answer = sc.call("push")
    assert answer["error"]["code"] == -32005
    assert "settings.py:2" in answer["error"]["message"]
    assert {"file": "settings.py", "line": 2, "type": "AWS Access Key"} in answer["error"]["data"]["findings"]
    assert dev.branch_sha(dev.repo(owner, repo), branch) == ""
    token = sc.rig.forge.world.bot.token
    sc.commit({"settings.py": "DEBUG = True\n", "notes.txt": f"remember {token}\n"}, "oops")
    answer = sc.call("push")
    assert answer["error"]["code"] == -32005 and "notes.txt:1 (forge credential)" in answer["error"]["message"]
    assert token not in json.dumps(answer)
    assert dev.branch_sha(dev.repo(owner, repo), branch) == ""
    denials = [d for op, outcome, d in sc.ops() if op == "push"]
    assert all("refused" in d or "secret" in d for d in denials) and len(denials) == 2
    assert all(token not in d for _, _, d in sc.ops())
    run = wait_until(lambda: sc.rig.store.runs(sc.state.slug), what="the run row")
    assert run[0]["secret_findings"] >= 1


def test_forge_tool_prints_json_and_fails_cleanly(running: Callable[..., Sidecar]) -> None:
    sc = running()
    env = {"PATH": os.environ["PATH"], "FORGE_SIDECAR_SOCKET": str(sc.path)}
    tool = [sys.executable, str(ROOT / "forge_client.py")]
    out = subprocess.run([*tool, "whoami"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["slug"] == sc.state.slug
    piped = subprocess.run(
        [*tool, "comment", str(sc.state.issue_number), "-"],
        env=env,
        input="from stdin",
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(piped.stdout)["id"] > 0
    bad = subprocess.run([*tool, "comment", "999", "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("forge: ") and "(code -32001)" in bad.stderr and len(bad.stderr.splitlines()) == 1
    usage = subprocess.run([*tool, "done", "maybe", "x"], env=env, capture_output=True, text=True)
    assert usage.returncode == 2
    gone = subprocess.run(
        [*tool, "whoami"], env={**env, "FORGE_SIDECAR_SOCKET": "/nonexistent/sock"}, capture_output=True, text=True
    )
    assert gone.returncode == 1 and "cannot reach the sidecar" in gone.stderr


def test_forge_tool_reads_long_answers_whole(running: Callable[..., Sidecar]) -> None:
    sc = running()
    long_body = "x" * 300_000  # many socket reads' worth
    forge = sc.rig.forge
    forge.dev.edit_issue(forge.owner, forge.repo, sc.state.issue_number, body=long_body, by=forge.world.member.login)
    env = {"PATH": os.environ["PATH"], "FORGE_SIDECAR_SOCKET": str(sc.path)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "forge_client.py"), "read-issue", str(sc.state.issue_number)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["body"] == long_body


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SSH-2.0-not-http\r\n", "did not answer in HTTP"),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\noh!", "answered HTTP 502 without JSON"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", "something other than a JSON-RPC response"),
    ],
)
def test_forge_tool_names_a_socket_that_is_not_a_sidecar(tmp_path: Path, answer: bytes, message: str) -> None:
    path = tmp_path / "forge.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)

        def answer_once() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

        thread = threading.Thread(target=answer_once)
        thread.start()
        env = {"PATH": os.environ["PATH"], "FORGE_SIDECAR_SOCKET": str(path)}
        out = subprocess.run(
            [sys.executable, str(ROOT / "forge_client.py"), "whoami"], env=env, capture_output=True, text=True
        )
        thread.join(timeout=10)
    assert out.returncode == 1 and out.stdout == ""
    assert message in out.stderr and len(out.stderr.splitlines()) == 1


def test_agent_that_lingers_after_done_is_stopped(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(done_grace=0.5, scripts={"linger": "#!/bin/sh\nforge done success 'said done'\nsleep 1000\n"})
    rig.start()
    _, state = rig.run_once(agent="linger")
    assert rig.store.transitions(state.slug)[-1]["trigger"] == "done"
    assert rig.store.runs(state.slug)[0]["exit_code"] != 0  # it was stopped, not exited


def test_happy_path_scripted_agent(rig: Rig) -> None:
    dev, owner, repo = rig.forge.dev, rig.forge.owner, rig.forge.repo
    issue, state = rig.run_once()
    assert state.pr_number is not None and state.pr_url.endswith(f"/pulls/{state.pr_number}")
    pull = dev.issue(owner, repo, state.pr_number)
    assert pull.pull is not None and pull.pull.head == f"bot-bottle/issue-{issue.number}"
    assert dev.read_file(owner, repo, pull.pull.head, "change.txt") == f"change for {issue.number}"
    bodies = [c.body for c in dev.issue(owner, repo, issue.number).comments]
    assert [b for b in bodies if "forgebottle:status" not in b] == ["working on it"]
    assert [o.op for o in rig.store.operations(state.slug)] == [
        "read_issue",
        "post_comment",
        "push",
        "open_pr",
        "signal_done",
    ]
    assert all(o.outcome == "ok" for o in rig.store.operations(state.slug))
    status = subprocess.run(
        [sys.executable, str(ROOT / "forgebottle.py"), "orchestrate", "status"],
        env={**os.environ, "FORGEBOTTLE_STATE_DIR": str(rig.state_dir)},
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(li for li in status.stdout.splitlines() if li.startswith(state.slug))
    assert "frozen" in line and state.pr_url in line and state.issue_url in line
