"""The egress gateway on the host (DESIGN.md §10): policy, address guard, model routes, limits.

Real parts only: the gateway on a real Unix socket in its own event loop, ``forge relay`` as a
real subprocess in front of it, real ``curl`` and Python clients, and local upstreams (HTTPS
with a test CA, plain HTTP, a fake model API) reached by names mapped in ``egress.resolve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from config import Config, ConfigError, EgressSpec, Secret
from egress import Budget, EgressEvent, Gateway, Route, Usage
from egress_policy import Denied, Guard, Policy, address_problem, parse_authority, parse_host
from tests.conftest import ROOT, free_port, verified_chain, wait_until

CONNECTS = 10_000
MODEL_KEY = "sk-ant-REAL-" + "7" * 32

# -- upstreams standing in for the internet ---------------------------------------------------


class Upstream(http.server.ThreadingHTTPServer):
    """A local web server: ``GET /bytes/N`` sends N bytes, ``POST /echo`` counts what it got, and
    ``/v1/messages`` / ``/v1/chat/completions`` answer as a model API (JSON or SSE), noting the
    headers each call came with."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext | None = None, usage: dict[str, int] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.context = context
        self.files: Path | None = None  # served under /files/ (a dumb-HTTP git repository, say)
        self.seen: list[dict[str, str]] = []
        self.received = 0
        self.usage = usage or {"input_tokens": 1200, "output_tokens": 345, "cache_read_input_tokens": 1000}
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_side=True)
        return sock, addr

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Upstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/files/") and self.server.files is not None:
            path = (self.server.files / self.path[len("/files/") :].split("?")[0]).resolve()
            if path.is_dir():
                path = path / "index.html"
            if self.server.files in path.parents and path.is_file():
                kind = "text/html" if path.suffix == ".html" else "application/octet-stream"
                self._send(200, path.read_bytes(), kind)
            else:
                self._send(404, b"not found\n", "text/plain")
            return
        if self.path.startswith("/bytes/"):
            size = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * 65536
            while size > 0:
                self.wfile.write(block[:size])
                size -= len(block)
            return
        self._send(200, b"hello from upstream\n")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.server.received += len(body)
        self.server.seen.append({k.lower(): v for k, v in self.headers.items()})
        if self.path == "/v1/messages":
            self._anthropic(json.loads(body))
        elif self.path == "/v1/chat/completions":
            self._openai(json.loads(body))
        else:
            self._send(200, json.dumps({"received": len(body)}).encode())

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _anthropic(self, request: dict[str, Any]) -> None:
        usage = self.server.usage
        if not request.get("stream"):
            message = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "hi"}]}
            self._send(200, json.dumps({**message, "usage": usage}).encode())
            return
        start = {"input_tokens": usage["input_tokens"], "output_tokens": 1}
        start["cache_read_input_tokens"] = usage.get("cache_read_input_tokens", 0)
        events = [
            ("message_start", {"type": "message_start", "message": {"type": "message", "usage": start}}),
            ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}}),
            ("message_delta", {"type": "message_delta", "usage": {"output_tokens": usage["output_tokens"]}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        self._sse("".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events))

    def _openai(self, request: dict[str, Any]) -> None:
        usage = self.server.usage
        counts = {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"]}
        if not request.get("stream"):
            self._send(200, json.dumps({"object": "chat.completion", "choices": [], "usage": counts}).encode())
            return
        chunks = [{"choices": [{"delta": {"content": "hi"}}], "usage": None}, {"choices": [], "usage": counts}]
        self._sse("".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n")

    def _sse(self, text: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in (text[: len(text) // 2], text[len(text) // 2 :]):  # split mid-event on purpose
            data = piece.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_upstream(ca: trustme.CA) -> Iterator[Upstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("allowed.test", "blocked.test", "other.test").configure_cert(context)
    server = Upstream(context)
    yield server
    server.close()


@pytest.fixture
def plain_upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


# -- the gateway in its own loop, with forge relay in front ---------------------------------


class GatewayThread:
    """A ``Gateway`` served on a real Unix socket by an event loop in a thread."""

    def __init__(self, sock: Path, **settings: Any) -> None:
        self.events: list[EgressEvent] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        limits = settings.pop("limits", EgressSpec(resolve=(("allowed.test", "127.0.0.1"),)))
        allow = settings.pop("allow", ())
        self.gateway = Gateway(
            slug="t",
            policy=Policy(allow, settings.pop("block", ()), read_only=limits.read_only),
            guard=Guard(dict(limits.resolve), forge_host=settings.pop("forge_host", "")),
            limits=limits,
            record=self.events.append,
            **settings,
        )
        self.sock = sock
        self.call(self.gateway.start(sock))

    def records(self, count: int) -> list[EgressEvent]:
        """The records, once there are at least ``count``."""
        wait_until(lambda: len(self.events) >= count, what=f"{count} egress records")
        return list(self.events)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        self.call(self.gateway.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


RELAY = [sys.executable, str(ROOT / "forge_client.py"), "relay"]


class Relay:
    """``forge relay`` on a free loopback port, its agent a ``sleep`` (outside any sandbox)."""

    def __init__(self, sock: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*RELAY, "--listen", f"127.0.0.1:{self.port}", "--socket", str(sock), "--", "sleep", "600"],
            start_new_session=True,
        )
        wait_until(self._up, timeout=20, what="forge relay to listen")
        self.proxy = f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def gateway_factory(short_tmp: Path) -> Iterator[Callable[..., tuple[GatewayThread, Relay]]]:
    made: list[tuple[GatewayThread, Relay]] = []

    def make(**settings: Any) -> tuple[GatewayThread, Relay]:
        sock = short_tmp / f"egress{len(made)}.sock"
        gateway = GatewayThread(sock, **settings)
        pair = (gateway, Relay(sock))
        made.append(pair)
        return pair

    yield make
    for gateway, relay in made:
        relay.stop()
        gateway.stop()


def curl(proxy: str, url: str, *args: str, ca: Path | None = None) -> tuple[int, str]:
    """(HTTP status, body) of ``curl`` through the proxy; status 0 if curl got none."""
    argv = ["curl", "-sS", "--max-time", "30", "--proxy", proxy, "-o", "-", "-w", "\n%{http_code}", url, *args]
    if ca is not None:
        argv += ["--cacert", str(ca)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body.rstrip("\n")


def figures(name: str, **values: Any) -> None:
    print(f"FIGURES {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


# -- host names and addresses: every spelling of somewhere a bottle must not reach ----------

SSRF_SPELLINGS = [
    ("127.0.0.1", "loopback"),
    ("2130706433", "loopback"),
    ("0x7f000001", "loopback"),
    ("0x7f.1", "loopback"),
    ("0177.0.0.1", "loopback"),
    ("0177.1", "loopback"),
    ("127.1", "loopback"),
    ("127.000.000.001", "loopback"),
    ("[::1]", "loopback"),
    ("[0:0:0:0:0:0:0:1]", "loopback"),
    ("[::ffff:127.0.0.1]", "loopback"),
    ("[::ffff:7f00:1]", "loopback"),
    ("[64:ff9b::127.0.0.1]", "loopback"),
    ("[2002:7f00:1::]", "loopback"),
    ("0", "unspecified"),
    ("0.0.0.0", "unspecified"),
    ("[::]", "unspecified"),
    ("10.1.2.3", "private"),
    ("012.1.2.3", "private"),
    ("0xa.1.2.3", "private"),
    ("192.168.1.1", "private"),
    ("172.16.0.1", "private"),
    ("169.254.169.254", "link-local"),
    ("0xa9fea9fe", "link-local"),
    ("[fe80::1]", "link-local"),
    ("[fd00::1]", "private"),
    ("224.0.0.1", "multicast"),
    ("[ff02::1]", "multicast"),
    ("100.64.0.1", "non-public"),
    ("240.0.0.1", "private"),
]


@pytest.mark.parametrize(("spelling", "problem"), SSRF_SPELLINGS)
def test_every_spelling_of_a_private_address_is_seen_as_one(spelling: str, problem: str) -> None:
    name, literal = parse_host(spelling)
    assert literal is not None, spelling
    assert address_problem(literal) == problem, (spelling, name)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("EXAMPLE.com.", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("localhost.", "localhost"),
    ],
)
def test_names_are_normalised_before_matching(raw: str, normal: str) -> None:
    assert parse_host(raw) == (normal, None)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "a..b",
        "1.2.3.4.5",
        "256.1.1.1",
        "1.2.3.0x100",
        "09.1.1.1",
        "[fe80::1%eth0]",
        "a b",
        "x/y",
        "host\x00.example",
        "\udcff.example",
        "[::1",
        "evil.example:443",
        "-" * 300,
        "example.123",
    ],
)
def test_what_is_neither_name_nor_address_is_refused(raw: str) -> None:
    with pytest.raises(Denied) as caught:
        parse_host(raw)
    assert (caught.value.status == 400 and raw not in str(caught.value)) or raw == ""


@pytest.mark.parametrize(("raw", "port"), [("a.example:443", 443), ("[::1]:8080", 8080), ("a.example", None)])
def test_authorities(raw: str, port: int | None) -> None:
    if port is None:
        with pytest.raises(Denied):
            parse_authority(raw, default_port=None)
        return
    assert parse_authority(raw, default_port=None)[2] == port


@pytest.mark.parametrize("raw", ["a.example:0", "a.example:65536", "a.example:x", "a.example:", "[::1]x", "::1:80"])
def test_bad_ports_are_refused(raw: str) -> None:
    with pytest.raises(Denied):
        parse_authority(raw, default_port=None)


def test_policy_allow_block_ports_and_presets() -> None:
    policy = Policy(
        ["pypi.org", "*.example.com", "plain.example:80", "ecosystem:node"], ["bad.example.com"], read_only=True
    )
    policy.check("pypi.org", 443)
    policy.check("files.pythonhosted.org".replace("files.pythonhosted", "pypi"), 443)
    policy.check("a.example.com", 443)
    policy.check("plain.example", 80)
    policy.check("registry.npmjs.org", 443)
    refusals = {
        ("pypi.org", 80): 'allow = ["pypi.org:80"]',
        ("example.com", 443): 'allow = ["example.com"]',  # *.suffix is subdomains only
        ("bad.example.com", 443): 'remove "bad.example.com" from [egress].block',
        ("plain.example", 443): 'allow = ["plain.example"]',
        ("evil.example", 443): 'allow = ["evil.example"]',
        ("pypi.org.evil.example", 443): 'allow = ["pypi.org.evil.example"]',
    }
    for (host, port), fix in refusals.items():
        with pytest.raises(Denied) as caught:
            policy.check(host, port)
        assert fix in caught.value.fix, (host, port, caught.value.fix)
    policy.check_method("GET")
    with pytest.raises(Denied, match="read-only"):
        policy.check_method("POST")
    figures("egress_policy", refusals=len(refusals), ssrf_spellings=len(SSRF_SPELLINGS))


def test_guard_resolves_once_and_refuses_what_resolves_inside() -> None:
    async def scenario() -> list[str]:
        guard = Guard({"mirror.test": "10.9.8.7"}, forge_host="forge.internal")
        await guard.start()
        out = [await guard.address("mirror.test", None, 443)]  # mapped: the only way to 10/8
        for host in ("localhost", "sub.localhost", "forge.internal"):
            with pytest.raises(Denied):
                await guard.address(host, None, 443)
        name, literal = parse_host("2130706433")
        with pytest.raises(Denied, match="loopback"):
            await guard.address(name, literal, 443)
        with pytest.raises(Denied) as caught:
            await guard.address("no-such-host.invalid", None, 443)
        out.append(str(caught.value.status))
        own = sorted(guard.forbidden, key=str)
        out.append(str(len(own)))
        return out

    mapped, status, own = asyncio.run(scenario())
    assert mapped == "10.9.8.7" and status == "502" and int(own) >= 1
    assert ipaddress.ip_address("127.0.0.1") in __import__("egress_policy").own_addresses()


# -- usage from model answers -----------------------------------------------------------------


def test_usage_from_json_and_sse_split_anywhere() -> None:
    anthropic = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":10,'
        b'"output_tokens":1,"cache_read_input_tokens":4}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7}}\n\n'
    )
    for step in (1, 3, 7, len(anthropic)):
        usage = Usage("text/event-stream; charset=utf-8")
        for i in range(0, len(anthropic), step):
            usage.feed(anthropic[i : i + step])
        assert usage.finish() == {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 4}
    openai = b'data: {"choices":[],"usage":null}\n\ndata: {"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    usage = Usage("text/event-stream")
    usage.feed(openai + b"data: [DONE]\n\n")
    assert usage.finish() == {"input_tokens": 5, "output_tokens": 2}
    usage = Usage("application/json")
    usage.feed(b'{"usage": {"input_tokens": 3, "output_tokens": true, "bogus": 9}}')
    assert usage.finish() == {"input_tokens": 3}
    hostile = Usage("text/event-stream")
    hostile.feed(b"data: " + b"[" * 2_000_000)  # an endless line is dropped, not parsed
    hostile.feed(b'\ndata: {"usage":{"input_tokens":1}}\n')
    hostile.feed(b"data: " + b"[" * 500_000 + b"\n")  # deep enough to exhaust the parser's recursion
    assert hostile.finish() == {"input_tokens": 1}


# -- config --------------------------------------------------------------------------------------


def test_config_egress_models_and_lazy_credential(tmp_path: Path) -> None:
    key_file = tmp_path / "model.key"
    key_file.write_text(MODEL_KEY + "\n")
    toml = f"""
[egress]
allow = ["pypi.org", "*.Example.COM.", "ecosystem:python"]
block = ["evil.example"]
read_only = true
resolve = {{ "mirror.test" = "10.0.0.5" }}
max_connections = 8
max_bytes = "500MB"
idle_timeout = "90s"
[models.claude]
api = "anthropic"
upstream = "https://api.anthropic.com/"
credential = "file:{key_file}"
[agents.a]
command = ["x"]
network = "gateway"
model = "claude"
egress = ["ecosystem:node"]
budget_tokens = 1000
issue_budget_tokens = 5000
"""
    path = tmp_path / "config.toml"
    path.write_text(toml)
    env = {"FORGE_GITEA_API": "https://git.example/api/v1", "FORGE_TOKEN": "t", "FORGE_WEBHOOK_SECRET": "w"}
    config = Config.load(env, path)
    assert config.egress.allow == ("pypi.org", "*.example.com", "ecosystem:python")
    assert (config.egress.max_connections, config.egress.max_bytes, config.egress.idle_timeout) == (8, 500 * 10**6, 90)
    assert config.egress.resolve == (("mirror.test", "10.0.0.5"),) and config.egress.read_only
    agent = config.agents["a"]
    assert (agent.network, agent.model, agent.egress, agent.budget_tokens) == (
        "gateway",
        "claude",
        ("ecosystem:node",),
        1000,
    )
    assert MODEL_KEY in config.secrets() and MODEL_KEY not in repr(config)
    # Read-only commands: the key need not be readable.
    key_file.chmod(0)
    key_file.rename(tmp_path / "gone")
    quiet = Config.load({}, path, require_forge=False)
    assert quiet.models["claude"].credential is None
    with pytest.raises(ConfigError, match=r"^models\.claude\.credential: cannot read"):
        Config.load(env, path)


@pytest.mark.parametrize(
    ("fragment", "key"),
    [
        ('[egress]\nallow = ["http://x"]', "egress.allow"),
        ("[egress]\nallow = 5", "egress.allow"),
        ("[egress]\nbogus = 1", "egress.bogus"),
        ('[egress]\nmax_bytes = "lots"', "egress.max_bytes"),
        ("[egress]\nmax_connections = 0", "egress.max_connections"),
        ('[egress]\nresolve = { "a.test" = "not-an-ip" }', "egress.resolve.a.test"),
        ('[egress]\nread_only = "yes"', "egress.read_only"),
        ('[models.m]\napi = "gemini"\nupstream = "https://x"\ncredential = "env:K"', "models.m.api"),
        ('[models.m]\napi = "openai"\nupstream = "ftp://x"\ncredential = "env:K"', "models.m.upstream"),
        ('[models.m]\napi = "openai"\nupstream = "https://x"\ncredential = "sk-literal"', "models.m.credential"),
        ('[models.m]\napi = "openai"\nupstream = "https://x"\ncredential = "env:K"\nkey = 1', "models.m.key"),
        ('[agents.a]\ncommand = ["x"]\nnetwork = "wifi"', "agents.a.network"),
        ('[agents.a]\ncommand = ["x"]\nnetwork = "gateway"\nmodel = "nope"', "agents.a.model"),
        ('[agents.a]\ncommand = ["x"]\nmodel = "m"', "agents.a.model"),
        ('[agents.a]\ncommand = ["x"]\negress = ["ecosystem:cobol"]', "agents.a.egress"),
        ('[agents.a]\ncommand = ["x"]\nbudget_tokens = -1', "agents.a.budget_tokens"),
    ],
)
def test_bad_egress_values_are_one_line_naming_the_key(tmp_path: Path, fragment: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(fragment + "\n")
    env = {"FORGE_GITEA_API": "https://git.example/api/v1", "FORGE_TOKEN": "t", "FORGE_WEBHOOK_SECRET": "w"}
    with pytest.raises(ConfigError) as caught:
        Config.load(env, path)
    message = str(caught.value)
    assert message.startswith(key) and "\n" not in message, message


# -- the gateway through forge relay: real clients -------------------------------------------


def resolve_to_loopback(*names: str, **extra: Any) -> EgressSpec:
    return EgressSpec(resolve=tuple((name, "127.0.0.1") for name in names), **extra)


def test_connect_tunnel_keeps_tls_end_to_end(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], tls_upstream: Upstream, ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    port = tls_upstream.port
    gateway, relay = gateway_factory(
        allow=[f"allowed.test:{port}", f"blocked.test:{port}"],
        block=["blocked.test"],
        limits=resolve_to_loopback("allowed.test", "blocked.test", "other.test"),
    )
    status, body = curl(relay.proxy, f"https://allowed.test:{port}/hello", ca=ca_file)
    assert (status, body) == (200, "hello from upstream")
    status, body = curl(relay.proxy, f"https://other.test:{port}/", ca=ca_file)
    assert status == 0  # curl: the CONNECT was answered 403
    status, body = curl(relay.proxy, f"https://blocked.test:{port}/", ca=ca_file)
    assert status == 0
    ops = gateway.records(3)
    by_target = {e.target: e for e in ops}
    ok = by_target[f"allowed.test:{port}"]
    assert ok.outcome == "ok" and ok.data["bytes_down"] > 0 and ok.data["address"] == "127.0.0.1"
    assert by_target[f"other.test:{port}"].outcome == "denied"
    assert by_target[f"other.test:{port}"].data["fix"] == f'[egress] allow = ["other.test:{port}"]'
    assert "blocked" in by_target[f"blocked.test:{port}"].detail
    # Verified end to end: a client that does not trust the test CA refuses the upstream.
    status, _ = curl(relay.proxy, f"https://allowed.test:{port}/hello")
    assert status == 0
    figures("egress_connect", ok=1, denied=2, bytes_down=ok.data["bytes_down"])


def test_denials_say_why_in_one_line(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], plain_upstream: Upstream
) -> None:
    port = plain_upstream.port
    _, relay = gateway_factory(allow=[f"allowed.test:{port}"], limits=resolve_to_loopback("allowed.test"))
    results = {}
    for url in (
        f"http://evil.example:{port}/",
        f"http://127.0.0.1:{port}/",
        f"http://2130706433:{port}/",
        f"http://0x7f.1:{port}/",
        f"http://[::1]:{port}/",
        f"http://localhost:{port}/",
    ):
        status, body = curl(relay.proxy, url)
        results[url] = (status, body)
        assert status == 403 and "\n" not in body.strip(), (url, body)
    status, body = curl(relay.proxy, f"http://allowed.test:{port}/x")
    assert (status, body) == (200, "hello from upstream")
    figures("egress_denials", refused=len(results), allowed=1)


def test_ssrf_spellings_refused_even_when_allowed(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], plain_upstream: Upstream
) -> None:
    """An allow entry for an address does not open what the guard refuses."""
    port = plain_upstream.port
    spellings = ["127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "localhost", "[::1]"]
    spellings.append("[::ffff:127.0.0.1]")
    allow = [f"{parse_host(s)[0]}:{port}" for s in spellings if not s.startswith("[")]
    gateway, relay = gateway_factory(allow=allow, limits=EgressSpec())
    refused = 0
    for spelling in spellings:
        status, _ = curl(relay.proxy, f"http://{spelling}:{port}/")
        refused += status in (403, 400)
        status, _ = curl(relay.proxy, f"https://{spelling}:{port}/")
        refused += status == 0
    assert refused == 2 * len(spellings)
    assert plain_upstream.received == 0 and not plain_upstream.seen
    wait_until(lambda: len(gateway.events) >= 2 * len(spellings), what="every refusal on the record")
    assert all(e.outcome == "denied" for e in gateway.events)
    figures("egress_ssrf_through_gateway", spellings=len(spellings), refused=refused)


def test_read_only_refuses_a_post(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], plain_upstream: Upstream
) -> None:
    port = plain_upstream.port
    _, relay = gateway_factory(
        allow=[f"allowed.test:{port}"], limits=resolve_to_loopback("allowed.test", read_only=True)
    )
    status, body = curl(relay.proxy, f"http://allowed.test:{port}/echo", "-d", "payload")
    assert status == 403 and "read-only" in body
    assert plain_upstream.received == 0
    assert curl(relay.proxy, f"http://allowed.test:{port}/x")[0] == 200
    figures("egress_read_only", post=status)


def test_bytes_recorded_match_bytes_sent(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], plain_upstream: Upstream, tmp_path: Path
) -> None:
    port = plain_upstream.port
    gateway, relay = gateway_factory(allow=[f"allowed.test:{port}"], limits=resolve_to_loopback("allowed.test"))
    size = 8 * 1024 * 1024
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(3 * 1024 * 1024))
    status, _ = curl(relay.proxy, f"http://allowed.test:{port}/bytes/{size}")
    assert status == 200
    status, body = curl(relay.proxy, f"http://allowed.test:{port}/echo", "--data-binary", f"@{upload}")
    assert status == 200 and json.loads(body)["received"] == upload.stat().st_size
    down, up = gateway.records(2)[:2]
    assert abs(down.data["bytes_down"] - size) <= size * 0.01
    assert abs(up.data["bytes_up"] - upload.stat().st_size) <= upload.stat().st_size * 0.01
    figures(
        "egress_bytes",
        sent_down=size,
        recorded_down=down.data["bytes_down"],
        sent_up=upload.stat().st_size,
        recorded_up=up.data["bytes_up"],
    )


def model_gateway(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], upstream: Upstream, api: str, **budget: int
) -> tuple[GatewayThread, Relay]:
    route = Route("m", api, __import__("httpx").URL(f"http://model.test:{upstream.port}"), Secret(MODEL_KEY))
    return gateway_factory(limits=resolve_to_loopback("model.test"), route=route, budget=Budget(**budget))


def post_model(relay: Relay, path: str, body: dict[str, Any], key: str = "forgebottle-gateway") -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{relay.port}/models/m{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-api-key": key, "authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_model_route_swaps_the_key_and_reads_usage(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], plain_upstream: Upstream, api: str
) -> None:
    gateway, relay = model_gateway(gateway_factory, plain_upstream, api)
    path = "/v1/messages" if api == "anthropic" else "/v1/chat/completions"
    for stream in (False, True):
        status, body = post_model(relay, path, {"stream": stream, "messages": []})
        assert status == 200 and body
    seen = plain_upstream.seen
    assert len(seen) == 2
    for headers in seen:
        if api == "anthropic":
            assert headers["x-api-key"] == MODEL_KEY and "authorization" not in headers
        else:
            assert headers["authorization"] == f"Bearer {MODEL_KEY}" and "x-api-key" not in headers
        assert "forgebottle-gateway" not in json.dumps(headers)
    calls = gateway.records(2)
    expected = {"input_tokens": 1200, "output_tokens": 345}
    if api == "anthropic":
        expected["cache_read_input_tokens"] = 1000
    for call in calls:
        assert call.op == "model" and call.outcome == "ok" and call.data["usage"] == expected, call
    figures(f"model_usage_{api}", calls=len(calls), reported=expected, recorded=calls[-1].data["usage"])


def test_budget_once_spent_answers_429_naming_it(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], plain_upstream: Upstream
) -> None:
    gateway, relay = model_gateway(gateway_factory, plain_upstream, "anthropic", run=2000, issue=10**9)
    assert post_model(relay, "/v1/messages", {})[0] == 200  # 1545 used
    assert post_model(relay, "/v1/messages", {})[0] == 200  # 3090 used: over, but it was under when asked
    status, body = post_model(relay, "/v1/messages", {})
    assert status == 429
    error = json.loads(body)["error"]
    assert error["budget"] == "budget_tokens" and "budget_tokens" in error["message"]
    assert len(plain_upstream.seen) == 2
    denied = wait_until(lambda: [e for e in gateway.events if e.outcome == "denied"], what="the denial's record")
    assert denied[0].data["budget"] == "budget_tokens"
    _, relay2 = model_gateway(gateway_factory, plain_upstream, "anthropic", issue=100, issue_used=100)
    status, body = post_model(relay2, "/v1/messages", {})
    assert status == 429 and json.loads(body)["error"]["budget"] == "issue_budget_tokens"
    figures("model_budget", used=gateway.gateway.budget.run_used, limit=2000, answer=status)


def test_a_wrong_model_name_and_a_dead_upstream(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], plain_upstream: Upstream
) -> None:
    gateway, relay = model_gateway(gateway_factory, plain_upstream, "anthropic")
    other = raw_exchange(relay.port, b"POST /models/other/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert other.startswith(b"HTTP/1.1 404")
    plain_upstream.close()
    status, _ = post_model(relay, "/v1/messages", {})
    assert status == 502
    outcomes = [(e.op, e.outcome) for e in gateway.records(2)]
    assert ("model", "denied") in outcomes and ("model", "error") in outcomes
    figures("model_errors", outcomes=outcomes)


# -- hostile clients --------------------------------------------------------------------------


def raw_exchange(port: int, data: bytes, *, timeout: float = 20.0, first: bool = False) -> bytes:
    """What the gateway answers ``data`` with: all of it, or (``first``) its first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if first:
            return sock.recv(65536)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def test_hostile_clients_get_answers_and_the_gateway_keeps_serving(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], plain_upstream: Upstream
) -> None:
    port = plain_upstream.port
    limits = resolve_to_loopback("allowed.test", max_connections=16)
    gateway, relay = gateway_factory(allow=[f"allowed.test:{port}"], limits=limits)
    garbage = raw_exchange(relay.port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400")
    flood = b"GET http://allowed.test/ HTTP/1.1\r\nHost: x\r\n" + b"X-Flood: y\r\n" * 5000 + b"\r\n"
    assert raw_exchange(relay.port, flood).startswith(b"HTTP/1.1 4")
    non_utf8 = raw_exchange(relay.port, b"CONNECT \xff\xfe:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert non_utf8.startswith(b"HTTP/1.1 4")
    binary_header = f"GET http://allowed.test:{port}/x HTTP/1.1\r\nHost: x\r\nX-Bin: \xff\xe9\r\n\r\n"
    assert raw_exchange(relay.port, binary_header.encode("latin-1"), first=True).startswith(b"HTTP/1.1 200 OK")
    bad_chunks = f"POST http://allowed.test:{port}/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert raw_exchange(relay.port, bad_chunks.encode() + b"5\r\nhello\r\nZZ\r\n").startswith(b"HTTP/1.1 400")
    smuggle = f"GET http://allowed.test:{port}/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"
    assert raw_exchange(relay.port, smuggle.encode()).startswith(b"HTTP/1.1 400")
    # Slowloris: connections that dribble a head never get to hold the slots.
    started = time.monotonic()
    slow = [socket.create_connection(("127.0.0.1", relay.port)) for _ in range(16)]
    for sock in slow:
        sock.sendall(b"GET http://allowed.test/ HTTP/1.1\r\n")
    wait_until(lambda: gateway.gateway.connections >= 16, timeout=20, what="the slow connections to arrive")
    over = raw_exchange(relay.port, b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert over.startswith(b"HTTP/1.1 503")
    wait_until(lambda: gateway.gateway.connections == 0, timeout=30, what="the head timeout to cut them")
    cut_after = time.monotonic() - started
    for sock in slow:
        sock.close()
    # 10,000 CONNECTs, 64 at a time: each answered or refused, none hung.
    statuses: dict[str, int] = {}

    def one(_: int) -> None:
        try:
            head = f"CONNECT allowed.test:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            answer = raw_exchange(relay.port, head, timeout=30, first=True)
        except OSError:
            answer = b"refused"
        key = answer[:12].decode(errors="replace")
        statuses[key] = statuses.get(key, 0) + 1

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(CONNECTS)))
    assert sum(statuses.values()) == CONNECTS
    assert set(statuses) <= {"HTTP/1.1 200", "HTTP/1.1 503", "refused"}, statuses
    assert curl(relay.proxy, f"http://allowed.test:{port}/x")[0] == 200
    figures("egress_hostile", slowloris_cut_s=round(cut_after, 1), connects=statuses)


# -- the record ------------------------------------------------------------------------------


def test_data_is_under_the_hash_and_old_chains_still_verify(tmp_path: Path) -> None:
    from statemachine import BottleState
    from store import ForgeState, Store

    store = Store(tmp_path / "db")
    store.upsert(ForgeState("o", "r", 1, "o-r-1", "a", BottleState.RUNNING, "t", "t"))
    plain = store.append_operation(
        "o-r-1", run=1, at="t", op="whoami", target="", outcome="ok", detail="d", duration_ms=1
    )
    data = {"host": "pypi.org", "port": 443, "bytes_up": 10, "bytes_down": 2.5e6, "name": "«ü»"}
    egress = store.append_operation(
        "o-r-1", run=1, at="t", op="egress", target="pypi.org:443", outcome="ok", detail="d", duration_ms=2, data=data
    )
    assert "data" not in plain.content() and egress.content()["data"] == data
    assert store.operations("o-r-1")[1].data == data and verified_chain(store, "o-r-1").verified
    store.append_operation(
        "o-r-1", run=1, at="t", op="egress", target="x:443", outcome="denied", detail="d", duration_ms=0, data={}
    )
    assert store.egress_denials() == {"o-r-1": 1}
    with store.transaction() as db:  # an edit of the data alone breaks the chain
        db.execute("UPDATE operations SET data = ? WHERE seq = 2", ('{"bytes_down":1}',))
    check = verified_chain(store, "o-r-1")
    assert not check.verified and check.broken_seq == 2
    store.close()


def test_status_shows_denials_without_the_model_key(short_tmp: Path) -> None:
    from statemachine import BottleState
    from store import ForgeState, Store

    state_dir = short_tmp / "state"
    store = Store(state_dir / "bot-bottle.db")
    store.upsert(ForgeState("o", "r", 1, "o-r-1", "a", BottleState.RUNNING, "t", "t"))
    for n in range(3):
        store.append_operation(
            "o-r-1", run=1, at="t", op="egress", target=f"e{n}:443", outcome="denied", detail="d", duration_ms=0
        )
    usage = {"input_tokens": 1200, "output_tokens": 34}
    store.append_operation(
        "o-r-1",
        run=1,
        at="t",
        op="model",
        target="m:443",
        outcome="ok",
        detail="d",
        duration_ms=0,
        data={"model": "m", "host": "m", "port": 443, "usage": usage},
    )
    store.close()
    config = short_tmp / "config.toml"
    config.write_text(
        f'[server]\nstate_dir = "{state_dir}"\n[models.m]\napi = "anthropic"\nupstream = "https://api.anthropic.com"\n'
        f'credential = "file:{short_tmp}/no-such-key"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE")}
    argv = [sys.executable, str(ROOT / "forgebottle.py"), "orchestrate", "status", "--config", str(config)]
    table = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert row.split()[header.split().index("DENIED")] == "3"
    assert row.split()[header.split().index("TOKENS")] == "1234"
    listed = subprocess.run([*argv, "--json"], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert json.loads(listed.stdout)[0]["egress_denied"] == 3
    figures("egress_status", denied=3)


def test_denials_are_logged_with_the_line_that_would_allow_them(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]],
    plain_upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = plain_upstream.port
    gateway, relay = gateway_factory(allow=[], limits=resolve_to_loopback("evil.test"))
    assert curl(relay.proxy, f"http://evil.test:{port}/")[0] == 403
    gateway.records(1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f'[egress] allow = ["evil.test:{port}"]' in w for w in warnings), warnings


def test_a_model_key_file_a_bottle_could_see_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "model.key").write_text(MODEL_KEY)
    path = tmp_path / "config.toml"
    path.write_text(
        f'[models.m]\napi = "openai"\nupstream = "https://api.openai.com"\ncredential = "file:{keys}/model.key"\n'
        f'[agents.a]\ncommand = ["x"]\nnetwork = "gateway"\nmodel = "m"\nro_binds = ["{keys}"]\n'
    )
    env = {"FORGE_GITEA_API": "https://git.example/api/v1", "FORGE_TOKEN": "t", "FORGE_WEBHOOK_SECRET": "w"}
    with pytest.raises(ConfigError, match=r"^agents\.a: .*model\.key would be visible in the bottle"):
        Config.load(env, path)


def test_max_bytes_cuts_the_run_and_idle_tunnels_are_closed(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], plain_upstream: Upstream
) -> None:
    port = plain_upstream.port
    limits = resolve_to_loopback("allowed.test", max_bytes=1024 * 1024, idle_timeout=1.0)
    gateway, relay = gateway_factory(allow=[f"allowed.test:{port}"], limits=limits)
    status, body = curl(relay.proxy, f"http://allowed.test:{port}/bytes/{4 * 1024 * 1024}")
    assert len(body) < 4 * 1024 * 1024
    cut = gateway.records(1)[0]
    assert cut.outcome == "error" and "egress limit" in cut.data["cut"]
    status, body = curl(relay.proxy, f"http://allowed.test:{port}/x")
    assert status == 403 and "bytes of egress" in body
    # An idle tunnel: nothing either way for idle_timeout, and it is closed and recorded.
    gateway2, relay2 = gateway_factory(
        allow=[f"allowed.test:{port}"], limits=resolve_to_loopback("allowed.test", idle_timeout=1.0)
    )
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", relay2.port), timeout=20) as sock:
        sock.sendall(f"CONNECT allowed.test:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        assert sock.recv(1024) == b""  # closed by the gateway, not by us
    idle = gateway2.records(1)[0]
    assert idle.data["cut"] == "idle for 1s" and time.monotonic() - started < 15
    figures("egress_limits", cut_at=cut.data["bytes_down"], idle_cut_s=round(time.monotonic() - started, 1))


def test_every_spelling_of_a_name_meets_the_same_entries(
    gateway_factory: Callable[..., tuple[GatewayThread, Relay]], plain_upstream: Upstream
) -> None:
    port = plain_upstream.port
    # What config.py makes of allow = ["bücher.test"]: the entry in IDNA form.
    limits = EgressSpec(resolve=(("xn--bcher-kva.test", "127.0.0.1"), ("evil.test", "127.0.0.1")))
    gateway, relay = gateway_factory(
        allow=[f"xn--bcher-kva.test:{port}", f"evil.test:{port}"], block=["evil.test"], limits=limits
    )
    answers = {}
    for host in ("bücher.test", "BÜCHER.test.", "xn--bcher-kva.test", "XN--BCHER-KVA.TEST.", "EVIL.test.", "evil.TEST"):
        head = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        answers[host] = raw_exchange(relay.port, head, first=True)[:12].decode()
    # Raw UTF-8 is not HTTP (clients send the IDNA form); the IDNA form in any case is the name.
    assert [answers[h] for h in answers] == ["HTTP/1.1 400"] * 2 + ["HTTP/1.1 200"] * 2 + ["HTTP/1.1 403"] * 2
    targets = {e.target for e in gateway.records(6)}
    assert targets == {f"xn--bcher-kva.test:{port}", f"evil.test:{port}", "-"}  # "-": the malformed ones
    figures("egress_name_spellings", answers=answers)
