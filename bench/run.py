"""forgebottle benchmarks: what users feel, each as a ratio to a baseline measured in the same run.

    python bench/run.py                  # full sizes, a few minutes
    python bench/run.py --smoke          # tiny sizes: proves the script still works (CI)
    python bench/run.py --only intake,cli

Every target is measured twice, on the tree before the refactor (``--old``, checked out for
the run with ``git worktree``) and on this one, through interfaces both share: the CLI, HTTP and
the sidecar's Unix socket. Prints a table and writes ``--out``. Targets are reported, never
asserted: a miss is a finding to profile, not a failed build.
"""

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
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import targets_gateway
import uvicorn
from benchlib import (
    OLD_REV,
    OLD_SCHEMA,
    ROOT,
    SECRET,
    SMOKE,
    Figure,
    Forge,
    Guard,
    Row,
    Serve,
    Sizes,
    Tree,
    answers,
    child,
    devforge,
    free_port,
    http,
    median,
    pct,
    poll,
    rotated,
    run_devforge,
    serving,
    settled_rss,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bottles import find_bwrap
from statemachine import BottleState
from store import ForgeState, Store

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


def fill_store(path: Path, count: int, schema: int | None = None) -> None:
    """``count`` frozen bottles straight into SQLite, with this tree's ``Store``. ``schema``, or
    the version the file had, is stamped back afterwards: the versions since the old tree's only
    added columns and an index (``store.MIGRATIONS``), which its queries never name, but it
    refuses a file newer than it knows."""
    if schema is None and path.exists():
        with contextlib.closing(sqlite3.connect(path)) as db:
            schema = int(db.execute("PRAGMA user_version").fetchone()[0]) or None
    store = Store(path)
    at, frozen = "2026-01-01T00:00:00.000+00:00", BottleState.FROZEN
    with store.transaction() as db:
        for n in range(1, count + 1):
            url = f"https://git.example.com/acme/widgets/issues/{n}"
            state = ForgeState("acme", "widgets", n, f"acme-widgets-{n}", "implementer", frozen, at, at, issue_url=url)
            store.upsert(state, db)
    store.close()
    if schema is not None:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute(f"PRAGMA user_version = {int(schema)}")


def bench_cli(sizes: Sizes, root: Path, trees: list[Tree], guard: Guard) -> dict[str, Any]:
    """Each command a fresh process, as a user runs it; rounds run every command in rotated order,
    and each figure is a median over rounds."""
    states = {t.label: root / f"state-{t.label}" for t in trees}
    for tree in trees:
        fill_store(states[tree.label] / "bot-bottle.db", sizes.cli_bottles, OLD_SCHEMA if tree.rev == OLD_REV else None)
    by_label = {t.label: t for t in trees}
    commands: dict[tuple[str, str], list[str]] = {("", "pass"): [sys.executable, "-c", "pass"]}
    for tree in trees:
        commands[tree.label, "version"] = tree.cli("--version")
        commands[tree.label, "status"] = tree.cli("orchestrate", "status")

    def run(key: tuple[str, str]) -> float:
        tree = by_label.get(key[0], Tree("", "", ROOT))
        env = tree.env(FORGEBOTTLE_STATE_DIR=str(states.get(key[0], root)))
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
    "gateway": targets_gateway.bench_gateway,
    "models": targets_gateway.bench_models,
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
        if row.limit is None:
            limit, met = "(reported)", "—"
        else:
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
    if args[:1] == ["_upstream"]:
        targets_gateway.run_upstream(int(args[1]))
        return 0
    if args[:1] == ["_models"]:
        targets_gateway.run_models()
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
