"""What an agent inside bwrap can and cannot reach (DESIGN.md §6)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import Rig, needs_bwrap, read_when

pytestmark = needs_bwrap

# Probes run inside the bottle; each prints key=value, the test reads them from $HOME.
PROBE_AGENT = r"""#!/bin/sh
out="$HOME/probe.txt"
: > "$out"
say() { echo "$1" >> "$out"; }
say "cwd=$(pwd)"
[ -d /workspace/.git ] && say "workspace=yes" || say "workspace=no"
[ -S /run/forge/forge.sock ] && say "socket=yes" || say "socket=no"
[ -r /run/forge/prompt.md ] && say "prompt=yes" || say "prompt=no"
cat "$PROBE_STATE_DIR/bot-bottle.db" > /dev/null 2>&1 && say "db=readable" || say "db=hidden"
ls "$PROBE_STATE_DIR" > /dev/null 2>&1 && say "statedir=visible" || say "statedir=hidden"
cat "$PROBE_TOKEN_FILE" > /dev/null 2>&1 && say "tokenfile=readable" || say "tokenfile=hidden"
[ -e "$PROBE_STATE_DIR/admin.sock" ] && say "admin=visible" || say "admin=hidden"
python3 - "$PROBE_PORT" "$PROBE_SERVE_PORT" >> "$out" <<'PY'
import socket, sys
for name, port in (("forge", sys.argv[1]), ("serve", sys.argv[2])):
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()
        print(f"net_{name}=open")
    except OSError as exc:
        print(f"net_{name}=blocked")
PY
touch /etc/probe 2>/dev/null && say "etc=writable" || say "etc=readonly"
touch /usr/probe 2>/dev/null && say "usr=writable" || say "usr=readonly"
env > "$HOME/env.txt"
for p in /proc/[0-9]*; do
  tr '\0' ' ' < "$p/cmdline" 2>/dev/null; echo
  tr '\0' '\n' < "$p/environ" 2>/dev/null
done > "$HOME/procs.txt"
forge done success probed
"""


def probe(rig_factory: Callable[..., Rig], short_tmp: Path, network: str) -> tuple[Rig, dict[str, str], str]:
    token_file = short_tmp / "forge-token"
    rig = rig_factory(scripts={"probe": PROBE_AGENT}, network=network)
    token_file.write_text(rig.forge.world.bot.token)
    rig.agent_env = {
        "PROBE_STATE_DIR": str(rig.state_dir),
        "PROBE_TOKEN_FILE": str(token_file),
        "PROBE_PORT": str(rig.forge.server.port),
        "PROBE_SERVE_PORT": str(rig.server.port),
    }
    rig.start()
    _, state = rig.run_once(agent="probe")
    text = read_when(rig.home(state.slug) / "probe.txt")
    return rig, dict(line.split("=", 1) for line in text.splitlines() if "=" in line), state.slug


def test_agent_is_contained(rig_factory: Callable[..., Rig], short_tmp: Path) -> None:
    rig, seen, slug = probe(rig_factory, short_tmp, "none")
    assert seen["cwd"] == "/workspace"
    assert (seen["workspace"], seen["socket"], seen["prompt"]) == ("yes", "yes", "yes")
    assert (seen["db"], seen["statedir"], seen["tokenfile"], seen["admin"]) == ("hidden",) * 4
    assert (seen["net_forge"], seen["net_serve"]) == ("blocked", "blocked")
    assert (seen["etc"], seen["usr"]) == ("readonly", "readonly")
    env = dict(line.split("=", 1) for line in (rig.home(slug) / "env.txt").read_text().splitlines() if "=" in line)
    assert env["FORGE_SIDECAR_SOCKET"] == "/run/forge/forge.sock"
    assert env["FORGE_BOTTLE_SLUG"] == slug and env["FORGE_ISSUE_NUMBER"] == "1"
    assert env["FORGE_PROMPT_FILE"] == "/run/forge/prompt.md" and env["HOME"] == "/home/agent"
    assert "/opt/forgebottle/bin" in env["PATH"].split(":")
    assert not {"FORGE_TOKEN", "GIT_CONFIG_VALUE_0", "PYTEST_CURRENT_TEST"} & set(env)


def test_token_is_nowhere_the_agent_can_see(rig_factory: Callable[..., Rig], short_tmp: Path) -> None:
    rig, _, slug = probe(rig_factory, short_tmp, "none")
    token = rig.forge.world.bot.token.encode()
    bottle = rig.state_dir / "bottles" / slug
    searched = 0
    hits = []
    # The agent's environment and every argv/environ it could see, its home, logs, and the
    # whole workspace including .git.
    for path in [*bottle.rglob("*"), *(rig.state_dir / "sidecars").rglob("*")]:
        if path.is_file() and not path.is_relative_to(bottle / "mirror.git"):
            searched += 1
            if token in path.read_bytes():
                hits.append(str(path))
    assert searched > 20 and (bottle / "workspace" / ".git" / "config").exists()
    assert (bottle / "home" / "procs.txt").stat().st_size > 0
    assert hits == []


def test_network_host_shares_the_network(rig_factory: Callable[..., Rig], short_tmp: Path) -> None:
    _, seen, _ = probe(rig_factory, short_tmp, "host")
    assert seen["net_forge"] == "open"
    assert seen["tokenfile"] == "hidden"


def test_mirror_config_holds_no_token(rig: Rig) -> None:
    _, state = rig.run_once()
    bottle = rig.state_dir / "bottles" / state.slug
    token = rig.forge.world.bot.token
    for config in (bottle / "mirror.git" / "config", bottle / "workspace" / ".git" / "config"):
        assert token not in config.read_text()
    assert "extraheader" not in (bottle / "workspace" / ".git" / "config").read_text().lower()
