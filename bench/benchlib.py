"""What every benchmark target shares: sizes, figures and rows, the old tree's guard, polling,
child processes, and the world they run in (a devforge, and ``serve`` from either tree)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
RUN = Path(__file__).with_name("run.py")  # the driver: it runs the child processes too
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Mount, Route  # noqa: E402

import devforge as df  # noqa: E402
from bottles import find_bwrap  # noqa: E402

SECRET = "bench-webhook-secret"
OLD_REV = "0c2c1b5"  # the last commit before forgebottle.py was split into modules
OLD_SCHEMA = 4  # its store's schema version (PRAGMA user_version)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The full run's; ``SMOKE`` below is --smoke's."""

    intake_rounds: int = 5
    intake_seconds: float = 3.0  # per target per round
    connections: int = 32
    sidecar_rounds: int = 5
    sidecar_calls: int = 300  # per tree per round
    cli_rounds: int = 9
    cli_bottles: int = 10_000
    launches: int = 8  # per tree, after a warm-up
    frozen: int = 200
    download_mib: int = 100
    download_rounds: int = 5
    setup_rounds: int = 5
    setup_calls: int = 200  # per side per round
    tunnels: int = 1000
    tunnel_limit: int = 256  # egress.max_connections for that target
    model_rounds: int = 5
    model_calls: int = 100  # per side per round
    mcp_calls: int = 200  # per side per round


SMOKE = Sizes(1, 0.5, 4, 1, 20, 1, 50, 1, 5, 4, 1, 1, 20, 50, 16, 1, 10, 20)


@dataclasses.dataclass(frozen=True)
class Tree:
    """A checkout of forgebottle, run as its own program: ``cwd`` and ``PYTHONPATH`` are the tree."""

    label: str  # "before" or "after"
    rev: str
    path: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGE", "PYTHON"))}
        return {**env, "PYTHONPATH": str(self.path), **extra}

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, str(self.path / "forgebottle.py"), *args]


@dataclasses.dataclass
class Figure:
    """A median with the range of the rounds it is the median of."""

    value: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Figure:
        return cls(statistics.median(values), min(values), max(values))


@dataclasses.dataclass
class Row:
    target: str
    limit: float | None  # None: reported, with no target
    higher_is_better: bool
    unit: str  # the times sign for ratios, " ms", or "" for counts
    against: str = ""
    figures: dict[str, Figure | None] = dataclasses.field(default_factory=dict)

    def met(self, label: str) -> bool | None:
        figure = self.figures.get(label)
        if figure is None or self.limit is None:
            return None
        return figure.value >= self.limit if self.higher_is_better else figure.value <= self.limit


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Guard:
    """The old tree may not survive every measurement: its failure becomes "n/a" with the reason,
    and it is left out for the rest of that target (``broken``), or of the run when it could not
    be checked out (``absent``). A failure of this tree stops the run."""

    def __init__(self) -> None:
        self.absent: dict[str, str] = {}
        self.broken: dict[str, str] = {}
        self.failures: dict[str, dict[str, str]] = {}  # target -> tree -> why

    def begin(self, target: str) -> None:
        self.broken = dict(self.absent)
        self.failures[target] = self.broken

    @contextlib.contextmanager
    def __call__(self, tree: Tree) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if tree.label == "after":
                raise
            self.broken[tree.label] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"   {tree.label} tree left out: {self.broken[tree.label]}", flush=True)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def poll(predicate: Callable[[], T | None], *, timeout: float, what: str, every: float = 0.02) -> T:
    """``predicate()`` once it is truthy; RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with contextlib.closing(df.loopback_socket()) as sock:
        return int(sock.getsockname()[1])


@functools.cache
def http() -> httpx.Client:
    """One client for the bench's own calls: making one loads a TLS context, which costs more than
    a launch's forge reads, and would land inside the figures if every call made its own (as
    ``httpx.get`` does)."""
    return httpx.Client(timeout=60)


def answers(url: str, check: Callable[[httpx.Response], bool] = lambda r: True) -> bool:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        return check(http().get(url, timeout=2))
    return False


def end(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, and SIGKILL if that was not enough within a minute."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def child(argv: list[str], **popen: Any) -> Iterator[subprocess.Popen[Any]]:
    """A process of this script's, ended on the way out."""
    proc = subprocess.Popen(argv, cwd=ROOT, **popen)
    try:
        yield proc
    finally:
        end(proc)


# -- the world: a devforge, and serve from either tree ------------------------------------------

WAIT_AGENT = """#!/bin/sh
started=$(date +%s.%N)
echo "$started" > "$HOME/.started" && mv "$HOME/.started" "$HOME/started-$started"
while [ ! -f "$HOME/go" ]; do sleep 0.05; done
forge done success done
"""


def run_devforge(root: Path, port: int) -> None:
    """Child process: devforge, plus two routes for the bench to make repos (with a hook) and issues."""
    forge = df.DevForge(root, base_url=f"http://127.0.0.1:{port}/")
    world = df.seed(forge)

    async def repo(request: Request) -> JSONResponse:
        data = await request.json()
        forge.create_repo(
            world.owner, data["name"], {"README.md": "# bench\n"}, collaborators={world.bot.login: "admin"}
        )
        forge.add_hook(world.owner, data["name"], data["hook"], SECRET)
        return JSONResponse({})

    async def issue(request: Request) -> JSONResponse:
        data = await request.json()
        member = world.member.login
        number = forge.create_issue(
            world.owner, data["repo"], title="bench", user=member, labels=["bot-bottle:wait"], assignees=[member]
        ).number
        return JSONResponse({"number": number})

    app = Starlette(
        routes=[
            Route("/_bench/repo", repo, methods=["POST"]),
            Route("/_bench/issue", issue, methods=["POST"]),
            Mount("/", app=forge.app),
        ]
    )
    print(json.dumps({"token": world.bot.token, "owner": world.owner, "org": world.org}), flush=True)
    sock = df.loopback_socket(port)
    uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False)).run(sockets=[sock])


@dataclasses.dataclass
class Forge:
    url: str
    token: str
    owner: str
    org: str

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1"

    def add_repo(self, name: str, hook: str) -> None:
        http().post(f"{self.url}/_bench/repo", json={"name": name, "hook": hook}).raise_for_status()

    def open_issue(self, repo: str) -> int:
        response = http().post(f"{self.url}/_bench/issue", json={"repo": repo})
        response.raise_for_status()
        return int(response.json()["number"])


@contextlib.contextmanager
def devforge(root: Path) -> Iterator[Forge]:
    """devforge in a process of its own, so it shares neither CPU time nor the GIL with the bench."""
    port = free_port()
    argv = [sys.executable, str(RUN), "_devforge", str(root / "forge"), str(port)]
    with child(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        assert proc.stdout is not None
        seeded = json.loads(proc.stdout.readline() or "{}")
        url = f"http://127.0.0.1:{port}"
        poll(lambda: proc.poll() is None and answers(f"{url}/api/v1/version"), timeout=30, what="devforge")
        yield Forge(url, seeded["token"], seeded["owner"], seeded["org"])


class Serve:
    """``forgebottle serve --config F`` of one tree, configured as on a host, on its own state."""

    def __init__(self, tree: Tree, root: Path, forge: Forge, *, agent_toml: str = "", extra_toml: str = "") -> None:
        """``agent_toml`` goes into the agent's table, ``extra_toml`` after it (more tables)."""
        self.tree, self.root, self.forge, self.repo = tree, root, forge, tree.label
        self.state_dir = root / "state"
        (self.state_dir / "tools").mkdir(parents=True)
        (self.state_dir / "tools" / "wait-agent").write_text(WAIT_AGENT)
        (root / "token").write_text(forge.token)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        sandbox = "bwrap" if find_bwrap() else "none"
        agent = "/opt/forgebottle/bin/wait-agent" if sandbox == "bwrap" else str(self.state_dir / "tools/wait-agent")
        self.config = root / "config.toml"
        self.config.write_text(
            f'[forge]\napi_url = "{forge.api}"\ntoken_file = "{root / "token"}"\norg = "{forge.org}"\n'
            f'[server]\nstate_dir = "{self.state_dir}"\nlisten = "127.0.0.1:{self.port}"\nmax_running = 4\n'
            f'[bottles.local]\nsandbox = "{sandbox}"\n[agents.wait]\ncommand = ["/bin/sh", "{agent}"]\n'
            + agent_toml
            + extra_toml
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        with open(self.root / "serve.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.tree.cli("serve", "--config", str(self.config)),
                cwd=self.tree.path,
                env=self.tree.env(FORGE_WEBHOOK_SECRET=SECRET),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.tree.label}: serve exited {proc.returncode}; see {self.root / 'serve.log'}")
            return answers(f"{self.url}/healthz", lambda r: bool(r.json().get("forge_user")))

        poll(up, timeout=60, what=f"{self.tree.label} serve")
        return self

    def kill(self) -> None:
        """SIGKILL: what a crash does; nothing is flushed on the way out."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        for home in self.state_dir.glob("bottles/*/home"):
            home.joinpath("go").touch()  # let any agent finish rather than be killed
        if self.proc is not None:
            end(self.proc)

    def bottles(self) -> dict[str, str]:
        """slug -> status, through the read API."""
        response = http().get(f"{self.url}/api/bottles")
        response.raise_for_status()
        return {b["slug"]: b["status"] for b in response.json()}

    def slug(self, issue: int) -> str:
        return f"{self.forge.owner}-{self.repo}-{issue}".lower()

    def home(self, issue: int) -> Path:
        return self.state_dir / "bottles" / self.slug(issue) / "home"

    def socket(self, issue: int) -> Path:
        return self.state_dir / "sidecars" / self.slug(issue) / "forge.sock"

    def launch(self) -> int:
        return self.forge.open_issue(self.repo)

    def wait_status(self, issue: int, status: str) -> None:
        slug = self.slug(issue)
        poll(lambda: self.bottles().get(slug) == status, timeout=60, what=f"{slug} {status}", every=0.05)


@contextlib.contextmanager
def serving(tree: Tree, root: Path, forge: Forge, **toml: str) -> Iterator[Serve]:
    root.mkdir(parents=True)
    serve = Serve(tree, root, forge, **toml)
    forge.add_repo(serve.repo, serve.url + "/webhook")
    try:
        yield serve.start()
    finally:
        serve.stop()


def rotated(items: list[T], r: int) -> list[T]:
    """``items`` starting at ``r``: which side goes first changes from round to round."""
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError, StopIteration):  # gone, or a zombie
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return 0


def service_rss_kib(pid: int) -> int:
    """serve's RSS with that of any Python helper it runs (the old tree's WAL sync process); the
    bottles, its other children, are the agents' cost, not the service's."""
    total = rss_kib(pid)
    exe = os.readlink(f"/proc/{pid}/exe")
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else 0
            if parent == pid and os.readlink(entry / "exe") == exe:
                total += rss_kib(int(entry.name))
    return total


def settled_rss(pid: int) -> int:
    """RSS once two readings 0.2 s apart agree within 1% (it still grows just after start-up)."""
    readings = [service_rss_kib(pid)]

    def steady() -> bool:
        readings.append(service_rss_kib(pid))
        return abs(readings[-1] - readings[-2]) <= readings[-2] / 100

    with contextlib.suppress(RuntimeError):  # never steady within 10 s: take the last reading
        poll(steady, timeout=10, what="steady RSS", every=0.2)
    return readings[-1]
