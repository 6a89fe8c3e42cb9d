"""Issue 18's acceptance: real agent CLIs, end to end, in real bwrap bottles.

``forgebottle serve`` runs as a subprocess from a TOML config holding the recipes of
docs/real-agents.md as written (only the install prefix differs: ``.ci/node``). Each agent has
``network = "gateway"`` and a model route whose upstream is the scripted model server, reached
through ``egress.resolve``; the route's credential is a file only the service reads. The
scripted model drives the real CLI through a whole issue: read it through the forge's MCP
tools, write a file with the CLI's own tool, commit with git, push and open the PR through MCP,
``signal_done``. A review comment then rehydrates the bottle with ``resume_command``, which
must find the first run's session in the kept HOME.

Each test checks the forge (the PR and its commit), the bottle's record (the MCP operations,
the run's usage against what the scripted server reported) and that the model key is nowhere
the bottle can see, while the scripted server received it on every call.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from config import secret_forms
from provenance import provenance
from statemachine import BottleState
from store import Store
from tests.conftest import WEBHOOK_SECRET, Forge, ServeProcess, needs_bwrap, wait_until
from tests.modelserver import ModelServer, Seen, Step, call, say
from tests.test_agent_clis import NODE_PREFIX, documented_recipes, needs_claude, needs_codex

pytestmark = needs_bwrap

PLACEHOLDER = "forgebottle-gateway"
# What the scripted agent writes, commits and pushes: the PR must carry exactly this.
MADE = "made-by-a-real-agent"
REVIEW = "PLEASE-RESUME and say hello"
RUN_SECONDS = 90.0
ISSUE_TITLE = "Add the real-agent file"
ISSUE_BODY = "Create made.txt saying who made it, commit it and open a PR."


def figures(name: str, **values: Any) -> None:
    print(f"FIGURES {name} " + " ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in values.items()))


def toml_value(value: Any) -> str:
    # TOML's basic strings and arrays of them are JSON's; tables are written inline.
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def toml_table(name: str, table: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in table.items())


def recipe(agent: str) -> dict[str, Any]:
    """docs/real-agents.md's recipe for ``agent``, with the install where ``.ci/run`` puts it."""
    text = json.dumps(documented_recipes()[agent]).replace("/opt/agents", str(NODE_PREFIX))
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@dataclasses.dataclass
class Scene:
    """A started ``forgebottle serve`` with one real agent, its scripted model and the forge."""

    forge: Forge
    serve: ServeProcess
    models: ModelServer
    store: Store
    agent: str
    key: str
    key_file: Path

    def bottle_state(self, issue: int, runs: int) -> BottleState | None:
        state = self.store.get(self.forge.owner, self.forge.repo, issue)
        return state.status if state and len(self.store.runs(state.slug)) >= runs else None

    def wait_frozen(self, issue: int, runs: int) -> str:
        def frozen() -> bool:
            return self.bottle_state(issue, runs) is BottleState.FROZEN

        wait_until(frozen, timeout=RUN_SECONDS, what=f"run {runs} of issue #{issue} to end frozen ({self.log()})")
        state = self.store.get(self.forge.owner, self.forge.repo, issue)
        assert state is not None
        return state.slug

    def log(self) -> str:
        return self.serve.log.read_text(errors="replace")[-1500:]

    def bottle(self, slug: str) -> Path:
        return self.serve.state_dir / "bottles" / slug

    def run_log(self, slug: str, n: int) -> str:
        return (self.bottle(slug) / f"run-{n}.log").read_text(errors="replace")


@pytest.fixture
def scene(forge: Forge, serve_factory: Callable[..., ServeProcess], short_tmp: Path) -> Iterator[Callable[..., Scene]]:
    made: list[Scene] = []

    def make(agent: str, api: str, script: list[Step]) -> Scene:
        models = ModelServer(script).start()
        port = models.url.rsplit(":", 1)[1]
        key = {"anthropic": "sk-ant-test-", "openai": "sk-proj-test-"}[api] + secrets.token_hex(16)
        key_file = short_tmp / f"{agent}.key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        model = recipe(agent)["model"]
        extra = "\n".join(
            [
                toml_table("egress", {"resolve": {"models.test": "127.0.0.1"}}),
                toml_table(
                    f"models.{model}",
                    {"api": api, "upstream": f"http://models.test:{port}", "credential": f"file:{key_file}"},
                ),
                toml_table(f"agents.{agent}", recipe(agent)),
            ]
        )
        serve = serve_factory(extra_toml=extra).start()
        forge.dev.add_hook(forge.owner, forge.repo, f"{serve.url}/webhook", WEBHOOK_SECRET)
        built = Scene(forge, serve, models, Store(serve.state_dir / "bot-bottle.db"), agent, key, key_file)
        made.append(built)
        return built

    yield make
    for built in made:
        built.serve.stop()
        built.store.close()
        built.models.stop()


def open_issue(scene: Scene) -> int:
    member = scene.forge.world.member.login
    issue = scene.forge.dev.create_issue(
        scene.forge.owner,
        scene.forge.repo,
        title=ISSUE_TITLE,
        body=ISSUE_BODY,
        user=member,
        labels=[f"bot-bottle:{scene.agent}"],
        assignees=[member],
    )
    return issue.number


def dump(n: int) -> str:
    """A shell step: the agent's environment and prompt, kept in HOME, where the key search looks."""
    # No quotes: the conversation carries it JSON-escaped, twice for Codex's arguments.
    return f"env > $HOME/env-{n}.txt && cp $FORGE_PROMPT_FILE $HOME/prompt-{n}.md"


def holding_the_key(scene: Scene, files: list[Path]) -> list[Path]:
    forms = [form for form, _ in secret_forms([scene.key])]
    return [p for p in files if any(form in p.read_bytes() for form in forms)]


def key_search(scene: Scene, slug: str, doc: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
    """Every place the bottle (or a reader of its record) could find the model key: each regular
    file of the bottle (workspace and its .git, HOME with the CLI's sessions and the env and
    prompt dumps, run logs, mirror), its sidecar dir, the service log, the database, and
    provenance; searched for the key and its base64 and hex forms. Returns (places by kind, hits)."""
    bottle = scene.bottle(slug)
    kinds: dict[str, list[Path]] = {
        "workspace": [bottle / "workspace"],
        "home": [bottle / "home"],
        "bottle_rest": [p for p in bottle.iterdir() if p.name not in ("workspace", "home")],
        "sidecar": [scene.serve.state_dir / "sidecars" / slug],
    }
    files: dict[str, list[Path]] = {}
    for kind, roots in kinds.items():
        found = [r for r in roots if r.is_file()]
        found += [p for r in roots if r.is_dir() for p in r.rglob("*") if p.is_file() and not p.is_symlink()]
        files[kind] = found
    files["service"] = [scene.serve.log, *scene.serve.state_dir.glob("bot-bottle.db*")]
    record = scene.serve.log.parent / f"provenance-{slug}.json"
    record.write_text(json.dumps(doc))
    files["provenance"] = [record]
    # The search finds the key where it is: the file it was configured from.
    assert holding_the_key(scene, [scene.key_file]) == [scene.key_file]
    hits = [str(p) for group in files.values() for p in holding_the_key(scene, group)]
    return {kind: len(group) for kind, group in files.items()}, hits


def run_usage(doc: dict[str, Any], n: int, model: str) -> dict[str, int]:
    usage: dict[str, int] = doc["runs"][n - 1]["usage"][model]
    return usage


def reported(seen: list[Seen]) -> dict[str, int]:
    """What the scripted server reported over ``seen``: the gateway's counts must equal it."""
    usages = [s.usage for s in seen if s.usage is not None]
    return {
        "requests": len(seen),
        "input_tokens": sum(u.input_tokens for u in usages),
        "output_tokens": sum(u.output_tokens for u in usages),
    }


def first_script(issue: int, shell: Callable[[str], Step], write: Step) -> list[Step]:
    return [
        call("mcp__forge__read_issue", number=issue),
        shell(dump(1)),
        write,
        shell(f"git add made.txt && git commit -q -m 'Add made.txt for #{issue}'"),
        call("mcp__forge__push"),
        call("mcp__forge__open_pr", title=f"Fix #{issue}: the real-agent file", body=f"Closes #{issue}."),
        call("mcp__forge__signal_done", status="success", summary="opened the PR"),
        say("first run done"),
    ]


def second_script(pr: int, shell: Callable[[str], Step]) -> list[Step]:
    return [
        shell(dump(2)),
        call("mcp__forge__post_comment", number=pr, body="hello from the resumed session"),
        call("mcp__forge__signal_done", status="success", summary="answered the review"),
        say("second run done"),
    ]


@dataclasses.dataclass(frozen=True)
class Vendor:
    """What differs between the two CLIs: their API, tools and where they keep a session."""

    agent: str
    api: str
    path: str  # the model API path each turn posts to
    shell: Callable[[str], Step]
    write: Step
    base_url_var: str
    base_url: str
    session_id: Callable[[Seen], str]  # the session or thread a request belongs to
    sessions: str  # the glob, under HOME, of the CLI's session files


def run_end_to_end(make: Callable[..., Scene], vendor: Vendor) -> tuple[Scene, Path]:
    """Both runs, checked; returns the scene and the bottle's HOME for the vendor's own checks."""
    issue = 1  # a fresh forge: the script names it before the run starts
    scene = make(vendor.agent, vendor.api, first_script(issue, vendor.shell, vendor.write))
    assert open_issue(scene) == issue
    slug = scene.wait_frozen(issue, 1)
    assert scene.models.remaining == 0, scene.run_log(slug, 1)[-3000:]
    dev, owner, repo = scene.forge.dev, scene.forge.owner, scene.forge.repo
    home = scene.bottle(slug) / "home"

    # The forge: the PR, and its commit carrying the file the CLI wrote.
    state = scene.store.get(owner, repo, issue)
    assert state is not None and state.pr_number is not None, scene.run_log(slug, 1)[-3000:]
    pr = state.pr_number
    pull = dev.issue(owner, repo, pr)
    assert pull.pull is not None and pull.title == f"Fix #{issue}: the real-agent file"
    made = f"{MADE} {vendor.agent}"
    assert dev.read_file(owner, repo, f"bot-bottle/issue-{issue}", "made.txt") == made  # git strips the \n
    assert (scene.bottle(slug) / "workspace" / "made.txt").read_text() == made + "\n"

    # The record: the forge's MCP tools as operations in provenance, in the script's order.
    doc = provenance(scene.store, slug)
    assert doc["chain"]["verified"]
    ops = [(op["op"], op["outcome"]) for op in doc["operations"]]
    forge_ops = [op for op in ops if op[0] not in ("model", "egress")]
    assert forge_ops == [(op, "ok") for op in ("read_issue", "push", "open_pr", "signal_done")], ops
    run1 = scene.models.requests
    # One streamed POST per turn: the CLI's own traffic is off, nothing else reached the model.
    assert [(s.path, s.kind, s.stream) for s in run1] == [(vendor.path, "scripted", True)] * len(run1)
    # read_issue's answer went back to the model: the issue's text once more than the prompt has it.
    assert run1[1].text().count(ISSUE_BODY) > run1[0].text().count(ISSUE_BODY)
    usage1, expected1 = run_usage(doc, 1, vendor.api), reported(run1)
    assert {k: usage1[k] for k in expected1} == expected1

    # What the agent saw: the route and the placeholder, its PATH before forgebottle's.
    env = (home / "env-1.txt").read_text()
    assert f"{vendor.base_url_var}={vendor.base_url}" in env
    assert f"{vendor.api.upper()}_API_KEY={PLACEHOLDER}" in env
    [path] = [line[5:] for line in env.splitlines() if line.startswith("PATH=")]
    # The recipe's PATH, then forgebottle's, so the forge tool stays on it (§6); a CLI may put
    # its own helpers in front for the commands it runs (Codex does).
    assert f":{path}".endswith(f":{NODE_PREFIX}/node_modules/.bin:/opt/forgebottle/bin:/usr/local/bin:/usr/bin:/bin")
    assert ISSUE_TITLE in (home / "prompt-1.md").read_text()
    sessions = sorted(home.glob(vendor.sessions))
    [session] = {vendor.session_id(s) for s in run1}
    assert len(sessions) == 1 and session in sessions[0].name, (session, sessions)

    # A review comment from an org member rehydrates the bottle with resume_command.
    scene.models.load(second_script(pr, vendor.shell))
    dev.comment(owner, repo, pr, REVIEW, user=scene.forge.world.member.login)
    assert scene.wait_frozen(issue, 2) == slug
    assert scene.models.remaining == 0, scene.run_log(slug, 2)[-3000:]
    assert "hello from the resumed session" in [c.body for c in dev.issue(owner, repo, pr).comments]
    run2 = scene.models.requests[len(run1) :]
    # Its first request carries run 1's conversation: the session was found in the kept HOME.
    remembered = [ISSUE_TITLE, dump(1), made, "first run done", REVIEW]
    missing = [text for text in remembered if text not in run2[0].text()]
    assert not missing, missing
    assert {vendor.session_id(s) for s in run2} == {session}
    assert sorted(home.glob(vendor.sessions)) == sessions
    assert REVIEW in (home / "prompt-2.md").read_text()
    doc = provenance(scene.store, slug)
    assert [t["trigger"] for t in doc["transitions"]] == ["launch", "done", "rehydrate", "done"]
    usage2, expected2 = run_usage(doc, 2, vendor.api), reported(run2)
    assert {k: usage2[k] for k in expected2} == expected2

    # The key: the model server got the real one on every call, never the placeholder...
    seen = scene.models.requests
    assert {s.api_key for s in seen} == {scene.key}
    assert not [s.n for s in seen if PLACEHOLDER in s.text() or scene.key in s.text()]
    # ...and the bottle held only the placeholder: the key is nowhere it could look.
    for n in (1, 2):
        assert scene.key not in (home / f"env-{n}.txt").read_text()
    places, hits = key_search(scene, slug, doc)
    assert not hits, hits
    figures(
        f"real_agent_{vendor.agent}",
        runs=2,
        requests=[len(run1), len(run2)],
        usage_run1=usage1,
        server_run1=expected1,
        usage_run2=usage2,
        server_run2=expected2,
        usage_equal=True,
        resumed_remembered=len(remembered),
        key_places=places,
        key_places_total=sum(places.values()),
        key_hits=len(hits),
    )
    return scene, home


def claude_shell(command: str) -> Step:
    return call("Bash", command=command, description="run a command")


@needs_claude
def test_claude_code_end_to_end_through_the_gateway(scene: Callable[..., Scene]) -> None:
    vendor = Vendor(
        agent="claude",
        api="anthropic",
        path="/v1/messages",
        shell=claude_shell,
        write=call("Write", file_path="/workspace/made.txt", content=f"{MADE} claude\n"),
        base_url_var="ANTHROPIC_BASE_URL",
        base_url="http://127.0.0.1:3128/models/anthropic",
        session_id=lambda seen: seen.headers["x-claude-code-session-id"],
        sessions=".claude/projects/-workspace/*.jsonl",
    )
    _, home = run_end_to_end(scene, vendor)
    # Claude Code asks `server/discover` first and waits 3 s for a server that ignores it:
    # `forge mcp` answers -32601 at once, so each start connects well inside that.
    connects = []
    for log in sorted(home.glob(".cache/claude-cli-nodejs/-workspace/mcp-logs-forge/*.jsonl")):
        for line in log.read_text().splitlines():
            found = re.search(r"Successfully connected \(transport: stdio\) in (\d+)ms", json.loads(line)["debug"])
            connects += [int(found.group(1))] if found else []
    assert len(connects) == 2 and max(connects) < 3000, connects
    figures("real_agent_claude_mcp", connect_ms=connects)


def codex_turn(seen: Seen) -> dict[str, Any]:
    metadata: dict[str, Any] = json.loads(seen.headers["x-codex-turn-metadata"])
    return metadata


def codex_thread(seen: Seen) -> str:
    return str(codex_turn(seen)["thread_id"])


def codex_shell(command: str) -> Step:
    return call("exec_command", cmd=command)


@needs_codex
def test_codex_end_to_end_through_the_gateway(scene: Callable[..., Scene]) -> None:
    vendor = Vendor(
        agent="codex",
        api="openai",
        path="/v1/responses",
        shell=codex_shell,
        write=codex_shell(f"printf '%s\\n' '{MADE} codex' > made.txt"),
        base_url_var="OPENAI_BASE_URL",
        base_url="http://127.0.0.1:3128/models/openai/v1",
        session_id=codex_thread,
        sessions=".codex/sessions/*/*/*/rollout-*.jsonl",
    )
    world, _ = run_end_to_end(scene, vendor)
    # Run 2 loaded the thread from its rollout in the kept HOME, as Codex says of each turn.
    history = [codex_turn(s)["history_initialization"] for s in world.models.requests]
    turns = len(first_script(1, codex_shell, vendor.write)), len(second_script(2, codex_shell))
    assert history == ["new"] * turns[0] + ["cold_resume"] * turns[1], history
