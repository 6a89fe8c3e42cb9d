"""Config: defaults < TOML < environment; every bad value is one line naming its key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import Config, ConfigError, Secret, parse_duration
from tests.conftest import ROOT

BASE = {
    "FORGE_GITEA_API": "https://git.example.com/api/v1",
    "FORGE_TOKEN": "tok-123",
    "FORGE_WEBHOOK_SECRET": "hook-456",
}


def load(toml: str = "", env: dict[str, str] | None = None, tmp: Path | None = None, **kw: bool) -> Config:
    path = None
    if tmp is not None:
        path = tmp / "config.toml"
        path.write_text(toml)
    return Config.load({**BASE, **(env or {})}, path, **kw)


def test_defaults() -> None:
    config = load()
    assert (config.org, config.watchdog_timeout, config.listen, config.max_running) == (
        "bot-bottle",
        1800.0,
        "127.0.0.1:8765",
        2,
    )
    assert config.state_dir == Path("~/.bot-bottle").expanduser()
    assert config.api_token is None and config.agents == {} and set(config.bottles) == {"local"}


def test_environment_overrides_toml(tmp_path: Path) -> None:
    toml = '[forge]\norg = "from-toml"\n[server]\nlisten = "127.0.0.1:1"\nmax_running = 5\n[watchdog]\ntimeout = "2h"\n'
    config = load(toml, {"FORGE_ORG": "from-env", "FORGE_WATCHDOG_TIMEOUT": "90s"}, tmp_path)
    assert (config.org, config.watchdog_timeout, config.listen, config.max_running) == (
        "from-env",
        90.0,
        "127.0.0.1:1",
        5,
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("45", 45), (" 1.5h ", 5400), (12, 12)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5", "0", "5 weeks", "1e3"])
def test_bad_durations_name_the_key(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^watchdog\.timeout: "):
        parse_duration(text, "watchdog.timeout")


def test_secrets_come_from_files_and_are_masked(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("file-token\n")
    (tmp_path / "hook").write_text("file-hook")
    toml = '[forge]\napi_url = "http://g/api/v1"\ntoken_file = "token"\nwebhook_secret_file = "hook"\n'
    path = tmp_path / "c.toml"
    path.write_text(toml)
    config = Config.load({}, path)
    assert config.token.reveal() == "file-token" and config.webhook_secret is not None
    assert config.webhook_secret.reveal() == "file-hook"
    assert "file-token" not in repr(config) and "file-hook" not in repr(config) and "***" in repr(config)
    assert str(Secret("x")) == "Secret('**********')"


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("", {"FORGE_GITEA_API": ""}, r"^forge\.api_url: required"),
        ("", {"FORGE_GITEA_API": "git.example.com"}, r"^forge\.api_url: 'git\.example\.com' is not an http"),
        ("", {"FORGE_TOKEN": ""}, r"^forge\.token_file: required"),
        ("", {"FORGE_WEBHOOK_SECRET": ""}, r"^forge\.webhook_secret_file: required"),
        ('[forge]\ntoken = "inline"\n', {}, r"^forge\.token: secrets never go in the TOML"),
        ('[forge]\ntoken_file = "/nonexistent/x"\n', {"FORGE_TOKEN": ""}, r"^forge\.token_file: cannot read"),
        ("[server]\nmax_running = 0\n", {}, r"^server\.max_running: 0 must be a positive integer"),
        ('[server]\nlisten = "nowhere"\n', {}, r"^server\.listen: "),
        ('[server]\nlisten = "unix:relative"\n', {}, r"^server\.listen: "),
        ('[server]\nlistn = "x"\n', {}, r"^server\.listn: unknown key"),
        ("[serve]\n", {}, r"^serve: unknown section"),
        ('[agents.a]\ncommand = "claude -p"\n', {}, r"^agents\.a\.command: must be a non-empty list"),
        ('[agents.a]\ncommand = ["x"]\nnetwork = "lan"\n', {}, r"^agents\.a\.network: "),
        (
            '[agents.a]\ncommand = ["x"]\nenv = { K = "env:MISSING_VAR" }\n',
            {},
            r"^agents\.a\.env\.K: MISSING_VAR is not set",
        ),
        (
            '[agents.a]\ncommand = ["x"]\nenv = { K = "env:FORGE_TOKEN" }\n',
            {},
            r"^agents\.a\.env\.K: passes a forgebottle",
        ),
        ('[agents.a]\ncommand = ["x"]\ntimeout = "later"\n', {}, r"^agents\.a\.timeout: "),
        ('[agents.a]\ncommand = ["x"]\nro_binds = ["/"]\n', {}, r"^agents\.a: .* would be visible in the bottle"),
        ('[bottles.b]\nbackend = "docker"\n', {}, r"^bottles\.b\.backend: "),
        ('[bottles.b]\nbackend = "command"\n', {}, r"^bottles\.b\.start: must be a non-empty list"),
        ("this is = not toml", {}, r"config\.toml: "),
    ],
)
def test_bad_values_are_one_line_naming_the_key(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load(toml, env, tmp_path)
    assert "\n" not in str(info.value)


def test_unsigned_webhooks_only_when_asked() -> None:
    config = load(env={"FORGE_WEBHOOK_SECRET": ""}, insecure_no_webhook_secret=True)
    assert config.webhook_secret is None


def test_agents_get_only_what_they_are_given(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-file\n")
    toml = (
        f'[agents.impl]\ncommand = ["claude", "-p", "{{prompt}}"]\n'
        f'env = {{ A = "env:MY_KEY", B = "file:{tmp_path}/key", C = "literal" }}\ntimeout = "2h"\n'
    )
    config = load(toml, {"MY_KEY": "k-1"}, tmp_path)
    agent = config.agents["impl"]
    assert agent.command == ("claude", "-p", "{prompt}") and agent.resume_command == agent.command
    assert {k: v.reveal() for k, v in agent.env} == {"A": "k-1", "B": "from-file", "C": "literal"}
    assert agent.timeout == 7200 and agent.network == "none"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FORGE")}
    return subprocess.run(
        [sys.executable, str(ROOT / "forgebottle.py"), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_exit_codes() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("forgebottle, version ")
    bad_config = run_cli("serve")
    assert bad_config.returncode == 1
    assert (
        bad_config.stderr.strip() == "Error: forge.api_url: required (or FORGE_GITEA_API), "
        "e.g. https://git.example.com/api/v1"
    )
    usage = run_cli("orchestrate", "start", "--issue", "x")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert run_cli("no-such-command").returncode == 2
