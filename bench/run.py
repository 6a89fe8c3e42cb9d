"""forgebottle benchmarks: what users feel, each as a ratio to a baseline measured in the same run.

    python bench/run.py                  # full sizes, a few minutes
    python bench/run.py --smoke          # tiny sizes: proves the script still works (CI)
    python bench/run.py --only intake,cli

Every target is measured twice, on the tree before the refactor (``--old``, checked out for
the run with ``git worktree``) and on this one, through interfaces both share: the CLI, HTTP and
the sidecar's Unix socket. Prints a table and writes ``--out``. Targets are reported, never
asserted: a miss is a finding to profile, not a failed build.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Mount, Route  # noqa: E402

import devforge as df  # noqa: E402
from bottles import find_bwrap  # noqa: E402
from statemachine import BottleState  # noqa: E402
from store import ForgeState, Store  # noqa: E402

SECRET = "bench-webhook-secret"
OLD_REV = "0c2c1b5"  # the last commit before forgebottle.py was split into modules
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


SMOKE = Sizes(1, 0.5, 4, 1, 20, 1, 50, 1, 5)


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
    limit: float
    higher_is_better: bool
    unit: str  # the times sign for ratios, " ms", or "" for counts
    against: str = ""
    figures: dict[str, Figure | None] = dataclasses.field(default_factory=dict)

    def met(self, label: str) -> bool | None:
        figure = self.figures.get(label)
        if figure is None:
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
    argv = [sys.executable, __file__, "_devforge", str(root / "forge"), str(port)]
    with child(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        assert proc.stdout is not None
        seeded = json.loads(proc.stdout.readline() or "{}")
        url = f"http://127.0.0.1:{port}"
        poll(lambda: proc.poll() is None and answers(f"{url}/api/v1/version"), timeout=30, what="devforge")
        yield Forge(url, seeded["token"], seeded["owner"], seeded["org"])


class Serve:
    """``forgebottle serve --config F`` of one tree, configured as on a host, on its own state."""

    def __init__(self, tree: Tree, root: Path, forge: Forge) -> None:
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
def serving(tree: Tree, root: Path, forge: Forge) -> Iterator[Serve]:
    root.mkdir(parents=True)
    serve = Serve(tree, root, forge)
    forge.add_repo(serve.repo, serve.url + "/webhook")
    try:
        yield serve.start()
    finally:
        serve.stop()


# -- 1. webhook intake ---------------------------------------------------------------------------

# An issues/opened payload as Gitea shapes it; NUMBER and RUN make each body unique (never a replay).
PAYLOAD = (
    '{"action": "opened", "number": NUMBER, "run": "RUN", "issue": {"number": NUMBER},'
    ' "repository": {"name": "demo", "owner": {"login": "alice"}}, "sender": {"login": "alice"}}'
)


def webhook(run: str, n: int) -> tuple[bytes, str]:
    """A signed ``issues/opened`` delivery (it goes to the worker); unique, so never a replay."""
    body = PAYLOAD.replace("NUMBER", str(n)).replace("RUN", run).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    delivery = f"{run}-{n}"
    head = (
        f"POST /webhook HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"X-Gitea-Event-Type: issues\r\nX-Gitea-Delivery: {delivery}\r\nX-Gitea-Signature: {signature}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body, delivery


@dataclasses.dataclass
class Phase:
    rps: float
    p99_ms: float
    statuses: dict[int, int]
    acked: set[str]


async def load(port: int, run: str, seconds: float, connections: int) -> Phase:
    """Keep-alive HTTP/1.1 on raw streams: a load client cheap enough not to be the bottleneck."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    acked: set[str] = set()
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                request, delivery = webhook(run, next(counter))
                started = time.perf_counter()
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                status = int(status_line.split()[1])
                statuses[status] = statuses.get(status, 0) + 1
                if status == 202:
                    acked.add(delivery)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return Phase(len(latencies) / seconds, pct(latencies, 99) * 1000, statuses, acked)


def run_bare(port: int) -> None:
    """Child process: the bare endpoint, a minimal Starlette app on uvicorn that reads the body
    and answers 202, on a TCP listener with serve's uvicorn settings."""

    async def hook(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"status": "queued"}, status_code=202)

    app = Starlette(routes=[Route("/webhook", hook, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, http="h11", log_config=None, access_log=False, proxy_headers=False)


def inbox_deliveries(url: str) -> set[str]:
    """Every delivery id in serve's inbox, paged through ``GET /api/events``."""
    found: set[str] = set()
    before: int | None = None
    while True:
        params = {"limit": "1000", **({"before": str(before)} if before else {})}
        page = http().get(f"{url}/api/events", params=params).json()
        if not page:
            return found
        found.update(e["delivery"] for e in page)
        before = min(e["id"] for e in page)


def bench_intake(sizes: Sizes, root: Path, trees: list[Tree], guard: Guard) -> dict[str, Any]:
    """Rounds alternate the targets (order rotated each round), each on a fresh process and store,
    so a slow minute of a shared machine hits every side of a ratio alike."""
    seconds, conns = sizes.intake_seconds, sizes.connections
    bare: dict[int, Phase] = {}
    phases: dict[str, dict[int, Phase]] = {t.label: {} for t in trees}
    lost: dict[str, int] = {t.label: 0 for t in trees}
    with devforge(root / "forge") as forge:
        for r in range(sizes.intake_rounds):
            for tree in rotated([None, *trees], r):
                if tree is None:
                    port = free_port()
                    with child([sys.executable, __file__, "_bare", str(port)], stderr=subprocess.DEVNULL):
                        poll(functools.partial(answers, f"http://127.0.0.1:{port}/"), timeout=30, what="bare endpoint")
                        bare[r] = asyncio.run(load(port, f"bare{r}", seconds, conns))
                    continue
                if tree.label in guard.broken:
                    continue
                (root / f"{tree.label}{r}").mkdir()
                serve = Serve(tree, root / f"{tree.label}{r}", forge)
                with guard(tree):
                    try:
                        phase = asyncio.run(load(serve.start().port, f"{tree.label}{r}", seconds, conns))
                        # Zero lost: a crash right after the load; every 202 must be in the inbox.
                        serve.kill()
                        missing = phase.acked - inbox_deliveries(serve.start().url)
                        phases[tree.label][r] = phase
                        lost[tree.label] += len(missing)
                    finally:
                        serve.stop()
    rps_row = Row("intake req/s", 0.5, True, "×", f"bare {median([p.rps for p in bare.values()]):,.0f} req/s")
    p99_row = Row("intake p99", 3.0, False, "×", f"bare p99 {median([p.p99_ms for p in bare.values()]):.1f} ms")
    lost_row = Row("intake: acknowledged, then lost to a SIGKILL", 0, False, "", "every 202 answered")
    out: dict[str, Any] = {"bare": {r: dataclasses.asdict(p) | {"acked": len(p.acked)} for r, p in bare.items()}}
    for tree in trees:
        mine = phases[tree.label]
        if mine:
            rps_row.figures[tree.label] = Figure.of([m.rps / bare[r].rps for r, m in mine.items()])
            p99_row.figures[tree.label] = Figure.of([m.p99_ms / bare[r].p99_ms for r, m in mine.items()])
            lost_row.figures[tree.label] = Figure(lost[tree.label], lost[tree.label], lost[tree.label])
        out[tree.label] = {r: dataclasses.asdict(p) | {"acked": len(p.acked)} for r, p in mine.items()}
    out["rows"] = [rps_row, p99_row, lost_row]
    return out


def rotated(items: list[T], r: int) -> list[T]:
    """``items`` starting at ``r``: which side goes first changes from round to round."""
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


# -- 2. the sidecar's read_issue -----------------------------------------------------------------


def bench_sidecar(sizes: Sizes, root: Path, trees: list[Tree], guard: Guard) -> dict[str, Any]:
    """``read_issue`` through each tree's sidecar against the same read made directly with httpx,
    alternated call by call, so both sides of each difference share every moment of the machine."""
    with devforge(root / "forge") as forge, contextlib.ExitStack() as stack:
        direct = stack.enter_context(
            httpx.Client(base_url=forge.api, headers={"Authorization": f"token {forge.token}"}, timeout=30)
        )
        pairs: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
        for tree in trees:
            with guard(tree):
                serve = stack.enter_context(serving(tree, root / tree.label, forge))
                issue = serve.launch()
                serve.wait_status(issue, "running")
                rpc = stack.enter_context(
                    httpx.Client(transport=httpx.HTTPTransport(uds=str(serve.socket(issue))), base_url="http://s")
                )
                path = f"/repos/{forge.owner}/{serve.repo}/issues/{issue}"
                body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "read_issue", "params": {"number": issue}})
                pairs[tree.label] = (
                    reader(functools.partial(direct.get, path), issue),
                    reader(functools.partial(rpc.post, "/rpc", content=body.encode()), issue),
                )
        times: dict[str, list[tuple[list[float], list[float]]]] = {label: [] for label in pairs}
        for r in range(sizes.sidecar_rounds + 1):  # round 0, 20 calls, only warms connections and caches
            block: dict[str, tuple[list[float], list[float]]] = {label: ([], []) for label in pairs}
            for _ in range(sizes.sidecar_calls if r else 20):
                for tree in rotated(trees, r):
                    if tree.label in pairs and tree.label not in guard.broken:
                        with guard(tree):
                            for call, into in zip(pairs[tree.label], block[tree.label], strict=True):
                                started = time.perf_counter()
                                call()
                                into.append(time.perf_counter() - started)
            for label, (direct_times, sidecar_times) in block.items():
                if r and label not in guard.broken:
                    times[label].append((direct_times, sidecar_times))
    row = Row("sidecar read_issue p50 over direct", 1.0, False, " ms")
    out: dict[str, Any] = {}
    for label, rounds in times.items():
        if not rounds:
            continue
        over = [(pct(s, 50) - pct(d, 50)) * 1000 for d, s in rounds]
        row.figures[label] = Figure.of(over)
        out[label] = [{"direct_p50_ms": pct(d, 50) * 1000, "sidecar_p50_ms": pct(s, 50) * 1000} for d, s in rounds]
        row.against = f"direct httpx p50 {median([r['direct_p50_ms'] for r in out[label]]):.2f} ms"
    out["rows"] = [row]
    return out


def reader(call: Callable[[], httpx.Response], issue: int) -> Callable[[], None]:
    """``call``, its answer checked: an error must not pass for a fast read."""

    def checked() -> None:
        data = call().json()
        data = data.get("result", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or data.get("number") != issue:
            raise RuntimeError(f"read of issue #{issue} answered {str(data)[:200]}")

    return checked


# -- 3. launch -----------------------------------------------------------------------------------


def clone_and_bwrap(forge: Forge, repo: str, into: Path, bwrap: str | None) -> float:
    """The floor of a launch: a clone of the same repository, then ``bwrap … true`` on it."""
    started = time.perf_counter()
    url = f"{forge.url}/{forge.owner}/{repo}.git"
    auth = f"http.extraHeader=Authorization: token {forge.token}"
    subprocess.run(["git", "-c", auth, "clone", "-q", url, str(into)], check=True, capture_output=True)
    if bwrap:
        binds = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib"]
        binds += ["--symlink", "usr/lib64", "/lib64", "--bind", str(into), "/workspace"]
        subprocess.run([bwrap, "--unshare-all", "--die-with-parent", *binds, "--", "/bin/true"], check=True)
    return time.perf_counter() - started


def launch_once(serve: Serve) -> float:
    """Issue created on the forge → the agent running inside its bottle (it stamps its own start,
    so polling here can be slow without moving the figure); then let it finish and freeze."""
    sent = time.time()
    issue = serve.launch()
    home = serve.home(issue)
    stamp = poll(lambda: next(home.glob("started-*"), None), timeout=60, what=f"{serve.slug(issue)} start")
    started = float(stamp.read_text())
    home.joinpath("go").touch()
    serve.wait_status(issue, "frozen")
    return started - sent


def bench_launch(sizes: Sizes, root: Path, trees: list[Tree], guard: Guard) -> dict[str, Any]:
    bwrap = find_bwrap()
    pairs: dict[str, list[tuple[float, float]]] = {t.label: [] for t in trees}
    with devforge(root / "forge") as forge, contextlib.ExitStack() as stack:
        serves: dict[str, Serve] = {}
        for tree in trees:
            with guard(tree):
                serves[tree.label] = stack.enter_context(serving(tree, root / tree.label, forge))
        # One launch at a time, each followed by its baseline; the trees take turns. Launch 0 of
        # each is a warm-up, not counted: a service's first launch after start is rare.
        for n in range(sizes.launches + 1):
            for tree in rotated(trees, n):
                if tree.label in serves and tree.label not in guard.broken:
                    with guard(tree):
                        took = launch_once(serves[tree.label])
                        floor = clone_and_bwrap(forge, serves[tree.label].repo, root / f"clone-{tree.label}-{n}", bwrap)
                        if n:
                            pairs[tree.label].append((took, floor))
    row = Row("launch", 1.5, False, "×", "")
    out: dict[str, Any] = {}
    for label, measured in pairs.items():
        if measured:
            row.figures[label] = Figure.of([took / floor for took, floor in measured])
            out[label] = [{"launch_ms": took * 1000, "clone_bwrap_ms": floor * 1000} for took, floor in measured]
            floors = [floor * 1000 for _, floor in measured]
            row.against = f"clone + `bwrap true` {median(floors):.0f} ms"
    out["rows"] = [row]
    return out


# -- 4. the CLI ----------------------------------------------------------------------------------


def fill_store(path: Path, count: int) -> None:
    """``count`` frozen bottles straight into SQLite (both trees share the schema)."""
    store = Store(path)
    at, frozen = "2026-01-01T00:00:00.000+00:00", BottleState.FROZEN
    with store.transaction() as db:
        for n in range(1, count + 1):
            url = f"https://git.example.com/acme/widgets/issues/{n}"
            state = ForgeState("acme", "widgets", n, f"acme-widgets-{n}", "implementer", frozen, at, at, issue_url=url)
            store.upsert(state, db)
    store.close()


def bench_cli(sizes: Sizes, root: Path, trees: list[Tree], guard: Guard) -> dict[str, Any]:
    """Each command a fresh process, as a user runs it; rounds run every command in rotated order,
    and each figure is a median over rounds."""
    state = root / "state"
    fill_store(state / "bot-bottle.db", sizes.cli_bottles)
    by_label = {t.label: t for t in trees}
    commands: dict[tuple[str, str], list[str]] = {("", "pass"): [sys.executable, "-c", "pass"]}
    for tree in trees:
        commands[tree.label, "version"] = tree.cli("--version")
        commands[tree.label, "status"] = tree.cli("orchestrate", "status")

    def run(key: tuple[str, str]) -> float:
        tree = by_label.get(key[0], Tree("", "", ROOT))
        env = tree.env(FORGEBOTTLE_STATE_DIR=str(state))
        started = time.perf_counter()
        done = subprocess.run(commands[key], cwd=tree.path, env=env, capture_output=True, check=False)
        took = time.perf_counter() - started
        if done.returncode != 0 or (key[1] == "status" and b"acme-widgets-1 " not in done.stdout):
            raise RuntimeError(f"{' '.join(key)}: exit {done.returncode}: {done.stderr.decode()[-300:]}")
        return took

    times: dict[tuple[str, str], list[float]] = {key: [] for key in commands}
    for r in range(sizes.cli_rounds + 1):  # round 0 only warms the page and byte-code caches
        for key in rotated(list(commands), r):
            if key[0] not in guard.broken:
                with guard(by_label[key[0]]) if key[0] else contextlib.nullcontext():
                    took = run(key)
                    times[key] += [took] if r else []
    python = times["", "pass"]
    status = Row(f"`orchestrate status` at {sizes.cli_bottles:,} bottles", 2.0, False, "×", "its tree's `--version`")
    version = Row("`--version`", 4.0, False, "×", f"`python -c pass` {median(python) * 1000:.0f} ms")
    for tree in trees:
        v, s = times[tree.label, "version"], times[tree.label, "status"]
        if v and s and tree.label not in guard.broken:
            status.figures[tree.label] = Figure.of([a / b for a, b in zip(s, v, strict=False)])
            version.figures[tree.label] = Figure.of([a / b for a, b in zip(v, python, strict=False)])
    out: dict[str, Any] = {" ".join(key).strip(): [t * 1000 for t in took] for key, took in times.items()}
    out["rows"] = [status, version]
    return out


# -- 5. memory -----------------------------------------------------------------------------------


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


def bench_memory(sizes: Sizes, root: Path, trees: list[Tree], guard: Guard) -> dict[str, Any]:
    row = Row(f"RSS with {sizes.frozen} frozen + 2 running", 1.5, False, "×", "the same `serve` idle")
    out: dict[str, Any] = {}
    with devforge(root / "forge") as forge:
        for tree in trees:
            with guard(tree), serving(tree, root / tree.label, forge) as serve:
                assert serve.proc is not None
                serve.bottles()  # the read API's first answer is part of idle
                idle = settled_rss(serve.proc.pid)
                fill_store(serve.state_dir / "bot-bottle.db", sizes.frozen)
                issues = [serve.launch() for _ in range(2)]
                for issue in issues:
                    serve.wait_status(issue, "running")
                for _ in range(200):  # exercise the read side while loaded
                    serve.bottles()
                loaded = settled_rss(serve.proc.pid)
                row.figures[tree.label] = Figure(loaded / idle, loaded / idle, loaded / idle)
                out[tree.label] = {"idle_mib": round(idle / 1024, 1), "loaded_mib": round(loaded / 1024, 1)}
    out["rows"] = [row]
    return out


# -- the report ----------------------------------------------------------------------------------

BENCHES: dict[str, Callable[[Sizes, Path, list[Tree], Guard], dict[str, Any]]] = {
    "intake": bench_intake,
    "sidecar": bench_sidecar,
    "launch": bench_launch,
    "cli": bench_cli,
    "memory": bench_memory,
}


def fmt(row: Row, label: str) -> str:
    figure = row.figures.get(label)
    if figure is None:
        return "n/a"
    if row.unit == "":
        return f"{figure.value:.0f}"
    spread = "" if figure.low == figure.high else f" ({figure.low:.2f}–{figure.high:.2f})"
    return f"{figure.value:.2f}{row.unit}{spread}"


def table(rows: list[Row], trees: list[Tree]) -> str:
    sign = {True: "≥", False: "≤"}
    head = ["target", "measured against", *(f"{t.label} ({t.rev})" for t in trees), "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        limit = "= 0" if row.limit == 0 else f"{sign[row.higher_is_better]} {row.limit:g}{row.unit}".rstrip()
        met = " → ".join({True: "yes", False: "**no**", None: "n/a"}[row.met(t.label)] for t in trees)
        cells = [f"{row.target} {limit}", row.against, *(fmt(row, t.label) for t in trees), met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def old_tree(rev: str, root: Path, guard: Guard) -> Iterator[list[Tree]]:
    """``rev`` checked out beside this tree for the run (a detached worktree), removed after.
    One that cannot be checked out (a shallow clone, say) is left out: its column says n/a."""
    if not rev:
        yield []
        return
    tree = Tree("before", rev, root / "old-tree")
    made = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree.path), rev], capture_output=True, text=True
    )
    if made.returncode != 0:
        guard.absent[tree.label] = f"cannot check out {rev}: {made.stderr.strip()[-200:]}"
        yield [tree]
        return
    try:
        yield [tree]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree.path)], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_devforge"]:
        run_devforge(Path(args[1]), int(args[2]))
        return 0
    if args[:1] == ["_bare"]:
        run_bare(int(args[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script works")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated: " + ",".join(BENCHES))
    parser.add_argument("--old", default=OLD_REV, help="the tree to compare with (a git revision); '' for none")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    options = parser.parse_args(args)
    names = [n for n in options.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}")
    sizes = SMOKE if options.smoke else Sizes()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    edited = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "*.py"], capture_output=True)
    new = Tree("after", (head.stdout.strip() or "this tree") + (" + edits" if edited.returncode else ""), ROOT)
    results: dict[str, Any] = {"smoke": options.smoke, "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    rows: list[Row] = []
    root = Path(tempfile.mkdtemp(prefix="fbbench-"))
    try:
        guard = Guard()
        with old_tree(options.old, root, guard) as old:
            trees = [*old, new]
            for name in names:
                started = time.monotonic()
                print(f"== {name}", flush=True)
                (root / name).mkdir()
                guard.begin(name)
                result = BENCHES[name](sizes, root / name, [t for t in trees if t.label not in guard.broken], guard)
                rows += result["rows"]
                results[name] = {**result, "rows": [dataclasses.asdict(r) for r in result["rows"]]}
                print(f"   ({time.monotonic() - started:.0f}s)", flush=True)
            results["trees"] = {t.label: t.rev for t in trees}
            results["left_out"] = guard.failures
            print(table(rows, trees))
            for name, failures in guard.failures.items():
                for label, why in failures.items():
                    print(f"n/a for {label} in {name}: {why}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Path(options.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
