"""The command line as an operator meets it, from the built .pyz: state found by --config or
the environment, read-only commands without secrets, one clear line for each mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from statemachine import BottleState
from tests.conftest import Rig, ServeProcess, clean_env, needs_bwrap, post_webhook, wait_until


def cli(pyz: Path, *args: str, state_dir: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    extra = {"SHIV_ROOT": str(pyz.parent / ".shiv-cli"), **env}
    if state_dir is not None:
        extra["FORGEBOTTLE_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, str(pyz), *args], env=clean_env(**extra), capture_output=True, text=True, timeout=120
    )


def test_status_without_a_database_says_where_it_looked(pyz: Path, tmp_path: Path) -> None:
    done = cli(pyz, "orchestrate", "status", state_dir=tmp_path / "nothing-here")
    assert done.returncode == 1
    assert f"no forgebottle state at {tmp_path / 'nothing-here'}" in done.stderr
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "from-config"}"\n')
    done = cli(pyz, "orchestrate", "status", "--config", str(config))
    assert done.returncode == 1 and str(tmp_path / "from-config") in done.stderr


def test_a_repo_without_a_slash_is_a_usage_error(pyz: Path, tmp_path: Path) -> None:
    done = cli(pyz, "orchestrate", "start", "--repo", "alice-demo", "--issue", "1", "--agent", "a", state_dir=tmp_path)
    assert done.returncode == 2 and "OWNER/REPO" in done.stderr


@needs_bwrap
def test_provenance_summary_logs_and_a_second_destroy(pyz: Path, rig: Rig) -> None:
    issue, state = rig.run_once()
    slug = state.slug
    # Read-only commands need no secret: the environment has none.
    summary = cli(pyz, "provenance", slug, state_dir=rig.state_dir)
    assert summary.returncode == 0, summary.stderr
    lines = summary.stdout.splitlines()
    assert lines[0].startswith(f"{slug}: frozen; agent happy")
    assert any("run 1 (issues" in line and "signalled success: opened a PR" in line for line in lines)
    assert any(f"posted comment to #{issue.number}" in line for line in lines)
    assert lines[-1].startswith("  chain verified:")
    doc = json.loads(cli(pyz, "provenance", slug, "--json", state_dir=rig.state_dir).stdout)
    assert doc["slug"] == slug and doc["chain"]["verified"] is True
    # The run's own output (the happy agent's forge calls print JSON).
    log = cli(pyz, "logs", slug, state_dir=rig.state_dir)
    assert log.returncode == 0 and '"html_url"' in log.stdout
    missing = cli(pyz, "logs", slug, "--run", "7", state_dir=rig.state_dir)
    assert missing.returncode == 1 and "has no run 7 (runs: 1)" in missing.stderr
    # Destroying twice records one destroy.
    for _ in range(2):
        done = cli(pyz, "orchestrate", "destroy", "--slug", slug, state_dir=rig.state_dir)
        assert done.returncode == 0 and f"{slug} destroyed" in done.stdout, done.stderr
    assert [t["trigger"] for t in rig.store.transitions(slug)].count("destroy") == 1
    assert rig.store.by_slug(slug).status is BottleState.DESTROYED  # type: ignore[union-attr]


@needs_bwrap
def test_each_webhook_is_counted_once(rig: Rig) -> None:
    rig.run_once()
    rig.wait_events_done()
    text = httpx.get(f"{rig.url}/metrics", timeout=10).text
    counted = sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("forgebottle_webhooks_total{")
    )
    assert counted == len(rig.store.events(1000))


def test_logs_are_levelled_for_journald_and_readable_on_a_terminal(
    serve_factory: Callable[..., ServeProcess],
) -> None:
    serve = serve_factory()
    serve.start()
    assert post_webhook(serve.url, b"{}", "issues", signature="00" * 32).status_code == 401
    wait_until(lambda: "refused (401)" in serve.log.read_text(), what="the refusal in the log")
    assert serve.stop() == 0
    lines = [json.loads(line) for line in serve.log.read_text().splitlines() if line.startswith("{")]
    refusal = next(entry for entry in lines if "refused (401)" in entry["msg"])
    assert (refusal["level"], refusal["PRIORITY"]) == ("warning", 4)
    started = next(entry for entry in lines if " serving on " in entry["msg"])
    assert "sandbox" in started["msg"] and "agents happy" in started["msg"] and "0.1.0" in started["msg"]
    assert any(" stopped on " in entry["msg"] for entry in lines)
    # Under systemd (JOURNAL_STREAM set) each line carries journald's priority prefix.
    journal = serve_factory()
    journal.config.write_text(serve.config.read_text().replace(f":{serve.port}", f":{journal.port}"))
    os.environ["JOURNAL_STREAM"] = "8:1234"
    try:
        journal.start()
    finally:
        del os.environ["JOURNAL_STREAM"]
    assert journal.stop() == 0
    assert any(line.startswith("<6>{") for line in journal.log.read_text().splitlines())
    # And for a terminal, text.
    text = serve_factory(log_format="text")
    text.config.write_text(serve.config.read_text().replace(f":{serve.port}", f":{text.port}"))
    text.start()
    assert text.stop() == 0
    assert any(" INFO    forgebottle 0.1.0 serving on " in line for line in text.log.read_text().splitlines())


TALKING_AGENT = """#!/bin/sh
echo "first line"
while [ ! -f "$HOME/go" ]; do sleep 0.05; done
echo "second line"
forge done success "talked"
"""


@needs_bwrap
def test_logs_follow_a_running_run_until_it_ends(pyz: Path, rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(scripts={"talk": TALKING_AGENT}).start()
    issue = rig.open_issue(agent="talk")
    state = rig.wait_state(issue.number, BottleState.RUNNING)
    extra = {"SHIV_ROOT": str(pyz.parent / ".shiv-cli"), "FORGEBOTTLE_STATE_DIR": str(rig.state_dir)}
    follow = subprocess.Popen(
        [sys.executable, str(pyz), "logs", state.slug, "-f"],
        env=clean_env(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None
        assert follow.stdout.readline() == "first line\n"  # printed while the run goes on
        assert follow.poll() is None
        rig.home(state.slug).joinpath("go").touch()
        out, err = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 0, err
    assert "second line" in out
    rig.wait_state(issue.number, BottleState.FROZEN, runs=1)
