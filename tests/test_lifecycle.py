"""Runs end: done, exited, watchdog, timeout, destroy; the command backend; recovery after kill -9."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from config import BottleSpec
from statemachine import BottleState
from store import Store
from tests.conftest import (
    ROOT,
    WEBHOOK_SECRET,
    Forge,
    Rig,
    ServeProcess,
    needs_bwrap,
    open_issue,
    processes_mentioning,
    read_when,
    wait_until,
)

pytestmark = needs_bwrap


def status(store: Store, forge: Forge, issue: int) -> BottleState | None:
    state = store.get(forge.owner, forge.repo, issue)
    return state.status if state else None


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE")}
    env["FORGEBOTTLE_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, str(ROOT / "forgebottle.py"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_exit_without_done_freezes_at_once(rig: Rig) -> None:
    issue = rig.open_issue(agent="exit")
    started = time.monotonic()
    state = rig.wait_state(issue.number, BottleState.FROZEN, runs=1)
    assert time.monotonic() - started < rig.config.watchdog_timeout
    last = rig.store.transitions(state.slug)[-1]
    assert (last["trigger"], last["reason"]) == ("exited", "agent exited with 3 without signal_done")
    run = rig.store.runs(state.slug)[0]
    assert (run["exit_code"], run["signalled_status"], run["watchdog_fired"]) == (3, None, 0)


def test_watchdog_freezes_a_stalled_agent_and_kills_its_tree(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(watchdog_timeout=1.0, watchdog_interval=0.2).start()
    issue = rig.open_issue(agent="sleep")
    state = rig.wait_state(issue.number, BottleState.RUNNING)
    wait_until(lambda: (rig.home(state.slug) / "started").exists(), what="the agent and its child")
    marker = str(rig.state_dir / "bottles" / state.slug / "workspace")
    assert processes_mentioning(marker)  # bwrap's command line names the workspace
    began = time.monotonic()
    state = rig.wait_state(issue.number, BottleState.FROZEN, runs=1, timeout=30)
    assert time.monotonic() - began < 1.0 + 0.2 + 5  # timeout + interval + the stop's grace
    last = rig.store.transitions(state.slug)[-1]
    assert last["trigger"] == "watchdog" and "no activity (sidecar call or output) for" in last["reason"]
    run = rig.store.runs(state.slug)[0]
    assert run["watchdog_fired"] == 1 and run["signalled_status"] is None
    wait_until(lambda: not processes_mentioning(marker), timeout=10, what="the process tree to be gone")


# Busy but quiet towards the forge: prints a line every 0.2 s for 3 s, then finishes.
BUSY_AGENT = """#!/bin/sh
forge whoami > /dev/null
i=0
while [ $i -lt 15 ]; do echo "working $i"; sleep 0.2; i=$((i + 1)); done
forge done success "busy but done"
"""


def test_output_keeps_a_busy_agent_alive(rig_factory: Callable[..., Rig]) -> None:
    # Three times the watchdog's timeout without a sidecar call, but never a second without
    # output: the agent is working, and the watchdog leaves it be (DESIGN.md §5).
    rig = rig_factory(scripts={"busy": BUSY_AGENT}, watchdog_timeout=1.0, watchdog_interval=0.2).start()
    issue = rig.open_issue(agent="busy")
    state = rig.wait_state(issue.number, BottleState.FROZEN, runs=1, timeout=60)
    last = rig.store.transitions(state.slug)[-1]
    assert last["trigger"] == "done", last
    assert rig.store.runs(state.slug)[0]["watchdog_fired"] == 0


def test_run_timeout_fires_the_watchdog(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(agent_timeout=1.0, watchdog_interval=0.2).start()
    issue = rig.open_issue(agent="sleep")
    state = rig.wait_state(issue.number, BottleState.FROZEN, runs=1, timeout=30)
    last = rig.store.transitions(state.slug)[-1]
    assert last["trigger"] == "watchdog" and "passed its timeout of 1s" in last["reason"]


def test_orchestrate_start_resume_destroy_through_admin_socket(rig: Rig) -> None:
    dev, world = rig.forge.dev, rig.forge.world
    issue = dev.create_issue(rig.forge.owner, rig.forge.repo, title="By hand", body="b", user=world.outsider.login)
    admin = rig.state_dir / "admin.sock"
    assert stat.S_IMODE(admin.stat().st_mode) == 0o600
    start = [
        "orchestrate",
        "start",
        "--repo",
        f"{rig.forge.owner}/{rig.forge.repo}",
        "--issue",
        str(issue.number),
        "--agent",
        "turns",
    ]
    started = cli(rig.state_dir, *start, "--prompt", "OPERATOR-SAYS")
    assert started.returncode == 0, started.stderr
    slug = started.stdout.split()[0]
    state = rig.wait_state(issue.number, BottleState.RUNNING)
    assert state.slug == slug
    again = cli(rig.state_dir, *start)
    assert again.returncode == 1 and "already running" in again.stderr and "Traceback" not in again.stderr
    assert "OPERATOR-SAYS" in read_when(rig.home(slug) / "prompt-1.md")
    rig.go(slug, 1)
    rig.wait_state(issue.number, BottleState.FROZEN, runs=1)
    resumed = cli(rig.state_dir, "orchestrate", "resume", "--slug", slug, "--prompt", "AGAIN-PLEASE")
    assert resumed.returncode == 0, resumed.stderr
    rig.wait_state(issue.number, BottleState.RUNNING, runs=2)
    assert "AGAIN-PLEASE" in read_when(rig.home(slug) / "prompt-2.md")
    assert rig.store.runs(slug)[1]["trigger"] == "orchestrate resume"
    destroyed = cli(rig.state_dir, "orchestrate", "destroy", "--slug", slug)
    assert destroyed.returncode == 0, destroyed.stderr
    rig.wait_state(issue.number, BottleState.DESTROYED)
    assert not (rig.state_dir / "bottles" / slug / "workspace").exists()
    assert wait_until(lambda: not processes_mentioning(str(rig.state_dir / "bottles" / slug)), timeout=10)
    assert [t["trigger"] for t in rig.store.transitions(slug)] == ["launch", "done", "rehydrate", "destroy"]
    assert cli(rig.state_dir, "orchestrate", "status").stdout.strip() == "no live bottles"
    every = cli(rig.state_dir, "orchestrate", "status", "--all").stdout.splitlines()
    assert [row.split()[:2] for row in every[1:]] == [[slug, "destroyed"]]
    unknown = cli(rig.state_dir, "orchestrate", "destroy", "--slug", "no-such-bottle")
    assert unknown.returncode == 1 and "no bottle" in unknown.stderr
    hostile = cli(rig.state_dir, "orchestrate", "destroy", "--slug", "../../etc")
    assert hostile.returncode == 1 and "invalid slug" in hostile.stderr


def test_status_works_with_the_server_down(rig: Rig) -> None:
    _, state = rig.run_once()
    rig.server.stop()
    table = cli(rig.state_dir, "orchestrate", "status")
    assert table.returncode == 0
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:7] == ["SLUG", "STATE", "AGENT", "AGE", "CHECK-IN", "ISSUE", "PR"]
    assert row.split()[:3] == [state.slug, "frozen", "happy"] and state.issue_url in row and state.pr_url in row
    data = json.loads(cli(rig.state_dir, "orchestrate", "status", "--json").stdout)
    assert [(b["slug"], b["status"], b["pr_number"]) for b in data] == [(state.slug, "frozen", state.pr_number)]
    down = cli(rig.state_dir, "orchestrate", "resume", "--slug", state.slug, "--prompt", "x")
    assert down.returncode == 1 and "not running" in down.stderr


LAUNCHER = r"""#!/bin/sh
# A stand-in for bot-bottle: records how it was called, then acts as the agent.
record="$(dirname "$0")/launcher-$1.json"
python3 - "$record" "$@" <<'PY'
import json, os, sys
json.dump({"argv": sys.argv[2:], "env": dict(os.environ)}, open(sys.argv[1], "w"))
PY
if [ "$1" = start ]; then
  python3 "$FORGE_TOOL" whoami > /dev/null
  python3 "$FORGE_TOOL" done success "launched by command backend"
fi
"""


def test_command_backend_runs_the_launcher(rig_factory: Callable[..., Rig], short_tmp: Path) -> None:
    launcher = short_tmp / "launcher.sh"
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    argv = [str(launcher), "{slug}", "{agent}", "{bottle}", "{prompt_file}", "{socket_dir}", "{workspace}"]
    spec = BottleSpec(
        "ext",
        backend="command",
        sandbox="none",
        start=(str(launcher), "start", *argv[1:]),
        destroy=(str(launcher), "destroy", *argv[1:]),
    )
    rig = rig_factory(bottles={"local": BottleSpec(), "ext": spec})
    rig.agent_env = {"FORGE_TOOL": str(ROOT / "forge_client.py")}
    rig.start()
    issue, state = rig.run_once(labels=["bot-bottle:happy", "bot-bottle-bottle:ext"])
    assert (state.backend_name, state.bottle_names) == ("command", ("ext",))
    call = json.loads((short_tmp / "launcher-start.json").read_text())
    paths = rig.state_dir / "sidecars" / state.slug
    assert call["argv"] == [
        "start",
        state.slug,
        "happy",
        "ext",
        str(paths / "prompt.md"),
        str(paths),
        str(rig.state_dir / "bottles" / state.slug / "workspace"),
    ]
    env = call["env"]
    assert env["FORGE_SIDECAR_SOCKET"] == str(paths / "forge.sock") and env["FORGE_BOTTLE_SLUG"] == state.slug
    assert env["FORGE_ISSUE_NUMBER"] == str(issue.number) and env["FORGE_PR_NUMBER"] == ""
    token = rig.forge.world.bot.token
    assert token not in json.dumps(call)
    assert rig.store.runs(state.slug)[0]["signalled_summary"] == "launched by command backend"
    assert cli(rig.state_dir, "orchestrate", "destroy", "--slug", state.slug).returncode == 0
    rig.wait_state(issue.number, BottleState.DESTROYED)
    assert json.loads((short_tmp / "launcher-destroy.json").read_text())["argv"][1] == state.slug


def test_kill_9_then_restart_processes_every_acknowledged_event_once(
    forge: Forge, serve_factory: Callable[..., ServeProcess]
) -> None:
    serve = serve_factory().start()
    forge.dev.add_hook(forge.owner, forge.repo, f"{serve.url}/webhook", "whsec-" + "5" * 24)
    running = open_issue(forge, "turns", title="runs")
    store = Store(serve.state_dir / "bot-bottle.db")
    wait_until(lambda: status(store, forge, running.number) is BottleState.RUNNING, what="the first bottle to run")
    # The forge goes down: new events are acknowledged and stored, but cannot be processed.
    forge.dev.fault = lambda request: 503 if request.url.path.startswith("/api/") else None
    later = [open_issue(forge, title=f"later {n}") for n in range(3)]
    deliveries = forge.dev.wait_deliveries()
    # Launch events only: the bot's status comment on the running issue sends one more.
    issue_events = [d for d in deliveries if d.event_type == "issues"]
    acknowledged = [d for d in issue_events if d.status is not None and 200 <= d.status < 300]
    assert len(acknowledged) == 4
    wait_until(lambda: len(store.pending_events()) == 3, what="three stored, unprocessed events")
    serve.kill9()
    forge.dev.fault = None
    serve.start()
    first = store.get(forge.owner, forge.repo, running.number)
    assert first is not None
    wait_until(lambda: store.by_slug(first.slug).status is BottleState.FROZEN, what="recovery")  # type: ignore[union-attr]
    assert store.transitions(first.slug)[-1]["reason"] == "orchestrator restarted"
    assert not processes_mentioning(str(serve.state_dir / "bottles" / first.slug))
    wait_until(
        lambda: all(status(store, forge, i.number) is BottleState.FROZEN for i in later),
        timeout=60,
        what="the later issues' bottles to finish",
    )
    # Exactly once: each acknowledged launch event is done, and each issue has one bottle
    # with one launch. (The agents' own comments and PRs send more, ignored, events.)
    launches = [e for e in store.events(100) if e["event_type"] == "issues"]
    assert [e["status"] for e in launches] == ["done"] * 4
    assert len(store.all()) == 4
    for state in store.all():
        launches = [t for t in store.transitions(state.slug) if t["trigger"] == "launch"]
        assert len(launches) == 1
    assert httpx.get(f"{serve.url}/healthz").json()["status"] == "ok"
    assert serve.stop() == 0


RESIDENT_LAUNCHER = r"""#!/bin/sh
# A launcher whose resource outlives forgebottle (as a VM or a container would) until `stop`.
here="$(dirname "$0")"
echo "$2" > "$here/launcher-$1"
if [ "$1" = start ]; then
  while [ ! -f "$here/stopped" ]; do sleep 0.05; done
fi
if [ "$1" = stop ]; then
  touch "$here/stopped"
fi
"""


def test_restart_asks_a_command_launcher_to_stop_the_interrupted_run(
    forge: Forge, serve_factory: Callable[..., ServeProcess], short_tmp: Path
) -> None:
    launcher = short_tmp / "resident" / "launcher.sh"
    launcher.parent.mkdir()
    launcher.write_text(RESIDENT_LAUNCHER)
    launcher.chmod(0o755)
    serve = serve_factory(
        extra_toml=(
            f'[bottles.ext]\nbackend = "command"\nsandbox = "none"\n'
            f'start = ["{launcher}", "start", "{{slug}}"]\nstop = ["{launcher}", "stop", "{{slug}}"]\n'
        )
    ).start()
    forge.dev.add_hook(forge.owner, forge.repo, f"{serve.url}/webhook", WEBHOOK_SECRET)
    issue = open_issue(forge, labels=["bot-bottle:happy", "bot-bottle-bottle:ext"])
    store = Store(serve.state_dir / "bot-bottle.db")
    wait_until(lambda: status(store, forge, issue.number) is BottleState.RUNNING, what="the command bottle to run")
    state = store.get(forge.owner, forge.repo, issue.number)
    # The launcher may still be writing its note when the bottle is recorded running.
    started = launcher.parent / "launcher-start"
    said = wait_until(lambda: started.exists() and started.read_text().strip(), what="the launcher's start")
    assert state is not None and said == state.slug
    serve.kill9()
    assert processes_mentioning(str(launcher)), "the launcher's run outlives forgebottle, as a VM would"
    serve.start()
    wait_until(lambda: status(store, forge, issue.number) is BottleState.FROZEN, what="recovery")
    assert (launcher.parent / "launcher-stop").read_text().strip() == state.slug
    assert wait_until(lambda: not processes_mentioning(str(launcher)), timeout=10, what="the resident run to stop")
    assert serve.stop() == 0


def test_run_logs_are_bounded_and_never_block_the_agent(rig_factory: Callable[..., Rig]) -> None:
    chatty = "#!/bin/sh\nhead -c 20000000 /dev/zero | tr '\\0' x\nforge done success 'said a lot'\n"
    rig = rig_factory(scripts={"chatty": chatty}).start()
    _, state = rig.run_once(agent="chatty")
    assert rig.store.transitions(state.slug)[-1]["trigger"] == "done"  # it finished: the pipe never filled
    log = rig.state_dir / "bottles" / state.slug / "run-1.log"
    wait_until(lambda: log.read_bytes().endswith(b"the rest was discarded]\n"), what="the truncation note")
    assert 16 * 1024 * 1024 <= log.stat().st_size < 16 * 1024 * 1024 + 200
