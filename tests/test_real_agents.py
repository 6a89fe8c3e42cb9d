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
        key = f"sk-{agent}-test-{secrets.token_hex(16)}"
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
        built = Scene(forge, serve, models, Store(serve.state_dir / "bot-bottle.db"), agent, key)
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
        title="Add the real-agent file",
        body="Create made.txt saying who made it, commit it and open a PR.",
        user=member,
        labels=[f"bot-bottle:{scene.agent}"],
        assignees=[member],
    )
    return issue.number


def key_hits(scene: Scene, slug: str, doc: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Where the bottle (or anyone reading its record) could find the model key: every regular
    file of the bottle (workspace, .git, HOME with the CLI's sessions, run logs), its sidecar
    dir (prompt, MCP config, sockets' dir), the service log, the database and provenance; each
    searched for the key and its base64 and hex forms. Returns (places, hits)."""
    forms = [form for form, _ in secret_forms([scene.key])]
    files = [p for p in scene.bottle(slug).rglob("*") if p.is_file() and not p.is_symlink()]
    files += [p for p in (scene.serve.state_dir / "sidecars").rglob("*") if p.is_file() and not p.is_symlink()]
    files += [scene.serve.log, *scene.serve.state_dir.glob("bot-bottle.db*")]
    places = [str(p) for p in files] + ["provenance"]
    hits = [str(p) for p in files if any(form in p.read_bytes() for form in forms)]
    text = json.dumps(doc).encode()
    hits += ["provenance"] if any(form in text for form in forms) else []
    return places, hits


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


def check_the_key(scene: Scene, slug: str, doc: dict[str, Any], env_dump: str) -> tuple[int, int]:
    """The bottle held the placeholder; the model server got the real key on every call."""
    assert f"ANTHROPIC_API_KEY={PLACEHOLDER}" in env_dump or f"OPENAI_API_KEY={PLACEHOLDER}" in env_dump
    assert scene.key not in env_dump
    seen = scene.models.requests
    assert seen and {s.api_key for s in seen} == {scene.key}
    # Nor did the placeholder, or the key itself, travel in any body the model got.
    assert not [s.n for s in seen if PLACEHOLDER in s.text() or scene.key in s.text()]
    places, hits = key_hits(scene, slug, doc)
    assert not hits, hits
    return len(places), len(hits)


def check_env(env_dump: str) -> None:
    # The recipe's PATH, then forgebottle's: the forge tool stays on it (§6). A CLI may put
    # its own helpers in front for the commands it runs (Codex does).
    [path] = [line[5:] for line in env_dump.splitlines() if line.startswith("PATH=")]
    assert f":{path}".endswith(f":{NODE_PREFIX}/node_modules/.bin:/opt/forgebottle/bin:/usr/local/bin:/usr/bin:/bin"), path


def check_first_run(scene: Scene, issue: int, slug: str) -> tuple[int, dict[str, Any]]:
    """The PR and its commit on the forge, the MCP operations on the record."""
    dev, owner, repo = scene.forge.dev, scene.forge.owner, scene.forge.repo
    state = scene.store.get(owner, repo, issue)
    assert state is not None and state.pr_number is not None, scene.run_log(slug, 1)[-3000:]
    pull = dev.issue(owner, repo, state.pr_number)
    assert pull.pull is not None and pull.title == f"Fix #{issue}: the real-agent file"
    branch = f"bot-bottle/issue-{issue}"
    # git_out strips the last newline; the workspace has the file as the CLI wrote it.
    assert dev.read_file(owner, repo, branch, "made.txt") == f"{MADE} {scene.agent}"
    assert (scene.bottle(slug) / "workspace" / "made.txt").read_text() == f"{MADE} {scene.agent}\n"
    ops = [op.op for op in scene.store.operations(slug)]
    for op in ("read_issue", "push", "open_pr", "signal_done"):
        assert op in ops, ops
    assert ops.index("read_issue") < ops.index("push") < ops.index("open_pr") < ops.index("signal_done")
    doc = provenance(scene.store, slug)
    assert doc["chain"]["verified"]
    return state.pr_number, doc


def first_script(issue: int, shell: Callable[[str], Step], write: Step) -> list[Step]:
    return [
        call("mcp__forge__read_issue", number=issue),
        shell("env > $HOME/env.txt"),
        write,
        shell(f"git add made.txt && git commit -q -m 'Add made.txt for #{issue}'"),
        call("mcp__forge__push"),
        call("mcp__forge__open_pr", title=f"Fix #{issue}: the real-agent file", body=f"Closes #{issue}."),
        call("mcp__forge__signal_done", status="success", summary="opened the PR"),
        say("first run done"),
    ]


def second_script(pr: int) -> list[Step]:
    return [
        call("mcp__forge__post_comment", number=pr, body="hello from the resumed session"),
        call("mcp__forge__signal_done", status="success", summary="answered the review"),
        say("second run done"),
    ]


def review_and_resume(scene: Scene, issue: int, pr: int, slug: str, run1: int) -> Seen:
    """A review comment from an org member rehydrates the bottle; returns run 2's first request."""
    scene.models.load(second_script(pr))
    dev, owner, repo = scene.forge.dev, scene.forge.owner, scene.forge.repo
    dev.comment(owner, repo, pr, REVIEW, user=scene.forge.world.member.login)
    assert scene.wait_frozen(issue, 2) == slug
    assert scene.models.remaining == 0, scene.run_log(slug, 2)[-3000:]
    comments = [c.body for c in dev.issue(owner, repo, pr).comments]
    assert "hello from the resumed session" in comments
    return scene.models.requests[run1]


def check_resumed(first: Seen, remembered: list[str]) -> int:
    """Run 2's first request carries run 1's conversation, then the review."""
    history = first.text()
    missing = [text for text in remembered if text not in history]
    assert not missing, missing
    assert REVIEW in history
    return len(remembered)


def claude_shell(command: str) -> Step:
    return call("Bash", command=command, description="run a command")


@needs_claude
def test_claude_code_end_to_end_through_the_gateway(scene: Callable[..., Scene]) -> None:
    issue = 1  # a fresh forge: the script must name it before the run starts
    write = call("Write", file_path="/workspace/made.txt", content=f"{MADE} claude\n")
    world = scene("claude", "anthropic", first_script(issue, claude_shell, write))
    assert open_issue(world) == issue
    slug = world.wait_frozen(issue, 1)
    assert world.models.remaining == 0, world.run_log(slug, 1)[-3000:]
    pr, doc = check_first_run(world, issue, slug)
    run1 = len(world.models.requests)
    # One streamed POST per turn: the CLI's own traffic is off, and nothing else reached it.
    assert [(s.path, s.kind, s.stream) for s in world.models.requests] == [("/v1/messages", "scripted", True)] * run1
    usage = run_usage(doc, 1, "anthropic")
    expected = reported(world.models.requests)
    assert {k: usage[k] for k in expected} == expected
    env_dump = (world.bottle(slug) / "home" / "env.txt").read_text()
    check_env(env_dump)
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:3128/models/anthropic" in env_dump
    assert "IS_SANDBOX=1" in env_dump and "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1" in env_dump
    sessions = list((world.bottle(slug) / "home" / ".claude" / "projects" / "-workspace").glob("*.jsonl"))
    assert len(sessions) == 1

    first = review_and_resume(world, issue, pr, slug, run1)
    remembered = ["Add the real-agent file", "env > $HOME/env.txt", f"{MADE} claude", "first run done"]
    resumed = check_resumed(first, remembered)
    doc = provenance(world.store, slug)
    assert [t["trigger"] for t in doc["transitions"]][-2:] == ["rehydrate", "done"]
    usage2 = run_usage(doc, 2, "anthropic")
    expected2 = reported(world.models.requests[run1:])
    assert {k: usage2[k] for k in expected2} == expected2
    places, hits = check_the_key(world, slug, doc, env_dump)
    figures(
        "real_agent_claude",
        runs=2,
        requests=[run1, len(world.models.requests) - run1],
        usage_run1=usage,
        server_run1=expected,
        usage_equal=True,
        resumed_remembered=resumed,
        key_places=places,
        key_hits=hits,
    )


def codex_shell(command: str) -> Step:
    return call("exec_command", cmd=command)


@needs_codex
def test_codex_end_to_end_through_the_gateway(scene: Callable[..., Scene]) -> None:
    issue = 1
    write = codex_shell(f"printf '%s\\n' '{MADE} codex' > made.txt")
    world = scene("codex", "openai", first_script(issue, codex_shell, write))
    assert open_issue(world) == issue
    slug = world.wait_frozen(issue, 1)
    assert world.models.remaining == 0, world.run_log(slug, 1)[-3000:]
    pr, doc = check_first_run(world, issue, slug)
    run1 = len(world.models.requests)
    assert [(s.path, s.kind, s.stream) for s in world.models.requests] == [("/v1/responses", "scripted", True)] * run1
    usage = run_usage(doc, 1, "openai")
    expected = reported(world.models.requests)
    assert {k: usage[k] for k in expected} == expected
    env_dump = (world.bottle(slug) / "home" / "env.txt").read_text()
    check_env(env_dump)
    assert "OPENAI_BASE_URL=http://127.0.0.1:3128/models/openai/v1" in env_dump
    rollouts = list((world.bottle(slug) / "home" / ".codex" / "sessions").rglob("rollout-*.jsonl"))
    assert len(rollouts) == 1

    first = review_and_resume(world, issue, pr, slug, run1)
    remembered = ["Add the real-agent file", "env > $HOME/env.txt", f"{MADE} codex", "first run done"]
    resumed = check_resumed(first, remembered)
    doc = provenance(world.store, slug)
    assert [t["trigger"] for t in doc["transitions"]][-2:] == ["rehydrate", "done"]
    usage2 = run_usage(doc, 2, "openai")
    expected2 = reported(world.models.requests[run1:])
    assert {k: usage2[k] for k in expected2} == expected2
    places, hits = check_the_key(world, slug, doc, env_dump)
    # Same thread id: resume --last found run 1's rollout in the kept HOME.
    assert re.search(r"rollout-.*\.jsonl", str(rollouts[0]))
    figures(
        "real_agent_codex",
        runs=2,
        requests=[run1, len(world.models.requests) - run1],
        usage_run1=usage,
        server_run1=expected,
        usage_equal=True,
        resumed_remembered=resumed,
        key_places=places,
        key_hits=hits,
    )
