"""The egress gateway and model routes (DESIGN.md §10): one ``Gateway`` per running bottle.

Served on ``sidecars/<slug>/egress.sock`` (0600, in the bottle's 0700 ``/run/forge``); inside
the bottle ``forge relay`` turns each TCP connection to ``127.0.0.1:3128`` into a connection
to this socket. Everything is enforced here, on the host: the bottle only relays bytes.

A connection carries one of three kinds of request:

* ``CONNECT host:port``: the policy and the address guard (``egress_policy``) decide, then a
  blind TCP tunnel; TLS stays end to end and its contents are not inspected;
* absolute-form ``http://host/...``: the same decision, then the request is forwarded;
* origin-form ``/models/<name>/...``: the agent's model route. The placeholder key is replaced
  with the real credential, the answer is streamed back and its token usage read; per-run and
  per-bottle budgets answer ``429`` once spent.

HTTP/1.1 is parsed by h11 (uvicorn's own parser), forwarding is done by httpx; only the tunnel
is ours. Each connection, request and denial is handed to ``record`` as an ``EgressEvent``: the
service appends it to the bottle's hash chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import h11
import httpx

from config import AgentSpec, Config, ConfigError, EgressSpec, Secret
from egress_policy import Denied, Guard, IPAddress, Policy, parse_authority, parse_http_url, printable

log = logging.getLogger("forgebottle")

PLACEHOLDER = "forgebottle-gateway"
HEAD_BYTES = 16 * 1024  # request line and headers
HEAD_SECONDS = 10.0  # to send them, after connecting or after the last answer
CONNECT_SECONDS = 10.0
LINGER_SECONDS = 1.0
CHUNK = 64 * 1024
USAGE_JSON_BYTES = 16 * 1024 * 1024  # a non-streamed model answer read for its usage
USAGE_LINE_BYTES = 1024 * 1024  # one SSE line
# Never passed on in either direction: they describe one hop, or carry the agent's key.
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",  # answered here (100 Continue), not passed on
    }
)
KEY_HEADERS = frozenset({"x-api-key", "authorization", "api-key", "x-goog-api-key"})
USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
_ALIASES = {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"}


@dataclasses.dataclass(frozen=True)
class EgressEvent:
    """One connection, request or denial, for the bottle's record."""

    op: str  # "egress" or "model"
    target: str  # host:port
    outcome: str  # ok, denied or error
    detail: str  # a sentence
    duration_ms: float
    data: dict[str, Any]


Record = Callable[[EgressEvent], None]


@dataclasses.dataclass
class Budget:
    """Token budgets: ``run`` for this run, ``issue`` over all runs of the bottle."""

    run: int | None = None
    issue: int | None = None
    run_used: int = 0
    issue_used: int = 0

    def spent(self) -> str | None:
        """The name of the budget that is spent, if one is."""
        if self.run is not None and self.run_used >= self.run:
            return "budget_tokens"
        if self.issue is not None and self.issue_used >= self.issue:
            return "issue_budget_tokens"
        return None

    def add(self, tokens: int) -> None:
        self.run_used += tokens
        self.issue_used += tokens


def used_tokens(usage: dict[str, int]) -> int:
    """What counts against a budget: the tokens read and written."""
    return usage.get("input_tokens", 0) + usage.get("output_tokens", 0)


class Usage:
    """Token counts read from a model's answer as it streams past: a JSON body (Anthropic's or
    OpenAI's ``usage``) or server-sent events (Anthropic ``message_start``/``message_delta``,
    OpenAI's final chunk with ``usage``). Counts are cumulative, so later values replace."""

    def __init__(self, content_type: str) -> None:
        self.sse = content_type.split(";")[0].strip().lower() == "text/event-stream"
        self.buffer = bytearray()
        self.skipping = False
        self.tokens: dict[str, int] = {}

    def feed(self, chunk: bytes) -> None:
        if not self.sse:
            if len(self.buffer) + len(chunk) > USAGE_JSON_BYTES:
                self.skipping = True
            if not self.skipping:
                self.buffer += chunk
            return
        self.buffer += chunk
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[: end + 1]
            if self.skipping:
                self.skipping = False  # the end of an over-long line
            elif line.startswith(b"data:"):
                self._event(line[5:].strip())
        if len(self.buffer) > USAGE_LINE_BYTES:
            self.buffer.clear()
            self.skipping = True

    def finish(self) -> dict[str, int]:
        if not self.sse and not self.skipping and self.buffer:
            self._event(bytes(self.buffer))
        return dict(self.tokens)

    def _event(self, payload: bytes) -> None:
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return  # "[DONE]", not JSON at all, or nested past what the parser takes
        if not isinstance(doc, dict):
            return
        usage = doc.get("usage")
        message = doc.get("message")
        if doc.get("type") == "message_start" and isinstance(message, dict):
            usage = message.get("usage")
        response = doc.get("response")
        if usage is None and isinstance(response, dict):
            usage = response.get("usage")  # OpenAI's Responses API: response.completed
        if not isinstance(usage, dict):
            return
        for key, value in usage.items():
            name = _ALIASES.get(key, key)
            if name in USAGE_FIELDS and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                self.tokens[name] = value
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.tokens["cache_read_input_tokens"] = details["cached_tokens"]


@dataclasses.dataclass(frozen=True)
class Route:
    """A model route as the gateway uses it: the upstream and the key that replaces the
    placeholder."""

    name: str
    api: str
    upstream: httpx.URL
    credential: Secret

    def auth_headers(self) -> list[tuple[str, str]]:
        if self.api == "anthropic":
            return [("x-api-key", self.credential.reveal())]
        return [("authorization", f"Bearer {self.credential.reveal()}")]


class _Cut(Exception):
    """A tunnel or transfer ended by the gateway: a limit was reached."""


@dataclasses.dataclass
class _Flow:
    """Byte counts of one connection or request."""

    up: int = 0
    down: int = 0
    cut: str = ""


class Meter:
    """Bytes and activity of one run's egress, against ``max_bytes`` and the idle timeout."""

    def __init__(self, limits: EgressSpec) -> None:
        self.limits = limits
        self.bytes_total = 0
        self.last_activity = 0.0

    def check(self) -> None:
        if self.bytes_total >= self.limits.max_bytes:
            raise Denied(
                f"this run has used its {self.limits.max_bytes} bytes of egress", fix="[egress] max_bytes = <more>"
            )

    def count(self, flow: _Flow, *, up: int = 0, down: int = 0) -> None:
        flow.up += up
        flow.down += down
        self.bytes_total += up + down
        self.last_activity = time.monotonic()
        if self.bytes_total > self.limits.max_bytes:
            flow.cut = f"the run's egress limit of {self.limits.max_bytes} bytes"
            raise _Cut(flow.cut)

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: _Flow, *, up: bool) -> None:
        """Copy one direction until EOF, then half-close; cut when both directions are idle."""
        idle = self.limits.idle_timeout
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(CHUNK), idle)
            except TimeoutError:
                if time.monotonic() - self.last_activity < idle:
                    continue  # the other direction (or another connection) is busy
                flow.cut = f"idle for {idle:.0f}s"
                raise _Cut(flow.cut) from None
            if not chunk:
                break
            self.count(flow, up=len(chunk) if up else 0, down=0 if up else len(chunk))
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()


class Forwarder:
    """Forwards one HTTP request with httpx, its body streamed from the client through h11,
    and streams the answer back; bytes are counted by the ``Meter``."""

    def __init__(self, meter: Meter, client: httpx.AsyncClient) -> None:
        self.meter = meter
        self.limits = meter.limits
        self._client = client

    async def forward(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        flow: _Flow,
        *,
        sni: str | None,
        usage: Callable[[dict[str, int]], None] | None = None,
    ) -> tuple[int, dict[str, int]]:
        """Send the request (its body streamed from the client) and stream the answer back:
        (its status, or 0 if there was none; the token usage read from it). ``usage`` hears the
        counts before the client hears the end of the answer, so its next call meets the budget."""
        extensions = {"sni_hostname": sni} if sni else {}
        # As bytes: header values need not be ASCII (latin-1 round-trips what h11 received).
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        request = self._client.build_request(
            method, url, headers=raw, content=self._body(conn, reader, writer, flow), extensions=extensions
        )
        for default in ("user-agent", "accept"):
            if not any(k == default for k, _ in headers):
                request.headers.pop(default, None)  # httpx's defaults are not the client's
        if not any(k == "accept-encoding" for k, _ in headers):
            request.headers["accept-encoding"] = "identity"
        try:
            response = await self._client.send(request, stream=True)
        except h11.RemoteProtocolError:
            flow.cut = "malformed request body"
            if conn.our_state is h11.SEND_RESPONSE:
                _refuse(conn, writer, 400, flow.cut)
            return 0, {}
        except (httpx.HTTPError, httpx.InvalidURL, TimeoutError, _Cut) as exc:
            flow.cut = flow.cut or f"upstream: {type(exc).__name__}"
            if conn.our_state is h11.SEND_RESPONSE:
                _refuse(conn, writer, 502, "the upstream did not answer")
            return 0, {}
        reading = Usage(response.headers.get("content-type", "")) if usage else None
        length = response.headers.get("content-length", "")
        expected = int(length) if length.isdigit() else None
        tokens: dict[str, int] | None = None
        received = 0
        try:
            # As bytes: an upstream's header values need not be ASCII, and pass through untouched.
            answer = [(k, v) for k, v in response.headers.raw if k.lower().decode("latin-1") not in HOP_HEADERS]
            reason = response.reason_phrase.encode("latin-1", "replace")
            writer.write(conn.send(h11.Response(status_code=response.status_code, headers=answer, reason=reason)))
            async for chunk in response.aiter_raw(CHUNK):
                self.meter.count(flow, down=len(chunk))
                received += len(chunk)
                if reading is not None:
                    reading.feed(chunk)
                    if expected is not None and received >= expected:
                        tokens = _report(reading, usage)  # the client's answer is complete with this chunk
                writer.write(conn.send(h11.Data(data=chunk)))
                await asyncio.wait_for(writer.drain(), self.limits.idle_timeout)
            if reading is not None and tokens is None:
                tokens = _report(reading, usage)
            writer.write(conn.send(h11.EndOfMessage()))
        except (httpx.HTTPError, h11.LocalProtocolError, TimeoutError, _Cut) as exc:
            flow.cut = flow.cut or f"upstream: {type(exc).__name__}"
            conn.send_failed()
            if reading is not None and tokens is None:
                tokens = _report(reading, usage)  # what a cut answer had reported still counts
        finally:
            await response.aclose()
        return response.status_code, tokens or {}

    async def _body(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: _Flow
    ) -> AsyncIterator[bytes]:
        if conn.they_are_waiting_for_100_continue:  # curl waits a second for this before a large body
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:
            event = await asyncio.wait_for(_next(conn, reader), self.limits.idle_timeout)
            if isinstance(event, h11.Data):
                self.meter.count(flow, up=len(event.data))
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return


class Gateway:
    """The host side of one bottle's egress (see the module docstring)."""

    def __init__(
        self,
        *,
        slug: str,
        policy: Policy,
        guard: Guard,
        limits: EgressSpec,
        record: Record,
        route: Route | None = None,
        budget: Budget | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.slug = slug
        self.policy = policy
        self.guard = guard
        self.limits = limits
        self.record = record
        self.route = route
        self.budget = budget or Budget()
        self.meter = Meter(limits)
        self.connections = 0
        self.refused_at_limit = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._path: Path | None = None
        timeout = httpx.Timeout(limits.idle_timeout, connect=CONNECT_SECONDS, pool=CONNECT_SECONDS)
        self._client = httpx.AsyncClient(trust_env=False, timeout=timeout, follow_redirects=False, transport=transport)
        self.forwarder = Forwarder(self.meter, self._client)

    @property
    def last_activity(self) -> float:
        """When bytes last moved, or a connection came (the watchdog counts it as activity)."""
        return self.meter.last_activity

    @classmethod
    def for_agent(
        cls,
        config: Config,
        agent: AgentSpec,
        *,
        slug: str,
        record: Record,
        issue_used: int = 0,
    ) -> Gateway:
        """A gateway with ``config``'s policy and the agent's route and budgets."""
        egress = config.egress
        route = None
        if agent.model is not None:
            model = config.models.get(agent.model)
            if model is None or model.credential is None:
                raise ConfigError(f"agents.{agent.name}.model: the route {agent.model!r} has no credential loaded")
            route = Route(model.name, model.api, httpx.URL(model.upstream), model.credential)
        forge_host = httpx.URL(config.api_url).host if config.api_url else ""
        return cls(
            slug=slug,
            policy=Policy((*egress.allow, *agent.egress), egress.block, read_only=egress.read_only),
            guard=Guard(dict(egress.resolve), forge_host=forge_host),
            limits=egress,
            record=record,
            route=route,
            budget=Budget(agent.budget_tokens, agent.issue_budget_tokens, 0, issue_used),
        )

    # -- serving -------------------------------------------------------------------

    async def start(self, path: Path) -> None:
        await self.guard.start()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._accept, path=str(path), limit=CHUNK, backlog=1024)
        os.chmod(path, 0o600)
        self._path = path

    async def stop(self) -> None:
        """Close the socket and cut every open connection (each is recorded as it ends)."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        await self._client.aclose()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.meter.last_activity = time.monotonic()
        try:
            if self.connections >= self.limits.max_connections:
                self._at_limit(writer)
            else:
                self.connections += 1
                try:
                    await self._serve(reader, writer)
                finally:
                    self.connections -= 1
            await _linger(reader, writer)
        except (ConnectionError, TimeoutError, _Cut, h11.ProtocolError):
            pass  # the client went away, broke the protocol mid-body, or was cut
        finally:
            self._tasks.discard(task)
            writer.close()

    def _at_limit(self, writer: asyncio.StreamWriter) -> None:
        self.refused_at_limit += 1
        reason = f"over the limit of {self.limits.max_connections} connections"
        body = f"{reason}\n".encode()
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        if self.refused_at_limit == 1 or self.refused_at_limit % 1000 == 0:
            log.warning(
                "%s: egress refused a connection %s (%d so far); to allow more: [egress] max_connections",
                self.slug,
                reason,
                self.refused_at_limit,
                extra={"slug": self.slug},
            )
        self.record(EgressEvent("egress", "-", "denied", f"refused a connection: {reason}", 0.0, {"reason": reason}))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_BYTES)
        while True:
            try:
                async with asyncio.timeout(HEAD_SECONDS):
                    event = await _next(conn, reader)
            except TimeoutError:
                if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    return  # an idle kept-alive connection, or one that never spoke
                self._deny(conn, writer, "egress", "-", Denied("the request head did not arrive in time", status=408))
                return
            except h11.RemoteProtocolError:
                self._deny(conn, writer, "egress", "-", Denied("malformed HTTP request", status=400))
                return
            if not isinstance(event, h11.Request):
                return
            try:
                target = event.target.decode("utf-8")
                method = event.method.decode("ascii").upper()
            except UnicodeDecodeError:
                self._deny(conn, writer, "egress", "-", Denied("the request target is not UTF-8", status=400))
                return
            if method == "CONNECT":
                await self._connect(conn, reader, writer, target)
                return
            if target.startswith("/models/"):
                await self._model(conn, reader, writer, event, method, target)
            elif target[:7].lower() == "http://":
                await self._plain(conn, reader, writer, event, method, target)
            else:
                self._deny(
                    conn,
                    writer,
                    "egress",
                    "-",
                    Denied("not a proxy request: use CONNECT host:port, http://host/..., or /models/", status=400),
                )
                return
            await writer.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    def _deny(self, conn: h11.Connection, writer: asyncio.StreamWriter, op: str, target: str, denied: Denied) -> None:
        _refuse(conn, writer, denied.status, str(denied))
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        outcome = "error" if denied.status == 502 else "denied"
        data: dict[str, Any] = {"host": host, "port": int(port) if port.isdigit() else 0, "reason": str(denied)}
        if denied.fix:
            data["fix"] = denied.fix
        what = "a request" if target == "-" else target
        self.record(EgressEvent(op, target, outcome, f"refused {what}: {denied}", 0.0, data))
        if outcome == "denied":
            log.warning(
                "%s: egress refused %s: %s%s",
                self.slug,
                target,
                denied,
                f"; to allow it: {denied.fix}" if denied.fix else "",
                extra={"slug": self.slug, "op": op, "outcome": outcome},
            )

    async def _decide(self, host: str, literal: IPAddress | None, port: int) -> str:
        """The address to connect to, or Denied. An address literal meets the guard first (its
        reason is the better one); a name meets the policy first, so that a name no entry allows
        is never looked up (a lookup of an agent's chosen name is itself a way out)."""
        if literal is not None:
            await self.guard.address(host, literal, port)
        self.policy.check(host, port)
        self.meter.check()
        return await self.guard.address(host, literal, port)

    # -- CONNECT: a blind tunnel ---------------------------------------------------------

    async def _connect(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: str
    ) -> None:
        started = time.monotonic()
        try:
            host, literal, port = parse_authority(raw, default_port=None)
        except Denied as denied:
            self._deny(conn, writer, "egress", printable(raw), denied)
            return
        target = _target(host, port)
        try:
            while not isinstance(await _next(conn, reader), h11.EndOfMessage):
                pass
            address = await self._decide(host, literal, port)
        except Denied as denied:
            self._deny(conn, writer, "egress", target, denied)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(address, port, limit=CHUNK), CONNECT_SECONDS
            )
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or "failed")
            self._deny(conn, writer, "egress", target, Denied(f"cannot connect to {target}: {reason}", status=502))
            return
        writer.write(conn.send(h11.Response(status_code=200, headers=[], reason=b"Connection established")))
        flow = _Flow()
        leftover = conn.trailing_data[0]
        try:
            if leftover:
                self.meter.count(flow, up=len(leftover))
                up_writer.write(leftover)
            await asyncio.gather(
                self.meter.pump(reader, up_writer, flow, up=True), self.meter.pump(up_reader, writer, flow, up=False)
            )
        except (ConnectionError, _Cut) as exc:
            flow.cut = flow.cut or (str(exc) if isinstance(exc, _Cut) else "connection reset")
        finally:
            up_writer.close()
            self._record_flow("egress", target, address, "CONNECT", flow, started)

    def _record_flow(
        self, op: str, target: str, address: str, method: str, flow: _Flow, started: float, *, status: int = 0
    ) -> None:
        seconds = time.monotonic() - started
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        data: dict[str, Any] = {
            "host": host,
            "port": int(port),
            "address": address,
            "method": method,
            "bytes_up": flow.up,
            "bytes_down": flow.down,
            "duration": round(seconds, 3),
        }
        answer = f" -> {status}" if status else ""
        if status:
            data["status"] = status
        detail = f"{method} {target}{answer}: {flow.up} bytes up, {flow.down} down in {seconds:.1f}s"
        if flow.cut:
            data["cut"] = flow.cut
            detail += f"; cut: {flow.cut}"
        self.record(EgressEvent(op, target, "error" if flow.cut else "ok", detail, seconds * 1000, data))

    # -- forwarded requests: plain HTTP and model routes --------------------------------

    async def _plain(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        method: str,
        raw: str,
    ) -> None:
        started = time.monotonic()
        try:
            host, literal, port, path = parse_http_url(raw)
        except Denied as denied:
            self._deny(conn, writer, "egress", printable(raw.partition("//")[2].partition("/")[0]), denied)
            return
        target = _target(host, port)
        try:
            self.policy.check_method(method)
            address = await self._decide(host, literal, port)
        except Denied as denied:
            self._deny(conn, writer, "egress", target, denied)
            return
        ip = f"[{address}]" if ":" in address else address
        headers = _forwarded_headers(request)
        headers.append(("host", target if port != 80 else host))
        flow = _Flow()
        url = f"http://{ip}:{port}{path}"
        status, _ = await self.forwarder.forward(conn, reader, writer, method, url, headers, flow, sni=None)
        self._record_flow("egress", target, address, method, flow, started, status=status)

    async def _model(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        method: str,
        raw: str,
    ) -> None:
        started = time.monotonic()
        name, _, rest = raw[len("/models/") :].partition("/")
        route = self.route
        if route is None or name != route.name:
            self._deny(
                conn, writer, "model", printable(name, 64), Denied("this bottle has no such model route", status=404)
            )
            return
        upstream = route.upstream
        port = upstream.port or (443 if upstream.scheme == "https" else 80)
        target = f"{upstream.host}:{port}"
        spent = self.budget.spent()
        if spent is not None:
            self._over_budget(conn, writer, route, target, spent)
            return
        try:
            self.policy.check_method(method)
            self.meter.check()
            address = await self.guard.address(upstream.host, None, port)
        except Denied as denied:
            self._deny(conn, writer, "model", target, denied)
            return
        ip = f"[{address}]" if ":" in address else address
        base = upstream.raw_path.decode("ascii").split("?")[0].rstrip("/")
        url = f"{upstream.scheme}://{ip}:{port}{base}/{rest}"
        headers = [(k, v) for k, v in _forwarded_headers(request) if k not in KEY_HEADERS and k != "accept-encoding"]
        # Identity: the answer is read for its usage as it passes, so it must not be compressed.
        headers += [("host", upstream.netloc.decode("ascii")), ("accept-encoding", "identity"), *route.auth_headers()]
        flow = _Flow()
        sni = upstream.host if upstream.scheme == "https" else None
        status, tokens = await self.forwarder.forward(
            conn, reader, writer, method, url, headers, flow, sni=sni, usage=lambda t: self.budget.add(used_tokens(t))
        )
        seconds = time.monotonic() - started
        data: dict[str, Any] = {
            "host": upstream.host,
            "port": port,
            "model": route.name,
            "api": route.api,
            "status": status,
            "requests": 1,
            "bytes_up": flow.up,
            "bytes_down": flow.down,
            "duration": round(seconds, 3),
            "usage": tokens,
        }
        if flow.cut:
            data["cut"] = flow.cut
        summary = ", ".join(f"{v} {k}" for k, v in tokens.items()) or "no usage reported"
        detail = f"model {route.name}: {method} /{printable(rest.split('?')[0], 60)} -> {status}; {summary}"
        outcome = "ok" if status and not flow.cut else "error"
        self.record(EgressEvent("model", target, outcome, detail, seconds * 1000, data))

    def _over_budget(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, route: Route, target: str, spent: str
    ) -> None:
        limit = self.budget.run if spent == "budget_tokens" else self.budget.issue
        used = self.budget.run_used if spent == "budget_tokens" else self.budget.issue_used
        message = f"the token budget {spent} ({limit}) is spent: {used} tokens used"
        body = json.dumps(
            {"type": "error", "error": {"type": "budget_exhausted", "budget": spent, "message": message}}
        ).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close")]
        writer.write(conn.send(h11.Response(status_code=429, headers=headers)))
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        data = {"host": target.rpartition(":")[0], "model": route.name, "budget": spent, "limit": limit, "used": used}
        self.record(EgressEvent("model", target, "denied", f"refused a call to {route.name}: {message}", 0.0, data))
        log.warning("%s: %s", self.slug, message, extra={"slug": self.slug})


def _report(reading: Usage, usage: Callable[[dict[str, int]], None] | None) -> dict[str, int]:
    tokens = reading.finish()
    if usage is not None:
        usage(tokens)
    return tokens


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read what the client still sends for a moment: a socket closed with
    unread input is reset, and the reset can overtake the answer written just before it."""
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(CHUNK):
                pass


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    """The next h11 event, reading from ``reader`` as it needs."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(CHUNK))


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _forwarded_headers(request: h11.Request) -> list[tuple[str, str]]:
    headers = []
    for name, value in request.headers:
        key = name.decode("latin-1").lower()
        if key not in HOP_HEADERS and not key.startswith("proxy-"):
            headers.append((key, value.decode("latin-1")))
    return headers


def _refuse(conn: h11.Connection, writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    """Answer ``status`` with a one-line reason and close."""
    body = f"{reason}\n".encode()
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    try:
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
    except h11.LocalProtocolError:
        return  # a response was already under way: closing is the only answer left
