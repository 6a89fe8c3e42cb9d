"""Shared rig: a devforge and forgebottle's app, each on real loopback HTTP in its own thread.

Nothing of ours is patched: tests talk to the service the way Gitea and agents do (signed
webhooks from devforge, the sidecar socket) and read the SQLite file it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import pytest

import devforge as df
from bottles import find_bwrap
from config import AgentSpec, BottleSpec, Config, Secret
from devforge import ServerThread
from gitea import Gitea
from service import Service
from statemachine import BottleState
from store import ChainCheck, ForgeState, InboxEvent, Store, verify_chain
from web import create_app

T = TypeVar("T")

HAVE_BWRAP = find_bwrap() is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not installed")
WEBHOOK_SECRET = "whsec-" + "5" * 24


def _polls(timeout: float, what: str) -> Iterator[None]:
    """Yield until ``timeout`` seconds have passed, then fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_until(predicate: Callable[[], T], *, timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    for _ in _polls(timeout, what):
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("unreachable")


async def until(predicate: Callable[[], T], *, timeout: float = 30.0, what: str = "condition") -> T:
    """``wait_until`` inside an event loop: polls without blocking it, so its tasks go on."""
    for _ in _polls(timeout, what):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError("unreachable")


@dataclasses.dataclass
class Forge:
    dev: df.DevForge
    world: df.Seeded
    server: ServerThread

    @property
    def api(self) -> str:
        return f"{self.server.url}/api/v1"

    @property
    def owner(self) -> str:
        return self.world.owner

    @property
    def repo(self) -> str:
        return self.world.repo


@pytest.fixture
def figures(capsys: pytest.CaptureFixture[str]) -> Callable[..., None]:
    """Print a test's ``FIGURES name: k=v, ...`` line past pytest's capture, into CI's output."""

    def report(name: str, **counts: Any) -> None:
        with capsys.disabled():
            print(f"\nFIGURES {name}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))

    return report


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are capped at 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="fb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve_forge(root: Path, flavor: Literal["gitea", "forgejo"] = "gitea") -> Iterator[Forge]:
    dev = df.DevForge(root, flavor=flavor)
    world = df.seed(dev)
    server = ServerThread(dev.app)
    dev.base_url = server.url + "/"
    server.start()
    yield Forge(dev, world, server)
    server.stop()
    dev.close()


@pytest.fixture
def forge(short_tmp: Path) -> Iterator[Forge]:
    yield from serve_forge(short_tmp / "forge")


# An agent that does the whole happy path with nothing but git and the forge tool.
HAPPY_AGENT = r"""#!/bin/sh
set -eu
issue="$FORGE_ISSUE_NUMBER"
env > "$HOME/env.txt"
if grep -q "New input since your last run" "$FORGE_PROMPT_FILE"; then
  pr=$(forge whoami | python3 -c 'import json,sys; print(json.load(sys.stdin)["pr"])')
  forge comment "$pr" "rehydrated with: $(grep -o 'PLEASE-[A-Z]*' "$FORGE_PROMPT_FILE" | tr '\n' ' ')"
  forge done success "answered review"
  exit 0
fi
forge read-issue "$issue" > /dev/null
forge comment "$issue" "working on it"
echo "change for $issue" > change.txt
git add change.txt
git commit -q -m "change for #$issue"
forge push
forge open-pr --title "Fix #$issue" --body "A change."
forge done success "opened a PR"
"""

SLEEP_AGENT = """#!/bin/sh
forge whoami > /dev/null
sleep 1000 &
echo started > "$HOME/started"
sleep 1000
"""

EXIT_AGENT = """#!/bin/sh
forge whoami > /dev/null
exit 3
"""


# An agent that takes turns: copies each prompt to $HOME, then waits for the test's go-<n>.
TURNS_AGENT = """#!/bin/sh
n=$(ls "$HOME" | grep -c '^prompt-')
n=$((n + 1))
cp "$FORGE_PROMPT_FILE" "$HOME/.prompt" && mv "$HOME/.prompt" "$HOME/prompt-$n.md"  # whole, for read_when
forge whoami > "$HOME/whoami-$n.json"
while [ ! -f "$HOME/go-$n" ]; do sleep 0.05; done
forge done success "turn $n"
"""

AGENTS = {"happy": HAPPY_AGENT, "sleep": SLEEP_AGENT, "exit": EXIT_AGENT, "turns": TURNS_AGENT}


class Rig:
    """forgebottle's app served on loopback against a devforge, plus a store to read its state."""

    def __init__(
        self,
        forge: Forge,
        state_dir: Path,
        *,
        scripts: dict[str, str] | None = None,
        agent_env: dict[str, str] | None = None,
        network: Literal["none", "host"] = "none",
        agent_timeout: float | None = None,
        **overrides: Any,
    ) -> None:
        self.forge = forge
        self.state_dir = state_dir
        tools = state_dir / "tools"
        tools.mkdir(parents=True, exist_ok=True)
        scripts = {**AGENTS, **(scripts or {})}
        for name, script in scripts.items():
            (tools / f"{name}-agent").write_text(script)
        self.scripts = scripts
        self.agent_env = dict(agent_env or {})
        self.network = network
        self.agent_timeout = agent_timeout
        self.overrides = overrides
        self.server = ServerThread()
        self.store = Store(state_dir / "bot-bottle.db")
        self.hook: df.HookRec | None = None
        self.config = self._config()

    def _config(self) -> Config:
        tools = self.state_dir / "tools"
        env = tuple((k, Secret(v)) for k, v in self.agent_env.items())
        sandbox: Literal["bwrap", "none"] = "bwrap" if HAVE_BWRAP else "none"
        agents = {}
        for name in self.scripts:
            inside = ("/bin/sh", f"/opt/forgebottle/bin/{name}-agent")
            command = inside if sandbox == "bwrap" else ("/bin/sh", str(tools / f"{name}-agent"))
            agents[name] = AgentSpec(name, command, command, network=self.network, env=env, timeout=self.agent_timeout)
        settings: dict[str, Any] = {
            "api_url": self.forge.api,
            "token": Secret(self.forge.world.bot.token),
            "webhook_secret": Secret(WEBHOOK_SECRET),
            "state_dir": self.state_dir,
            "org": self.forge.world.org,
            "agents": agents,
            "bottles": {"local": BottleSpec(sandbox=sandbox)},
            "done_grace": 5.0,
            "watchdog_timeout": 600.0,
            "watchdog_interval": 0.2,
        }
        settings.update(self.overrides)
        return Config(**settings)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self, *, hook: bool = True) -> Rig:
        """Build the app from the settings as they are now, serve it, and point a webhook at it."""
        self.config = self._config()
        app_store = Store(self.config.db_path)
        gitea = Gitea(self.config.api_url, self.config.token.reveal(), timeout=self.config.forge_timeout)
        self.service = Service(self.config, app_store, gitea)
        self.server.app = create_app(self.config, self.service)
        self.server.start()
        if hook:
            self.hook = self.forge.dev.add_hook(
                self.forge.owner, self.forge.repo, f"{self.url}/webhook", WEBHOOK_SECRET
            )
        return self

    def stop(self) -> None:
        self.server.stop()
        self.store.close()

    def deliveries(self) -> list[df.Delivery]:
        return self.forge.dev.wait_deliveries()

    def bottle(self, issue: int) -> ForgeState | None:
        return self.store.get(self.forge.owner, self.forge.repo, issue)

    def wait_state(self, issue: int, state: BottleState, *, runs: int = 0, timeout: float = 60.0) -> ForgeState:
        def check() -> ForgeState | None:
            found = self.bottle(issue)
            if found and found.status is state and len(self.store.runs(found.slug)) >= runs:
                return found
            return None

        found = wait_until(check, timeout=timeout, what=f"issue #{issue} {state.value} with {runs} run(s)")
        assert found is not None
        return found

    def wait_events_done(self, timeout: float = 30.0) -> None:
        self.deliveries()
        wait_until(lambda: not self.store.pending_events(1), timeout=timeout, what="the inbox to drain")

    def open_issue(
        self,
        agent: str = "happy",
        *,
        assignee: str | None = None,
        labels: list[str] | None = None,
        body: str = "Please fix.",
    ) -> df.IssueRec:
        return open_issue(self.forge, agent, assignee=assignee, labels=labels, body=body)

    def run_once(self, agent: str = "happy", **kwargs: Any) -> tuple[df.IssueRec, ForgeState]:
        """Open an issue for ``agent`` and wait for its first run to end frozen."""
        issue = self.open_issue(agent, **kwargs)
        return issue, self.wait_state(issue.number, BottleState.FROZEN, runs=1)

    def home(self, slug: str) -> Path:
        return self.state_dir / "bottles" / slug / "home"

    def go(self, slug: str, turn: int) -> None:
        """Let a turns-agent finish turn ``turn``."""
        self.home(slug).joinpath(f"go-{turn}").touch()

    def event_reasons(self) -> list[str]:
        return [e["reason"] for e in self.store.events(1000)]


def open_issue(
    forge: Forge,
    agent: str = "happy",
    *,
    title: str = "Fix the thing",
    body: str = "Please fix.",
    assignee: str | None = None,
    labels: list[str] | None = None,
) -> df.IssueRec:
    """An issue opened by the org member, labelled for ``agent`` and assigned (to the member)."""
    member = forge.world.member.login
    return forge.dev.create_issue(
        forge.owner,
        forge.repo,
        title=title,
        body=body,
        user=member,
        labels=labels if labels is not None else [f"bot-bottle:{agent}"],
        assignees=[assignee or member],
    )


@pytest.fixture
def rig_factory(forge: Forge, short_tmp: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**overrides: Any) -> Rig:
        rig = Rig(forge, short_tmp / f"state{len(rigs)}", **overrides)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.stop()


@pytest.fixture
def rig(rig_factory: Callable[..., Rig]) -> Rig:
    return rig_factory().start()


def read_when(path: Path, *, timeout: float = 30.0) -> str:
    """The text of ``path`` once it exists."""
    wait_until(path.exists, timeout=timeout, what=str(path))
    return path.read_text()


def sign(body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    return df.sign(secret, body)


def post_webhook(
    url: str,
    body: bytes,
    event_type: str = "issues",
    *,
    signature: str | None = None,
    content_type: str = "application/json",
) -> httpx.Response:
    headers = {
        "Content-Type": content_type,
        "X-Gitea-Event-Type": event_type,
        "X-Gitea-Event": event_type,
        "X-Gitea-Delivery": "d-" + os.urandom(4).hex(),
    }
    if signature is not None:
        headers["X-Gitea-Signature"] = signature
    return httpx.post(f"{url}/webhook", content=body, headers=headers, timeout=10)


ROOT = Path(__file__).resolve().parents[1]
PYZ = ROOT / "dist" / "forgebottle.pyz"


@pytest.fixture(scope="session")
def pyz() -> Path:
    """Build dist/forgebottle.pyz from this tree once per session."""
    result = subprocess.run(
        ["bash", str(ROOT / "build.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return PYZ


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without forgebottle's own variables (and shiv's), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGE", "SHIV"))}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """``forgebottle serve`` as a real subprocess, configured by a TOML file and secret files."""

    def __init__(
        self,
        forge: Forge,
        home: Path,
        *,
        command: list[str] | None = None,
        scripts: dict[str, str] | None = None,
        extra_toml: str = "",
        nofile: int | None = None,
        log_format: str | None = None,
    ) -> None:
        self.forge = forge
        self.home = home
        self.nofile = nofile  # the soft RLIMIT_NOFILE serve starts with (systemd's default is 1,024)
        self.log_format = log_format
        self.state_dir = home / "state"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (home / "token").write_text(forge.world.bot.token + "\n")
        (home / "whsec").write_text(WEBHOOK_SECRET)
        tools = self.state_dir / "tools"
        tools.mkdir(parents=True, exist_ok=True)
        agents = ""
        for name, script in {**AGENTS, **(scripts or {})}.items():
            (tools / f"{name}-agent").write_text(script)
            agents += f'[agents.{name}]\ncommand = ["/bin/sh", "/opt/forgebottle/bin/{name}-agent"]\n'
        self.config = home / "config.toml"
        self.config.write_text(
            f'[forge]\napi_url = "{forge.api}"\ntoken_file = "token"\nwebhook_secret_file = "whsec"\n'
            f'org = "{forge.world.org}"\n[server]\nstate_dir = "{self.state_dir}"\n'
            f'listen = "127.0.0.1:{self.port}"\n[watchdog]\ntimeout = "10m"\ninterval = "1s"\n'
            f'[sidecar]\ndone_grace = "5s"\n{extra_toml}\n{agents}'
        )
        self.command = command or [sys.executable, str(ROOT / "forgebottle.py")]
        self.log = home / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> ServeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGE", "FORGEBOTTLE"))}
        nofile = self.nofile

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.command,
                    "serve",
                    "--config",
                    str(self.config),
                    *(["--log-format", self.log_format] if self.log_format else []),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                preexec_fn=limit,
            )
        if not wait:
            return self

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=60, what="serve to answer /healthz")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text``: how tests see that a process tree is gone."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


@pytest.fixture
def serve_factory(forge: Forge, short_tmp: Path) -> Iterator[Callable[..., ServeProcess]]:
    made: list[ServeProcess] = []

    def make(**kwargs: Any) -> ServeProcess:
        home = short_tmp / f"serve{len(made)}"
        home.mkdir()
        process = ServeProcess(forge, home, **kwargs)
        made.append(process)
        return process

    yield make
    for process in made:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(timeout=30)


def verified_chain(store: Store, slug: str) -> ChainCheck:
    """The bottle's hash chain recomputed, as ``provenance --verify`` does."""
    state = store.known(slug)
    return verify_chain(slug, store.operations(slug), head=state.chain_head, count=state.op_count)


def stored_event(store: Store, event_id: int) -> InboxEvent | None:
    """One stored webhook with its body, read from the database file."""
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM inbox WHERE id = ?", (event_id,)).fetchone()
    if row is None:
        return None
    fields = ("received_at", "delivery", "event_type", "status", "reason", "slug")
    text = {name: str(row[name]) for name in fields}
    return InboxEvent(id=int(row["id"]), body=bytes(row["body"]), attempts=int(row["attempts"]), **text)


def schema_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
