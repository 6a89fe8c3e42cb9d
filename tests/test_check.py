"""`check` proves each part on this host, from the built .pyz: one `ok`/`FIX` line each, exit 1
on any FIX, and the line says how to fix it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Forge, clean_env, needs_bwrap


def write_config(tmp: Path, forge: Forge, *, agent: str = '["/bin/sh", "-c", "true"]', extra: str = "") -> Path:
    (tmp / "token").write_text(forge.world.bot.token)
    (tmp / "whsec").write_text("s" * 32)
    config = tmp / "config.toml"
    config.write_text(
        f'[forge]\napi_url = "{forge.api}"\ntoken_file = "token"\nwebhook_secret_file = "whsec"\n'
        f'org = "{forge.world.org}"\n[server]\nstate_dir = "{tmp / "state"}"\nlisten = "127.0.0.1:{free_port()}"\n'
        f"{extra}\n[agents.a]\ncommand = {agent}\n"
    )
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_check(pyz: Path, config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(pyz), "check", "--config", str(config), *args],
        env=clean_env(SHIV_ROOT=str(pyz.parent / ".shiv-check"), **env),
        capture_output=True,
        text=True,
        timeout=180,
    )


def fixes(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stdout.splitlines() if line.startswith("FIX")]


@needs_bwrap
def test_check_passes_on_a_good_host(pyz: Path, forge: Forge, tmp_path: Path) -> None:
    done = run_check(pyz, write_config(tmp_path, forge))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok   sandbox: a bottle starts with" in done.stdout
    assert "ok   agent a: /bin/sh is found in the bottle" in done.stdout
    assert f"ok   state dir {tmp_path / 'state'} is writable" in done.stdout


@needs_bwrap
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("agent", "agent a: claude-nowhere: command not found in the bottle"),
        ("state", "is not writable"),
        ("port", "is not free"),
        ("api", "does not answer like Gitea's API (the API URL usually ends in /api/v1"),
        ("bwrap", "sandbox: bwrap not found; install bubblewrap"),
        ("hook", "no webhook to"),
    ],
)
def test_check_names_what_to_fix(pyz: Path, forge: Forge, tmp_path: Path, case: str, expected: str) -> None:
    env: dict[str, str] = {}
    args: list[str] = []
    agent = '["claude-nowhere", "-p", "{prompt}"]' if case == "agent" else '["/bin/sh", "-c", "true"]'
    config = write_config(tmp_path, forge, agent=agent)
    if case == "state":
        (tmp_path / "state").write_text("a file where the state dir should be")
    held = None
    if case == "port":
        held = socket.socket()
        port = int(config.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])
        held.bind(("127.0.0.1", port))
        held.listen()
    if case == "api":
        config.write_text(config.read_text().replace(forge.api, forge.api.removesuffix("/api/v1")))
    if case == "bwrap":
        env["PATH"] = "/nonexistent"
    if case == "hook":
        args = ["--repo", f"{forge.owner}/{forge.repo}"]
    try:
        done = run_check(pyz, config, *args, **env)
    finally:
        if held is not None:
            held.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert any(expected in line for line in fixes(done)), done.stdout
    assert "Traceback" not in done.stderr


def test_init_writes_a_config_and_a_secret_and_never_overwrites(pyz: Path, tmp_path: Path) -> None:
    out = tmp_path / "etc" / "config.toml"
    done = subprocess.run(
        [sys.executable, str(pyz), "init", "--out", str(out)],
        env=clean_env(SHIV_ROOT=str(pyz.parent / ".shiv-check")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    secret = out.parent / "webhook-secret"
    assert oct(os.stat(secret).st_mode & 0o777) == "0o600" and len(secret.read_text().strip()) == 64
    assert "[agents." in out.read_text() and "webhook_secret_file" in out.read_text()
    before = secret.read_text()
    again = subprocess.run(
        [sys.executable, str(pyz), "init", "--out", str(out)],
        env=clean_env(SHIV_ROOT=str(pyz.parent / ".shiv-check")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1 and "never overwrites" in again.stderr and secret.read_text() == before


@needs_bwrap
def test_init_setup_serve_then_a_label_launches(pyz: Path, forge: Forge, tmp_path: Path) -> None:
    from statemachine import BottleState
    from store import Store
    from tests.conftest import HAPPY_AGENT, ServeProcess, open_issue, wait_until

    env = clean_env(SHIV_ROOT=str(pyz.parent / ".shiv-check"))

    def fb(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(pyz), *args], env=env, capture_output=True, text=True, timeout=120)

    config = tmp_path / "etc" / "config.toml"
    assert fb("init", "--out", str(config)).returncode == 0
    (config.parent / "forge-token").write_text(forge.world.bot.token)
    state = tmp_path / "state"
    (state / "tools").mkdir(parents=True)
    (state / "tools" / "happy-agent").write_text(HAPPY_AGENT)
    port = free_port()
    text = config.read_text()
    text = text.replace('api_url = "https://git.example.com/api/v1"', f'api_url = "{forge.api}"')
    text = text.replace('org = "bot-bottle"', f'org = "{forge.world.org}"')
    text = text.replace('listen = "127.0.0.1:8765"', f'listen = "127.0.0.1:{port}"')
    text = text.replace("# public_url = ", "public_url = ").replace(
        "https://forgebottle.example.com", f"http://127.0.0.1:{port}"
    )
    text = text.replace(text.split("state_dir = ")[1].split("\n")[0], f'"{state}"', 1)
    text += '\n[agents.happy]\ncommand = ["/bin/sh", "/opt/forgebottle/bin/happy-agent"]\n'
    config.write_text(text)
    repo = f"{forge.owner}/{forge.repo}"
    dry = fb("setup", "--config", str(config), "--repo", repo, "--dry-run")
    assert dry.returncode == 0 and "label bot-bottle:happy: would create" in dry.stdout, dry.stdout + dry.stderr
    assert forge.dev.repo(forge.owner, forge.repo).hooks == []
    done = fb("setup", "--config", str(config), "--repo", repo)
    assert done.returncode == 0, done.stderr
    assert (
        "label bot-bottle:happy: created" in done.stdout
        and f"webhook http://127.0.0.1:{port}/webhook: created" in done.stdout
    )
    again = fb("setup", "--config", str(config), "--repo", repo)
    assert "label bot-bottle:happy: exists" in again.stdout and "exists with every event" in again.stdout
    checked = fb("check", "--config", str(config), "--repo", repo)
    assert f"ok   {repo}: webhook http://127.0.0.1:{port}/webhook sends what forgebottle needs" in checked.stdout
    serve = ServeProcess(forge, tmp_path, command=[sys.executable, str(pyz)])
    serve.config, serve.port, serve.url, serve.state_dir = config, port, f"http://127.0.0.1:{port}", state
    serve.start()
    try:
        issue = open_issue(forge, "happy")
        store = Store(state / "bot-bottle.db")
        wait_until(
            lambda: (
                (found := store.get(forge.owner, forge.repo, issue.number)) is not None
                and found.status is BottleState.FROZEN
            ),
            timeout=90,
            what="the labelled issue's bottle to finish",
        )
        store.close()
    finally:
        assert serve.stop() == 0
