"""`forge mcp` (DESIGN.md §11), driven by the official MCP Python SDK's stdio client against the
real sidecar of a running bottle; `/run/forge/mcp.json`; and the PATH an agent sees (§6)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import mcp_types
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

import forge_client
from backends import LocalBackend
from bottles import BottleContext, BottlePaths, git_env
from config import AgentSpec, BottleSpec, Secret
from statemachine import BottleState
from store import ForgeState, Operation
from tests.conftest import Rig, needs_bwrap, open_issue, read_when, wait_until

ROOT = Path(__file__).resolve().parents[1]
FORGE = str(ROOT / "forge_client.py")
SECTION_7 = {
    "whoami",
    "read_issue",
    "read_pr",
    "read_comments",
    "post_comment",
    "update_description",
    "push",
    "open_pr",
    "signal_done",
    "update_progress",
    "read_checks",
    "read_job_log",
    "refresh",
}
IN_BOTTLE_CONFIG = {"mcpServers": {"forge": {"command": "/opt/forgebottle/bin/forge", "args": ["mcp"]}}}


@dataclasses.dataclass
class Bottle:
    rig: Rig
    state: ForgeState

    @property
    def socket(self) -> Path:
        return self.rig.state_dir / "sidecars" / self.state.slug / "forge.sock"

    @property
    def workspace(self) -> Path:
        return self.rig.state_dir / "bottles" / self.state.slug / "workspace"

    def ops(self) -> list[Operation]:
        return self.rig.store.operations(self.state.slug)

    def commit(self, name: str, text: str) -> None:
        (self.workspace / name).write_text(text)
        who = {
            "GIT_AUTHOR_NAME": "a",
            "GIT_AUTHOR_EMAIL": "a@x",
            "GIT_COMMITTER_NAME": "a",
            "GIT_COMMITTER_EMAIL": "a@x",
        }
        env = {**git_env(), **who}
        subprocess.run(["git", "-C", str(self.workspace), "add", "-A"], check=True, env=env)
        subprocess.run(["git", "-C", str(self.workspace), "commit", "-qm", f"add {name}"], check=True, env=env)


def running_bottle(rig: Rig) -> Bottle:
    """A bottle whose turns-agent has made its first call and now waits: its sidecar is ours."""
    issue = rig.open_issue(agent="turns")
    state = rig.wait_state(issue.number, BottleState.RUNNING)
    bottle = Bottle(rig, state)
    wait_until(bottle.ops, what="the agent's first call")
    return bottle


def server_params(socket: Path) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[FORGE, "mcp"], env={"FORGE_SIDECAR_SOCKET": str(socket)})


def text_of(result: mcp_types.CallToolResult) -> str:
    assert len(result.content) == 1
    block = result.content[0]
    assert isinstance(block, mcp_types.TextContent)
    return block.text


def ok(result: mcp_types.CallToolResult) -> Any:
    """The tool's JSON answer, checked to agree with its structured copy."""
    assert not result.is_error, text_of(result)
    value = json.loads(text_of(result))
    if isinstance(value, dict):
        assert result.structured_content == value
    else:
        assert result.structured_content is None
    return value


# -- the SDK's client against a real sidecar ----------------------------------------------


@needs_bwrap
def test_sdk_client_lists_and_calls_every_tool(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory().start()
    bottle = running_bottle(rig)
    dev, owner, repo = rig.forge.dev, rig.forge.owner, rig.forge.repo
    issue = bottle.state.issue_number
    other = open_issue(rig.forge, labels=[], title="Somebody else's issue").number
    timings: list[float] = []
    errors: list[str] = []

    async def session_work() -> tuple[str, list[mcp_types.Tool], int]:
        async with (
            stdio_client(server_params(bottle.socket)) as (read, write),
            ClientSession(read, write) as session,
        ):
            init = await session.initialize()
            tools = (await session.list_tools()).tools

            async def call(name: str, **arguments: Any) -> mcp_types.CallToolResult:
                started = time.perf_counter()
                result = await session.call_tool(name, arguments)
                timings.append(time.perf_counter() - started)
                if result.is_error:
                    errors.append(text_of(result))
                return result

            me = ok(await call("whoami"))
            assert me == {"slug": bottle.state.slug, "owner": owner, "repo": repo, "issue": issue, "pr": None,
                          "writable": [issue]}  # fmt: skip
            assert ok(await call("read_issue", number=issue))["title"] == "Fix the thing"
            posted = ok(await call("post_comment", number=issue, body="hello through MCP"))
            bodies = [c.body for c in dev.issue(owner, repo, issue).comments]
            assert [b for b in bodies if "forgebottle:status" not in b] == ["hello through MCP"]
            comments = ok(await call("read_comments", number=issue))
            mine = [(c["id"], c["body"]) for c in comments if "forgebottle:status" not in c["body"]]
            assert mine == [(posted["id"], "hello through MCP")]
            assert ok(await call("update_description", number=issue, body="described through MCP")) == {}
            assert dev.issue(owner, repo, issue).body == "described through MCP"
            bottle.commit("mcp.txt", "made for MCP\n")
            pushed = ok(await call("push"))
            assert pushed["branch"] == f"bot-bottle/issue-{issue}"
            assert dev.read_file(owner, repo, pushed["branch"], "mcp.txt") == "made for MCP"
            pr = ok(await call("open_pr", title="Through MCP", body="Opened by an MCP client."))
            record = dev.issue(owner, repo, pr["number"])
            assert record.title == "Through MCP" and record.pull is not None
            read = ok(await call("read_pr", number=pr["number"]))
            assert (read["title"], read["head"]) == ("Through MCP", pushed["branch"])

            # Out of scope: the sidecar's own words come back as an error result.
            denied = await call("post_comment", number=other, body="not mine")
            assert denied.is_error and denied.structured_content is None
            assert text_of(denied) == f"out of scope (writable: {issue}, {pr['number']}) (code -32001)"
            assert [c for c in dev.issue(owner, repo, other).comments if "forgebottle:status" not in c.body] == []

            # The newer methods reach the sidecar and are on the record whether it has them yet or not.
            for name, arguments in (
                ("update_progress", {"body": "- [x] pushed"}),
                ("read_checks", {}),
                ("read_job_log", {"job_id": 1, "tail_lines": 5}),
                ("refresh", {}),
            ):
                before = len(bottle.ops())
                result = await call(name, **arguments)
                assert text_of(result)
                latest = wait_until(lambda: bottle.ops()[before:], what=f"{name} on the record")  # noqa: B023
                assert len(latest) == 1 and (latest[0].op == name or name in latest[0].detail), latest
            done = ok(await call("signal_done", status="success", summary="all through MCP"))
            assert done == {"acknowledged": True}
            return init.protocol_version, tools, pr["number"]

    version, tools, pr_number = asyncio.run(session_work())
    assert version == "2025-06-18"
    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == SECTION_7
    for tool in tools:
        jsonschema.Draft202012Validator.check_schema(tool.input_schema)
        assert tool.description and "\n" not in tool.description
        assert tool.input_schema["type"] == "object" and tool.input_schema["additionalProperties"] is False
    assert by_name["signal_done"].input_schema["properties"]["status"]["enum"] == ["success", "failure", "blocked"]
    assert by_name["post_comment"].input_schema["required"] == ["number", "body"]
    # The schema refuses what the sidecar would.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"status": "maybe", "summary": "x"}, by_name["signal_done"].input_schema)

    ops = [(o.op, o.outcome, o.detail) for o in bottle.ops()]
    denials = [detail for op, outcome, detail in ops if (op, outcome) == ("post_comment", "denied")]
    assert len(denials) == 1 and denials[0].startswith(f"denied comment to #{other}: ")
    assert denials[0].endswith(f"out of scope (writable: {issue}, {pr_number})")
    assert ("post_comment", "ok", f"posted comment to #{issue}") in ops
    assert ("signal_done", "ok", "signalled done: success: all through MCP") in ops
    calls = len(timings)
    print(
        f"FIGURES mcp: tools={len(tools)} sdk_calls={calls} error_results={len(errors)} "
        f"mean_call_ms={sum(timings) / calls * 1000:.1f} max_call_ms={max(timings) * 1000:.1f}"
    )


# -- the protocol edge, attacked as an agent would ------------------------------------------


def converse(lines: list[bytes], socket: Path | str = "/nonexistent/forge.sock") -> list[dict[str, Any]]:
    """Feed raw lines to `forge mcp` and return its answers, one JSON object per line."""
    env = {"PATH": os.environ["PATH"], "FORGE_SIDECAR_SOCKET": str(socket)}
    done = subprocess.run(
        [sys.executable, FORGE, "mcp"], input=b"".join(lines), capture_output=True, env=env, timeout=60, check=True
    )
    assert done.stderr == b""
    return [json.loads(line) for line in done.stdout.splitlines()]


def request(rid: Any, method: str, params: Any = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode() + b"\n"


def test_version_negotiation_and_protocol_errors() -> None:
    long_method = "x" * 5000
    answers = converse(
        [
            request(1, "initialize", {"protocolVersion": "2024-11-05", "capabilities": {}}),
            request(2, "initialize", {"protocolVersion": "1999-01-01", "capabilities": {}}),
            b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n',
            b'{"jsonrpc":"2.0","method":"notifications/whatever","params":{"a":1}}\n',
            b'{"jsonrpc":"2.0","id":99,"result":{}}\n',  # a response to nothing we asked: ignored
            request(3, "ping"),
            request(4, long_method),
            request(5, "tools/call", {"name": "delete_repo", "arguments": {}}),
            request(6, "tools/call", {"name": "whoami", "arguments": ["not", "an", "object"]}),
            request(7, "tools/list", ["positional"]),
            request(True, "ping"),
            b'[{"jsonrpc":"2.0","id":8,"method":"ping"}]\n',
            b"\xff\xfe not utf-8\n",
            b"[" * 100_000 + b"\n",
            b"\n",
            request(9, "ping"),
        ]
    )
    by_id = {a["id"]: a for a in answers if a["id"] is not None}
    assert by_id[1]["result"]["protocolVersion"] == "2024-11-05"
    assert by_id[2]["result"]["protocolVersion"] == "2025-06-18"
    assert by_id[2]["result"]["capabilities"] == {"tools": {"listChanged": False}}
    assert by_id[3]["result"] == {} and by_id[9]["result"] == {}
    assert by_id[4]["error"]["code"] == -32601
    assert len(by_id[4]["error"]["message"]) < 100  # a hostile name is not echoed whole
    assert by_id[5]["error"] == {"code": -32602, "message": "unknown tool 'delete_repo'"}
    assert by_id[6]["error"]["code"] == -32602 and by_id[7]["error"]["code"] == -32602
    anonymous = [a["error"]["code"] for a in answers if a["id"] is None]
    assert anonymous == [-32600, -32600, -32700, -32700]  # bool id, batch, not UTF-8, too deep
    assert sorted(by_id) == [1, 2, 3, 4, 5, 6, 7, 9] and len(answers) == 12  # notifications, stray response: none


def test_an_oversized_line_is_refused_and_the_next_one_served() -> None:
    huge = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"' + b"a" * (3 * 1024 * 1024) + b'"}}\n'
    started = time.perf_counter()
    answers = converse([huge, request(2, "ping")])
    elapsed = time.perf_counter() - started
    assert answers[0] == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": "message over 2097152 bytes"},
    }
    assert answers[1] == {"jsonrpc": "2.0", "id": 2, "result": {}}
    print(f"FIGURES mcp: oversized_line_bytes={len(huge)} refused_in_s={elapsed:.2f}")


def test_an_unreachable_sidecar_is_an_error_result() -> None:
    answers = converse([request(1, "tools/call", {"name": "whoami"})], socket="/nonexistent/forge.sock")
    result = answers[0]["result"]
    assert result["isError"] is True and "structuredContent" not in result
    assert result["content"][0]["text"].startswith("cannot reach the sidecar at /nonexistent/forge.sock")


@needs_bwrap
def test_hostile_arguments_are_the_sidecars_to_refuse(rig_factory: Callable[..., Rig]) -> None:
    bottle = running_bottle(rig_factory().start())
    issue = bottle.state.issue_number
    before = len(bottle.ops())
    lone = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"post_comment","arguments":'
    answers = converse(
        [
            lone + b'{"number":' + str(issue).encode() + b',"body":"\\ud800"}}}\n',
            request(2, "tools/call", {"name": "post_comment", "arguments": {"number": issue, "body": "x" * 70_000}}),
            request(3, "tools/call", {"name": "read_issue", "arguments": {"number": issue, "token": "please"}}),
            request(4, "tools/call", {"name": "signal_done", "arguments": {"status": "maybe", "summary": "s"}}),
        ],
        socket=bottle.socket,
    )
    texts = {a["id"]: a["result"]["content"][0]["text"] for a in answers}
    assert all(a["result"]["isError"] for a in answers)
    assert texts[1] == "invalid Unicode in the request (a lone surrogate) (code -32602)"
    assert texts[2] == "param 'body' is 70000 bytes, over the limit of 65536 (code -32602)"
    assert texts[3] == "unknown param(s) for read_issue: token (code -32602)"
    assert texts[4] == "status must be one of success, failure, blocked (code -32602)"
    assert rig_comments(bottle) == []
    records = wait_until(lambda: bottle.ops()[before:][:4] if len(bottle.ops()) >= before + 4 else [], what="records")
    assert [o.outcome for o in records] == ["error"] * 4


def rig_comments(bottle: Bottle) -> list[str]:
    forge = bottle.rig.forge
    comments = forge.dev.issue(forge.owner, forge.repo, bottle.state.issue_number).comments
    return [c.body for c in comments if "forgebottle:status" not in c.body]


# -- the newer calls, against a socket that echoes what it was asked --------------------------


class EchoSidecar(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A real Unix socket speaking the sidecar's HTTP: answers each call with its method and
    params, for the calls the real sidecar may not have yet."""

    daemon_threads = True

    def __init__(self, path: Path) -> None:
        self.calls: list[dict[str, Any]] = []
        self.path = str(path)
        super().__init__(self.path, EchoHandler)


class EchoHandler(socketserver.StreamRequestHandler):
    server: EchoSidecar

    def handle(self) -> None:
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        request = json.loads(self.rfile.read(length))
        self.server.calls.append(request)
        result = {"method": request["method"], "params": request["params"]}
        body = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        self.wfile.write(head.encode() + body)


@pytest.fixture
def echo(short_tmp: Path) -> Iterator[EchoSidecar]:
    server = EchoSidecar(short_tmp / "echo.sock")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("argv", "stdin", "method", "params"),
    [
        (["progress", "- [x] tests"], "", "update_progress", {"body": "- [x] tests"}),
        (["progress"], "- [ ] from stdin\n", "update_progress", {"body": "- [ ] from stdin\n"}),
        (["progress", "-"], "dash\n", "update_progress", {"body": "dash\n"}),
        (["checks"], "", "read_checks", {}),
        (["checks", "main"], "", "read_checks", {"ref": "main"}),
        (["job-log", "7"], "", "read_job_log", {"job_id": 7}),
        (["job-log", "7", "--tail", "50"], "", "read_job_log", {"job_id": 7, "tail_lines": 50}),
        (["refresh"], "", "refresh", {}),
    ],
)
def test_newer_cli_commands_map_to_sidecar_methods(
    echo: EchoSidecar, argv: list[str], stdin: str, method: str, params: dict[str, Any]
) -> None:
    env = {"PATH": os.environ["PATH"], "FORGE_SIDECAR_SOCKET": echo.path}
    done = subprocess.run(
        [sys.executable, FORGE, *argv], input=stdin.encode(), capture_output=True, env=env, timeout=60, check=True
    )
    assert json.loads(done.stdout) == {"method": method, "params": params}
    assert [(c["method"], c["params"]) for c in echo.calls] == [(method, params)]


def test_mcp_forwards_arguments_unchanged(echo: EchoSidecar) -> None:
    sent = {
        "update_progress": {"body": "- [x] \u00e9t\u00e9"},
        "read_checks": {"ref": "bot-bottle/issue-1"},
        "read_job_log": {"job_id": 3, "tail_lines": 20},
        "refresh": {},
    }
    lines = [request(n, "tools/call", {"name": name, "arguments": args}) for n, (name, args) in enumerate(sent.items())]
    answers = converse(lines, socket=echo.path)
    assert [a["result"]["structuredContent"] for a in answers] == [
        {"method": name, "params": args} for name, args in sent.items()
    ]
    assert [(c["method"], c["params"]) for c in echo.calls] == list(sent.items())


@needs_bwrap
def test_an_mcp_call_costs_little_over_the_raw_socket(rig_factory: Callable[..., Rig]) -> None:
    bottle = running_bottle(rig_factory().start())
    issue = bottle.state.issue_number
    env = {"PATH": os.environ["PATH"], "FORGE_SIDECAR_SOCKET": str(bottle.socket)}
    raw: list[float] = []
    through_mcp: list[float] = []
    argv = [sys.executable, FORGE, "mcp"]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) as server:
        assert server.stdin is not None and server.stdout is not None
        for n in range(30):
            started = time.perf_counter()
            direct = forge_client.call("read_issue", {"number": issue}, socket_path=str(bottle.socket))
            raw.append(time.perf_counter() - started)
            started = time.perf_counter()
            server.stdin.write(request(n, "tools/call", {"name": "read_issue", "arguments": {"number": issue}}))
            server.stdin.flush()
            answer = json.loads(server.stdout.readline())
            through_mcp.append(time.perf_counter() - started)
            assert answer["id"] == n and answer["result"]["structuredContent"] == direct
        server.stdin.close()
        assert server.wait(timeout=30) == 0  # stdin closed: the server ends by itself
    raw_ms, mcp_ms = statistics.median(raw) * 1000, statistics.median(through_mcp) * 1000
    print(f"FIGURES mcp: read_issue_p50_raw_ms={raw_ms:.2f} read_issue_p50_mcp_ms={mcp_ms:.2f} n=30")


# -- in a real bwrap bottle: mcp.json, the PATH, and a scripted MCP session ---------------------

MCP_AGENT = r"""#!/bin/sh
out="$HOME/mcp"
mkdir -p "$out"
echo "$PATH" > "$out/path.txt"
command -v forge > "$out/which.txt"
cp /run/forge/mcp.json "$out/mcp.json"
python3 - > "$out/session.jsonl" <<'PY'
import json
hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "script", "version": "1"}}
for message in (
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}},
):
    print(json.dumps(message))
PY
# Start the server exactly as a client reading mcp.json would, with none of our variables.
server=$(python3 - <<'PY'
import json
spec = json.load(open("/run/forge/mcp.json"))["mcpServers"]["forge"]
print(spec["command"], *spec["args"])
PY
)
env -i $server < "$out/session.jsonl" > "$out/answers.tmp" 2> "$out/stderr.txt"
mv "$out/answers.tmp" "$out/answers.jsonl"
forge done success "spoke MCP"
"""


@needs_bwrap
def test_forge_mcp_inside_a_bwrap_bottle(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(scripts={"mcp": MCP_AGENT}, agent_env={"PATH": "/opt/agent/bin:/usr/bin"}).start()
    _, state = rig.run_once(agent="mcp")
    out = rig.home(state.slug) / "mcp"
    answers = [json.loads(line) for line in read_when(out / "answers.jsonl").splitlines()]
    assert (out / "stderr.txt").read_text() == ""
    assert json.loads((out / "mcp.json").read_text()) == IN_BOTTLE_CONFIG
    assert json.loads((rig.state_dir / "sidecars" / state.slug / "mcp.json").read_text()) == IN_BOTTLE_CONFIG
    # The agent's own PATH first, then the forge tool and the system's: the tool stays reachable.
    assert (
        out / "path.txt"
    ).read_text().strip() == "/opt/agent/bin:/usr/bin:/opt/forgebottle/bin:/usr/local/bin:/usr/bin:/bin"
    assert (out / "which.txt").read_text().strip() == "/opt/forgebottle/bin/forge"
    assert [a["id"] for a in answers] == [1, 2]
    assert answers[0]["result"]["protocolVersion"] == "2025-06-18"
    # `env -i`: the server found the socket at its default place, /run/forge/forge.sock.
    me = answers[1]["result"]["structuredContent"]
    assert (me["slug"], me["issue"]) == (state.slug, state.issue_number)
    ops = [(o.op, o.outcome) for o in rig.store.operations(state.slug)]
    assert ops == [("whoami", "ok"), ("signal_done", "ok")]
    print(f"FIGURES mcp: in_bwrap_answers={len(answers)} ops={len(ops)}")


def test_mcp_config_outside_bwrap_names_host_paths(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(bottles={"local": BottleSpec(sandbox="none")})
    tools = str(rig.state_dir / "tools")
    command = ("/bin/sh", f"{tools}/turns-agent")
    rig.overrides["agents"] = {"turns": AgentSpec("turns", command, command)}
    bottle = running_bottle(rig.start())
    config = json.loads((rig.state_dir / "sidecars" / bottle.state.slug / "mcp.json").read_text())
    server = config["mcpServers"]["forge"]
    assert server == {"command": f"{tools}/forge", "args": ["mcp"], "env": {"FORGE_SIDECAR_SOCKET": str(bottle.socket)}}

    async def whoami() -> Any:
        # Exactly what the config says, through the SDK, which passes the server little else.
        params = StdioServerParameters(command=server["command"], args=server["args"], env=server["env"])
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            return ok(await session.call_tool("whoami", {}))

    assert asyncio.run(whoami())["slug"] == bottle.state.slug
    rig.go(bottle.state.slug, 1)
    rig.wait_state(bottle.state.issue_number, BottleState.FROZEN, runs=1)


# -- mcp.json and PATH, from the backend's own functions ----------------------------------------


def context(
    state_dir: Path, *, sandbox: Literal["bwrap", "none"] = "bwrap", env: dict[str, str] | None = None
) -> BottleContext:
    agent = AgentSpec("a", ("true",), ("true",), env=tuple((k, Secret(v)) for k, v in (env or {}).items()))
    return BottleContext(
        slug="acme-widgets-1",
        owner="acme",
        repo="widgets",
        issue=1,
        pr=None,
        agent=agent,
        bottle=BottleSpec(sandbox=sandbox),
        paths=BottlePaths(state_dir, "acme-widgets-1"),
        clone_url="http://127.0.0.1:9/acme/widgets.git",
        default_branch="main",
        git_user="bot",
        token=Secret("t"),
        bwrap=None,
    )


@pytest.mark.parametrize(
    ("sandbox", "own", "expected"),
    [
        ("bwrap", None, "/opt/forgebottle/bin:/usr/local/bin:/usr/bin:/bin"),
        ("bwrap", "/opt/node/bin", "/opt/node/bin:/opt/forgebottle/bin:/usr/local/bin:/usr/bin:/bin"),
        ("bwrap", "", "/opt/forgebottle/bin:/usr/local/bin:/usr/bin:/bin"),
        ("none", "/home/me/bin:/usr/bin", "/home/me/bin:/usr/bin:{tools}:/usr/local/bin:/usr/bin:/bin"),
    ],
)
def test_path_keeps_the_forge_tool(
    short_tmp: Path, sandbox: Literal["bwrap", "none"], own: str | None, expected: str
) -> None:
    ctx = context(short_tmp, sandbox=sandbox, env={"PATH": own} if own is not None else {})
    env = LocalBackend().agent_env(ctx)
    assert env["PATH"] == expected.format(tools=short_tmp / "tools")


def test_mcp_config_replaces_a_planted_symlink(short_tmp: Path) -> None:
    ctx = context(short_tmp, sandbox="none")
    (ctx.paths.workspace / ".git").mkdir(parents=True)  # already cloned: prepare makes no clone
    ctx.paths.sidecar_dir.mkdir(parents=True)
    victim = short_tmp / "victim"
    victim.write_text("untouched")
    ctx.paths.mcp_config.symlink_to(victim)
    asyncio.run(LocalBackend().prepare(ctx))
    assert victim.read_text() == "untouched"
    assert not ctx.paths.mcp_config.is_symlink()
    assert json.loads(ctx.paths.mcp_config.read_text()) == ctx.mcp_config()
    assert sorted(p.name for p in ctx.paths.sidecar_dir.iterdir()) == ["mcp.json"]  # no temp file left
