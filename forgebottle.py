"""forgebottle: Gitea issues in, pull requests out, by sandboxed agents with an audit trail.

The entry point: the command line and logging. Each command imports only what it needs, so
``--version`` and ``orchestrate status`` stay fast; the service itself is ``service.py``, its
HTTP face ``web.py``.
"""

from __future__ import annotations

import asyncio
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
from typing import TYPE_CHECKING, Any, TypeVar

import click

from config import ENV_CONFIG, ENV_ORG, Config, ConfigError, config_path, parse_listen, redact
from statemachine import ForgeBottleError

if TYPE_CHECKING:
    from store import Store

__version__ = "0.1.0"

log = logging.getLogger("forgebottle")


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


@main.command()
@config_option
@click.option("--insecure-no-webhook-secret", is_flag=True, help="Accept unsigned webhooks (testing only).")
@edge
def serve(config_file: str | None, insecure_no_webhook_secret: bool) -> None:
    """Run the service: webhooks, sidecars, bottles, watchdog."""
    import uvicorn

    from gitea import Gitea
    from service import Service
    from serving import raise_file_limit, server_config
    from store import Store
    from web import create_app

    config = Config.load(
        os.environ, config_path(config_file, os.environ), insecure_no_webhook_secret=insecure_no_webhook_secret
    )
    setup_logging(config.secrets())
    problem = config.read_api_problem()
    if problem:
        raise ConfigError(problem)
    files = raise_file_limit()
    store = Store(config.db_path)
    service = Service(config, store, Gitea(config.api_url, config.token.reveal(), timeout=config.forge_timeout))
    service.check_sandbox()
    app = create_app(config, service)
    # uvicorn re-raises the signal that stopped it once it has shut down; make that a clean
    # exit 0 (running bottles were frozen with "orchestrator stopped") rather than death by SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    where = parse_listen(config.listen)
    listen: dict[str, Any] = {"uds": where} if isinstance(where, str) else {"host": where[0], "port": where[1]}
    server = uvicorn.Server(server_config(app, **listen))
    log.info(
        "forgebottle %s serving on %s; state in %s; forge %s; org %s; agents %s; up to %d open files",
        __version__,
        config.listen,
        config.state_dir,
        config.api_url,
        config.org,
        ", ".join(config.agents) or "none",
        files,
    )
    old = os.umask(0o077)  # a unix: listener is restricted like admin.sock
    try:
        server.run()
    finally:
        os.umask(old)
    if not server.started:
        raise ForgeBottleError(f"could not listen on {config.listen}")


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
    from provenance import bottle_views

    store = _open_store(_load(config_file))
    states = store.all(live_only=not show_all)
    if as_json:
        click.echo(json.dumps(bottle_views(store, states), indent=2))
        return
    if not states:
        click.echo("no live bottles")
        return
    denied = store.egress_denials()
    rows = [("SLUG", "STATE", "AGENT", "AGE", "CHECK-IN", "ISSUE", "PR", "DENIED")]
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
@click.option("--verify", is_flag=True, help="Recompute the hash chain; exit 1 if it is broken.")
@edge
def provenance_command(config_file: str | None, slug: str, verify: bool) -> None:
    """Print a bottle's provenance record."""
    from provenance import provenance

    config = _load(config_file)
    doc = provenance(_open_store(config), slug, api_url=config.api_url, org=config.org)
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
    from bottles import find_bwrap
    from gitea import ForgeError, ForgeUnavailable, Gitea, OrgNotVisible
    from service import sandbox_problem

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
    problem = config.read_api_problem()
    say(problem is None, problem or "read API: " + ("bearer token" if config.api_token else "loopback clients only"))
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
            click.echo(f"state kept in {root}")
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
