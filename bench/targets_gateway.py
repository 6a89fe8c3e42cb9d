"""The egress gateway's targets (issue 17) and the model route's and ``forge mcp``'s (issue 18).

Only this tree has a gateway, so these run on it alone (the old tree's column says n/a). Each
figure is still against a baseline measured in the same run, alternated with it: the same
download, connection or model call made directly from the host, and the same sidecar call made
on the raw socket. The gateway is reached from the host on its Unix socket
(``sidecars/<slug>/egress.sock``), speaking the HTTP proxy protocol a bottle's relay carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import http.server
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
from benchlib import (
    ROOT,
    RUN,
    Figure,
    Guard,
    Row,
    Serve,
    Sizes,
    Tree,
    child,
    devforge,
    free_port,
    pct,
    poll,
    rotated,
    service_rss_kib,
    serving,
    settled_rss,
)

import forge_client

UPSTREAM = "up.test"  # mapped to 127.0.0.1 by egress.resolve, as a bottle's names would be
MODELS = "models.test"
CHUNK = 1024 * 1024
TUNNEL_DEADLINE = 60.0  # seconds for every one of the concurrent tunnels to end, one way or the other


# -- the far side: an upstream of bytes and the scripted model server, each in its own process --


class _Bytes(http.server.BaseHTTPRequestHandler):
    """``GET /bytes/N``: N bytes, from one buffer, so the upstream costs next to nothing."""

    protocol_version = "HTTP/1.1"
    block = bytes(CHUNK)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        size = int(self.path.rsplit("/", 1)[1]) if self.path.startswith("/bytes/") else 0
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        view = memoryview(self.block)
        while size > 0:
            self.wfile.write(view[: min(size, CHUNK)])
            size -= CHUNK


def run_upstream(port: int) -> None:
    """Child process: the upstream the downloads and tunnels reach."""
    _Upstream(("127.0.0.1", port), _Bytes).serve_forever()


class _Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # The tunnels target opens hundreds at once; the default backlog (5) would stall some of
    # them in SYN retries, and that wait would be the upstream's, not the gateway's.
    request_queue_size = 1024


def run_models() -> None:
    """Child process: the scripted model server until stdin closes; its URL on stdout."""
    from tests.modelserver import ModelServer

    with ModelServer() as models:
        print(models.url, flush=True)
        sys.stdin.read()


@contextlib.contextmanager
def far_side() -> Iterator[tuple[int, str]]:
    """(upstream port, model server URL), each server a process of its own so that neither
    shares the GIL with the bench's clients."""
    port = free_port()
    with (
        child([sys.executable, str(RUN), "_upstream", str(port)], stderr=subprocess.DEVNULL),
        child([sys.executable, str(RUN), "_models"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as m,
    ):
        assert m.stdout is not None and m.stdin is not None
        models_url = m.stdout.readline().strip()
        poll(lambda: _answers_tcp(port), timeout=30, what="upstream")
        yield port, models_url
        m.stdin.close()


def _answers_tcp(port: int) -> bool:
    with contextlib.suppress(OSError):
        return fetch(direct_socket(port), "/bytes/1") == 1
    return False


@dataclasses.dataclass
class World:
    serve: Serve
    issue: int
    upstream: int  # port
    models_url: str

    @property
    def egress(self) -> str:
        return str(self.serve.state_dir / "sidecars" / self.serve.slug(self.issue) / "egress.sock")


@contextlib.contextmanager
def gateway_world(sizes: Sizes, root: Path, trees: list[Tree]) -> Iterator[World]:
    """devforge, the far side, and this tree's ``serve`` with one running ``network = "gateway"``
    bottle whose agent has a model route."""
    tree = next(t for t in trees if t.label == "after")
    with devforge(root / "forge") as forge, far_side() as (port, models_url):
        key = root / "model.key"
        key.write_text("sk-ant-bench-" + "0" * 32 + "\n")
        key.chmod(0o600)
        models_port = models_url.rsplit(":", 1)[1]
        extra = (
            f'[egress]\nallow = ["{UPSTREAM}:{port}"]\nmax_connections = {sizes.tunnel_limit}\n'
            f'resolve = {{ "{UPSTREAM}" = "127.0.0.1", "{MODELS}" = "127.0.0.1" }}\n'
            f'[models.bench]\napi = "anthropic"\nupstream = "http://{MODELS}:{models_port}"\n'
            f'credential = "file:{key}"\n'
        )
        agent = 'network = "gateway"\nmodel = "bench"\n'
        with serving(tree, root / tree.label, forge, agent_toml=agent, extra_toml=extra) as serve:
            issue = serve.launch()
            serve.wait_status(issue, "running")
            world = World(serve, issue, port, models_url)
            poll(lambda: Path(world.egress).exists(), timeout=30, what="the gateway's socket")
            yield world


# -- raw HTTP on sockets: the same client code on both sides of every figure ---------------------


def direct_socket(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=60)


def tunnel(egress: str, port: int) -> socket.socket:
    """A CONNECT tunnel through the gateway to the upstream, answered 200."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(egress)
    sock.sendall(f"CONNECT {UPSTREAM}:{port} HTTP/1.1\r\nHost: {UPSTREAM}:{port}\r\n\r\n".encode())
    head = _head(sock)[0]
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        raise RuntimeError(f"CONNECT answered {head[:100]!r}")
    return sock


def proxied(egress: str) -> socket.socket:
    """A connection to the gateway, for an absolute-form (plain HTTP) request."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(egress)
    return sock


def _head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(the answer's head, what came after it); CONNECT's answer has nothing after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise RuntimeError(f"connection closed in the answer's head: {data[:100]!r}")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def fetch(sock: socket.socket, target: str, buffer: bytearray | None = None) -> int:
    """GET ``target`` on ``sock`` (closed after): the body's length, read to the end."""
    with sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {UPSTREAM}\r\nConnection: close\r\n\r\n".encode())
        head, rest = _head(sock)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET {target} answered {head[:100]!r}")
        got, view = len(rest), memoryview(buffer or bytearray(65536))
        while n := sock.recv_into(view):
            got += n
        return got


def timed(call: Callable[[], int], expect: int) -> float:
    started = time.perf_counter()
    got = call()
    took = time.perf_counter() - started
    if got != expect:
        raise RuntimeError(f"read {got} bytes, expected {expect}")
    return took


# -- issue 17: download, connection set-up, 1,000 tunnels ----------------------------------------


def bench_gateway(sizes: Sizes, root: Path, trees: list[Tree], guard: Guard) -> dict[str, Any]:
    size = sizes.download_mib * 1024 * 1024
    buffer = bytearray(CHUNK)
    out: dict[str, Any] = {}
    with gateway_world(sizes, root, trees) as w:
        plain = f"http://{UPSTREAM}:{w.upstream}/bytes/{size}"
        sides: dict[str, Callable[[], int]] = {
            "direct": lambda: fetch(direct_socket(w.upstream), f"/bytes/{size}", buffer),
            "connect": lambda: fetch(tunnel(w.egress, w.upstream), f"/bytes/{size}", buffer),
            "plain": lambda: fetch(proxied(w.egress), plain, buffer),
        }
        downloads: list[dict[str, float]] = []
        for r in range(sizes.download_rounds + 1):  # round 0 warms every path
            took = {name: timed(sides[name], size) for name in rotated(list(sides), r)}
            downloads += [took] if r else []
        out["download_s"] = downloads

        setup: dict[str, Callable[[], int]] = {
            "direct": lambda: fetch(direct_socket(w.upstream), "/bytes/1"),
            "gateway": lambda: fetch(tunnel(w.egress, w.upstream), "/bytes/1"),
        }
        rounds: list[tuple[list[float], list[float]]] = []
        for r in range(sizes.setup_rounds + 1):
            block: dict[str, list[float]] = {"direct": [], "gateway": []}
            for _ in range(sizes.setup_calls if r else 20):
                for name in rotated(list(setup), r):
                    block[name].append(timed(setup[name], 1))
            rounds += [(block["direct"], block["gateway"])] if r else []
        out["setup_p50_ms"] = [{"direct": pct(d, 50) * 1000, "gateway": pct(g, 50) * 1000} for d, g in rounds]

        assert w.serve.proc is not None
        pid = w.serve.proc.pid
        before = settled_rss(pid)
        tunnels = asyncio.run(many_tunnels(w.egress, w.upstream, sizes.tunnels, pid))
        after = settled_rss(pid)
        tunnels |= {"rss_before_mib": before / 1024, "rss_after_mib": after / 1024}
        out["tunnels"] = tunnels

    mib = sizes.download_mib
    connect = Row(f"{mib} MiB download via CONNECT", 0.8, True, "×")
    connect.against = f"direct {median_of(downloads, 'direct') * 1000:.0f} ms"
    connect.figures["after"] = Figure.of([d["direct"] / d["connect"] for d in downloads])
    plain_row = Row(f"{mib} MiB download via absolute-form GET", 0.8, True, "×", "the same direct download")
    plain_row.figures["after"] = Figure.of([d["direct"] / d["plain"] for d in downloads])
    setup_row = Row("gateway connection set-up p50 over direct", 2.0, False, " ms")
    setup_row.against = f"direct connect + GET p50 {median_of(out['setup_p50_ms'], 'direct'):.2f} ms"
    setup_row.figures["after"] = Figure.of([(pct(g, 50) - pct(d, 50)) * 1000 for d, g in rounds])
    n, limit = sizes.tunnels, sizes.tunnel_limit
    # Anything else (an error, a cut answer) is neither served nor refused: it counts as hung.
    hung = Row(f"{n:,} concurrent tunnels: hung", 0, False, "")
    hung.against = f"{tunnels['served']} served, {tunnels['refused']} refused at max_connections = {limit}"
    hung.against += "".join(f", {count} {what}" for what, count in tunnels["other"].items())
    hung.figures["after"] = Figure(*[float(n - tunnels["served"] - tunnels["refused"])] * 3)
    rss = Row(f"RSS growth over {n:,} tunnels", None, False, " MiB")
    rss.against = f"`serve` {before / 1024:.1f} MiB before; {tunnels['rss_open_mib']:.1f} MiB with them open"
    rss.figures["after"] = Figure(*[(after - before) / 1024] * 3)
    out["rows"] = [connect, plain_row, setup_row, hung, rss]
    return out


def median_of(rounds: list[dict[str, float]], key: str) -> float:
    return Figure.of([r[key] for r in rounds]).value


async def many_tunnels(egress: str, port: int, count: int, pid: int) -> dict[str, Any]:
    """``count`` CONNECTs at once from one bottle. Each tunnel the gateway grants stays open until
    every one has its answer (so all are open together); then each fetches a little through it.
    A connection that has no outcome by the deadline is hung."""
    outcomes: Counter[str] = Counter()
    answered = 0
    all_answered = asyncio.Event()
    open_rss: list[int] = []
    request = f"CONNECT {UPSTREAM}:{port} HTTP/1.1\r\nHost: {UPSTREAM}:{port}\r\n\r\n".encode()

    async def one() -> None:
        nonlocal answered
        try:
            reader, writer = await asyncio.open_unix_connection(egress)
        except OSError as exc:
            outcomes[f"connect: {type(exc).__name__}"] += 1
            return
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            answered += 1
            if answered == count:
                open_rss.append(service_rss_kib(pid))
                all_answered.set()
            status = head.split()[1].decode()
            if status != "200":
                outcomes["refused" if status == "503" else f"answered {status}"] += 1
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_answered.wait(), TUNNEL_DEADLINE / 2)
            writer.write(f"GET /bytes/4096 HTTP/1.1\r\nHost: {UPSTREAM}\r\nConnection: close\r\n\r\n".encode())
            body = (await reader.read()).partition(b"\r\n\r\n")[2]
            outcomes["served" if len(body) == 4096 else "cut"] += 1
        except (OSError, asyncio.IncompleteReadError) as exc:
            outcomes[f"error: {type(exc).__name__}"] += 1
        finally:
            writer.close()

    started = time.monotonic()
    tasks = [asyncio.create_task(one()) for _ in range(count)]
    _, pending = await asyncio.wait(tasks, timeout=TUNNEL_DEADLINE)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return {
        "served": outcomes["served"],
        "refused": outcomes["refused"],
        "hung": len(pending),
        "other": {k: v for k, v in outcomes.items() if k not in ("served", "refused")},
        "seconds": round(time.monotonic() - started, 2),
        "rss_open_mib": (open_rss[0] if open_rss else 0) / 1024,
    }


# -- issue 18: a model call's time to first byte, and `forge mcp` --------------------------------

MESSAGE = {"model": "bench", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def first_byte(client: httpx.Client, path: str) -> float:
    """Seconds to the first byte of the streamed answer's body; the rest is read and checked."""
    headers = {"x-api-key": "placeholder", "anthropic-version": "2023-06-01"}
    started = time.perf_counter()
    with client.stream("POST", path, json=MESSAGE, headers=headers) as response:
        chunks = response.iter_raw()
        first = next(chunks, b"")
        took = time.perf_counter() - started
        body = first + b"".join(chunks)
    if response.status_code != 200 or b"message_stop" not in body:
        raise RuntimeError(f"model call answered {response.status_code}: {body[:200]!r}")
    return took


def bench_models(sizes: Sizes, root: Path, trees: list[Tree], guard: Guard) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with gateway_world(sizes, root, trees) as w, contextlib.ExitStack() as stack:
        direct = stack.enter_context(httpx.Client(base_url=w.models_url, timeout=60))
        gateway = stack.enter_context(
            httpx.Client(transport=httpx.HTTPTransport(uds=w.egress), base_url="http://gateway", timeout=60)
        )
        sides = {
            "direct": functools.partial(first_byte, direct, "/v1/messages"),
            "gateway": functools.partial(first_byte, gateway, "/models/bench/v1/messages"),
        }
        model_rounds = alternate(sides, sizes.model_rounds, sizes.model_calls)

        sidecar = str(w.serve.socket(w.issue))
        env = {"PATH": "/usr/bin:/bin", "FORGE_SIDECAR_SOCKET": sidecar}
        argv = [sys.executable, str(ROOT / "forge_client.py"), "mcp"]
        mcp = stack.enter_context(child(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env))
        params = {"number": w.issue}
        ids = iter(range(1, 10**9))

        def raw() -> None:
            answer = forge_client.call("read_issue", params, socket_path=sidecar)
            if answer.get("number") != w.issue:
                raise RuntimeError(f"read_issue answered {str(answer)[:200]}")

        def through_mcp() -> None:
            assert mcp.stdin is not None and mcp.stdout is not None
            rid = next(ids)
            call = {"name": "read_issue", "arguments": params}
            mcp.stdin.write(json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": call}).encode())
            mcp.stdin.write(b"\n")
            mcp.stdin.flush()
            answer = json.loads(mcp.stdout.readline())
            if answer.get("id") != rid or answer["result"]["structuredContent"].get("number") != w.issue:
                raise RuntimeError(f"forge mcp answered {str(answer)[:200]}")

        mcp_rounds = alternate({"raw": raw, "mcp": through_mcp}, sizes.model_rounds, sizes.mcp_calls)

    model = Row("model call time to first byte, streamed, p50 over direct", 1.0, False, " ms")
    model.against = f"the model server directly, p50 {p50_ms(model_rounds, 'direct'):.2f} ms"
    model.figures["after"] = Figure.of([(pct(r["gateway"], 50) - pct(r["direct"], 50)) * 1000 for r in model_rounds])
    mcp_row = Row("`forge mcp` read_issue p50 − 1.5× raw", 1.0, False, " ms")
    mcp_row.against = f"the raw sidecar socket, p50 {p50_ms(mcp_rounds, 'raw'):.2f} ms"
    mcp_row.figures["after"] = Figure.of([(pct(r["mcp"], 50) - 1.5 * pct(r["raw"], 50)) * 1000 for r in mcp_rounds])
    out["model_p50_ms"] = [{k: pct(v, 50) * 1000 for k, v in r.items()} for r in model_rounds]
    out["mcp_p50_ms"] = [{k: pct(v, 50) * 1000 for k, v in r.items()} for r in mcp_rounds]
    out["rows"] = [model, mcp_row]
    return out


def alternate(sides: Mapping[str, Callable[[], Any]], rounds: int, calls: int) -> list[dict[str, list[float]]]:
    """``rounds`` rounds of ``calls`` calls per side, taking turns call by call, the order rotated
    each round; round 0 (20 calls) only warms connections and caches. A side that returns a float
    has timed itself (time to first byte); any other is timed whole."""
    out: list[dict[str, list[float]]] = []
    for r in range(rounds + 1):
        block: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(calls if r else 20):
            for name in rotated(list(sides), r):
                started = time.perf_counter()
                value = sides[name]()
                block[name].append(value if isinstance(value, float) else time.perf_counter() - started)
        out += [block] if r else []
    return out


def p50_ms(rounds: list[dict[str, list[float]]], side: str) -> float:
    return Figure.of([pct(r[side], 50) * 1000 for r in rounds]).value
