"""Configuration: one frozen ``Config``, read once at start-up (defaults < TOML < environment).

Secrets come from files or the environment, never from the TOML, and live in ``Secret``s that
do not print themselves; ``redact`` is the one function that scrubs them from any text that
leaves the process (logs, and everything the sidecar sends an agent).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hmac
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from statemachine import ForgeBottleError

VERSION = "0.1.0"


class Secret:
    """A string that does not print itself (after starlette's ``Secret``)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def reveal(self) -> str:
        return self._value

    def matches(self, candidate: str) -> bool:
        """Constant-time comparison."""
        return hmac.compare_digest(self._value.encode(), candidate.encode())


def secret_forms(secrets: Iterable[str]) -> list[tuple[bytes, str]]:
    """(bytes, kind) for each secret and, as defence in depth, its base64 (at the three
    alignments it can take inside a longer encoded text) and hex encodings."""
    forms: list[tuple[bytes, str]] = []
    for secret in secrets:
        raw = secret.encode(errors="surrogatepass")
        if not raw:
            continue
        forms.append((raw, "forge credential"))
        if len(raw) < 8:
            continue  # short strings' encodings would match by chance
        for pad in range(3):
            encoded = base64.b64encode(b"\0" * pad + raw)
            # Only the characters that depend on the secret's bytes alone.
            start, end = -(-4 * pad // 3), 4 * (pad + len(raw)) // 3
            for variant in (encoded, encoded.translate(bytes.maketrans(b"+/", b"-_"))):
                forms.append((variant[start:end], "forge credential (base64)"))
        forms += [(form, "forge credential (hex)") for form in (raw.hex().encode(), raw.hex().upper().encode())]
    return forms


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret, and each encoding of it ``secret_forms`` knows, as ``***``: the
    one redaction of what leaves forgebottle (logs, and everything the sidecar tells an agent)."""
    for form in _redacted_forms(tuple(secrets)):
        if form in text:
            text = text.replace(form, "***")
    return text


@functools.lru_cache(maxsize=64)
def _redacted_forms(secrets: tuple[str, ...]) -> tuple[str, ...]:
    """The strings ``redact`` replaces, longest first; the same few secrets are asked for on
    every log line and every answer to an agent, so they are worked out once."""
    present = sorted({s for s in secrets if s}, key=len, reverse=True)
    encodings = [form.decode() for form, kind in secret_forms(present) if kind != "forge credential"]
    return (*present, *encodings)


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """``[agents.<name>]`` of the config."""

    name: str
    command: tuple[str, ...]
    resume_command: tuple[str, ...]
    network: Literal["none", "gateway", "host"] = "none"
    env: tuple[tuple[str, Secret], ...] = ()
    timeout: float | None = None
    ro_binds: tuple[str, ...] = ()
    model: str | None = None  # a [models.<name>] route, reached through the gateway
    egress: tuple[str, ...] = ()  # added to [egress].allow for this agent
    budget_tokens: int | None = None  # per run
    issue_budget_tokens: int | None = None  # over all runs of one bottle


@dataclasses.dataclass(frozen=True)
class BottleSpec:
    """``[bottles.<name>]``: how an agent is contained. ``local`` is built in."""

    name: str = "local"
    backend: Literal["local", "command"] = "local"
    sandbox: Literal["bwrap", "none"] = "bwrap"
    start: tuple[str, ...] = ()
    resume: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    destroy: tuple[str, ...] = ()


BACKENDS = ("local", "command")
SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def valid_slug(slug: str) -> bool:
    """A bottle's name: also a directory name under the state dir, so never a path."""
    return bool(SLUG_RE.fullmatch(slug)) and ".." not in slug


# The hosts each ``ecosystem:<name>`` egress entry opens: entries as in ``[egress].allow``
# (``*.suffix`` matches subdomains only; no port means 443).
EGRESS_PRESETS: Mapping[str, tuple[str, ...]] = {
    "python": ("pypi.org", "files.pythonhosted.org", "pypi.python.org"),
    "node": ("registry.npmjs.org", "registry.yarnpkg.com", "nodejs.org"),
    "debian": (
        "deb.debian.org",
        "deb.debian.org:80",
        "security.debian.org",
        "security.debian.org:80",
        "ftp.debian.org",
        "ftp.debian.org:80",
    ),
    "rust": ("crates.io", "index.crates.io", "static.crates.io", "static.rust-lang.org", "sh.rustup.rs"),
    "go": ("proxy.golang.org", "sum.golang.org", "index.golang.org", "go.dev", "dl.google.com"),
    "github": (
        "github.com",
        "*.github.com",
        "*.githubusercontent.com",
        "codeload.github.com",
        "ghcr.io",
        "pkg-containers.githubusercontent.com",
    ),
    "anthropic": ("api.anthropic.com",),
    "openai": ("api.openai.com",),
    "google": ("generativelanguage.googleapis.com", "aiplatform.googleapis.com", "oauth2.googleapis.com"),
}
_EGRESS_ENTRY = re.compile(r"^(\*\.)?[a-z0-9_](?:[a-z0-9_.-]{0,252})(?::(\d{1,5}))?$")


@dataclasses.dataclass(frozen=True)
class EgressSpec:
    """``[egress]``: what bottles with ``network = "gateway"`` may reach (DESIGN.md §10)."""

    allow: tuple[str, ...] = ()
    block: tuple[str, ...] = ()
    read_only: bool = False
    resolve: tuple[tuple[str, str], ...] = ()  # (name, address): the only way to a non-public address
    max_connections: int = 64  # open at once, per bottle
    max_bytes: int = 4 * 1024**3  # up and down, per run
    idle_timeout: float = 300.0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """``[models.<name>]``: a model API the gateway forwards to with the real credential.

    The credential is read lazily (``Config.load(require_forge=False)`` leaves it None), so
    read-only commands never need the key to be readable."""

    name: str
    api: Literal["anthropic", "openai"]
    upstream: str
    credential_source: str
    credential: Secret | None = None


# What of the host a bottle sees, read-only. Never "/": that would show the token file and
# the state dir. /etc only by entry, so that a secret kept under /etc stays out.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_ENTRIES = (
    "alternatives",
    "ca-certificates",
    "ssl",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "host.conf",
    "resolv.conf",
    "gitconfig",
    "mime.types",
    "protocols",
    "services",
    "os-release",
)


def system_binds() -> list[tuple[str, str]]:
    """(kind, path) for what the sandbox shows of the host: symlinks kept as symlinks."""
    binds: list[tuple[str, str]] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            binds.append(("symlink", path))
        elif os.path.isdir(path):
            binds.append(("ro-bind", path))
    for entry in ETC_ENTRIES:
        path = f"/etc/{entry}"
        if os.path.lexists(path):
            binds.append(("ro-bind", path))
    return binds


def exposed(path: Path, extra: Sequence[str] = ()) -> str | None:
    """The bound host path under which ``path`` would be visible in a bottle, if any."""
    target = Path(os.path.realpath(path))
    for kind, bound in system_binds():
        if kind == "ro-bind" and (target == Path(bound) or Path(bound) in target.parents):
            return bound
    for bound in extra:
        real = Path(os.path.realpath(bound))
        if target == real or real in target.parents:
            return bound
    return None


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

_TOP_KEYS = {"forge", "watchdog", "server", "sidecar", "agents", "bottles", "egress", "models", "ci", "provenance"}
_SECTION_KEYS = {
    "forge": {"api_url", "token_file", "webhook_secret_file", "org", "timeout"},
    "watchdog": {"timeout", "interval"},
    "server": {"state_dir", "listen", "api_token_file", "max_running", "event_retries", "public_url"},
    "sidecar": {"writes_per_hour", "done_grace"},
    "egress": {"allow", "block", "read_only", "resolve", "max_connections", "max_bytes", "idle_timeout"},
    "ci": {"max_fix_attempts"},
    "provenance": {"anchor"},
}
_AGENT_KEYS = {
    "command",
    "resume_command",
    "network",
    "env",
    "timeout",
    "ro_binds",
    "model",
    "egress",
    "budget_tokens",
    "issue_budget_tokens",
}
_MODEL_KEYS = {"api", "upstream", "credential"}
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


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40})


def parse_size(value: Any, key: str) -> int:
    """``4GiB``, ``500MB`` or plain bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match or int(match.group(1)) <= 0:
        raise ConfigError(f"{key}: {value!r} is not a size (use 4GiB, 500MB or bytes)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


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
    public_url: str = ""
    egress: EgressSpec = EgressSpec()
    models: Mapping[str, ModelSpec] = dataclasses.field(default_factory=dict)
    # The conversation on the forge (conversation.py, DESIGN.md §12).
    ci_max_fix_attempts: int = 3
    status_edit_interval: float = 5.0
    anchor: str = ""  # "forge": each freeze writes the chain head into the status comment

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
        out += [m.credential.reveal() for m in self.models.values() if m.credential]
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
        ci = toml.get("ci", {})
        anchor = toml.get("provenance", {}).get("anchor", "")
        if anchor not in ("", "none", "forge"):
            raise ConfigError(f'provenance.anchor: {str(anchor)[:40]!r} is not "forge" or "none"')
        attempts = ci.get("max_fix_attempts", 3)
        if not isinstance(attempts, int) or isinstance(attempts, bool) or not 0 <= attempts <= 100:
            raise ConfigError(f"ci.max_fix_attempts: {str(attempts)[:40]!r} is not a number from 0 to 100")
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
        public_url = str(server.get("public_url") or "").rstrip("/")
        if public_url and not re.match(r"^https?://[^/\s]+", public_url):
            raise ConfigError(f"server.public_url: {public_url!r} is not an http(s) URL")
        agents = {name: _agent(name, spec, environ) for name, spec in toml.get("agents", {}).items()}
        models = {
            name: _model(name, spec, environ, load_credential=require_forge)
            for name, spec in _table(toml.get("models", {}), "models").items()
        }
        _check_routes(agents, models)
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
            public_url=public_url,
            ci_max_fix_attempts=attempts,
            anchor="forge" if anchor == "forge" else "",
            secret_files=tuple(
                (base / str(f)).expanduser()
                for f in (
                    environ.get(ENV_TOKEN_FILE) or forge.get("token_file"),
                    environ.get(ENV_WEBHOOK_SECRET_FILE) or forge.get("webhook_secret_file"),
                    environ.get(ENV_API_TOKEN_FILE) or server.get("api_token_file"),
                )
                if f
            )
            # A model's key file must stay out of every bottle as the token's does.
            + tuple(
                Path(m.credential_source[5:]).expanduser()
                for m in models.values()
                if m.credential_source[:5] == "file:"
            ),
            egress=_egress(toml.get("egress", {})),
            models=models,
        )
        config.check_secrets_stay_out()
        return config

    def read_api_problem(self) -> str | None:
        """Why ``serve`` must not start with this read API, if it must not.

        An agent with ``network = "host"`` is a loopback client like any other: with such an
        agent configured, loopback proves nothing, so the read API needs its bearer token or a
        Unix socket (whose mode keeps bottles out)."""
        host = sorted(a.name for a in self.agents.values() if a.network == "host")  # not "gateway": its own netns
        if host and self.api_token is None and not self.listen.startswith("unix:"):
            return (
                f'agents {", ".join(host)} have network = "host" and so could read the read API as a '
                "loopback client: set server.api_token_file (or FORGEBOTTLE_API_TOKEN) or listen on unix:/path"
            )
        return None

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
    if network not in ("none", "gateway", "host"):
        raise ConfigError(f'{key}.network: {network!r} must be "none", "gateway" or "host"')
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
    model = spec.get("model")
    if model is not None and (not isinstance(model, str) or network != "gateway"):
        raise ConfigError(f'{key}.model: must name a [models.<name>] route, with network = "gateway"')
    budgets = {k: _positive_int(spec[k], f"{key}.{k}") if k in spec else None for k in _BUDGETS}
    return AgentSpec(
        name,
        command,
        resume,
        network,
        tuple(env),
        timeout,
        tuple(ro_binds),
        model=model,
        egress=_egress_entries(spec.get("egress", []), f"{key}.egress"),
        **budgets,
    )


_BUDGETS = ("budget_tokens", "issue_budget_tokens")


def _table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table")
    return value


def _egress_entries(value: Any, key: str) -> tuple[str, ...]:
    """Entries are ``host``, ``*.suffix``, ``host:port`` or ``ecosystem:<name>``, kept lower case
    and in IDNA form, as the gateway compares them."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of strings")
    entries = []
    for raw in value:
        if raw.startswith("ecosystem:"):
            if raw[10:] not in EGRESS_PRESETS:
                raise ConfigError(f"{key}: {raw!r}: no such ecosystem (one of {', '.join(EGRESS_PRESETS)})")
            entries.append(raw)
            continue
        try:
            entry = raw.strip().rstrip(".").lower().encode("idna").decode("ascii")
        except UnicodeError:
            entry = ""
        match = _EGRESS_ENTRY.match(entry)
        if not match or (match.group(2) and not 0 < int(match.group(2)) < 65536):
            raise ConfigError(f"{key}: {raw!r} is not host, *.suffix, host:port or ecosystem:<name>")
        entries.append(entry)
    return tuple(entries)


def _egress(spec: Any) -> EgressSpec:
    read_only = spec.get("read_only", False)
    if not isinstance(read_only, bool):
        raise ConfigError("egress.read_only: must be true or false")
    resolve = _table(spec.get("resolve", {}), "egress.resolve")
    pairs = []
    for name, address in resolve.items():
        try:
            ipaddress.ip_address(address)
        except (TypeError, ValueError):
            raise ConfigError(f"egress.resolve.{name}: {address!r} is not an IP address") from None
        pairs.append((_egress_entries([name], f"egress.resolve.{name}")[0], str(address)))
    return EgressSpec(
        allow=_egress_entries(spec.get("allow", []), "egress.allow"),
        block=_egress_entries(spec.get("block", []), "egress.block"),
        read_only=read_only,
        resolve=tuple(pairs),
        max_connections=_positive_int(spec.get("max_connections", 64), "egress.max_connections"),
        max_bytes=parse_size(spec.get("max_bytes", "4GiB"), "egress.max_bytes"),
        idle_timeout=parse_duration(spec.get("idle_timeout", "5m"), "egress.idle_timeout"),
    )


def _model(name: str, spec: Any, environ: Mapping[str, str], *, load_credential: bool) -> ModelSpec:
    key = f"models.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f"{key}: model names are letters, digits, '.', '_' and '-'")
    bad = sorted(set(_table(spec, key)) - _MODEL_KEYS)
    if bad:
        raise ConfigError(f"{key}.{bad[0]}: unknown key")
    api = spec.get("api")
    if api not in ("anthropic", "openai"):
        raise ConfigError(f'{key}.api: {api!r} must be "anthropic" or "openai"')
    upstream = spec.get("upstream")
    if not isinstance(upstream, str) or not re.match(r"^https?://[^/\s]+", upstream):
        raise ConfigError(f"{key}.upstream: {upstream!r} is not an http(s) URL")
    source = spec.get("credential")
    if not isinstance(source, str) or not source.startswith(("file:", "env:")):
        raise ConfigError(f"{key}.credential: must be file:/path or env:NAME (never the key itself)")
    model = ModelSpec(name, api, upstream.rstrip("/"), source)
    return dataclasses.replace(model, credential=model_credential(model, environ)) if load_credential else model


def model_credential(model: ModelSpec, environ: Mapping[str, str]) -> Secret:
    """Read a model's key from its ``file:`` or ``env:`` source."""
    key, source = f"models.{model.name}.credential", model.credential_source
    if source.startswith("env:"):
        value = environ.get(source[4:], "").strip()
        if not value:
            raise ConfigError(f"{key}: {source[4:]} is not set in forgebottle's environment")
        return Secret(value)
    try:
        value = Path(source[5:]).expanduser().read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {source[5:]}: {exc.strerror}") from None
    if not value:
        raise ConfigError(f"{key}: {source[5:]} is empty")
    return Secret(value)


def _check_routes(agents: Mapping[str, AgentSpec], models: Mapping[str, ModelSpec]) -> None:
    for agent in agents.values():
        if agent.model is not None and agent.model not in models:
            raise ConfigError(f"agents.{agent.name}.model: {agent.model!r} is not a configured [models.<name>]")


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
