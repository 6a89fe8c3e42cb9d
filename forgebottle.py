"""forgebottle: Gitea issues in, pull requests out, by sandboxed agents with an audit trail.

The entry point: the command line and logging. Each command imports only what it needs, so
``--version`` and ``orchestrate status`` stay fast; the service itself is ``service.py``, its
HTTP face ``web.py``.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

from config import ENV_CONFIG, Config, ConfigError, config_path, parse_listen, redact
from config import VERSION as __version__
from statemachine import ForgeBottleError

if TYPE_CHECKING:
    from store import Store


log = logging.getLogger("forgebottle")


FIELDS = ("slug", "event", "trigger", "op", "outcome", "status", "reason", "source", "dest", "event_id")
# syslog priorities: journald reads a "<N>" prefix on each line as the line's priority, so
# `journalctl -p warning` finds forgebottle's warnings and errors.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def priority(record: logging.LogRecord) -> int:
    return PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, every secret redacted; ``journald``: with a priority prefix."""

    def __init__(self, secrets: Sequence[str] = (), *, journald: bool = False) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "PRIORITY": priority(record),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = redact(json.dumps(entry, default=str), self.secrets)
        return f"<{entry['PRIORITY']}>{line}" if self.journald else line


class TextFormatter(logging.Formatter):
    """For a terminal: time, level, message, and the fields that apply."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = " ".join(f"{f}={getattr(record, f)}" for f in FIELDS if getattr(record, f, ""))
        line = f"{when} {record.levelname:<7} {record.getMessage()}" + (f"  [{fields}]" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line, self.secrets)


LOG_FORMATS = ("auto", "json", "text")


def setup_logging(
    secrets: Sequence[str], level: int = logging.INFO, stream: Any = None, log_format: str = "auto"
) -> None:
    """``auto``: JSON (with journald priorities under systemd), text on a terminal."""
    out = stream or sys.stderr
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    if log_format == "auto":
        log_format = "text" if not journald and getattr(out, "isatty", lambda: False)() else "json"
    formatter = TextFormatter(secrets) if log_format == "text" else JsonFormatter(secrets, journald=journald)
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
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


log_format_option = click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="auto",
    show_default=True,
    help="auto: JSON under systemd or when piped, text on a terminal.",
)


@main.command()
@config_option
@log_format_option
@click.option("--insecure-no-webhook-secret", is_flag=True, help="Accept unsigned webhooks (testing only).")
@edge
def serve(config_file: str | None, log_format: str, insecure_no_webhook_secret: bool) -> None:
    """Run the service: webhooks, sidecars, bottles, watchdog."""
    import asyncio

    import uvicorn

    from gitea import Gitea
    from service import Service
    from serving import bind_listener, lock_state_dir, raise_file_limit, server_config
    from store import Store
    from web import create_app

    config = Config.load(
        os.environ, config_path(config_file, os.environ), insecure_no_webhook_secret=insecure_no_webhook_secret
    )
    setup_logging(config.secrets(), log_format=log_format)
    problem = config.read_api_problem()
    if problem:
        raise ConfigError(problem)
    lock = lock_state_dir(config.state_dir)
    files = raise_file_limit()
    asyncio.run(_token_accepted(config))
    store = Store(config.db_path)
    service = Service(config, store, Gitea(config.api_url, config.token.reveal(), timeout=config.forge_timeout))
    service.check_sandbox()
    old = os.umask(0o077)  # a unix: listener is restricted like admin.sock
    try:
        sock = bind_listener(parse_listen(config.listen))
    finally:
        os.umask(old)

    def reload() -> Config:
        return Config.load(
            os.environ, config_path(config_file, os.environ), insecure_no_webhook_secret=insecure_no_webhook_secret
        )

    server = uvicorn.Server(server_config(create_app(config, service, reload=reload)))
    # uvicorn re-raises the signal that stopped it once it has shut down; make that a clean
    # exit 0 (running bottles were frozen with "orchestrator stopped") rather than death by SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    said = (
        f"on {config.listen}; sandbox {service.sandbox_name()}; agents {', '.join(config.agents) or 'none'}; "
        f"forge {config.api_url}; org {config.org}; state {config.state_dir}"
    )
    log.info("forgebottle %s serving %s; up to %d open files", __version__, said, files)
    try:
        server.run(sockets=[sock])
    finally:
        log.info("forgebottle %s stopped %s", __version__, said)
        os.close(lock)


async def _token_accepted(config: Config) -> None:
    """Refuse to start on a token the forge refuses; an unreachable forge is only a warning
    (webhooks are stored meanwhile, and /healthz says 503 until it answers)."""
    from gitea import ForgeAuthError, ForgeUnavailable, Gitea

    forge = Gitea(config.api_url, config.token.reveal(), timeout=min(config.forge_timeout, 10.0))
    try:
        user = await forge.current_user()
        log.info("the forge token belongs to %s", user.login)
    except ForgeAuthError as exc:
        raise ForgeBottleError(
            f"the forge refused the token ({exc.status}): check FORGE_TOKEN / forge.token_file"
        ) from None
    except ForgeUnavailable as exc:
        log.warning("the forge is unreachable (%s); serving anyway and retrying", exc)
    finally:
        await forge.aclose()


@main.command()
@click.option("--port", type=int, default=3000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--dir", "root", type=click.Path(file_okay=False), help="Where repositories live (default: a temp dir)")
@click.option("--flavor", type=click.Choice(("gitea", "forgejo")), default="gitea", show_default=True)
@edge
def devforge(port: int, host: str, root: str | None, flavor: Literal["gitea", "forgejo"]) -> None:
    """Serve a Gitea-compatible development forge, seeded with users, an org and a repo."""
    import devforge as df

    base = Path(root) if root else Path(tempfile.mkdtemp(prefix="devforge-"))
    forge = df.DevForge(base, base_url=f"http://{host}:{port}/", flavor=flavor)
    seeded = df.seed(forge)
    click.echo(f"devforge on http://{host}:{port}/ (repos in {base})")
    click.echo(f"  API:      http://{host}:{port}/api/v1   repo {seeded.owner}/{seeded.repo}, org {seeded.org}")
    for user in (seeded.admin, seeded.bot, seeded.member, seeded.outsider):
        click.echo(f"  user {user.login:12} token {user.token}")
    import uvicorn

    uvicorn.run(forge.app, host=host, port=port, log_level="warning")


@main.group()
def orchestrate() -> None:
    """Launch, resume and destroy bottles by hand; show them."""


def _load(config_file: str | None) -> Config:
    """The config of a command that reads state only: it needs no secret."""
    return Config.load(os.environ, config_path(config_file, os.environ), require_forge=False)


def _admin(config_file: str | None, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    import httpx

    sock = _load(config_file).admin_socket
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


def _owner_repo(ctx: click.Context, param: click.Parameter, value: str) -> str:
    owner, sep, repo = value.partition("/")
    if not sep or not owner or not repo or "/" in repo:
        raise click.BadParameter("must be OWNER/REPO")
    return value


@orchestrate.command("start")
@config_option
@click.option("--repo", required=True, help="OWNER/REPO", callback=_owner_repo)
@click.option("--issue", type=int, required=True)
@click.option("--agent", required=True)
@click.option("--bottle", "bottles", multiple=True)
@click.option("--prompt", default="")
@edge
def orchestrate_start(
    config_file: str | None, repo: str, issue: int, agent: str, bottles: tuple[str, ...], prompt: str
) -> None:
    """Launch a bottle for an issue."""
    data = _admin(
        config_file,
        "/admin/start",
        {"repo": repo, "issue": issue, "agent": agent, "bottles": list(bottles), "prompt": prompt},
    )
    click.echo(f"{data['slug']} {data['status']}")


@orchestrate.command("resume")
@config_option
@click.option("--slug", required=True)
@click.option("--prompt", required=True)
@edge
def orchestrate_resume(config_file: str | None, slug: str, prompt: str) -> None:
    """Rehydrate a frozen bottle with a prompt (kept pending while it runs)."""
    data = _admin(config_file, "/admin/resume", {"slug": slug, "prompt": prompt})
    click.echo(f"{data['slug']} {data['status']}")


@orchestrate.command("destroy")
@config_option
@click.option("--slug", required=True)
@edge
def orchestrate_destroy(config_file: str | None, slug: str) -> None:
    """Destroy a bottle: agent killed, workspace removed, record kept."""
    data = _admin(config_file, "/admin/destroy", {"slug": slug})
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


def _open_store(config: Config) -> Store:
    from store import Store

    if not config.db_path.exists():
        raise ForgeBottleError(
            f"no forgebottle state at {config.state_dir} (give the config serve uses: --config F or ${ENV_CONFIG})"
        )
    return Store(config.db_path)


@orchestrate.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "show_all", is_flag=True, help="Include destroyed bottles.")
@edge
def orchestrate_status(config_file: str | None, as_json: bool, show_all: bool) -> None:
    """Live bottles, straight from SQLite (works with the server down)."""
    store = _open_store(_load(config_file))
    states = store.all(live_only=not show_all)
    if as_json:
        from provenance import bottle_views

        click.echo(json.dumps(bottle_views(store, states), indent=2))
        return
    if not states:
        click.echo("no live bottles")
        return
    denied, tokens = store.egress_denials(), store.model_tokens_by_bottle()
    rows = [("SLUG", "STATE", "AGENT", "AGE", "CHECK-IN", "ISSUE", "PR", "TOKENS", "DENIED")]
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
                str(tokens.get(s.slug, 0)),  # model tokens, all runs
                str(denied.get(s.slug, 0)),  # refused egress
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    # One write: echo flushes, and a line at a time costs a syscall per bottle.
    click.echo(
        "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows)
    )


@main.command("provenance")
@config_option
@click.argument("slug")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON (DESIGN.md §8).")
@click.option("--verify", is_flag=True, help="Recompute the hash chain; exit 1 if it is broken.")
@edge
def provenance_command(config_file: str | None, slug: str, as_json: bool, verify: bool) -> None:
    """A bottle's provenance record: a summary, or the JSON document."""
    from provenance import provenance, summary

    config = _load(config_file)
    doc = provenance(_open_store(config), slug, api_url=config.api_url, org=config.org)
    if verify:
        chain = doc["chain"]
        if not chain["verified"]:
            raise ForgeBottleError(f"chain broken at operation {chain['broken_seq']}: {chain['problem']}")
        click.echo(f"{slug}: chain verified ({len(doc['operations'])} operations, head {chain['head'][:16]})")
        if config.anchor == "forge":
            click.echo(_check_anchor(config, slug))
        return
    click.echo(json.dumps(doc, indent=2) if as_json else summary(doc))


def _check_anchor(config: Config, slug: str) -> str:
    """``provenance.anchor = "forge"``: the record against the heads in the status comment."""
    import asyncio

    from conversation import verify_anchor
    from gitea import ForgeError, Gitea

    async def check() -> list[str]:
        forge = Gitea(config.api_url, config.token.reveal(), timeout=config.forge_timeout)
        try:
            return await verify_anchor(forge, _open_store(config), slug)
        finally:
            await forge.aclose()

    try:
        problems = asyncio.run(check())
    except ForgeError as exc:
        return f"{slug}: anchor not checked: {redact(str(exc), config.secrets())}"
    if problems:
        raise ForgeBottleError(f"{slug}: the forge's anchor disagrees: " + "; ".join(problems))
    return f"{slug}: the forge's anchor agrees"


@main.command("logs")
@config_option
@click.argument("slug")
@click.option("--run", "run", type=int, default=None, help="Which run (default: the latest).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing while the run goes on.")
@edge
def logs_command(config_file: str | None, slug: str, run: int | None, follow: bool) -> None:
    """An agent run's output, as forgebottle kept it (bottles/<slug>/run-<n>.log)."""
    import time

    from bottles import BottlePaths

    config = _load(config_file)
    store = _open_store(config)
    state = store.known(slug)
    runs = store.runs(state.slug)
    if not runs:
        raise ForgeBottleError(f"{slug} has not run yet")
    n = run if run is not None else int(runs[-1]["n"])
    if n not in {int(r["n"]) for r in runs}:
        raise ForgeBottleError(f"{slug} has no run {n} (runs: {', '.join(str(r['n']) for r in runs)})")
    path = BottlePaths(config.state_dir, state.slug).run_log(n)
    out = sys.stdout.buffer
    with open(path, "rb") if path.exists() else open(os.devnull, "rb") as log_file:
        while True:
            chunk = log_file.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            ended = next((r["ended_at"] for r in store.runs(state.slug) if int(r["n"]) == n), None)
            if not follow or ended:
                return
            time.sleep(0.2)


@main.command()
@config_option
@click.option("--repo", "repos", multiple=True, help="OWNER/REPO whose webhook to check (repeatable).")
@edge
def check(config_file: str | None, repos: tuple[str, ...]) -> None:
    """Prove each part works: config, forge, token, org, webhook, a real bottle, each agent."""
    import asyncio

    from operate import run_checks

    def load() -> Config:
        return Config.load(os.environ, config_path(config_file, os.environ))

    problems = asyncio.run(run_checks(load, repos, click.echo))
    if problems:
        raise ForgeBottleError(f"{problems} problem(s) found")


@main.command()
@config_option
@click.option("--repo", required=True, help="OWNER/REPO to prepare.")
@click.option("--dry-run", is_flag=True, help="Say what would be created; create nothing.")
@edge
def setup(config_file: str | None, repo: str, dry_run: bool) -> None:
    """Create the bot-bottle:<agent> labels and the webhook on a repository (idempotent)."""
    import asyncio

    from operate import setup as prepare

    config = Config.load(os.environ, config_path(config_file, os.environ))
    asyncio.run(prepare(config, repo, dry_run=dry_run, echo=click.echo))


@main.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("forgebottle.toml"),
    show_default=True,
    help="Where to write the config (the webhook secret goes beside it).",
)
@edge
def init(out: Path) -> None:
    """Write a commented config and a fresh webhook secret (0600); never overwrite."""
    from operate import init as write

    state = Path(os.environ.get("FORGEBOTTLE_STATE_DIR") or "~/.bot-bottle").expanduser()
    for path in write(out.resolve(), state_dir=state):
        click.echo(f"wrote {path}")
    click.echo(f"next: put the bot's token in {out.resolve().parent / 'forge-token'} (0600), edit {out}, then")
    click.echo(f"  forgebottle setup --config {out} --repo OWNER/REPO && forgebottle check --config {out}")


@main.command()
@click.option("--keep", is_flag=True, help="Keep the temporary state directory.")
@edge
def demo(keep: bool) -> None:
    """The whole loop on this machine: devforge, serve, a scripted agent, review, merge."""
    from devforge.demo import run_demo

    root = Path(tempfile.mkdtemp(prefix="fbdemo-"))
    try:
        code = run_demo(root, click.echo, self_command())
    finally:
        if keep:
            click.echo(
                f"state kept in {root}: forgebottle orchestrate status --config {root / 'state' / 'config.toml'}"
            )
        else:
            shutil.rmtree(root, ignore_errors=True)
    if code:
        raise ForgeBottleError("demo failed")


def self_command() -> list[str]:
    """How to run this forgebottle again as a subprocess: the .pyz, or this module."""
    program = Path(sys.argv[0])
    if program.suffix == ".pyz" and program.is_file():
        return [sys.executable, str(program.resolve())]
    return [sys.executable, str(Path(__file__).resolve())]


if __name__ == "__main__":
    main()
