"""The product as a user meets it: the built .pyz, `demo`, `check`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from statemachine import BottleState
from store import Store
from tests.conftest import ROOT, WEBHOOK_SECRET, Forge, ServeProcess, clean_env, needs_bwrap, wait_until


def test_pyz_runs_with_home_unwritable(pyz: Path, short_tmp: Path) -> None:
    env = clean_env(SHIV_ROOT=str(short_tmp / "shiv"), HOME="/proc/unwritable-home")
    version = subprocess.run(
        [sys.executable, str(pyz), "--version"], env=env, capture_output=True, text=True, timeout=120
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("forgebottle, version ")
    assert any((short_tmp / "shiv").iterdir())  # unpacked where SHIV_ROOT says
    direct = subprocess.run([str(pyz), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert direct.returncode == 0 and "orchestrate" in direct.stdout


@needs_bwrap
def test_the_whole_loop_from_the_built_pyz(
    pyz: Path,
    forge: Forge,
    serve_factory: Callable[..., ServeProcess],
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serve = serve_factory(command=[sys.executable, str(pyz)])
    monkeypatch.setenv("SHIV_ROOT", str(short_tmp / "shiv"))
    serve.start()
    dev, world, owner, repo = forge.dev, forge.world, forge.owner, forge.repo
    dev.add_hook(owner, repo, f"{serve.url}/webhook", WEBHOOK_SECRET)
    store = Store(serve.state_dir / "bot-bottle.db")

    def status(runs: int) -> BottleState | None:
        state = store.get(owner, repo, 1)
        return state.status if state and len(store.runs(state.slug)) >= runs else None

    dev.create_issue(
        owner,
        repo,
        title="Do it",
        body="please",
        user=world.member.login,
        labels=["bot-bottle:happy"],
        assignees=[world.member.login],
    )
    wait_until(lambda: status(1) is BottleState.FROZEN, timeout=60, what="the first run")
    state = store.get(owner, repo, 1)
    assert state is not None and state.pr_number is not None
    dev.comment(owner, repo, state.pr_number, "PLEASE-REVIEW this", user=world.member.login)
    wait_until(lambda: status(2) is BottleState.FROZEN, timeout=60, what="the rehydrated run")
    dev.merge_pr(owner, repo, state.pr_number, user=world.member.login)
    wait_until(lambda: status(2) is BottleState.DESTROYED, timeout=60, what="destroy on merge")
    # The forge: branch pushed, PR merged into main, comments from the agent present.
    pull = dev.issue(owner, repo, state.pr_number)
    assert pull.pull is not None and pull.pull.merged and pull.state == "closed"
    assert dev.read_file(owner, repo, "main", "change.txt") == "change for 1"
    assert dev.read_file(owner, repo, "bot-bottle/issue-1", "change.txt") == "change for 1"
    bodies = [c.body for c in dev.issue(owner, repo, 1).comments]
    assert [b for b in bodies if "forgebottle:status" not in b] == ["working on it"]
    assert any("rehydrated with: PLEASE-REVIEW" in c.body for c in pull.comments)
    assert dev.issue(owner, repo, 1).state == "closed"  # "Closes #1" did its work
    # forgebottle: destroyed, workspace gone, provenance complete and verified.
    assert not (serve.state_dir / "bottles" / state.slug / "workspace").exists()
    env = clean_env(FORGEBOTTLE_STATE_DIR=str(serve.state_dir), SHIV_ROOT=os.environ["SHIV_ROOT"])
    verify = subprocess.run(
        [sys.executable, str(pyz), "provenance", state.slug, "--verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr
    doc = json.loads(
        subprocess.run(
            [sys.executable, str(pyz), "provenance", state.slug, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert doc["status"] == "destroyed" and doc["chain"]["verified"] is True
    assert [r["n"] for r in doc["runs"]] == [1, 2]
    assert [t["trigger"] for t in doc["transitions"]] == ["launch", "done", "rehydrate", "done", "destroy"]
    assert len(doc["operations"]) == 8
    assert serve.stop() == 0


@needs_bwrap
def test_demo_shows_every_step() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "forgebottle.py"), "demo"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in (
        "queued -> running (launch",
        "running -> frozen (done",
        "frozen -> running (rehydrate",
        "frozen -> destroyed (destroy",
        "agent: pushed",
        "agent: opened pull request",
        "chain verified",
        "demo complete",
    ):
        assert step in out, step


def check(forge: Forge, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "FORGE_GITEA_API": forge.api,
        "FORGE_TOKEN": forge.world.bot.token,
        "FORGE_WEBHOOK_SECRET": "s",
        "FORGE_ORG": forge.world.org,
        "FORGEBOTTLE_STATE_DIR": "/tmp/unused",
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "forgebottle.py"), "check"],
        env=clean_env(**{**base, **env}),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_passes_against_devforge(forge: Forge) -> None:
    result = check(forge)
    assert f"the token belongs to {forge.world.bot.login}" in result.stdout
    assert f"{forge.world.bot.login} is a member of {forge.world.org}" in result.stdout
    # No agents are configured here: check says so, and that is its only complaint.
    assert result.returncode == 1 and [line for line in result.stdout.splitlines() if line.startswith("FIX")] == [
        "FIX  agents: none configured ([agents.<name>])"
    ]


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"FORGE_TOKEN": "wrong"}, "401 invalid username, password or token (check FORGE_TOKEN)"),
        ({"FORGE_ORG": "no-such-org"}, "org 'no-such-org' does not exist on the forge"),
        ({"FORGE_GITEA_API": "http://127.0.0.1:9/api/v1"}, "forge unreachable"),
    ],
)
def test_check_names_the_problem(forge: Forge, env: dict[str, str], problem: str) -> None:
    result = check(forge, **env)
    assert result.returncode == 1
    assert problem in result.stdout
    assert "Traceback" not in result.stderr and result.stderr.strip().startswith("Error: ")
