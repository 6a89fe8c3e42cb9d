"""forgebottle: Gitea issues in, pull requests out, by sandboxed agents with an audit trail.

The edges, in dependency order: config, logging, the service (webhook rules, scheduler, runs,
watchdog, recovery), provenance and metrics, the HTTP app, the CLI, and the demo.
``statemachine`` (pure lifecycle) <- ``gitea`` (forge) <- this module; ``store``, ``bottles``
and ``sidecar`` are sections split out of it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import tomllib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs

import click
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

import forge_client
from bottles import (
    BACKENDS,
    AgentSpec,
    Backend,
    BottleContext,
    BottleError,
    BottlePaths,
    BottleSpec,
    PushRefused,
    PushResult,
    RunHandle,
    check_slug,
    clone_workspace,
    exposed,
    find_bwrap,
)
from gitea import (
    Comment,
    Forge,
    ForgeError,
    ForgeUnavailable,
    Gitea,
    Issue,
    OrgNotVisible,
    PullRequest,
    Repo,
    ScopedForge,
    Secret,
    User,
    branch_for,
)
from sidecar import WRITES, BodyTooSlow, QuietServer, UnixServer, read_bounded, sidecar_app
from statemachine import (
    Bottle,
    BottleState,
    ForgeBottleError,
    Trigger,
    fire,
)
from store import ForgeState, InboxEvent, NewEvent, Store, WalSync, verify_chain

__version__ = "0.1.0"

log = logging.getLogger("forgebottle")

# =====================================================================================
# 1. Config
# =====================================================================================

ENV_API = "FORGE_GITEA_API"
ENV_TOKEN = "FORGE_TOKEN"
ENV_TOKEN_FILE = "FORGE_TOKEN_FILE"
ENV_WEBHOOK_SECRET = "FORGE_WEBHOOK_SECRET"
ENV_WEBHOOK_SECRET_FILE = "FORGE_WEBHOOK_SECRET_FILE"
ENV_ORG = "FORGE_ORG"
ENV_WATCHDOG = "FORGE_WATCHDOG_TIMEOUT"
ENV_STATE_DIR = "FORGEBOTTLE_STATE_DIR"
ENV_LISTEN = "FORGEBOTTLE_LISTEN"
ENV_API_TOKEN = "FORGEBOTTLE_API_TOKEN"
ENV_API_TOKEN_FILE = "FORGEBOTTLE_API_TOKEN_FILE"
ENV_CONFIG = "FORGEBOTTLE_CONFIG"

MAX_WEBHOOK_BYTES = 1024 * 1024
WEBHOOK_BODY_SECONDS = 10.0
MAX_PROMPT_BYTES = 96 * 1024  # one argv element may hold 128 KiB
MAX_PROMPT_PART = 32 * 1024
# No commit on the event loop checkpoints (it would copy and fsync twice there): the service
# checkpoints in a thread, after about as many intake pages as SQLite would (its default), and
# once a second when anything else was written.
CHECKPOINT_PAGES = 1000
CHECKPOINT_SECONDS = 1.0
INTAKE_QUIET = 0.02  # the worker waits until no webhook arrived for this long...
MAX_DEFERRAL = 2.0  # ...but never longer than this before it decides the next event

_TOP_KEYS = {"forge", "watchdog", "server", "sidecar", "agents", "bottles"}
_SECTION_KEYS = {
    "forge": {"api_url", "token_file", "webhook_secret_file", "org", "timeout"},
    "watchdog": {"timeout", "interval"},
    "server": {"state_dir", "listen", "api_token_file", "max_running", "event_retries"},
    "sidecar": {"writes_per_hour", "done_grace"},
}
_AGENT_KEYS = {"command", "resume_command", "network", "env", "timeout", "ro_binds"}
_BOTTLE_KEYS = {"backend", "sandbox", "start", "resume", "stop", "destroy"}


class ConfigError(ForgeBottleError):
    pass


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any, key: str) -> float:
    """``90s``, ``30m``, ``2h`` or plain seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _DURATION.match(str(value)) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}: {value!r} is not a duration (use 90s, 30m, 2h or seconds)")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything forgebottle is told, read once at start-up (defaults < TOML < environment)."""

    api_url: str
    token: Secret
    webhook_secret: Secret | None
    state_dir: Path
    org: str = "bot-bottle"
    watchdog_timeout: float = 1800.0
    watchdog_interval: float = 15.0
    listen: str = "127.0.0.1:8765"
    api_token: Secret | None = None
    max_running: int = 2
    agents: Mapping[str, AgentSpec] = dataclasses.field(default_factory=dict)
    bottles: Mapping[str, BottleSpec] = dataclasses.field(default_factory=lambda: {"local": BottleSpec()})
    writes_per_hour: int = 30
    done_grace: float = 30.0
    forge_timeout: float = 10.0
    event_retries: int = 5
    secret_files: tuple[Path, ...] = ()

    @property
    def db_path(self) -> Path:
        return self.state_dir / "bot-bottle.db"

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"

    def secrets(self) -> list[str]:
        """Every secret value forgebottle holds, for redaction and the push scan."""
        out = [self.token.reveal()]
        out += [s.reveal() for s in (self.webhook_secret, self.api_token) if s]
        return [s for s in out if s]

    def bottle(self, names: Sequence[str]) -> BottleSpec:
        name = names[0] if names else "local"
        if name not in self.bottles:
            raise ConfigError(f"bottles.{name}: no such bottle configured")
        return self.bottles[name]

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str],
        path: Path | None,
        *,
        insecure_no_webhook_secret: bool = False,
        require_forge: bool = True,
    ) -> Config:
        toml = _read_toml(path)
        forge = toml.get("forge", {})
        server = toml.get("server", {})
        watchdog = toml.get("watchdog", {})
        sidecar = toml.get("sidecar", {})
        base = path.parent if path else Path.cwd()

        api_url = environ.get(ENV_API) or forge.get("api_url") or ""
        if require_forge and not api_url:
            raise ConfigError(f"forge.api_url: required (or {ENV_API}), e.g. https://git.example.com/api/v1")
        if api_url and not re.match(r"^https?://[^/\s]+", api_url):
            raise ConfigError(f"forge.api_url: {api_url!r} is not an http(s) URL")
        token = _secret(environ, ENV_TOKEN, ENV_TOKEN_FILE, forge.get("token_file"), "forge.token_file", base)
        if require_forge and token is None:
            raise ConfigError(f"forge.token_file: required (or {ENV_TOKEN} / {ENV_TOKEN_FILE})")
        webhook_secret = _secret(
            environ,
            ENV_WEBHOOK_SECRET,
            ENV_WEBHOOK_SECRET_FILE,
            forge.get("webhook_secret_file"),
            "forge.webhook_secret_file",
            base,
        )
        if require_forge and webhook_secret is None and not insecure_no_webhook_secret:
            raise ConfigError(
                f"forge.webhook_secret_file: required (or {ENV_WEBHOOK_SECRET}); "
                "--insecure-no-webhook-secret accepts unsigned webhooks"
            )
        api_token = _secret(
            environ, ENV_API_TOKEN, ENV_API_TOKEN_FILE, server.get("api_token_file"), "server.api_token_file", base
        )
        org = environ.get(ENV_ORG) or forge.get("org") or "bot-bottle"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", org):
            raise ConfigError(f"forge.org: {org!r} is not an organisation name")
        timeout = parse_duration(environ.get(ENV_WATCHDOG) or watchdog.get("timeout", "30m"), "watchdog.timeout")
        interval = parse_duration(watchdog.get("interval", min(15.0, timeout / 4)), "watchdog.interval")
        state_dir = Path(environ.get(ENV_STATE_DIR) or server.get("state_dir") or "~/.bot-bottle").expanduser()
        listen = environ.get(ENV_LISTEN) or server.get("listen") or "127.0.0.1:8765"
        parse_listen(listen)
        max_running = _positive_int(server.get("max_running", 2), "server.max_running")
        agents = {name: _agent(name, spec, environ) for name, spec in toml.get("agents", {}).items()}
        bottles = {"local": BottleSpec()}
        bottles.update({name: _bottle(name, spec) for name, spec in toml.get("bottles", {}).items()})
        config = cls(
            api_url=api_url.rstrip("/"),
            token=token or Secret(""),
            webhook_secret=webhook_secret,
            state_dir=state_dir,
            org=org,
            watchdog_timeout=timeout,
            watchdog_interval=interval,
            listen=listen,
            api_token=api_token,
            max_running=max_running,
            agents=agents,
            bottles=bottles,
            writes_per_hour=_positive_int(sidecar.get("writes_per_hour", 30), "sidecar.writes_per_hour"),
            done_grace=parse_duration(sidecar.get("done_grace", "30s"), "sidecar.done_grace"),
            forge_timeout=parse_duration(forge.get("timeout", "10s"), "forge.timeout"),
            event_retries=_positive_int(server.get("event_retries", 5), "server.event_retries"),
            secret_files=tuple(
                (base / str(f)).expanduser()
                for f in (
                    environ.get(ENV_TOKEN_FILE) or forge.get("token_file"),
                    environ.get(ENV_WEBHOOK_SECRET_FILE) or forge.get("webhook_secret_file"),
                    environ.get(ENV_API_TOKEN_FILE) or server.get("api_token_file"),
                )
                if f
            ),
        )
        config.check_secrets_stay_out()
        return config

    def check_secrets_stay_out(self) -> None:
        """No agent may be handed a secret of ours, by config or by a bind of its directory."""
        secrets = self.secrets()
        for agent in self.agents.values():
            for key, value in agent.env:
                if value.reveal() in secrets:
                    raise ConfigError(f"agents.{agent.name}.env.{key}: passes a forgebottle secret to the agent")
            for path in (self.state_dir, *self.secret_files):
                where = exposed(path, agent.ro_binds)
                if where:
                    raise ConfigError(f"agents.{agent.name}: {path} would be visible in the bottle through {where}")


def _read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section")
    for section, keys in _SECTION_KEYS.items():
        value = data.get(section, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: must be a table")
        if section == "forge" and ("token" in value or "webhook_secret" in value):
            raise ConfigError("forge.token: secrets never go in the TOML; use forge.token_file or FORGE_TOKEN")
        bad = sorted(set(value) - keys)
        if bad:
            raise ConfigError(f"{section}.{bad[0]}: unknown key")
    return data


def _secret(environ: Mapping[str, str], env: str, env_file: str, toml_file: Any, key: str, base: Path) -> Secret | None:
    if environ.get(env):
        return Secret(environ[env].strip())
    filename = environ.get(env_file) or toml_file
    if not filename:
        return None
    path = (base / str(filename)).expanduser()
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{key}: {path} is empty")
    return Secret(value)


def _positive_int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}: {value!r} must be a positive integer")
    return value


def _argv(value: Any, key: str, *, required: bool) -> tuple[str, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a non-empty list of strings (an argv, never a shell line)")
    return tuple(value)


def _agent(name: str, spec: Any, environ: Mapping[str, str]) -> AgentSpec:
    key = f"agents.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f"{key}: agent names are letters, digits, '.', '_' and '-'")
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: must be a table")
    bad = sorted(set(spec) - _AGENT_KEYS)
    if bad:
        raise ConfigError(f"{key}.{bad[0]}: unknown key")
    command = _argv(spec.get("command"), f"{key}.command", required=True)
    resume = _argv(spec.get("resume_command"), f"{key}.resume_command", required=False) or command
    network = spec.get("network", "none")
    if network not in ("none", "host"):
        raise ConfigError(f'{key}.network: {network!r} must be "none" or "host"')
    env_spec = spec.get("env", {})
    if not isinstance(env_spec, dict):
        raise ConfigError(f"{key}.env: must be a table")
    env: list[tuple[str, Secret]] = []
    for var, raw in env_spec.items():
        if not isinstance(raw, str):
            raise ConfigError(f"{key}.env.{var}: must be a string")
        if raw.startswith("env:"):
            source = raw[4:]
            if source not in environ:
                raise ConfigError(f"{key}.env.{var}: {source} is not set in forgebottle's environment")
            env.append((var, Secret(environ[source])))
        elif raw.startswith("file:"):
            try:
                env.append((var, Secret(Path(raw[5:]).expanduser().read_text().strip())))
            except OSError as exc:
                raise ConfigError(f"{key}.env.{var}: cannot read {raw[5:]}: {exc.strerror}") from None
        else:
            env.append((var, Secret(raw)))
    timeout = parse_duration(spec["timeout"], f"{key}.timeout") if "timeout" in spec else None
    ro_binds = spec.get("ro_binds", [])
    if not isinstance(ro_binds, list) or not all(isinstance(p, str) and p.startswith("/") for p in ro_binds):
        raise ConfigError(f"{key}.ro_binds: must be a list of absolute paths")
    return AgentSpec(name, command, resume, network, tuple(env), timeout, tuple(ro_binds))


def _bottle(name: str, spec: Any) -> BottleSpec:
    key = f"bottles.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: must be a table")
    bad = sorted(set(spec) - _BOTTLE_KEYS)
    if bad:
        raise ConfigError(f"{key}.{bad[0]}: unknown key")
    backend = spec.get("backend", "local")
    if backend not in BACKENDS:
        raise ConfigError(f"{key}.backend: {backend!r} must be one of {', '.join(BACKENDS)}")
    sandbox = spec.get("sandbox", "bwrap")
    if sandbox not in ("bwrap", "none"):
        raise ConfigError(f'{key}.sandbox: {sandbox!r} must be "bwrap" or "none"')
    commands = {
        k: _argv(spec.get(k), f"{key}.{k}", required=(k == "start" and backend == "command"))
        for k in ("start", "resume", "stop", "destroy")
    }
    return BottleSpec(name, backend, sandbox, **commands)


def parse_listen(listen: str) -> tuple[str, int] | str:
    """``host:port`` or ``unix:/path``."""
    if listen.startswith("unix:"):
        if not listen[5:].startswith("/"):
            raise ConfigError(f"server.listen: {listen!r}: unix sockets need an absolute path")
        return listen[5:]
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"server.listen: {listen!r} must be host:port or unix:/path")
    return host.strip("[]") or "127.0.0.1", int(port)


def config_path(option: str | None, environ: Mapping[str, str]) -> Path | None:
    value = option or environ.get(ENV_CONFIG)
    return Path(value).expanduser() if value else None


# =====================================================================================
# 2. Logging: one JSON object per line, secrets redacted
# =====================================================================================


class JsonFormatter(logging.Formatter):
    FIELDS = ("slug", "event", "trigger", "op", "outcome", "status", "reason", "source", "dest", "event_id")

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in self.FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str), self.secrets)


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def setup_logging(secrets: Sequence[str], level: int = logging.INFO, stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Every sidecar is a uvicorn server; its start/stop chatter would drown the log.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


# =====================================================================================
# 3. Metrics (Prometheus text format)
# =====================================================================================

BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.histograms: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
        self.help: dict[str, str] = {}

    def inc(self, name: str, help_text: str, amount: float = 1, **labels: str) -> None:
        self.help.setdefault(name, help_text)
        self.counters[(name, tuple(sorted(labels.items())))] += amount

    def observe(self, name: str, help_text: str, seconds: float, **labels: str) -> None:
        self.help.setdefault(name, help_text)
        key = (name, tuple(sorted(labels.items())))
        counts = self.histograms.setdefault(key, [0.0] * (len(BUCKETS) + 2))
        # One bucket per observation (cumulated when rendered): this runs on every webhook.
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def render(self, gauges: Mapping[str, tuple[str, Mapping[tuple[tuple[str, str], ...], float]]]) -> str:
        lines: list[str] = []

        def labels(pairs: Sequence[tuple[str, str]]) -> str:
            if not pairs:
                return ""
            escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in pairs)
            return "{" + ",".join(escaped) + "}"

        for name in sorted({k[0] for k in self.counters}):
            lines += [f"# HELP {name} {self.help[name]}", f"# TYPE {name} counter"]
            for (metric, pairs), value in sorted(self.counters.items()):
                if metric == name:
                    lines.append(f"{name}{labels(pairs)} {value:g}")
        for name, (help_text, values) in sorted(gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for pairs, value in sorted(values.items()):
                lines.append(f"{name}{labels(pairs)} {value:g}")
        for name in sorted({k[0] for k in self.histograms}):
            lines += [f"# HELP {name} {self.help[name]}", f"# TYPE {name} histogram"]
            for (metric, pairs), counts in sorted(self.histograms.items()):
                if metric != name:
                    continue
                cumulative = list(itertools.accumulate(counts[:-1]))  # the last bucket is +Inf: all
                for index, bound in enumerate(BUCKETS):
                    lines.append(f"{name}_bucket{labels([*pairs, ('le', f'{bound:g}')])} {cumulative[index]:g}")
                lines.append(f"{name}_bucket{labels([*pairs, ('le', '+Inf')])} {cumulative[-1]:g}")
                lines.append(f"{name}_count{labels(pairs)} {cumulative[-1]:g}")
                lines.append(f"{name}_sum{labels(pairs)} {counts[-1]:.6f}")
        return "\n".join(lines) + "\n"


# =====================================================================================
# 4. Service: load -> guard -> effect -> trigger -> persist
# =====================================================================================


def sandbox_problem(config: Config, bwrap: str | None) -> str | None:
    """Without bwrap, a local bottle refuses to start unless it says sandbox = "none"."""
    for spec in config.bottles.values():
        if spec.backend == "local" and spec.sandbox == "bwrap" and bwrap is None:
            return (
                f'bottles.{spec.name}: bwrap not found; install bubblewrap, or set sandbox = "none" '
                "(agents then run unconfined)"
            )
    return None


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# What forgebottle acts on (DESIGN.md §4), by X-Gitea-Event-Type and action. Anything else is
# ignored from the payload alone, at intake, without waking the worker.
ACTIONS: dict[str, frozenset[str]] = {
    "issues": frozenset({"opened", "reopened", "edited"}),
    "issue_assign": frozenset({"assigned"}),
    "issue_label": frozenset({"label_updated"}),
    "issue_comment": frozenset({"created"}),
    "pull_request_comment": frozenset({"created"}),
    "pull_request_review_approved": frozenset({"reviewed"}),
    "pull_request_review_rejected": frozenset({"reviewed"}),
    "pull_request_review_comment": frozenset({"reviewed"}),
    "pull_request": frozenset({"opened", "closed"}),
}


def triage(event_type: str, payload: Mapping[str, Any]) -> str | None:
    """Why this event can be ignored without looking further, or None if it needs deciding."""
    actions = ACTIONS.get(event_type)
    if actions is None:
        return f"event type {event_type!r} is not one forgebottle acts on"
    action = payload.get("action")
    if not isinstance(action, str) or action not in actions:
        return f"{event_type} action {str(action)[:64]!r} is not one forgebottle acts on"
    return None


def _obj(data: Any, key: str) -> dict[str, Any]:
    """``data[key]`` if both are JSON objects, else {}: payloads are untrusted input."""
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def _text(data: Any, key: str) -> str:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) else ""


def _number(data: Any, key: str) -> int:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31 else 0


AGENT_LABEL = "bot-bottle:"
BOTTLE_LABEL = "bot-bottle-bottle:"


def _label_names(issue: Mapping[str, Any]) -> list[str]:
    """The label names of an issue object in a payload (untrusted: anything odd is skipped)."""
    labels = issue.get("labels")
    return [_text(label, "name") for label in labels] if isinstance(labels, list) else []


def _labelled(names: Sequence[str], prefix: str) -> list[str]:
    """What follows ``prefix`` in the labels that have it: agents for ``bot-bottle:``."""
    return [name.removeprefix(prefix) for name in names if name.startswith(prefix)]


def _discard(task: asyncio.Task[Any]) -> None:
    """Cancel a task whose result is no longer wanted, or take its exception so none is logged."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


@dataclasses.dataclass
class Decision:
    """What one webhook event comes to. ``apply`` writes its effects in the event's transaction."""

    status: Literal["done", "ignored"]
    reason: str
    slug: str = ""
    apply: Callable[[Any], None] | None = None
    destroy: str | None = None  # slug to destroy (effects happen before persisting)


def ignored(reason: str, slug: str = "") -> Decision:
    return Decision("ignored", reason, slug)


@dataclasses.dataclass
class CloneAhead:
    """A workspace cloned while the launch is still being decided (into ``path``/workspace)."""

    path: Path
    task: asyncio.Task[None]


@dataclasses.dataclass
class ActiveRun:
    ctx: BottleContext
    run: int
    scoped: ScopedForge
    started: float
    deadline: float | None
    last_call: float
    signalled: tuple[str, str] | None = None
    watchdog_reason: str = ""
    destroying: bool = False
    monitor: asyncio.Task[None] | None = None
    grace: asyncio.Task[None] | None = None
    # Set while starting; the sidecar is up before the agent so its first call finds it.
    sidecar: UnixServer | None = None
    handle: RunHandle | None = None


OVERLAY = """\
You are an agent working in a forgebottle bottle on {owner}/{repo}, issue #{issue}.
Your workspace (the current directory) is a git checkout on branch {branch}.
You hold no forge credentials: reach the forge only with the `forge` tool on your PATH.

  forge whoami                     your bottle, issue, PR and what you may write to
  forge read-issue N | read-pr N | comments N
  forge comment N TEXT             comment on your issue or PR (TEXT or - for stdin)
  forge describe N TEXT            replace your issue's or PR's description
  forge push                       push your committed HEAD to {branch} (secret-scanned)
  forge open-pr --title T --body TEXT
  forge done success|failure|blocked "summary"

Commit your work with git, `forge push`, `forge open-pr`, then always finish with `forge done`.
"""


class Service:
    """The lifecycle engine: turns webhook events and admin requests into bottle transitions."""

    def __init__(
        self,
        config: Config,
        store: Store,
        forge: Forge,
        *,
        bwrap: str | None = None,
        detect_bwrap: bool = True,
        wal: WalSync | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.forge = forge
        self.bwrap = bwrap if bwrap is not None else (find_bwrap() if detect_bwrap else None)
        self.metrics = Metrics()
        self.active: dict[str, ActiveRun] = {}
        self.bot: User | None = None
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._schedule_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._repos: dict[tuple[str, str], Repo] = {}
        self._admin: UnixServer | None = None
        self._stopping = False
        self._intake: list[tuple[NewEvent, asyncio.Future[tuple[int, bool]]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._wal = wal or WalSync(store.wal_path)
        self._unsynced: int | None = None  # the first new event of a batch committed, not yet synced
        self._unchecked = 0  # about how many pages intake wrote to the WAL since its last checkpoint
        self._checkpoint: asyncio.Task[None] | None = None
        self._checkpointed_at = float("-inf")  # loop time the last checkpoint started
        self._last_intake = 0.0
        self._ahead: dict[tuple[str, str, int], CloneAhead] = {}
        self.secrets = config.secrets()

    # -- start and stop ------------------------------------------------------------

    def check_sandbox(self) -> None:
        problem = sandbox_problem(self.config, self.bwrap)
        if problem:
            raise ConfigError(problem)
        for spec in self.config.bottles.values():
            if spec.sandbox == "none":
                log.warning('bottle %r runs agents WITHOUT a sandbox (sandbox = "none")', spec.name)

    async def start(self) -> None:
        self.check_sandbox()
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.config.state_dir, 0o700)
        install_tools(self.config.state_dir / "tools")
        # Clones made ahead by a previous process belong to decisions it did not finish.
        shutil.rmtree(self._clones_dir, ignore_errors=True)
        await self.recover()
        self._admin = UnixServer(admin_app(self), self.config.admin_socket, limit_concurrency=16)
        await self._admin.start()
        log.info(
            "forgebottle %s serving; state in %s; forge %s; org %s",
            __version__,
            self.config.state_dir,
            self.config.api_url,
            self.config.org,
        )
        self.store.defer_checkpoints()
        self._tasks = [
            asyncio.create_task(self._worker(), name="webhook-worker"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
            asyncio.create_task(self._checkpoints(), name="wal-checkpoints"),
        ]
        await self.schedule()

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for active in list(self.active.values()):
            active.watchdog_reason = ""
            await self._stop_agent(active, grace=5.0)
            if active.monitor is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await active.monitor
        if self._admin is not None:
            await self._admin.stop()
        await self._drop_all_ahead()
        await self._wal.close()
        if self._checkpoint is not None:
            await self._checkpoint
        await self.forge.aclose()

    async def recover(self) -> None:
        """After a restart: no agent of ours survives (--die-with-parent), so running means exited.
        A command bottle's launcher may have left resources running: it is asked to stop them."""
        stale = self.store.with_status(BottleState.RUNNING)
        for state in stale:
            last = self.store.last_run(state.slug)
            if last is not None and last["ended_at"] is None:
                self.store.update_run(state.slug, int(last["n"]), ended_at=utcnow(), error="orchestrator restarted")
            with contextlib.suppress(FileNotFoundError):
                BottlePaths(self.config.state_dir, state.slug).socket.unlink()
            self._transition(state, Trigger.EXITED, "orchestrator restarted")
        await asyncio.gather(*(self._release(state) for state in stale))
        for state in self.store.with_status(BottleState.DESTROYED):
            paths = BottlePaths(self.config.state_dir, state.slug)
            if paths.workspace.exists():
                shutil.rmtree(paths.workspace, ignore_errors=True)
                shutil.rmtree(paths.mirror, ignore_errors=True)

    async def _release(self, state: ForgeState) -> None:
        try:
            ctx = await self._context(state, offline=True)
            await self.backend(ctx).recovered(ctx)
        except (ForgeBottleError, OSError) as exc:
            log.warning("%s: could not release the interrupted run: %s", state.slug, exc, extra={"slug": state.slug})

    # -- webhook intake (called by the HTTP handler, before the answer) -------------

    async def accept(
        self, *, delivery: str, event_type: str, body: bytes, ignore: str | None = None
    ) -> tuple[int, bool]:
        """Store a webhook durably; returns (event id, is new) once it is on disk.

        Group commit: webhooks that arrive while a commit is in flight wait for the next one
        and share its transaction and fsync, so intake scales with concurrency, not fsyncs.
        """
        self._last_intake = time.monotonic()
        future: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self._intake.append((NewEvent(utcnow(), delivery, event_type, body, ignore or ""), future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_intake(), name="intake-commit")
        event_id, new = await future
        if not new:
            self.count_webhook("replay")
        elif ignore:
            self._event_outcome(event_id, event_type, "ignored", ignore)
        else:
            self.count_webhook("queued")
            self._wake.set()
        return event_id, new

    def count_webhook(self, outcome: str) -> None:
        self.metrics.inc("forgebottle_webhooks_total", "Webhooks received, by outcome", outcome=outcome)

    def _event_outcome(self, event_id: int, event_type: str, status: str, reason: str, slug: str = "") -> None:
        """How a stored event ended: one log line and one count, wherever it was decided."""
        self.count_webhook(status)
        log.info(
            "event %d %s: %s",
            event_id,
            event_type,
            reason,
            extra={"event_id": event_id, "event": event_type, "status": status, "slug": slug, "reason": reason},
        )

    async def _commit_intake(self) -> None:
        while self._intake:
            batch, self._intake = self._intake, []
            try:
                # Committed on the loop without an fsync, then synced outside the process: see WalSync.
                results = self.store.insert_events([event for event, _ in batch])
                fresh = [event_id for event_id, new in results if new]
                self._unsynced = min(fresh, default=None)
                await self.sync_wal()
            except Exception as exc:  # the edge of intake: every waiter gets the failure, none hangs
                # A failed sync (the disk, not the helper: a thread retried it) leaves the batch
                # committed but unconfirmed: its senders hear of the failure, and the worker may
                # still act on it, as it would on events found after a crash.
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self._unsynced = None
            # A batch rewrites about one page of the body index per event, plus its rows.
            self._unchecked += 2 + len(batch) + sum(len(event.body) for event, _ in batch) // 4096
            if self._unchecked > CHECKPOINT_PAGES and self._checkpoint_wal_soon():
                self._unchecked = 0
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def sync_wal(self) -> None:
        """Return once every commit made so far is on disk: what ``synchronous=FULL`` promises,
        without the event loop waiting on the disk (see WalSync). Raises OSError if it cannot."""
        by = await self._wal.sync()
        self.metrics.inc("forgebottle_wal_syncs_total", "WAL syncs, by where they ran", by=by)

    async def _checkpoints(self) -> None:
        """Sidecar records and the worker's commits reach the database file this way: their
        connection leaves checkpoints to the service (Store.defer_checkpoints)."""
        seen = self.store.changes
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            changes = self.store.changes
            # Under a webhook burst intake's own trigger checkpoints about as often: no second one.
            recent = loop.time() - self._checkpointed_at < CHECKPOINT_SECONDS
            if changes != seen and not recent and self._checkpoint_wal_soon():
                seen = changes

    def _checkpoint_wal_soon(self) -> bool:
        """Start a checkpoint in a thread unless one is running; whether one was started."""
        if self._checkpoint is not None and not self._checkpoint.done():
            return False
        self._checkpointed_at = asyncio.get_running_loop().time()
        self._checkpoint = asyncio.create_task(self._checkpoint_wal(), name="wal-checkpoint")
        return True

    async def _checkpoint_wal(self) -> None:
        try:
            await asyncio.to_thread(self.store.checkpoint)
        except (RuntimeError, sqlite3.Error) as exc:  # RuntimeError: the executor has shut down
            log.warning("WAL checkpoint failed: %s", exc)

    # -- the worker: events in arrival order -------------------------------------

    async def _worker(self) -> None:
        while True:
            self._wake.clear()
            if self.bot is None:
                try:
                    self.bot = await self.forge.current_user()
                    log.info("forge user is %s", self.bot.login)
                except ForgeError as exc:
                    log.error("cannot reach the forge to learn the token's user: %s", exc)
                    await asyncio.sleep(5)
                    continue
            events = self.ready_events()
            await self.process_batch(events)
            if not events:
                await self._wake.wait()

    def ready_events(self) -> list[InboxEvent]:
        """Pending events the worker may act on: on disk, so none acted on can be lost."""
        return self.store.pending_events(before=self._unsynced)

    async def process_batch(self, events: Sequence[InboxEvent]) -> None:
        """Decide events in arrival order. Plain ignores are finished together, in one
        transaction, flushed before any decision with effects (so no decision reads state an
        earlier one has not yet written)."""
        quiet: list[tuple[InboxEvent, Decision, str]] = []
        for event in events:
            if len(events) > 1:  # a backlog: a burst may still be arriving
                await self._defer_to_intake()
            outcome = await self._decide_or_fail(event)
            if outcome is None:
                break  # the forge is unavailable: retry this event (and those after it) later
            decision, status = outcome
            if decision.apply is None and decision.destroy is None:
                quiet.append((event, decision, status))
                continue
            self._finish(quiet)
            quiet = []
            if decision.destroy:
                await self.destroy(decision.destroy, decision.reason, event=event)
            else:
                self._finish([(event, decision, status)])
            await self.schedule()
            # A launch that could start has adopted its clone by now. One that must queue would
            # start from a checkout that grows stale while it waits: it clones when its turn comes.
            await self._drop_all_ahead()
        self._finish(quiet)

    async def _defer_to_intake(self) -> None:
        """Let a burst of webhooks in first: Gitea gives each delivery 5 s and never retries,
        while stored events can wait. Deferral is bounded, so processing never starves."""
        deferred = 0.0
        while time.monotonic() - self._last_intake < INTAKE_QUIET and deferred < MAX_DEFERRAL:
            await asyncio.sleep(INTAKE_QUIET)
            deferred += INTAKE_QUIET
        await asyncio.sleep(0)

    async def _decide_or_fail(self, event: InboxEvent) -> tuple[Decision, str] | None:
        try:
            decision = await self.decide(event)
        except ForgeUnavailable as exc:
            attempts = self.store.bump_attempts(event.id, str(exc))
            self.metrics.inc("forgebottle_forge_errors_total", "Forge calls that failed", kind="unavailable")
            if attempts >= self.config.event_retries:
                return Decision("ignored", f"failed after {attempts} attempts: {exc}"), "failed"
            delay = min(30.0, 0.5 * 2**attempts)
            log.warning(
                "event %d: forge unavailable, retry %d in %.1fs: %s",
                event.id,
                attempts,
                delay,
                exc,
                extra={"event_id": event.id},
            )
            await asyncio.sleep(delay)
            return None
        except ForgeError as exc:
            self.metrics.inc("forgebottle_forge_errors_total", "Forge calls that failed", kind="error")
            return Decision("ignored", f"forge error: {exc}"), "failed"
        return decision, decision.status

    def _finish(self, finished: Sequence[tuple[InboxEvent, Decision, str]]) -> None:
        if not finished:
            return
        at = utcnow()
        with self.store.transaction() as db:
            for event, decision, status in finished:
                if decision.apply is not None:
                    decision.apply(db)
                self.store.finish_event(
                    event.id, status=status, reason=decision.reason, slug=decision.slug, at=at, db=db
                )
        for event, decision, status in finished:
            self._event_outcome(event.id, event.event_type, status, decision.reason, decision.slug)

    async def decide(self, event: InboxEvent) -> Decision:
        try:
            payload = json.loads(event.body)
        except (ValueError, RecursionError):
            return ignored("body is not JSON")
        if not isinstance(payload, dict):
            return ignored("payload is not an object")
        reason = triage(event.event_type, payload)
        if reason is not None:
            return ignored(reason)
        repo = _obj(payload, "repository")
        owner, name = _text(_obj(repo, "owner"), "login"), _text(repo, "name")
        if not owner or not name:
            return ignored("payload names no repository")
        sender = _text(_obj(payload, "sender"), "login")
        kind = event.event_type
        if kind in ("issues", "issue_assign", "issue_label"):
            return await self._on_issue(kind, owner, name, payload, sender)
        if kind == "pull_request":
            return self._on_pull_request(_text(payload, "action"), owner, name, payload)
        return await self._on_comment(kind, owner, name, payload, sender)

    async def _on_issue(self, kind: str, owner: str, repo: str, payload: dict[str, Any], sender: str) -> Decision:
        number = _number(_obj(payload, "issue"), "number") or _number(payload, "number")
        if number <= 0:
            return ignored("payload names no issue")
        if self.bot and sender.lower() == self.bot.login.lower():
            return ignored(f"sent by forgebottle's own user {sender}")
        # The payload may be a replay of an old state: decide on the issue as it is now. When
        # the payload says the issue is labelled for an agent, read its comments (the prompt
        # needs them) at the same time: a launch then waits for two forge round trips, not three.
        # For the same reason the workspace clone starts now too: it is most of a launch.
        comments: asyncio.Task[list[Comment]] | None = None
        labels = _label_names(_obj(payload, "issue"))
        if _labelled(labels, AGENT_LABEL):
            comments = asyncio.create_task(self.forge.read_comments(owner, repo, number))
            self._clone_ahead(owner, repo, number, labels)
        launch = False
        try:
            issue = await self.forge.read_issue(owner, repo, number)
            decision = await self._on_current_issue(kind, owner, repo, issue, comments)
            launch = decision.apply is not None
            return decision
        finally:
            if comments is not None:
                _discard(comments)
            if not launch:
                await self._drop_ahead((owner, repo, number))

    async def _on_current_issue(
        self, kind: str, owner: str, repo: str, issue: Issue, comments: asyncio.Task[list[Comment]] | None
    ) -> Decision:
        number = issue.number
        if issue.is_pull:
            return ignored(f"#{number} is a pull request")
        if issue.state != "open":
            return ignored(f"issue #{number} is {issue.state}")
        agents = _labelled(issue.labels, AGENT_LABEL)
        if not agents:
            return ignored(f"issue #{number} has no bot-bottle:<agent> label")
        if len(set(agents)) > 1:
            return ignored(f"issue #{number} names several agents: {', '.join(sorted(set(agents)))}")
        agent = agents[0]
        if agent not in self.config.agents:
            return ignored(f"agent {agent!r} is not configured")
        bottles = _labelled(issue.labels, BOTTLE_LABEL)
        for bottle in bottles[:1]:
            if bottle not in self.config.bottles:
                return ignored(f"bottle {bottle!r} is not configured")
        existing = self.store.get(owner, repo, number)
        if existing is not None and existing.status.live:
            return ignored(f"bottle {existing.slug} is already {existing.status.value}", existing.slug)
        # Membership and the prompt snapshot are independent reads: make them together.
        flags, (prompt, seen) = await asyncio.gather(
            asyncio.gather(*(self._is_member(a) for a in issue.assignees)),
            self._snapshot(owner, repo, number, issue.title, issue.body, comments),
        )
        members = [a for a, member in zip(issue.assignees, flags, strict=True) if member]
        if not members:
            who = ", ".join(issue.assignees) or "nobody"
            return ignored(f"issue #{number} is assigned to {who}; none is a member of {self.config.org}")
        return self._create(
            owner,
            repo,
            number,
            agent=agent,
            bottles=bottles or ["local"],
            trigger=kind,
            prompt=prompt,
            issue_url=issue.html_url,
            source=f"issue #{number} (assigned to {members[0]})",
            seen_comment_id=seen,
        )

    @property
    def _clones_dir(self) -> Path:
        return self.config.state_dir / "clones"

    def _clone_ahead(self, owner: str, repo: str, number: int, labels: Sequence[str]) -> None:
        """Start cloning the workspace of a launch that is likely but not yet decided."""
        key = (owner, repo, number)
        try:
            spec = self.config.bottle(_labelled(labels, BOTTLE_LABEL)[:1] or ["local"])
        except ConfigError:
            return
        existing = self.store.get(owner, repo, number)
        if key in self._ahead or spec.backend != "local" or (existing is not None and existing.status.live):
            return
        self._clones_dir.mkdir(mode=0o700, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{number}-", dir=self._clones_dir))

        async def clone() -> None:
            found = await self._repo(owner, repo)
            await clone_workspace(
                path / "workspace",
                clone_url=found.clone_url,
                branch=branch_for(number),
                git_user=self.bot.login if self.bot else "forgebottle",
                token=self.config.token,
            )

        self._ahead[key] = CloneAhead(path, asyncio.create_task(clone(), name=f"clone-ahead:{owner}/{repo}#{number}"))

    async def _drop_ahead(self, key: tuple[str, str, int]) -> None:
        ahead = self._ahead.pop(key, None)
        if ahead is None:
            return
        ahead.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await ahead.task
        await asyncio.to_thread(shutil.rmtree, ahead.path, True)

    async def _drop_all_ahead(self) -> None:
        for key in list(self._ahead):
            await self._drop_ahead(key)

    async def _adopt_ahead(self, ctx: BottleContext) -> None:
        """Move a workspace cloned ahead into the bottle; if that clone failed, prepare clones."""
        key = (ctx.owner, ctx.repo, ctx.issue)
        if ctx.bottle.backend != "local":
            await self._drop_ahead(key)  # the payload's bottle label was not the issue's
            return
        ahead = self._ahead.pop(key, None)
        if ahead is None:
            return
        try:
            await asyncio.wait([ahead.task])  # the clone's own failure is not ours: see below
            failure = "cancelled" if ahead.task.cancelled() else ahead.task.exception()
            if failure is None and not ctx.paths.workspace.exists():
                ctx.paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.rename(ahead.path / "workspace", ctx.paths.workspace)
        except OSError as exc:
            failure = exc
        finally:
            await asyncio.to_thread(shutil.rmtree, ahead.path, True)
        if failure is not None:
            # prepare() clones as it would have without a clone made ahead.
            log.info("%s: the clone made ahead failed (%s); cloning again", ctx.slug, failure, extra={"slug": ctx.slug})

    async def _is_member(self, user: str) -> bool:
        return await self.forge.is_org_member(self.config.org, user)

    async def _snapshot(
        self,
        owner: str,
        repo: str,
        number: int,
        title: str,
        body: str,
        fetched: Awaitable[list[Comment]] | None = None,
    ) -> tuple[str, int]:
        """The trusted prompt: title, body, and comments by org members only (``fetched``: the
        comments, if their read is already under way)."""
        parts = [f"# {title}", "", _cap(body)]
        found = await (fetched if fetched is not None else self.forge.read_comments(owner, repo, number))
        authors = sorted({c.user for c in found})
        trusted = dict(zip(authors, await asyncio.gather(*(self._is_member(a) for a in authors)), strict=True))
        comments = []
        for comment in found:
            if trusted[comment.user]:
                comments.append(f"### Comment by @{comment.user} ({comment.created_at})\n\n{_cap(comment.body)}")
        if comments:
            parts += ["", "## Comments", "", *comments]
        return "\n".join(parts), max((c.id for c in found), default=0)

    def _create(
        self,
        owner: str,
        repo: str,
        number: int,
        *,
        agent: str,
        bottles: Sequence[str],
        trigger: str,
        prompt: str,
        issue_url: str,
        source: str,
        seen_comment_id: int = 0,
    ) -> Decision:
        slug_base = f"{owner}-{repo}-{number}".lower()
        slug_base = re.sub(r"[^a-z0-9._-]+", "-", slug_base)[:40].strip("-.") or "bottle"
        holder: dict[str, str] = {}
        spec = self.config.bottle(bottles)

        def apply(db: Any) -> None:
            slug = slug_base
            k = 1
            while self.store.slug_taken(slug, db):
                k += 1
                slug = f"{slug_base}-{k}"
            holder["slug"] = slug
            old = self.store.get(owner, repo, number)
            at = utcnow()
            if old is not None:
                self.store.archive(old, at, db)
            state = ForgeState(
                owner=owner,
                repo=repo,
                issue_number=number,
                slug=slug,
                agent_name=agent,
                status=BottleState.QUEUED,
                created_at=at,
                updated_at=at,
                bottle_names=tuple(bottles),
                backend_name=spec.backend,
                agent_git_user=self.bot.login if self.bot else "",
                issue_url=issue_url,
                sandbox=spec.sandbox if spec.backend == "local" else "external",
                queued_seq=self.store.next_queue_seq(db),
                api_url=self.config.api_url,
                org=self.config.org,
                seen_comment_id=seen_comment_id,
            )
            self.store.upsert(state, db)
            self.store.add_pending(slug, at=at, trigger=trigger, source=source, body=prompt, db=db)

        decision = Decision("done", f"launch queued for issue #{number} (agent {agent})", apply=None)

        def apply_and_name(db: Any) -> None:
            apply(db)
            decision.slug = holder["slug"]
            decision.reason = f"bottle {holder['slug']} queued for issue #{number} (agent {agent})"

        decision.apply = apply_and_name
        return decision

    async def _on_comment(self, kind: str, owner: str, repo: str, payload: dict[str, Any], sender: str) -> Decision:
        if kind.startswith("pull_request_review_"):
            number = _number(_obj(payload, "pull_request"), "number")
            body = _text(_obj(payload, "review"), "content")
            comment_id = 0
        else:
            number = _number(_obj(payload, "issue"), "number")
            comment = _obj(payload, "comment")
            body = _text(comment, "body")
            comment_id = _number(comment, "id")
        if number <= 0:
            return ignored("payload names no issue or pull request")
        state = self.store.by_pr(owner, repo, number) or self.store.get(owner, repo, number)
        if state is None or not state.status.live:
            return ignored(f"no live bottle for #{number}")
        if self.bot and sender.lower() == self.bot.login.lower():
            return ignored(f"comment by forgebottle's own user {sender}", state.slug)
        if comment_id and number == state.issue_number and comment_id <= state.seen_comment_id:
            # Posted before the launch but delivered after it: the launch prompt has it already.
            return ignored(f"comment {comment_id} is already in the launch prompt", state.slug)
        if not await self._trusted(owner, repo, sender):
            return ignored(
                f"{sender} is neither a member of {self.config.org} nor a writer on {owner}/{repo}", state.slug
            )
        verdict = {
            "pull_request_review_approved": "Approval",
            "pull_request_review_rejected": "Changes requested",
            "pull_request_review_comment": "Review",
        }.get(kind, "Comment")
        if not body.strip():
            if kind == "pull_request_review_approved":
                return ignored("approval without a comment", state.slug)
            body = "(no text)"
        prompt = f"### {verdict} from @{sender} on #{number}\n\n{_cap(body)}"
        source = f"{kind} {comment_id} by {sender}" if comment_id else f"{kind} by {sender}"
        where = (
            "rehydrate queued"
            if state.status is BottleState.FROZEN
            else f"kept as a pending prompt (bottle is {state.status.value})"
        )

        def apply(db: Any) -> None:
            self.store.add_pending(state.slug, at=utcnow(), trigger=kind, source=source, body=prompt, db=db)

        return Decision("done", f"{where}: {verdict.lower()} by {sender} on #{number}", state.slug, apply)

    async def _trusted(self, owner: str, repo: str, user: str) -> bool:
        if not user:
            return False
        if await self._is_member(user):
            return True
        try:
            return await self.forge.permission(owner, repo, user) in ("write", "admin", "owner")
        except ForgeUnavailable:
            raise
        except ForgeError as exc:
            log.warning("cannot read %s's permission on %s/%s: %s", user, owner, repo, exc)
            return False

    def _on_pull_request(self, action: str, owner: str, repo: str, payload: dict[str, Any]) -> Decision:
        pr = _obj(payload, "pull_request")
        number = _number(pr, "number") or _number(payload, "number")
        if number <= 0:
            return ignored("payload names no pull request")
        if action == "opened":
            head = _text(_obj(pr, "head"), "ref")
            match = re.fullmatch(r"bot-bottle/issue-(\d+)", head)
            if not match:
                return ignored(f"pull request #{number} is not from a bot-bottle branch")
            state = self.store.get(owner, repo, int(match.group(1)))
            if state is None or not state.status.live:
                return ignored(f"no live bottle for branch {head}")
            if state.pr_number == number:
                return ignored(f"pull request #{number} is already linked to {state.slug}", state.slug)
            url, slug = _text(pr, "html_url"), state.slug

            def apply(db: Any) -> None:
                self.store.set_fields(slug, db, pr_number=number, pr_url=url)

            return Decision("done", f"linked pull request #{number} to {slug}", slug, apply)
        if action == "closed":
            state = self.store.by_pr(owner, repo, number)
            if state is None or not state.status.live:
                return ignored(f"no live bottle for pull request #{number}")
            how = "merged" if pr.get("merged") is True else "closed"
            return Decision("done", f"pull request #{number} {how}", state.slug, destroy=state.slug)
        return ignored(f"pull_request action {action!r} is not one forgebottle acts on")  # (triage stops these)

    # -- orchestrate (admin socket) ------------------------------------------------

    async def orchestrate_start(
        self, repo_full: str, issue: int, agent: str, bottles: Sequence[str], prompt: str
    ) -> str:
        owner, sep, repo = repo_full.partition("/")
        if not sep or not owner or not repo:
            raise AdminError("--repo must be OWNER/REPO")
        if agent not in self.config.agents:
            raise AdminError(f"agent {agent!r} is not configured")
        names = list(bottles) or ["local"]
        self.config.bottle(names)
        existing = self.store.get(owner, repo, issue)
        if existing is not None and existing.status.live:
            raise AdminError(f"bottle {existing.slug} is already {existing.status.value}")
        found = await self.forge.read_issue(owner, repo, issue)
        text, seen = await self._snapshot(owner, repo, issue, found.title, found.body)
        if prompt:
            text += f"\n\n## Instructions from the operator\n\n{_cap(prompt)}"
        decision = self._create(
            owner,
            repo,
            issue,
            agent=agent,
            bottles=names,
            trigger="orchestrate start",
            prompt=text,
            issue_url=found.html_url,
            source="orchestrate start",
            seen_comment_id=seen,
        )
        with self.store.transaction() as db:
            assert decision.apply is not None
            decision.apply(db)
        await self.schedule()
        return decision.slug

    async def orchestrate_resume(self, slug: str, prompt: str) -> str:
        state = self._known(slug)
        if not state.status.live:
            raise AdminError(f"bottle {slug} is destroyed")
        self.store.add_pending(
            slug,
            at=utcnow(),
            trigger="orchestrate resume",
            source="orchestrate resume",
            body=f"### From the operator\n\n{_cap(prompt)}",
        )
        await self.schedule()
        return (self.store.by_slug(slug) or state).status.value

    def _known(self, slug: str) -> ForgeState:
        check_slug(slug)
        state = self.store.by_slug(slug)
        if state is None:
            raise NotFound(f"no bottle {slug!r}")
        return state

    # -- the scheduler: FIFO over everything waiting for a slot ---------------------

    async def schedule(self) -> None:
        async with self._schedule_lock:
            while True:
                running = len(self.store.with_status(BottleState.RUNNING))
                free = self.config.max_running - running
                if free <= 0:
                    return
                candidate = None
                for slug in self.store.slugs_with_pending():
                    state = self.store.by_slug(slug)
                    if (
                        state is not None
                        and state.status in (BottleState.QUEUED, BottleState.FROZEN)
                        and slug not in self.active
                    ):
                        candidate = state
                        break
                if candidate is None:
                    return
                await self._start_run(candidate, free)

    async def _start_run(self, state: ForgeState, free: int) -> None:
        """Effect (workspace, sidecar, agent), then trigger and persist in one transaction."""
        slug = state.slug
        async with self._locks[slug]:
            trigger = Trigger.LAUNCH if state.status is BottleState.QUEUED else Trigger.REHYDRATE
            pending = self.store.pending(slug)
            last = self.store.last_run(slug)
            n = int(last["n"]) + 1 if last else 1
            prompt = compose_prompt(state, pending, first=n == 1)
            prompt_sha = hashlib.sha256(prompt.encode()).hexdigest()
            run_trigger = pending[0]["trigger"] if pending else trigger.value
            error = ""
            active: ActiveRun | None = None
            try:
                ctx = await self._context(state)
                active = await self._spawn(ctx, state, prompt, n, resume=trigger is Trigger.REHYDRATE)
            except (ForgeBottleError, OSError) as exc:
                error = redact(str(exc), self.secrets)
                log.error("%s: could not start run %d: %s", slug, n, error, extra={"slug": slug})
            at = utcnow()
            with self.store.transaction() as db:
                bottle = Bottle(slug, state.status)
                record = fire(bottle, trigger, at=at, reason=_run_reason(pending, trigger), free_slots=free)
                self.store.apply(state, record, db)
                self.store.start_run(
                    slug,
                    trigger=run_trigger,
                    prompt_sha256=prompt_sha,
                    started_at=at,
                    network=self._network(state),
                    sandbox=state.sandbox,
                    db=db,
                )
                self.store.take_pending(slug, [int(p["id"]) for p in pending], db)
                if error:
                    record = fire(bottle, Trigger.EXITED, at=at, reason=f"failed to start: {error}")
                    self.store.apply(state, record, db)
                    db.execute("UPDATE runs SET ended_at = ?, error = ? WHERE slug = ? AND n = ?", (at, error, slug, n))
            self._log_transition(slug, trigger.value, f"run {n}")
            if active is not None:
                self.active[slug] = active
                active.monitor = asyncio.create_task(self._monitor(active), name=f"monitor:{slug}")

    def _network(self, state: ForgeState) -> str:
        agent = self.config.agents.get(state.agent_name)
        return agent.network if agent else "none"

    async def _repo(self, owner: str, repo: str) -> Repo:
        key = (owner, repo)
        if key not in self._repos:
            self._repos[key] = await self.forge.get_repo(owner, repo)
        return self._repos[key]

    async def _context(self, state: ForgeState, *, offline: bool = False) -> BottleContext:
        agent = self.config.agents.get(state.agent_name)
        if agent is None:
            raise ConfigError(f"agent {state.agent_name!r} of {state.slug} is no longer configured")
        bottle = self.config.bottle(state.bottle_names)
        repo = Repo(state.owner, state.repo, "main", "", "") if offline else await self._repo(state.owner, state.repo)
        return BottleContext(
            slug=state.slug,
            owner=state.owner,
            repo=state.repo,
            issue=state.issue_number,
            pr=state.pr_number,
            agent=agent,
            bottle=bottle,
            paths=BottlePaths(self.config.state_dir, state.slug),
            clone_url=repo.clone_url,
            default_branch=repo.default_branch,
            git_user=state.agent_git_user or (self.bot.login if self.bot else "forgebottle"),
            token=self.config.token,
            bwrap=self.bwrap,
        )

    def backend(self, ctx: BottleContext) -> Backend:
        return BACKENDS[ctx.bottle.backend]()

    async def _spawn(self, ctx: BottleContext, state: ForgeState, prompt: str, n: int, *, resume: bool) -> ActiveRun:
        backend = self.backend(ctx)
        scoped = ScopedForge(
            self.forge,
            owner=state.owner,
            repo=state.repo,
            issue=state.issue_number,
            prs=[state.pr_number] if state.pr_number else [],
        )
        now = time.monotonic()
        active = ActiveRun(
            ctx=ctx,
            run=n,
            scoped=scoped,
            started=now,
            deadline=now + ctx.agent.timeout if ctx.agent.timeout else None,
            last_call=now,
        )
        sidecar = UnixServer(sidecar_app(_Access(self, active)), ctx.paths.socket)
        active.sidecar = sidecar
        # The socket comes up while the workspace is cloned; the agent starts once both are ready.
        prepared, started = await asyncio.gather(self._prepare(backend, ctx), sidecar.start(), return_exceptions=True)
        for outcome in (prepared, started):
            if isinstance(outcome, BaseException):
                await sidecar.stop()
                raise outcome
        ctx.paths.prompt.write_text(prompt)
        (ctx.paths.root / f"prompt-{n}.md").write_text(prompt)
        self.active[ctx.slug] = active
        try:
            handle = await backend.start(ctx, prompt=prompt, run=n, resume=resume)
        except BaseException:
            self.active.pop(ctx.slug, None)
            await sidecar.stop()
            raise
        active.handle = handle
        log.info("%s: run %d started (pid %d)", ctx.slug, n, handle.pid, extra={"slug": ctx.slug})
        if ctx.bottle.backend == "local" and not ctx.sandboxed:
            log.warning(
                '%s: run %d is NOT sandboxed (bottle %r has sandbox = "none")',
                ctx.slug,
                n,
                ctx.bottle.name,
                extra={"slug": ctx.slug},
            )
        return active

    async def _prepare(self, backend: Backend, ctx: BottleContext) -> None:
        await self._adopt_ahead(ctx)
        await backend.prepare(ctx)

    async def _monitor(self, active: ActiveRun) -> None:
        assert active.handle is not None and active.sidecar is not None
        code = await active.handle.wait()
        slug = active.ctx.slug
        async with self._locks[slug]:
            self.active.pop(slug, None)
            if active.grace is not None:
                active.grace.cancel()
            await active.sidecar.stop()
            with contextlib.suppress(FileNotFoundError):
                active.ctx.paths.prompt.unlink()
            self.store.update_run(slug, active.run, ended_at=utcnow(), exit_code=code)
            self.metrics.observe(
                "forgebottle_run_seconds", "Agent run wall-clock duration", time.monotonic() - active.started
            )
            if active.destroying:
                return
            if active.watchdog_reason:
                trigger, reason = Trigger.WATCHDOG, active.watchdog_reason
            elif active.signalled:
                trigger, reason = Trigger.DONE, f"agent signalled {active.signalled[0]}: {active.signalled[1][:200]}"
            elif self._stopping:
                trigger, reason = Trigger.EXITED, "orchestrator stopped"
            else:
                trigger, reason = Trigger.EXITED, f"agent exited with {code} without signal_done"
            state = self.store.by_slug(slug)
            if state is not None:
                self._transition(state, trigger, reason)
        await self.schedule()

    def _transition(self, state: ForgeState, trigger: Trigger, reason: str) -> None:
        record = fire(Bottle(state.slug, state.status), trigger, at=utcnow(), reason=reason)
        self.store.apply(state, record)
        self._log_transition(state.slug, trigger.value, reason)

    def _log_transition(self, slug: str, trigger: str, reason: str) -> None:
        state = self.store.by_slug(slug)
        status = state.status.value if state else "?"
        self.metrics.inc("forgebottle_transitions_total", "Bottle transitions", trigger=trigger)
        log.info(
            "%s: %s -> %s (%s)",
            slug,
            trigger,
            status,
            reason,
            extra={"slug": slug, "trigger": trigger, "dest": status, "reason": reason},
        )

    async def _stop_agent(self, active: ActiveRun, grace: float) -> None:
        if active.handle is not None:
            await self.backend(active.ctx).stop(active.ctx, active.handle, grace)

    # -- sidecar-facing --------------------------------------------------------------

    async def signal_done(self, active: ActiveRun, status: str, summary: str) -> None:
        active.signalled = (status, summary)
        self.store.update_run(active.ctx.slug, active.run, signalled_status=status, signalled_summary=summary)
        if active.grace is None:
            active.grace = asyncio.create_task(self._grace(active), name=f"grace:{active.ctx.slug}")

    async def _grace(self, active: ActiveRun) -> None:
        await asyncio.sleep(self.config.done_grace)
        log.info(
            "%s: agent still running %.0fs after signal_done; stopping it",
            active.ctx.slug,
            self.config.done_grace,
            extra={"slug": active.ctx.slug},
        )
        await self._stop_agent(active, grace=5.0)

    async def push(self, active: ActiveRun) -> PushResult:
        backend = self.backend(active.ctx)
        try:
            result = await backend.push(active.ctx, forbidden=self.secrets)
        except PushRefused as exc:
            self.store.update_run(active.ctx.slug, active.run, secret_findings=len(exc.findings))
            raise
        return result

    async def pr_opened(self, active: ActiveRun, pr: PullRequest) -> None:
        self.store.set_fields(active.ctx.slug, pr_number=pr.number, pr_url=pr.html_url)

    # -- destroy ---------------------------------------------------------------------

    async def destroy(self, slug: str, reason: str, *, event: InboxEvent | None = None) -> None:
        """Effects first (kill, remove the workspace), then the transition, with the event if any."""
        state = self._known(slug)
        active = self.active.get(slug)
        if active is not None:
            active.destroying = True
            await self._stop_agent(active, grace=2.0)
            if active.monitor is not None:
                await active.monitor
        await self._drop_ahead((state.owner, state.repo, state.issue_number))
        async with self._locks[slug]:
            state = self._known(slug)
            if state.status.live:
                with contextlib.suppress(ForgeBottleError):
                    ctx = await self._context(state, offline=True)
                    await self.backend(ctx).destroy(ctx)
                shutil.rmtree(BottlePaths(self.config.state_dir, slug).sidecar_dir, ignore_errors=True)
            with self.store.transaction() as db:
                if state.status.live:
                    record = fire(Bottle(slug, state.status), Trigger.DESTROY, at=utcnow(), reason=reason)
                    self.store.apply(state, record, db)
                if event is not None:
                    self.store.finish_event(
                        event.id, status="done", reason=f"destroyed {slug}: {reason}", slug=slug, at=utcnow(), db=db
                    )
            if state.status is BottleState.DESTROYED:
                self._log_transition(slug, Trigger.DESTROY.value, reason)
        await self.schedule()

    # -- the watchdog ----------------------------------------------------------------

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.config.watchdog_interval)
            await self.check_watchdog()

    async def check_watchdog(self) -> None:
        now = time.monotonic()
        for active in list(self.active.values()):
            if active.watchdog_reason or active.destroying or active.signalled:
                continue
            quiet = now - active.last_call
            if quiet > self.config.watchdog_timeout:
                active.watchdog_reason = f"no sidecar call for {quiet:.0f}s (limit {self.config.watchdog_timeout:.0f}s)"
            elif active.deadline is not None and now > active.deadline:
                active.watchdog_reason = f"run passed its timeout of {active.ctx.agent.timeout:.0f}s"
            else:
                continue
            self.metrics.inc("forgebottle_watchdog_firings_total", "Runs frozen by the watchdog")
            self.store.update_run(active.ctx.slug, active.run, watchdog_fired=1)
            log.warning("%s: watchdog: %s", active.ctx.slug, active.watchdog_reason, extra={"slug": active.ctx.slug})
            await self._stop_agent(active, grace=2.0)


class _Access:
    """The sidecar's view of one running bottle (sidecar.BottleAccess)."""

    def __init__(self, service: Service, active: ActiveRun) -> None:
        self.service = service
        self.active = active
        self.slug = active.ctx.slug

    def is_running(self) -> bool:
        current = self.service.active.get(self.slug)
        return current is self.active and not self.active.destroying

    def scoped(self) -> ScopedForge:
        return self.active.scoped

    def whoami(self) -> dict[str, Any]:
        ctx = self.active.ctx
        pr = max(self.active.scoped.prs) if self.active.scoped.prs else None
        return {
            "slug": ctx.slug,
            "owner": ctx.owner,
            "repo": ctx.repo,
            "issue": ctx.issue,
            "pr": pr,
            "writable": self.active.scoped.writable,
        }

    def default_branch(self) -> str:
        return self.active.ctx.default_branch

    def writes_in_last_hour(self) -> int:
        since = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat(timespec="milliseconds")
        return self.service.store.count_operations(self.slug, sorted(WRITES), outcome="ok", since=since)

    def write_limit(self) -> int:
        return self.service.config.writes_per_hour

    async def push(self) -> PushResult:
        return await self.service.push(self.active)

    async def pr_opened(self, pr: PullRequest) -> None:
        await self.service.pr_opened(self.active, pr)

    async def signal_done(self, status: str, summary: str) -> None:
        await self.service.signal_done(self.active, status, summary)

    async def record(
        self, *, op: str, target: str, outcome: str, detail: str, duration_ms: float, code: int | None = None
    ) -> None:
        service = self.service
        detail = redact(detail, service.secrets)
        self.active.last_call = time.monotonic()
        service.store.append_operation(
            self.slug,
            run=self.active.run,
            at=utcnow(),
            op=op,
            target=target,
            outcome=outcome,
            detail=detail,
            duration_ms=duration_ms,
        )  # committed at NORMAL: crash-safe at once; synced below where promised
        # The operation is on record (above) before the agent hears back; its log line and
        # metrics need not be. Done here they were ~45 µs of every sidecar call (formatting, a
        # write to stderr): queued instead, they run once the answer is on its way, in call order.
        asyncio.get_running_loop().call_soon(self._tell, op, outcome, detail, duration_ms, code)
        if op in WRITES or op == "signal_done" or outcome != "ok":
            # What wrote, or tried to write, to the forge is on disk before the agent hears back
            # (reads reach it with the next sync). Synced by the WAL helper: the event loop, and
            # every other bottle and webhook on it, does not wait on the disk meanwhile.
            try:
                await service.sync_wal()
            except OSError as exc:
                # The forge call has happened either way: the agent hears how it went, the
                # operator that its record may not survive a power loss.
                log.error("%s: the record of %s could not be synced: %s", self.slug, op, exc, extra={"slug": self.slug})

    def _tell(self, op: str, outcome: str, detail: str, duration_ms: float, code: int | None) -> None:
        metrics = self.service.metrics
        metrics.inc(
            "forgebottle_sidecar_calls_total", "Sidecar calls, by method and outcome", method=op, outcome=outcome
        )
        if code == ForgeError.rpc_code:
            metrics.inc("forgebottle_forge_errors_total", "Forge calls that failed", kind="sidecar")
        metrics.observe("forgebottle_sidecar_call_seconds", "Sidecar call duration", duration_ms / 1000, method=op)
        log.info("%s: %s", self.slug, detail, extra={"slug": self.slug, "op": op, "outcome": outcome})


def _cap(text: str, limit: int = MAX_PROMPT_PART) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[:limit].decode(errors="ignore") + f"\n\n[truncated: {len(raw) - limit} more bytes]"


def _run_reason(pending: Sequence[Mapping[str, Any]], trigger: Trigger) -> str:
    if not pending:
        return trigger.value
    sources = "; ".join(str(p["source"]) for p in pending[:5])
    more = f" (+{len(pending) - 5} more)" if len(pending) > 5 else ""
    return f"{sources}{more}"


def compose_prompt(state: ForgeState, pending: Sequence[Mapping[str, Any]], *, first: bool) -> str:
    """The overlay, then the waiting prompts coalesced, oldest first, within the argv limit."""
    overlay = OVERLAY.format(
        owner=state.owner, repo=state.repo, issue=state.issue_number, branch=branch_for(state.issue_number)
    )
    header = "## Your task" if first else "## New input since your last run"
    parts = [overlay, header, ""]
    budget = MAX_PROMPT_BYTES - len("\n".join(parts).encode())
    for item in pending:
        body = str(item["body"])
        if len(body.encode()) + 2 > budget:
            parts.append(f"[{len(pending)} prompts in all; the rest did not fit]")
            break
        parts += [body, ""]
        budget -= len(body.encode()) + 2
    return "\n".join(parts)


def install_tools(directory: Path) -> None:
    """Put the agent-side ``forge`` tool (stdlib only) where bottles bind it."""
    directory.mkdir(parents=True, exist_ok=True)
    source = Path(forge_client.__file__).read_text()
    target = directory / "forge"
    if not target.exists() or target.read_text() != source:
        tmp = directory / ".forge.tmp"
        tmp.write_text(source)
        tmp.chmod(0o755)
        tmp.replace(target)


def bottle_view(state: ForgeState) -> dict[str, Any]:
    data = state.as_json()
    data["branch"] = branch_for(state.issue_number)
    for private in ("chain_head", "queued_seq"):
        data.pop(private, None)
    return data


# =====================================================================================
# 5. Provenance
# =====================================================================================


def provenance(store: Store, slug: str, *, api_url: str = "", org: str = "") -> dict[str, Any]:
    check_slug(slug)
    state = store.by_slug(slug)
    if state is None:
        raise NotFound(f"no bottle {slug!r}")
    ops = store.operations(slug)
    check = verify_chain(slug, ops, head=state.chain_head, count=state.op_count)
    runs = []
    for run in store.runs(slug):
        signalled = None
        if run["signalled_status"]:
            signalled = {"status": run["signalled_status"], "summary": run["signalled_summary"] or ""}
        runs.append(
            {
                "n": run["n"],
                "trigger": run["trigger"],
                "prompt_sha256": run["prompt_sha256"],
                "started_at": run["started_at"],
                "ended_at": run["ended_at"],
                "exit_code": run["exit_code"],
                "signalled": signalled,
                "watchdog_fired": bool(run["watchdog_fired"]),
                "secret_scan": {"tool": "detect-secrets", "findings": int(run["secret_findings"])},
                "egress": {"network": run["network"]},
                "sandbox": run["sandbox"],
                **({"error": run["error"]} if run["error"] else {}),
            }
        )
    return {
        "schema": "forgebottle.provenance/v1",
        "slug": slug,
        "agent": state.agent_name,
        "bottles": list(state.bottle_names),
        "backend": state.backend_name,
        "sandbox": state.sandbox,
        "org": state.org or org,
        "status": state.status.value,
        "forge": {
            "kind": "gitea",
            "api_url": state.api_url or api_url,
            "owner": state.owner,
            "repo": state.repo,
            "issue": state.issue_number,
            "pr": state.pr_number,
            "issue_url": state.issue_url,
            "pr_url": state.pr_url,
        },
        "runs": runs,
        "operations": [{**op.content(), "hash": op.hash} for op in ops],
        "transitions": store.transitions(slug),
        "chain": {
            "algorithm": "sha256",
            "head": state.chain_head,
            "verified": check.verified,
            **({"problem": check.problem, "broken_seq": check.broken_seq} if not check.verified else {}),
        },
    }


# =====================================================================================
# 6. HTTP: webhooks, read API, admin socket
# =====================================================================================


class HttpError(ForgeBottleError):
    pass


class Unauthorized(HttpError):
    http_status = 401


class Forbidden(HttpError):
    http_status = 403


class NotFound(HttpError):
    http_status = 404


class BadRequest(HttpError):
    http_status = 400
    exit_code = 2


class AdminError(HttpError):
    http_status = 409


async def _error_response(request: Request, exc: Exception) -> Response:
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


EVENT_TYPE = re.compile(r"[a-z_]{1,64}")
WEBHOOK_HEADERS = frozenset({"content-type", "x-gitea-signature", "x-gitea-event-type", "x-gitea-delivery"})


def _webhook_headers(request: Request) -> dict[str, str]:
    """The headers a webhook is judged by, in one pass (``request.headers.get`` walks and decodes
    every header per look-up). The first of a repeated header wins, as with ``headers.get``."""
    found: dict[str, str] = {}
    for key, value in request.scope["headers"]:
        name = key.decode("latin-1")
        if name in WEBHOOK_HEADERS and name not in found:
            found[name] = value.decode("latin-1")
    return found


def _loopback(request: Request) -> bool:
    if request.client is None:  # a Unix socket
        return True
    host = request.client.host
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(config: Config, store: Store, forge: Forge, *, service: Service | None = None) -> Starlette:
    """The service's HTTP face. The lifespan starts and stops the Service."""
    svc = service or Service(config, store, forge)

    def authorize(request: Request) -> None:
        if config.api_token is not None:
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not config.api_token.matches(value.strip()):
                raise Unauthorized("a valid Authorization: Bearer token is required")
        elif not _loopback(request):
            raise Forbidden("the read API answers loopback clients only unless server.api_token_file is set")

    async def webhook(request: Request) -> Response:
        started = time.perf_counter()
        try:
            # Gitea sends the whole body at once and gives a delivery 5 s in all.
            raw = await read_bounded(request, MAX_WEBHOOK_BYTES, seconds=WEBHOOK_BODY_SECONDS)
        except BodyTooSlow:
            svc.count_webhook("too_slow")
            raise
        if raw is None:
            svc.count_webhook("too_large")
            return JSONResponse({"error": f"body over {MAX_WEBHOOK_BYTES} bytes"}, status_code=413)
        body = raw
        headers = _webhook_headers(request)
        if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            try:
                form = parse_qs(raw.decode(), max_num_fields=16, strict_parsing=False)
                body = form.get("payload", [""])[0].encode()
            except (UnicodeDecodeError, ValueError):
                body = b""
        if config.webhook_secret is not None:
            signature = headers.get("x-gitea-signature", "")
            if not signature or not verify_signature(config.webhook_secret, body, signature):
                svc.count_webhook("unauthorized")
                return JSONResponse({"error": "bad or missing X-Gitea-Signature"}, status_code=401)
        event_type = headers.get("x-gitea-event-type", "")
        if not EVENT_TYPE.fullmatch(event_type):
            svc.count_webhook("malformed")
            return JSONResponse({"error": "missing or malformed X-Gitea-Event-Type"}, status_code=400)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None
        if not isinstance(payload, dict):
            svc.count_webhook("malformed")
            return JSONResponse({"error": "the payload is not a JSON object"}, status_code=400)
        delivery = headers.get("x-gitea-delivery", "")[:64]
        reason = triage(event_type, payload)
        event_id, new = await svc.accept(delivery=delivery, event_type=event_type, body=body, ignore=reason)
        svc.metrics.observe("forgebottle_webhook_seconds", "Webhook intake duration", time.perf_counter() - started)
        if not new:
            return JSONResponse({"status": "ignored", "reason": f"replay of event {event_id}"}, status_code=200)
        if reason:
            return JSONResponse({"status": "ignored", "event": event_id, "reason": reason}, status_code=200)
        # What JSONResponse would render, without json.dumps on the path every new event takes.
        return Response(b'{"status":"queued","event":%d}' % event_id, 202, media_type="application/json")

    async def healthz(request: Request) -> Response:
        counts = store.count_by_status()
        return JSONResponse(
            {
                "status": "ok",
                "version": __version__,
                "forge_user": svc.bot.login if svc.bot else None,
                **{s.value: counts.get(s.value, 0) for s in (BottleState.RUNNING, BottleState.QUEUED)},
            }
        )

    async def metrics(request: Request) -> Response:
        authorize(request)
        counts = store.count_by_status()
        by_state: dict[tuple[tuple[str, str], ...], float] = {
            (("state", s.value),): float(counts.get(s.value, 0)) for s in BottleState
        }
        events: dict[tuple[tuple[str, str], ...], float] = {
            (("status", k),): float(v) for k, v in store.count_events().items()
        }
        text = svc.metrics.render(
            {
                "forgebottle_bottles": ("Bottles by state", by_state),
                "forgebottle_inbox_events": ("Stored webhook events by status", events),
            }
        )
        return PlainTextResponse(redact(text, svc.secrets), media_type="text/plain; version=0.0.4")

    async def bottles(request: Request) -> Response:
        authorize(request)
        return JSONResponse([bottle_view(s) for s in store.all()])

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
        slug = request.path_params["slug"]
        try:
            doc = provenance(store, slug, api_url=config.api_url, org=config.org)
        except BottleError:
            raise NotFound(f"no bottle {slug!r}") from None
        return JSONResponse(doc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = Starlette(
        routes=[
            Route("/webhook", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/api/bottles", bottles, methods=["GET"]),
            Route("/api/events", events, methods=["GET"]),
            Route("/provenance/{slug}", prov, methods=["GET"]),
        ],
        exception_handlers={ForgeBottleError: _error_response},
        lifespan=lifespan,
    )
    app.state.service = svc
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
        service._known(slug)
        await service.destroy(slug, "orchestrate destroy")
        return JSONResponse({"slug": slug, "status": BottleState.DESTROYED.value})

    return Starlette(
        routes=[
            Route("/admin/start", start, methods=["POST"]),
            Route("/admin/resume", resume, methods=["POST"]),
            Route("/admin/destroy", destroy, methods=["POST"]),
        ],
        exception_handlers={ForgeBottleError: _error_response},
    )


# =====================================================================================
# 7. CLI
# =====================================================================================

F = TypeVar("F", bound=Callable[..., Any])


def edge(func: F) -> F:
    """The CLI's one catch: our errors become a one-line message and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ForgeBottleError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None

    return wrapper  # type: ignore[return-value]


config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help=f"TOML config (default: ${ENV_CONFIG})"
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="forgebottle")
def main() -> None:
    """Gitea issues in, pull requests out, by sandboxed agents with an audit trail."""


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _serve_config(app: ASGIApp, listen: str) -> uvicorn.Config:
    where = parse_listen(listen)
    kwargs: dict[str, Any] = {"uds": where} if isinstance(where, str) else {"host": where[0], "port": where[1]}
    # proxy_headers off: the loopback check of the read API must see the real peer.
    return uvicorn.Config(
        app, log_config=None, access_log=False, proxy_headers=False, timeout_graceful_shutdown=10, **kwargs
    )


@main.command()
@config_option
@click.option("--insecure-no-webhook-secret", is_flag=True, help="Accept unsigned webhooks (testing only).")
@edge
def serve(config_file: str | None, insecure_no_webhook_secret: bool) -> None:
    """Run the service: webhooks, sidecars, bottles, watchdog."""
    config = Config.load(
        os.environ, config_path(config_file, os.environ), insecure_no_webhook_secret=insecure_no_webhook_secret
    )
    setup_logging(config.secrets())
    store = Store(config.db_path)
    forge = Gitea(config.api_url, config.token.reveal(), timeout=config.forge_timeout)
    service = Service(config, store, forge)
    service.check_sandbox()
    app = create_app(config, store, forge, service=service)
    # uvicorn re-raises the signal that stopped it once it has shut down; make that a clean
    # exit 0 (running bottles were frozen with "orchestrator stopped") rather than death by SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    if isinstance(parse_listen(config.listen), str):
        # Read API over a socket: restrict it like admin.sock.
        old = os.umask(0o077)
        try:
            run_server(app, config.listen)
        finally:
            os.umask(old)
    else:
        run_server(app, config.listen)


def run_server(app: ASGIApp, listen: str) -> None:
    """Serve ``app`` until a signal stops it (``serve``, and the benchmarks' targets)."""
    server = uvicorn.Server(_serve_config(app, listen))
    # What is alive now (modules, the app, the config) lives as long as the process. Left in
    # the collector, every full collection walks all of it: under a webhook burst that was a
    # ~10 ms pause about once a second, collecting nothing (seen with gc.callbacks), and the
    # p99 of intake doubled. Frozen objects are never collected (nothing here becomes garbage).
    gc.freeze()
    server.run()
    if not server.started:
        raise ForgeBottleError(f"could not listen on {listen}")


@main.command()
@click.option("--port", type=int, default=3000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--dir", "root", type=click.Path(file_okay=False), help="Where repositories live (default: a temp dir)")
@edge
def devforge(port: int, host: str, root: str | None) -> None:
    """Serve a Gitea-compatible development forge, seeded with users, an org and a repo."""
    import devforge as df

    base = Path(root) if root else Path(tempfile.mkdtemp(prefix="devforge-"))
    forge = df.DevForge(base, base_url=f"http://{host}:{port}/")
    seeded = df.seed(forge)
    click.echo(f"devforge on http://{host}:{port}/ (repos in {base})")
    click.echo(f"  API:      http://{host}:{port}/api/v1   repo {seeded.owner}/{seeded.repo}, org {seeded.org}")
    for user in (seeded.admin, seeded.bot, seeded.member, seeded.outsider):
        click.echo(f"  user {user.login:12} token {user.token}")
    uvicorn.run(forge.app, host=host, port=port, log_level="warning")


@main.group()
def orchestrate() -> None:
    """Launch, resume and destroy bottles by hand; show them."""


def _admin(path: str, payload: dict[str, Any]) -> dict[str, Any]:
    config = Config.load(os.environ, config_path(None, os.environ), require_forge=False)
    sock = config.admin_socket
    if not sock.exists():
        raise ForgeBottleError(f"the server is not running ({sock} does not exist)")
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, base_url="http://forgebottle", timeout=120) as client:
            response = client.post(path, json=payload)
    except httpx.HTTPError as exc:
        raise ForgeBottleError(f"cannot reach the server over {sock}: {exc}") from None
    data = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code != 200:
        raise ForgeBottleError(str(data.get("error") or f"server answered {response.status_code}"))
    return dict(data)


@orchestrate.command("start")
@click.option("--repo", required=True, help="OWNER/REPO")
@click.option("--issue", type=int, required=True)
@click.option("--agent", required=True)
@click.option("--bottle", "bottles", multiple=True)
@click.option("--prompt", default="")
@edge
def orchestrate_start(repo: str, issue: int, agent: str, bottles: tuple[str, ...], prompt: str) -> None:
    """Launch a bottle for an issue."""
    data = _admin(
        "/admin/start", {"repo": repo, "issue": issue, "agent": agent, "bottles": list(bottles), "prompt": prompt}
    )
    click.echo(f"{data['slug']} {data['status']}")


@orchestrate.command("resume")
@click.option("--slug", required=True)
@click.option("--prompt", required=True)
@edge
def orchestrate_resume(slug: str, prompt: str) -> None:
    """Rehydrate a frozen bottle with a prompt (kept pending while it runs)."""
    data = _admin("/admin/resume", {"slug": slug, "prompt": prompt})
    click.echo(f"{data['slug']} {data['status']}")


@orchestrate.command("destroy")
@click.option("--slug", required=True)
@edge
def orchestrate_destroy(slug: str) -> None:
    """Destroy a bottle: agent killed, workspace removed, record kept."""
    data = _admin("/admin/destroy", {"slug": slug})
    click.echo(f"{data['slug']} {data['status']}")


def _age(stamp: str | None) -> str:
    if not stamp:
        return "-"
    try:
        then = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return "-"
    seconds = max(0, int((dt.datetime.now(dt.UTC) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _open_store_readonly(config: Config) -> Store | None:
    return Store(config.db_path) if config.db_path.exists() else None


@orchestrate.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "show_all", is_flag=True, help="Include destroyed bottles.")
@edge
def orchestrate_status(as_json: bool, show_all: bool) -> None:
    """Live bottles, straight from SQLite (works with the server down)."""
    config = Config.load(os.environ, config_path(None, os.environ), require_forge=False)
    store = _open_store_readonly(config)
    states = store.all(live_only=not show_all) if store else []
    if as_json:
        click.echo(json.dumps([bottle_view(s) for s in states], indent=2))
        return
    if not states:
        click.echo("no live bottles")
        return
    rows = [("SLUG", "STATE", "AGENT", "AGE", "CHECK-IN", "ISSUE", "PR")]
    for s in states:
        rows.append(
            (
                s.slug,
                s.status.value,
                s.agent_name,
                _age(s.created_at),
                _age(s.last_checkin_at),
                s.issue_url or f"{s.owner}/{s.repo}#{s.issue_number}",
                s.pr_url or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    # One write: echo flushes, and a line at a time costs a syscall per bottle.
    click.echo(
        "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows)
    )


@main.command("provenance")
@click.argument("slug")
@click.option("--verify", is_flag=True, help="Recompute the hash chain; exit 1 if it is broken.")
@edge
def provenance_command(slug: str, verify: bool) -> None:
    """Print a bottle's provenance record."""
    config = Config.load(os.environ, config_path(None, os.environ), require_forge=False)
    store = _open_store_readonly(config)
    if store is None:
        raise NotFound(f"no state at {config.state_dir}")
    doc = provenance(store, slug, api_url=config.api_url, org=config.org)
    if verify:
        chain = doc["chain"]
        if not chain["verified"]:
            raise ForgeBottleError(f"chain broken at operation {chain['broken_seq']}: {chain['problem']}")
        click.echo(f"{slug}: chain verified ({len(doc['operations'])} operations, head {chain['head'][:16]})")
        return
    click.echo(json.dumps(doc, indent=2))


@main.command()
@config_option
@edge
def check(config_file: str | None) -> None:
    """Validate the config, reach the forge, check the token's user and the org."""
    problems = asyncio.run(_check(config_path(config_file, os.environ)))
    if problems:
        raise ForgeBottleError(f"{problems} problem(s) found")


async def _check(path: Path | None) -> int:
    problems = 0

    def say(ok: bool, text: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        click.echo(f"{'ok ' if ok else 'FIX'}  {text}")

    try:
        config = Config.load(os.environ, path)
    except ConfigError as exc:
        say(False, f"config: {exc}")
        return problems
    say(True, f"config: forge {config.api_url}, org {config.org}, state {config.state_dir}")
    say(bool(config.agents), f"agents: {', '.join(config.agents) or 'none configured ([agents.<name>])'}")
    say(config.webhook_secret is not None, "webhook secret " + ("set" if config.webhook_secret else "NOT set"))
    problem = sandbox_problem(config, find_bwrap())
    say(problem is None, problem or f"sandbox: {find_bwrap() or 'not needed'}")
    forge = Gitea(config.api_url, config.token.reveal(), timeout=min(config.forge_timeout, 10))
    try:
        user = await forge.current_user()
        say(True, f"forge: reachable; the token belongs to {user.login}")
        if not await forge.org_exists(config.org):
            say(False, f"org {config.org!r} does not exist on the forge (set {ENV_ORG})")
        else:
            try:
                member = await forge.is_org_member(config.org, user.login)
                say(
                    member,
                    f"{user.login} is {'a member' if member else 'NOT a member'} of {config.org}"
                    + ("" if member else "; the token must see the org's members"),
                )
            except OrgNotVisible as exc:
                say(False, str(exc))
    except ForgeError as exc:
        hint = (
            " (check FORGE_TOKEN)"
            if exc.status == 401
            else " (check FORGE_GITEA_API)"
            if exc.status is None or isinstance(exc, ForgeUnavailable)
            else ""
        )
        say(False, f"forge: {exc}{hint}")
    finally:
        await forge.aclose()
    return problems


# =====================================================================================
# 8. Demo: the whole loop on this machine
# =====================================================================================

DEMO_AGENT = r"""#!/bin/sh
# The demo agent: uses nothing but git and the forge tool.
set -eu
issue="$FORGE_ISSUE_NUMBER"
if [ -z "${FORGE_PR_NUMBER:-}" ] && ! grep -q "New input since your last run" "$FORGE_PROMPT_FILE"; then
  forge read-issue "$issue" > /dev/null
  forge comment "$issue" "Looking into this now: I will open a pull request shortly."
  printf 'Hello from forgebottle (issue #%s).\n' "$issue" > HELLO.md
  git add HELLO.md
  git commit -q -m "Add HELLO.md for #$issue"
  forge push
  forge open-pr --title "Add HELLO.md" --body "Adds HELLO.md as asked in #$issue."
  forge done success "Opened a pull request with HELLO.md"
else
  pr=$(forge whoami | python3 -c 'import json,sys; print(json.load(sys.stdin)["pr"])')
  printf '\nReviewed and updated after feedback.\n' >> HELLO.md
  git commit -q -am "Address review on #$pr"
  forge push
  forge comment "$pr" "Thanks for the review: updated HELLO.md as requested."
  forge done success "Addressed the review comment"
fi
"""


@main.command()
@click.option("--keep", is_flag=True, help="Keep the temporary state directory.")
@edge
def demo(keep: bool) -> None:
    """The whole loop on this machine: devforge, serve, a scripted agent, review, merge."""
    root = Path(tempfile.mkdtemp(prefix="fbdemo-"))
    try:
        code = asyncio.run(run_demo(root, click.echo))
    finally:
        if keep:
            click.echo(f"state kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if code:
        raise ForgeBottleError("demo failed")


async def _until(predicate: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise ForgeBottleError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def run_demo(root: Path, echo: Callable[[str], None]) -> int:
    import devforge as df

    t0 = time.monotonic()

    def step(text: str) -> None:
        echo(f"[{time.monotonic() - t0:5.1f}s] {text}")

    forge_thread = df.ServerThread()
    forge_url = forge_thread.url + "/"
    serve_sock = df.loopback_socket()
    serve_port = serve_sock.getsockname()[1]
    dev = df.DevForge(root / "forge", base_url=forge_url)
    world = df.seed(dev)
    forge_thread.app = dev.app
    forge_thread.start()
    step(f"devforge up at {forge_url} with org {world.org}, repo {world.owner}/{world.repo}, bot {world.bot.login}")

    secret = os.urandom(16).hex()
    tools = root / "state" / "tools"
    tools.mkdir(parents=True)
    (tools / "demo-agent").write_text(DEMO_AGENT)
    (tools / "demo-agent").chmod(0o755)
    config = Config(
        api_url=f"{forge_url}api/v1",
        token=Secret(world.bot.token),
        webhook_secret=Secret(secret),
        state_dir=root / "state",
        org=world.org,
        listen=f"127.0.0.1:{serve_port}",
        agents={
            "demo": AgentSpec(
                "demo", ("/bin/sh", "/opt/forgebottle/bin/demo-agent"), ("/bin/sh", "/opt/forgebottle/bin/demo-agent")
            )
        },
        bottles={"local": BottleSpec()} if find_bwrap() else {"local": BottleSpec(sandbox="none")},
        done_grace=10.0,
        watchdog_timeout=120.0,
        watchdog_interval=5.0,
    )
    store = Store(config.db_path)
    gitea = Gitea(config.api_url, config.token.reveal())
    service = Service(config, store, gitea)
    app = create_app(config, store, gitea, service=service)
    server = QuietServer(uvicorn.Config(app, log_config=None, access_log=False))
    serve_task = asyncio.create_task(server.serve(sockets=[serve_sock]))
    await _until(lambda: server.started or serve_task.done(), "serve to start")
    if serve_task.done():
        serve_task.result()
    step(f"forgebottle serving on 127.0.0.1:{serve_port}, sandbox: {'bwrap' if find_bwrap() else 'NONE'}")
    dev.add_hook(world.owner, world.repo, f"http://127.0.0.1:{serve_port}/webhook", secret)

    seen_transitions = 0
    seen_ops = 0

    def report(slug: str) -> None:
        nonlocal seen_transitions, seen_ops
        for tr in store.transitions(slug)[seen_transitions:]:
            step(f"bottle {slug}: {tr['source']} -> {tr['dest']} ({tr['trigger']}: {tr['reason'][:70]})")
            seen_transitions += 1
        for op in store.operations(slug)[seen_ops:]:
            step(f"  agent: {op.detail}")
            seen_ops += 1

    def status_is(slug: str, wanted: BottleState, runs: int) -> Callable[[], bool]:
        def check() -> bool:
            report(slug)
            state = store.by_slug(slug)
            return state is not None and state.status is wanted and len(store.runs(slug)) >= runs

        return check

    try:
        issue = dev.create_issue(
            world.owner,
            world.repo,
            title="Add a HELLO.md",
            user=world.member.login,
            body="Please add a HELLO.md that greets the reader.",
            labels=["bot-bottle:demo"],
            assignees=[world.member.login],
        )
        step(f"issue #{issue.number} opened by {world.member.login}, labelled bot-bottle:demo, assigned")
        await _until(lambda: store.get(world.owner, world.repo, issue.number) is not None, "the launch")
        state = store.get(world.owner, world.repo, issue.number)
        assert state is not None
        slug = state.slug
        await _until(status_is(slug, BottleState.FROZEN, 1), "the first run to finish")
        state = store.by_slug(slug)
        assert state is not None and state.pr_number is not None
        step(f"pull request #{state.pr_number} open: {state.pr_url}")
        dev.review(
            world.owner,
            world.repo,
            state.pr_number,
            "Nearly there: could you add a closing line?",
            user=world.member.login,
            kind="rejected",
        )
        step(f"{world.member.login} (org member) reviewed the PR, requesting changes: rehydrating")
        await _until(status_is(slug, BottleState.FROZEN, 2), "the second run to finish")
        dev.merge_pr(world.owner, world.repo, state.pr_number, user=world.member.login)
        step(f"{world.member.login} merged pull request #{state.pr_number}")
        await _until(status_is(slug, BottleState.DESTROYED, 2), "the bottle to be destroyed")
        doc = provenance(store, slug, api_url=config.api_url, org=config.org)
        step("provenance:")
        echo(f"  slug {doc['slug']}  agent {doc['agent']}  status {doc['status']}  sandbox {doc['sandbox']}")
        for run in doc["runs"]:
            signalled = run["signalled"] or {}
            echo(
                f"  run {run['n']}: trigger {run['trigger']}, exit {run['exit_code']}, "
                f"signalled {signalled.get('status')}: {signalled.get('summary', '')}"
            )
        echo(
            f"  {len(doc['operations'])} operations, {len(doc['transitions'])} transitions, "
            f"chain {'verified' if doc['chain']['verified'] else 'BROKEN'} (head {doc['chain']['head'][:16]})"
        )
        step("demo complete")
        return 0 if doc["chain"]["verified"] else 1
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await serve_task
        forge_thread.stop()
        dev.close()
        store.close()


if __name__ == "__main__":
    main()
