"""The HTTP faces of the service: ``/webhook``, the read API, ``/provenance``, ``/metrics``,
and the admin app behind ``admin.sock``. Each handler translates HTTP to a call on the service
and back; errors are mapped to statuses here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import metrics as m
from bottles import BottlePaths
from config import VERSION as __version__
from config import Config, Secret, redact
from pages import bottle_page, index_page
from provenance import bottle_views, provenance, run_outcome, run_view
from rules import triage
from service import Service
from serving import BodyTooSlow, UnixServer, read_bounded
from statemachine import BottleState, ForgeBottleError

log = logging.getLogger("forgebottle")

MAX_WEBHOOK_BYTES = 1024 * 1024
LOG_TAIL_BYTES = 16 * 1024
WEBHOOK_BODY_SECONDS = 10.0  # Gitea sends the whole body at once and gives a delivery 5 s in all
EVENT_TYPE = re.compile(r"[a-z_]{1,64}")
# Gitea's header family, and Forgejo's: the same values under another prefix.
HEADER_FAMILIES = ("x-gitea-", "x-forgejo-")


class HttpError(ForgeBottleError):
    pass


class Unauthorized(HttpError):
    http_status = 401


class Forbidden(HttpError):
    http_status = 403


class BadRequest(HttpError):
    http_status = 400
    exit_code = 2


async def error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ForgeBottleError)
    return JSONResponse({"error": str(exc)}, status_code=exc.http_status)


def verify_signature(secret: Secret, body: bytes, signature: str) -> bool:
    # Compared as bytes: compare_digest refuses non-ASCII str (a TypeError, so a 500, for a
    # header with a byte over 0x7f). Non-hex or a wrong length just fails.
    try:
        given = bytes.fromhex(signature.strip())
    except ValueError:
        return False
    return hmac.compare_digest(hmac.digest(secret.reveal().encode(), body, "sha256"), given)


def webhook_header(request: Request, name: str) -> str:
    """``X-Gitea-<name>``, else ``X-Forgejo-<name>``."""
    for family in HEADER_FAMILIES:
        value = request.headers.get(family + name)
        if value is not None:
            return value
    return ""


def read_tail(path: Path, limit: int) -> str:
    """The last ``limit`` bytes of a run log, if it is there (never through a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - limit))
        return f.read(limit).decode(errors="replace")


def loopback(request: Request) -> bool:
    if request.client is None:  # a Unix socket
        return True
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


def create_app(config: Config, service: Service, *, reload: Callable[[], Config] | None = None) -> Starlette:
    """The service's HTTP face. The lifespan starts the service and ``admin.sock``, and stops them."""
    store = service.store

    def authorize(request: Request) -> None:
        if config.api_token is not None:
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not config.api_token.matches(value.strip()):
                raise Unauthorized("a valid Authorization: Bearer token is required")
        elif not loopback(request):
            raise Forbidden("the read API answers loopback clients only unless server.api_token_file is set")

    def refused(request: Request, outcome: str, status: int, message: str) -> Response:
        service.count_webhook(outcome)
        peer = request.client.host if request.client else "unix"
        log.warning("webhook from %s refused (%d): %s", peer, status, message, extra={"status": outcome})
        return JSONResponse({"error": message}, status_code=status)

    async def webhook(request: Request) -> Response:
        started = time.perf_counter()
        try:
            raw = await read_bounded(request, MAX_WEBHOOK_BYTES, seconds=WEBHOOK_BODY_SECONDS)
        except BodyTooSlow as exc:
            return refused(request, "too_slow", exc.http_status, str(exc))
        if raw is None:
            return refused(request, "too_large", 413, f"body over {MAX_WEBHOOK_BYTES} bytes")
        body = raw
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            try:
                form = parse_qs(raw.decode(), max_num_fields=16, strict_parsing=False)
                body = form.get("payload", [""])[0].encode()
            except (UnicodeDecodeError, ValueError):
                body = b""
        if config.webhook_secret is not None:
            signature = webhook_header(request, "signature")
            if not signature or not verify_signature(config.webhook_secret, body, signature):
                return refused(request, "unauthorized", 401, "bad or missing X-Gitea-Signature")
        event_type = webhook_header(request, "event-type")
        if not EVENT_TYPE.fullmatch(event_type):
            return refused(request, "malformed", 400, "missing or malformed X-Gitea-Event-Type")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None
        if not isinstance(payload, dict):
            return refused(request, "malformed", 400, "the payload is not a JSON object")
        reason = triage(event_type, payload)
        delivery = webhook_header(request, "delivery")[:64]
        event_id, new = await service.accept(delivery=delivery, event_type=event_type, body=body, ignore=reason)
        service.metrics.observe(m.WEBHOOK_SECONDS, time.perf_counter() - started)
        if not new:
            return JSONResponse({"status": "ignored", "reason": f"replay of event {event_id}"}, status_code=200)
        if reason:
            return JSONResponse({"status": "ignored", "event": event_id, "reason": reason}, status_code=200)
        return JSONResponse({"status": "queued", "event": event_id}, status_code=202)

    async def healthz(request: Request) -> Response:
        counts = store.count_by_status()
        problem = service.forge_problem
        return JSONResponse(
            {
                "status": "ok" if problem is None else "unavailable",
                **({"problem": problem} if problem else {}),
                "forge_user": service.bot.login if service.bot else None,
                **{s.value: counts.get(s.value, 0) for s in (BottleState.RUNNING, BottleState.QUEUED)},
            },
            status_code=200 if problem is None else 503,
        )

    async def metrics(request: Request) -> Response:
        authorize(request)
        counts = store.count_by_status()
        gauges: dict[m.Metric, dict[m.Labels, float]] = {
            m.BOTTLES: {(("state", s.value),): float(counts.get(s.value, 0)) for s in BottleState},
            m.INBOX: {(("status", k),): float(v) for k, v in store.count_events().items()},
        }
        text = service.metrics.render(gauges)
        return PlainTextResponse(redact(text, service.secrets), media_type="text/plain; version=0.0.4")

    async def bottles(request: Request) -> Response:
        authorize(request)
        return JSONResponse(bottle_views(store, store.all()))

    async def events(request: Request) -> Response:
        authorize(request)
        try:
            limit = min(1000, max(1, int(request.query_params.get("limit", "100"))))
            before = int(request.query_params["before"]) if "before" in request.query_params else None
        except ValueError:
            raise BadRequest("limit and before must be integers") from None
        return JSONResponse(store.events(limit, before))

    async def prov(request: Request) -> Response:
        authorize(request)
        return JSONResponse(provenance(store, request.path_params["slug"], api_url=config.api_url, org=config.org))

    async def index(request: Request) -> Response:
        authorize(request)
        states = store.all(live_only=True)
        outcomes = {}
        for state in states:
            last = store.last_run(state.slug)
            if last is not None:
                outcomes[state.slug] = run_outcome(run_view(last))
        ignored = [e for e in store.events(200) if e["status"] == "ignored"][:20]
        page = index_page(states, outcomes, ignored, version=__version__, forge_problem=service.forge_problem)
        return HTMLResponse(page)

    async def bottle(request: Request) -> Response:
        authorize(request)
        doc = provenance(store, request.path_params["slug"], api_url=config.api_url, org=config.org)
        tail = ""
        if doc["runs"]:
            path = BottlePaths(config.state_dir, doc["slug"]).run_log(int(doc["runs"][-1]["n"]))
            tail = read_tail(path, LOG_TAIL_BYTES)
        return HTMLResponse(bottle_page(doc, tail))

    def reread(load: Callable[[], Config]) -> None:
        try:
            service.reload(load())
        except ForgeBottleError as exc:  # a bad file: the config in use stays
            log.warning("config not re-read, the one in use stays: %s", exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        if reload is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reread, reload)
        admin = UnixServer(admin_app(service), config.admin_socket, limit_concurrency=16)
        try:
            await admin.start()
            yield
        finally:
            await admin.stop()
            await service.stop()

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/bottles/{slug}", bottle, methods=["GET"]),
            Route("/webhook", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/api/bottles", bottles, methods=["GET"]),
            Route("/api/events", events, methods=["GET"]),
            Route("/provenance/{slug}", prov, methods=["GET"]),
        ],
        exception_handlers={ForgeBottleError: error_response},
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def admin_app(service: Service) -> Starlette:
    """``orchestrate`` requests over admin.sock (0600: whoever can open it is the operator)."""

    async def body(request: Request) -> dict[str, Any]:
        raw = await read_bounded(request, MAX_WEBHOOK_BYTES)
        try:
            data = json.loads(raw or b"")
        except ValueError:
            raise BadRequest("body must be JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("body must be a JSON object")
        return data

    async def start(request: Request) -> Response:
        data = await body(request)
        try:
            issue = int(data["issue"])
            slug = await service.orchestrate_start(
                str(data["repo"]),
                issue,
                str(data["agent"]),
                [str(b) for b in data.get("bottles") or []],
                str(data.get("prompt") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"bad request: {exc}") from None
        state = service.store.by_slug(slug)
        return JSONResponse({"slug": slug, "status": (state.status if state else BottleState.QUEUED).value})

    async def resume(request: Request) -> Response:
        data = await body(request)
        slug, prompt = str(data.get("slug") or ""), str(data.get("prompt") or "")
        if not prompt:
            raise BadRequest("a prompt is required")
        status = await service.orchestrate_resume(slug, prompt)
        return JSONResponse({"slug": slug, "status": status})

    async def destroy(request: Request) -> Response:
        data = await body(request)
        slug = str(data.get("slug") or "")
        state = service.known(slug)
        if state.status.live:
            await service.destroy(slug, "orchestrate destroy")
        return JSONResponse({"slug": slug, "status": BottleState.DESTROYED.value})

    return Starlette(
        routes=[
            Route("/admin/start", start, methods=["POST"]),
            Route("/admin/resume", resume, methods=["POST"]),
            Route("/admin/destroy", destroy, methods=["POST"]),
        ],
        exception_handlers={ForgeBottleError: error_response},
    )
