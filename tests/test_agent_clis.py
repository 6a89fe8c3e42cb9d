"""Real agent CLIs, headless and offline, against the scripted model server (issue 18).

Claude Code (Anthropic Messages API) and OpenAI Codex (Responses API) run with a cleared
environment and their own HOME, the way a bottle starts them: on this host, and under bwrap
with the recipes of docs/real-agents.md as written. Each run makes the CLI call a tool of a
tiny stdio MCP server, run a shell command that writes a file, and finish; a second run
resumes the session from the kept HOME and must send the first run's conversation back. The
CLIs are the pinned ones ``.ci/run`` installs under ``.ci/node``; the doc has the findings
these tests keep true.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bottles import IN_HOME, IN_WORKSPACE, bwrap_argv, find_bwrap
from tests.conftest import needs_bwrap
from tests.modelserver import ModelServer, Seen, call, say

ROOT = Path(__file__).resolve().parents[1]
NODE_PREFIX = ROOT / ".ci" / "node"  # .ci/run installs the pinned CLIs here
CLAUDE = NODE_PREFIX / "node_modules" / ".bin" / "claude"
RUN_TIMEOUT = 120.0
# A prompt that looks like an option: the argv puts it after "--", so it stays a prompt.
PROMPT = "--version is not a flag here: stamp the word hello, then write made.txt"

# A Model Context Protocol server on stdio, in a few lines: one tool, ``stamp``, and a log
# of every message it got, so a test sees the call arrive as the CLI made it.
MCP_SERVER = """\
import json, sys
log = open(sys.argv[1], "a")
for line in sys.stdin:
    message = json.loads(line)
    log.write(json.dumps(message) + "\\n")
    log.flush()
    if "id" not in message:
        continue
    method, params = message.get("method"), message.get("params") or {}
    if method == "initialize":
        result = {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "probe", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [{"name": "stamp", "description": "Stamps a word.",
                             "inputSchema": {"type": "object", "properties": {"word": {"type": "string"}},
                                             "required": ["word"]}}]}
    elif method == "tools/call":
        word = params["arguments"]["word"]
        result = {"content": [{"type": "text", "text": "stamp:" + word}], "isError": False}
    else:
        reply = {"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "no such method"}}
        print(json.dumps(reply), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
"""

# Claude Code: IS_SANDBOX lets bypassPermissions run as root (a bottle is a sandbox); the
# last switch alone stops all of its own traffic (telemetry, update checks, error reports,
# the /api/hello probe); the other three name the parts, for older releases.
CLAUDE_ENV = {
    "IS_SANDBOX": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
}
# Codex: no approvals and no sandbox of its own (the bottle is the sandbox), no plugin
# marketplace (it would `git ls-remote` GitHub at start), no analytics, no update check.
CODEX_FLAGS = [
    "--skip-git-repo-check",
    "--dangerously-bypass-approvals-and-sandbox",
    "--disable",
    "plugins",
    "--disable",
    "remote_plugin",
    "-c",
    "analytics.enabled=false",
    "-c",
    "check_for_update_on_startup=false",
]


def codex_binary() -> Path | None:
    """Codex's native binary from its per-platform npm package (it needs no Node to run)."""
    found = sorted((NODE_PREFIX / "node_modules" / "@openai").glob("codex-linux-*/vendor/*/bin/codex"))
    return found[0] if found else None


def _needs(path: Path | None, name: str) -> pytest.MarkDecorator:
    missing = path is None or not os.access(path, os.X_OK)
    return pytest.mark.skipif(missing, reason=f"{name} is not installed under .ci/node (bash .ci/run installs it)")


needs_claude = _needs(CLAUDE, "Claude Code")
needs_codex = _needs(codex_binary(), "OpenAI Codex")


class Session:
    """A CLI's world for one test: a workspace, a kept HOME, the MCP probe and its log.

    ``bottled``: the CLI runs under bwrap with the local backend's layout (the workspace at
    /workspace, HOME at /home/agent, the system read-only, the CLI's install bound read-only
    at its own path), so the recipe in docs/real-agents.md is what is tested.
    """

    def __init__(self, tmp_path: Path, *, bottled: bool = False) -> None:
        self.work = tmp_path / "workspace"
        self.home = tmp_path / "home"
        self.work.mkdir()
        self.home.mkdir()
        self.bottled = bottled
        # The probe lives where the CLI can reach it: in the workspace when bottled.
        where = self.work if bottled else tmp_path
        (where / "mcp_probe.py").write_text(MCP_SERVER)
        self.mcp_log = where / "mcp.log"
        seen_as = Path(IN_WORKSPACE) if bottled else tmp_path
        self.mcp = seen_as / "mcp_probe.py"
        self.mcp_log_inside = seen_as / "mcp.log"
        self.key = "sk-test-" + secrets.token_hex(12)

    def env(self, *, path: str = "", **extra: str) -> dict[str, str]:
        # Cleared, as in a bottle: nothing of the test runner's environment leaks in.
        system = "/usr/local/bin:/usr/bin:/bin"
        home = IN_HOME if self.bottled else str(self.home)
        return {"PATH": f"{path}:{system}" if path else system, "HOME": home, "LANG": "C.UTF-8", **extra}

    def run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        cwd: Path | None = self.work
        if self.bottled:
            bwrap = find_bwrap()
            assert bwrap is not None
            binds = [("--bind", str(self.work), IN_WORKSPACE), ("--bind", str(self.home), IN_HOME)]
            # network="host" only so that the CLI reaches the test's loopback server; in a
            # real bottle the gateway's model route takes its place.
            argv = [*bwrap_argv(bwrap, network="host", binds=binds, ro_binds=[str(NODE_PREFIX)]), "--", *argv]
            cwd = None
        return subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL
        )

    def mcp_calls(self) -> list[tuple[str, Any]]:
        if not self.mcp_log.exists():
            return []
        messages = [json.loads(line) for line in self.mcp_log.read_text().splitlines()]
        return [(m["params"]["name"], m["params"]["arguments"]) for m in messages if m.get("method") == "tools/call"]


def claude_argv(session: Session, *, resume: bool = False) -> list[str]:
    config = session.work / ".mcp-probe.json"
    probe = {"command": "python3", "args": [str(session.mcp), str(session.mcp_log_inside)]}
    config.write_text(json.dumps({"mcpServers": {"probe": probe}}))
    seen_as = Path(IN_WORKSPACE) if session.bottled else session.work
    # --mcp-config takes several files: without "--" it would swallow the prompt as one.
    return [
        str(CLAUDE),
        "-p",
        *(["--continue"] if resume else []),
        "--permission-mode",
        "bypassPermissions",
        "--output-format",
        "json",
        "--mcp-config",
        str(seen_as / config.name),
        "--",
        PROMPT if not resume else "And now the review comment.",
    ]


@needs_claude
def test_claude_code_runs_mcp_and_shell_tools_offline_and_continues(tmp_path: Path) -> None:
    session = Session(tmp_path)
    script = [
        call("mcp__probe__stamp", word="hello"),
        call("Bash", command="echo made-by-claude > made.txt", description="Write a file"),
        say("first run done"),
    ]
    with ModelServer(script) as models:
        env = session.env(ANTHROPIC_BASE_URL=models.url, ANTHROPIC_API_KEY=session.key, **CLAUDE_ENV)
        first = session.run(claude_argv(session), env)
        assert first.returncode == 0, first.stderr
        result = json.loads(first.stdout)
        assert (result["result"], result["is_error"], result["num_turns"]) == ("first run done", False, 3)

        assert (session.work / "made.txt").read_text() == "made-by-claude\n"
        assert session.mcp_calls() == [("stamp", {"word": "hello"})]
        seen = models.requests
        # Only the main loop's three turns: with the switches set, no probe, no side request.
        assert [(s.path, s.kind, s.step, s.stream) for s in seen] == [
            ("/v1/messages", "scripted", i, True) for i in range(3)
        ]
        assert {s.api_key for s in seen} == {session.key}
        assert PROMPT in seen[0].text()
        assert {"Bash", "Write", "Edit", "Read"} <= set(seen[0].tools)
        # MCP tools are offered by name (deferred: listed in the prompt, loaded on use).
        assert "mcp__probe__stamp" in seen[0].text()
        assert "stamp:hello" in seen[1].text()  # the MCP result went back to the model
        # Claude Code's own count is what the server reported: the stream's usage was read right.
        total = models.usage()
        assert (result["usage"]["input_tokens"], result["usage"]["output_tokens"]) == (
            total.input_tokens,
            total.output_tokens,
        )
        transcripts = list((session.home / ".claude" / "projects").glob(f"*/{result['session_id']}.jsonl"))
        assert len(transcripts) == 1

        models.load([say("second run done")])
        second = session.run(claude_argv(session, resume=True), env)
        assert second.returncode == 0, second.stderr
        resumed = json.loads(second.stdout)
        assert (resumed["result"], resumed["session_id"]) == ("second run done", result["session_id"])
        [again] = models.requests[len(seen) :]
        history = again.text()
        for earlier in (
            PROMPT,
            "stamp:hello",
            "echo made-by-claude > made.txt",
            "first run done",
            "And now the review comment.",
        ):
            assert earlier in history
        assert again.api_key == session.key


@needs_claude
@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is for root")
def test_claude_code_refuses_bypass_permissions_as_root_without_is_sandbox(tmp_path: Path) -> None:
    session = Session(tmp_path)
    with ModelServer([say("never")]) as models:
        env = session.env(ANTHROPIC_BASE_URL=models.url, ANTHROPIC_API_KEY=session.key)
        env.update({k: v for k, v in CLAUDE_ENV.items() if k != "IS_SANDBOX"})
        refused = session.run(claude_argv(session), env)
        assert refused.returncode != 0
        assert "root" in refused.stderr
        assert models.requests == []


def codex_argv(session: Session, binary: Path, base_url: str, *, resume: bool = False) -> list[str]:
    # A provider of our own: the built-in "openai" one would also reach for OpenAI's hosts.
    provider = {
        "model_provider": "forgebottle",
        "model_providers.forgebottle.name": "forgebottle",
        "model_providers.forgebottle.base_url": base_url,
        "model_providers.forgebottle.env_key": "OPENAI_API_KEY",
        "mcp_servers.probe.command": "python3",
    }
    overrides = [f"{key}={json.dumps(value)}" for key, value in provider.items()]
    overrides.append(f"mcp_servers.probe.args={json.dumps([str(session.mcp), str(session.mcp_log_inside)])}")
    argv = [binary.name if session.bottled else str(binary), "exec", *CODEX_FLAGS, "--json", "-m", "scripted-model"]
    for override in overrides:
        argv += ["-c", override]
    if resume:
        argv += ["resume", "--last"]
    return [*argv, "--", PROMPT if not resume else "And now the review comment."]


def events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def usage_of(run: list[dict[str, Any]]) -> tuple[int, int]:
    [done] = [e for e in run if e["type"] == "turn.completed"]
    return done["usage"]["input_tokens"], done["usage"]["output_tokens"]


def reported(seen: list[Seen]) -> tuple[int, int]:
    usages = [s.usage for s in seen if s.usage is not None]
    return sum(u.input_tokens for u in usages), sum(u.output_tokens for u in usages)


@needs_codex
def test_codex_runs_mcp_and_shell_tools_offline_and_resumes(tmp_path: Path) -> None:
    binary = codex_binary()
    assert binary is not None
    session = Session(tmp_path)
    script = [
        call("mcp__probe__stamp", word="hello"),
        call("exec_command", cmd="echo made-by-codex > made.txt"),
        say("first run done"),
    ]
    with ModelServer(script) as models:
        env = session.env(OPENAI_API_KEY=session.key)
        first = session.run(codex_argv(session, binary, models.openai_base_url), env)
        assert first.returncode == 0, first.stderr
        run = events(first.stdout)
        [thread] = [e["thread_id"] for e in run if e["type"] == "thread.started"]
        messages = [
            e["item"]["text"] for e in run if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"
        ]
        assert messages == ["first run done"]
        commands = [
            e["item"] for e in run if e["type"] == "item.completed" and e["item"]["type"] == "command_execution"
        ]
        assert [c["exit_code"] for c in commands] == [0]

        assert (session.work / "made.txt").read_text() == "made-by-codex\n"
        assert session.mcp_calls() == [("stamp", {"word": "hello"})]
        seen = models.requests
        assert [(s.path, s.kind, s.step, s.stream) for s in seen] == [
            ("/v1/responses", "scripted", i, True) for i in range(3)
        ]
        assert {s.api_key for s in seen} == {session.key}
        assert PROMPT in seen[0].text()
        assert {"exec_command", "mcp__probe"} <= set(seen[0].tools)  # MCP tools come as a namespace
        assert "stamp:hello" in seen[1].text()
        assert usage_of(run) == reported(seen)
        assert len(list((session.home / ".codex" / "sessions").glob(f"*/*/*/rollout-*{thread}.jsonl"))) == 1

        models.load([say("second run done")])
        second = session.run(codex_argv(session, binary, models.openai_base_url, resume=True), env)
        assert second.returncode == 0, second.stderr
        resumed = events(second.stdout)
        assert [e["thread_id"] for e in resumed if e["type"] == "thread.started"] == [thread]
        [again] = models.requests[len(seen) :]
        history = again.text()
        for earlier in (
            PROMPT,
            "stamp:hello",
            "echo made-by-codex > made.txt",
            "first run done",
            "And now the review comment.",
        ):
            assert earlier in history
        assert again.api_key == session.key
        # Codex counts the thread, not the run: the resumed total includes the first run's.
        assert usage_of(resumed) == reported(models.requests)


def documented_recipes() -> dict[str, Any]:
    """The ``[agents.*]`` tables of the TOML block in docs/real-agents.md."""
    text = (ROOT / "docs" / "real-agents.md").read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    agents: dict[str, Any] = tomllib.loads(block)["agents"]
    return agents


def in_test(value: str, session: Session, models: ModelServer, mcp_config: str) -> str:
    """A recipe's word with the test's stand-ins for the gateway, the install and ``forge mcp``."""
    probe = [str(session.mcp), str(session.mcp_log_inside)]
    return (
        value.replace("{prompt}", PROMPT)
        .replace("/run/forge/mcp.json", mcp_config)
        .replace(f"{GATEWAY}/models/openai/v1", models.openai_base_url)
        .replace('"/opt/forgebottle/bin/forge"', '"python3"')
        .replace('["mcp"]', json.dumps(probe))
        .replace("/opt/agents", str(NODE_PREFIX))
    )


GATEWAY = "http://127.0.0.1:3128"
SHELL_STEP = {
    "claude": call("Bash", command="pwd > where"),
    "codex": call("exec_command", cmd="pwd > where"),
}


@needs_bwrap
@pytest.mark.parametrize(
    "agent",
    [pytest.param("claude", marks=needs_claude), pytest.param("codex", marks=needs_codex)],
)
def test_the_documented_recipe_runs_and_resumes_in_a_bwrap_bottle(tmp_path: Path, agent: str) -> None:
    """docs/real-agents.md's TOML, as written, under the local backend's bwrap layout.

    The install is bound read-only at its own path (``ro_binds``) and found through the
    recipe's PATH; the gateway's URL, the install prefix and ``forge mcp`` are replaced by the
    scripted server, .ci/node and the probe. ``network = "host"`` here only reaches the
    test's loopback server: the gateway's model route is the other half of issue 18.
    """
    recipe = documented_recipes()[agent]
    assert (recipe["network"], recipe["ro_binds"]) == ("gateway", ["/opt/agents"])
    session = Session(tmp_path, bottled=True)
    (session.work / ".forge-mcp.json").write_text(
        json.dumps(
            {"mcpServers": {"forge": {"command": "python3", "args": [str(session.mcp), str(session.mcp_log_inside)]}}}
        )
    )
    mcp_config = f"{IN_WORKSPACE}/.forge-mcp.json"
    with ModelServer([call("mcp__forge__stamp", word="hello"), SHELL_STEP[agent], say("first run done")]) as models:
        env = {key: in_test(value, session, models, mcp_config) for key, value in recipe["env"].items()}
        env = session.env(path=env.pop("PATH"), **env)
        # What the gateway sets in the bottle: its route and a placeholder key (here: the test's).
        env.update(ANTHROPIC_BASE_URL=models.url, ANTHROPIC_API_KEY=session.key, OPENAI_API_KEY=session.key)
        first = session.run([in_test(word, session, models, mcp_config) for word in recipe["command"]], env)
        assert first.returncode == 0, first.stderr
        assert (session.work / "where").read_text() == IN_WORKSPACE + "\n"
        assert session.mcp_calls() == [("stamp", {"word": "hello"})]
        assert [s.kind for s in models.requests] == ["scripted"] * 3
        assert {s.api_key for s in models.requests} == {session.key}

        models.load([say("second run done")])
        resumed = session.run([in_test(word, session, models, mcp_config) for word in recipe["resume_command"]], env)
        assert resumed.returncode == 0, resumed.stderr
        [again] = models.requests[3:]
        assert PROMPT in again.text() and "stamp:hello" in again.text() and "first run done" in again.text()
