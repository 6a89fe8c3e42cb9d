"""An operator's first day (DESIGN.md §2): ``init`` writes a config, ``setup`` prepares a
repository on the forge, ``check`` proves each part works and says how to fix what does not.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bottles import IN_TOOLS, IN_WORKSPACE, bwrap_argv, find_bwrap
from config import ENV_API, ENV_ORG, ENV_TOKEN, Config, ConfigError, parse_listen
from gitea import ForgeAuthError, ForgeError, ForgeNotFound, ForgeUnavailable, Gitea, OrgNotVisible
from statemachine import ForgeBottleError

# The events the webhook must send (DESIGN.md §4), by the names Gitea's hook API takes.
HOOK_EVENTS = (
    "issues",
    "issue_assign",
    "issue_label",
    "issue_comment",
    "pull_request",
    "pull_request_comment",
    "pull_request_review_approved",
    "pull_request_review_rejected",
    "pull_request_review_comment",
    "status",
    "workflow_run",
    "workflow_job",
)

CONFIG_TEMPLATE = """\
# forgebottle configuration (DESIGN.md §3). Secrets never go in this file: they come from the
# files named here (relative paths are relative to this file) or from the environment.

[forge]
api_url = "https://git.example.com/api/v1"   # your Gitea or Forgejo, with /api/v1
token_file = "forge-token"                   # a token of the bot user (scopes: issue, repository, organization)
webhook_secret_file = "{secret_name}"        # written by init; give the same secret to the webhook (setup does)
org = "bot-bottle"                           # assignees must be members of this org

[server]
state_dir = "{state_dir}"
listen = "127.0.0.1:8765"
# public_url = "https://forgebottle.example.com"   # where the forge reaches this service (setup, links)
max_running = 2

[watchdog]
timeout = "30m"          # no sidecar call and no output for this long: the run is stopped

# One table per agent; the label bot-bottle:<name> on an issue picks it.
[agents.demo]
command = ["/bin/sh", "-c", "forge read-issue $FORGE_ISSUE_NUMBER && forge done blocked 'configure a real agent'"]
network = "none"         # "none", or "host" (the whole host network: then set server.api_token_file)
timeout = "2h"
"""


def init(out: Path, *, state_dir: Path) -> list[Path]:
    """Write a commented config and a fresh webhook secret beside it; never overwrite."""
    secret = out.parent / "webhook-secret"
    for path in (out, secret):
        if os.path.lexists(path):
            raise ForgeBottleError(f"{path} exists; init never overwrites (remove it, or pick another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(CONFIG_TEMPLATE.format(secret_name=secret.name, state_dir=state_dir))
    return [out, secret]


class Checks:
    """One ``ok``/``FIX`` line per part; the count of FIX lines is the verdict."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.problems = 0

    def say(self, ok: bool, text: str) -> bool:
        self.problems += 0 if ok else 1
        self.echo(f"{'ok ' if ok else 'FIX'}  {text}")
        return ok


def bottle_runs(bwrap: str, probe: Sequence[str], *, ro_binds: Sequence[str] = (), tools: Path) -> tuple[bool, str]:
    """Run ``probe`` in a real bottle made with the service's own bwrap flags."""
    with tempfile.TemporaryDirectory(prefix="forgebottle-check-") as tmp:
        argv = bwrap_argv(
            bwrap,
            network="none",
            ro_binds=ro_binds,
            binds=[("--bind", tmp, IN_WORKSPACE), ("--ro-bind-try", str(tools), IN_TOOLS)],
        )
        env = {"PATH": f"{IN_TOOLS}:/usr/local/bin:/usr/bin:/bin", "HOME": IN_WORKSPACE, "LANG": "C.UTF-8"}
        done = subprocess.run([*argv, "--", *probe], env=env, capture_output=True, text=True, timeout=60, check=False)
        said = (done.stderr or done.stdout).strip().splitlines()
        return done.returncode == 0, said[-1] if said else f"exit {done.returncode}"


def check_host(config: Config, checks: Checks) -> None:
    """What the service needs of this host: a state dir it can write, a free listen address,
    bwrap that really starts a bottle, and each agent's command inside it."""
    state = config.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=state, prefix=".check-"):
            pass
        checks.say(True, f"state dir {state} is writable")
    except OSError as exc:
        checks.say(False, f"state dir {state} is not writable ({exc.strerror}): create it for the service's user")
    where = parse_listen(config.listen)
    if isinstance(where, str):
        checks.say(os.access(Path(where).parent, os.W_OK), f"listen socket directory {Path(where).parent} writable")
    else:
        with socket.socket(socket.AF_INET6 if ":" in where[0] else socket.AF_INET) as probe:
            try:
                probe.bind(where)
                checks.say(True, f"listen address {config.listen} is free")
            except OSError as exc:
                checks.say(
                    False, f"listen address {config.listen} is not free ({exc.strerror}): is serve running already?"
                )
    bwrap = find_bwrap()
    local = [spec for spec in config.bottles.values() if spec.backend == "local" and spec.sandbox == "bwrap"]
    if not local:
        checks.say(True, "sandbox: no bwrap bottles configured")
        return
    if bwrap is None:
        checks.say(False, 'sandbox: bwrap not found; install bubblewrap (or set sandbox = "none", unconfined)')
        return
    ok, why = bottle_runs(bwrap, ["/bin/true"], tools=config.state_dir / "tools")
    if not checks.say(
        ok, f"sandbox: a bottle starts with {bwrap}" if ok else f"sandbox: bwrap cannot start a bottle: {why}"
    ):
        return
    for agent in config.agents.values():
        program = agent.command[0]
        lookup = ["/bin/sh", "-c", 'command -v "$0" >/dev/null || test -x "$0"', program]
        found, _ = bottle_runs(bwrap, lookup, ro_binds=agent.ro_binds, tools=config.state_dir / "tools")
        checks.say(
            found,
            f"agent {agent.name}: {program} is found in the bottle"
            if found
            else f"agent {agent.name}: {program}: command not found in the bottle (bind its install with ro_binds, "
            "and give its directory in the agent's PATH)",
        )


async def check_forge(config: Config, checks: Checks, repos: Sequence[str]) -> None:
    forge = Gitea(config.api_url, config.token.reveal(), timeout=min(config.forge_timeout, 10.0))
    try:
        try:
            user = await forge.current_user()
        except ForgeNotFound:
            hint = "" if config.api_url.endswith("/api/v1") else f" (the API URL usually ends in /api/v1: {ENV_API})"
            checks.say(False, f"forge: {config.api_url} does not answer like Gitea's API{hint}")
            return
        except ForgeAuthError as exc:
            checks.say(False, f"forge: {exc} (check {ENV_TOKEN})")
            return
        except ForgeError as exc:
            hint = f" (check {ENV_API})" if isinstance(exc, ForgeUnavailable) or exc.status is None else ""
            checks.say(False, f"forge: {exc}{hint}")
            return
        checks.say(True, f"forge: reachable; the token belongs to {user.login}")
        if not await forge.org_exists(config.org):
            checks.say(False, f"org {config.org!r} does not exist on the forge (set {ENV_ORG})")
        else:
            try:
                member = await forge.is_org_member(config.org, user.login)
                checks.say(
                    member,
                    f"{user.login} is {'a member' if member else 'NOT a member'} of {config.org}"
                    + ("" if member else "; the token must see the org's members"),
                )
            except OrgNotVisible as exc:
                checks.say(False, str(exc))
        for full in repos:
            await check_hook(forge, config, checks, full)
    finally:
        await forge.aclose()


async def check_hook(forge: Gitea, config: Config, checks: Checks, full: str) -> None:
    owner, _, repo = full.partition("/")
    try:
        hooks = await forge.list_hooks(owner, repo)
    except ForgeError as exc:
        checks.say(False, f"{full}: cannot list webhooks ({exc}); the token needs admin on the repository")
        return
    url = (config.public_url or "").rstrip("/") + "/webhook"
    ours = [h for h in hooks if (h.url == url if config.public_url else h.url.endswith("/webhook"))]
    if not ours:
        wanted = url if config.public_url else "…/webhook"
        checks.say(False, f"{full}: no webhook to {wanted}: run `setup --repo {full}`")
        return
    hook = ours[0]
    missing = sorted(set(HOOK_EVENTS) - expand_events(hook.events))
    if hook.active and not missing:
        checks.say(True, f"{full}: webhook {hook.url} sends what forgebottle needs")
    else:
        what = "inactive" if not hook.active else "missing " + ", ".join(missing)
        checks.say(False, f"{full}: webhook {hook.url} is {what}: run `setup --repo {full}`")


def expand_events(events: Sequence[str]) -> set[str]:
    """Gitea's event groups (CONTRACT.md §1): ``issues`` and ``pull_request`` mean several."""
    out = set(events)
    if "issues" in out:
        out |= {"issue_assign", "issue_label", "issue_comment"}
    if "pull_request" in out:
        out |= {"pull_request_comment", "pull_request_review_approved", "pull_request_review_rejected"}
        out |= {"pull_request_review_comment"}
    return out


async def run_checks(load: Callable[[], Config], repos: Sequence[str], echo: Callable[[str], None]) -> int:
    checks = Checks(echo)
    try:
        config = load()
    except ConfigError as exc:
        checks.say(False, f"config: {exc}")
        return checks.problems
    checks.say(True, f"config: forge {config.api_url}, org {config.org}, state {config.state_dir}")
    checks.say(bool(config.agents), f"agents: {', '.join(config.agents) or 'none configured ([agents.<name>])'}")
    checks.say(config.webhook_secret is not None, "webhook secret " + ("set" if config.webhook_secret else "NOT set"))
    problem = config.read_api_problem()
    checks.say(problem is None, problem or "read API: " + ("bearer token" if config.api_token else "loopback only"))
    await asyncio.to_thread(check_host, config, checks)
    await check_forge(config, checks, repos)
    return checks.problems


async def setup(config: Config, full: str, *, dry_run: bool, echo: Callable[[str], None]) -> None:
    """Create what a repository needs: a ``bot-bottle:<agent>`` label per configured agent and
    the webhook to this service. Idempotent: what exists is left as it is, and said so."""
    owner, sep, repo = full.partition("/")
    if not sep or not owner or not repo:
        raise ForgeBottleError("--repo must be OWNER/REPO")
    if not config.public_url:
        raise ForgeBottleError("server.public_url is not set: the webhook needs the URL the forge reaches us at")
    if config.webhook_secret is None:
        raise ForgeBottleError("no webhook secret configured (forge.webhook_secret_file)")
    doing = "would create" if dry_run else "created"
    forge = Gitea(config.api_url, config.token.reveal(), timeout=config.forge_timeout)
    try:
        labels = {label.name for label in await forge.list_labels(owner, repo)}
        for agent in sorted(config.agents):
            name = f"bot-bottle:{agent}"
            if name in labels:
                echo(f"label {name}: exists")
                continue
            if not dry_run:
                await forge.create_label(owner, repo, name, LABEL_COLOR, f"forgebottle: run the {agent} agent")
            echo(f"label {name}: {doing}")
        url = config.public_url.rstrip("/") + "/webhook"
        hooks = [hook for hook in await forge.list_hooks(owner, repo) if hook.url == url]
        if hooks and hooks[0].active and not set(HOOK_EVENTS) - expand_events(hooks[0].events):
            echo(f"webhook {url}: exists with every event forgebottle needs")
        elif hooks:
            echo(
                f"webhook {url}: exists but is {'inactive' if not hooks[0].active else 'missing events'}; fix it in "
                "the repository's settings (setup never edits a hook it did not make)"
            )
        else:
            if not dry_run:
                await forge.create_hook(owner, repo, url, config.webhook_secret.reveal(), HOOK_EVENTS)
            echo(f"webhook {url}: {doing} ({', '.join(HOOK_EVENTS)})")
    except ForgeAuthError as exc:
        raise ForgeBottleError(f"the forge refused ({exc.status}): the token needs admin on {full}") from None
    except ForgeError as exc:
        raise ForgeBottleError(f"forge: {exc}") from None
    finally:
        await forge.aclose()


LABEL_COLOR = "5319e7"
