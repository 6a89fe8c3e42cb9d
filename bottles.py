"""Bottles: paths, context, the bwrap sandbox, the workspace clone, git with the token held apart.

Trust boundary. The agent controls everything in its workspace, ``.git`` included: hooks,
``core.fsmonitor``, ``url.*.insteadOf``, ``http.proxy``... Running git on the host in that
directory with the token in reach would hand the token to the agent. So the host never does:

* forgebottle clones the workspace from the forge into a fresh directory before the agent
  first runs, the token given to that one git process through ``GIT_CONFIG_*`` variables;
* each bottle has a **mirror** (``mirror.git``), made at the first push, that only forgebottle
  writes and the only repository it runs git in once the agent has run;
* to push, ``git bundle`` runs *inside the sandbox* (no network, no token) and writes a bundle
  file. What the sandbox leaves is the agent's: forgebottle copies the bytes (never through a
  link, at most MAX_BUNDLE_BYTES) into a directory the sandbox never saw, checks the bundle
  header and ``git bundle verify``s the copy in the mirror, and only then fetches it: a file
  that is not a bundle (a gitfile naming a repository the agent built) never reaches host git.
  The mirror then scans every commit of the change for secrets and pushes the commit to
  ``bot-bottle/issue-<N>``.

With ``sandbox = "none"`` the agent runs as forgebottle's own user and ``git bundle`` runs in its
workspace on the host: that bottle is trusted, not contained.

Errors. Every error has ``str(exc)``, what failed, and ``exc.detail``, what the operator's log
gets (by default the same)::

    BottleError                 preparing, starting, removing a bottle (str may hold git's words)
    ├── GitFailed               a host git command failed (stderr redacted of what it was given)
    ├── SandboxUnavailable      bwrap is missing (fixed sentence)
    ├── PushFailed     -32002   fixed sentence
    └── PushRefused    -32005   the scan's findings, their paths redacted
        └── TextRefused -32005  the same, for a comment or description (``check_text``)

``Backend.push`` raises only the last four. Their ``str(exc)`` is safe to send to the agent: no
git or forge text, no host path, no secret. Their ``detail`` (git's stderr, the stage that
failed) is redacted of every secret the push was given: log it, never send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from config import AgentSpec, BottleSpec, Secret, redact, system_binds, valid_slug
from gitea import basic_auth_header
from scan import GIT_TIMEOUT, Finding, plain_git_env, scan_text
from statemachine import ForgeBottleError, branch_for

SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the NUL
# The largest bundle the host copies out of the sandbox.
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
COPY_CHUNK = 1024 * 1024
BUNDLE_SIGNATURES = (b"# v2 git bundle\n", b"# v3 git bundle\n")
MAX_RUN_LOG = 16 * 1024 * 1024

# Inside the sandbox.
IN_WORKSPACE = "/workspace"
IN_FORGE_DIR = "/run/forge"
IN_TOOLS = "/opt/forgebottle/bin"
IN_HOME = "/home/agent"
IN_OUTBOX = "/run/outbox"
IN_EGRESS_SOCKET = f"{IN_FORGE_DIR}/egress.sock"
GATEWAY_LISTEN = "127.0.0.1:3128"
GATEWAY_URL = f"http://{GATEWAY_LISTEN}"
MODEL_PLACEHOLDER = "forgebottle-gateway"  # the only model key a bottle ever sees
IN_MIRROR = "/run/mirror"


class BottleError(ForgeBottleError):
    """A bottle could not be prepared, started, pushed from or removed.

    ``detail`` is for the operator's log; it defaults to the message.
    """

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = message if detail is None else detail


class SandboxUnavailable(BottleError):
    """bwrap is missing; ``str(exc)`` is a fixed sentence."""


class GitFailed(BottleError):
    """A host git command failed; ``str(exc)`` holds the last line of its (redacted) stderr."""


class PushRefused(BottleError):
    """The secret scan found something; nothing was pushed. The findings' paths are redacted."""

    rpc_code = -32005

    def __init__(self, message: str, findings: Sequence[Finding], *, detail: str | None = None) -> None:
        super().__init__(message, detail=detail)
        self.findings = list(findings)


class TextRefused(PushRefused):
    """An agent-written body (a comment, a description) holds a secret; nothing was posted."""


class PushFailed(BottleError):
    """A push failed: ``str(exc)`` is a fixed sentence for the agent, ``detail`` the cause."""

    rpc_code = -32002


@dataclasses.dataclass(frozen=True)
class BottlePaths:
    state_dir: Path
    slug: str

    def __post_init__(self) -> None:
        check_slug(self.slug)

    @property
    def root(self) -> Path:
        return self.state_dir / "bottles" / self.slug

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def mirror(self) -> Path:
        return self.root / "mirror.git"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def sidecar_dir(self) -> Path:
        return self.state_dir / "sidecars" / self.slug

    @property
    def socket(self) -> Path:
        return self.sidecar_dir / "forge.sock"

    @property
    def prompt(self) -> Path:
        return self.sidecar_dir / "prompt.md"

    @property
    def mcp_config(self) -> Path:
        return self.sidecar_dir / "mcp.json"

    @property
    def egress_socket(self) -> Path:
        return self.sidecar_dir / "egress.sock"

    @property
    def tools(self) -> Path:
        return self.state_dir / "tools"

    def run_log(self, n: int) -> Path:
        return self.root / f"run-{n}.log"


def check_slug(slug: str) -> str:
    if not valid_slug(slug):
        raise BottleError(f"invalid slug {slug!r}")
    return slug


@dataclasses.dataclass(frozen=True)
class BottleContext:
    """Everything a backend needs to run one bottle. Holds the token: never give it to the agent."""

    slug: str
    owner: str
    repo: str
    issue: int
    pr: int | None
    agent: AgentSpec
    bottle: BottleSpec
    paths: BottlePaths
    clone_url: str
    default_branch: str
    git_user: str
    token: Secret
    bwrap: str | None
    model_api: Literal["anthropic", "openai"] | None = None  # the api of the agent's model route

    @property
    def branch(self) -> str:
        return branch_for(self.issue)

    @property
    def sandboxed(self) -> bool:
        return self.bottle.sandbox == "bwrap"

    def forge_env(self, *, inside: bool) -> dict[str, str]:
        return {
            "FORGE_SIDECAR_SOCKET": f"{IN_FORGE_DIR}/forge.sock" if inside else str(self.paths.socket),
            "FORGE_BOTTLE_SLUG": self.slug,
            "FORGE_ISSUE_NUMBER": str(self.issue),
            "FORGE_PR_NUMBER": str(self.pr or ""),
            "FORGE_PROMPT_FILE": f"{IN_FORGE_DIR}/prompt.md" if inside else str(self.paths.prompt),
        }

    def mcp_config(self) -> dict[str, Any]:
        """``/run/forge/mcp.json`` (DESIGN.md §11). Outside bwrap the host's paths, and the socket
        named: MCP clients pass a server few of their own variables."""
        if self.bottle.backend == "local" and self.sandboxed:
            return {"mcpServers": {"forge": {"command": f"{IN_TOOLS}/forge", "args": ["mcp"]}}}
        server = {
            "command": str(self.paths.tools / "forge"),
            "args": ["mcp"],
            "env": {"FORGE_SIDECAR_SOCKET": str(self.paths.socket)},
        }
        return {"mcpServers": {"forge": server}}

    def gateway_env(self) -> dict[str, str]:
        """What points an agent with ``network = "gateway"`` at it (DESIGN.md §10)."""
        if self.agent.network != "gateway":
            return {}
        env = {name: GATEWAY_URL for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}
        # Model routes are reached directly at the gateway, not through it as a proxy.
        env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", FORGE_EGRESS_PROXY=GATEWAY_URL)
        route = f"{GATEWAY_URL}/models/{self.agent.model}"
        if self.model_api == "anthropic":
            env.update(ANTHROPIC_BASE_URL=route, ANTHROPIC_API_KEY=MODEL_PLACEHOLDER)
        elif self.model_api == "openai":
            env.update(OPENAI_BASE_URL=f"{route}/v1", OPENAI_API_KEY=MODEL_PLACEHOLDER)
        return env


@dataclasses.dataclass(frozen=True)
class PushResult:
    branch: str
    sha: str
    files_scanned: int
    pushed: bool


# -- the sandbox ------------------------------------------------------------------------


def bwrap_argv(
    bwrap: str,
    *,
    network: Literal["none", "gateway", "host"],
    binds: Sequence[tuple[str, str, str]],
    ro_binds: Sequence[str] = (),
    chdir: str = IN_WORKSPACE,
) -> list[str]:
    """The bwrap command line: a tmpfs root, read-only system dirs, then ``binds``.

    ``binds`` are (option, host path, sandbox path), e.g. ("--bind", workspace, "/workspace").
    With ``"gateway"`` the sandbox keeps its own network namespace, as with ``"none"``: only
    loopback, where ``forge relay`` listens for the gateway.
    """
    argv = [bwrap, "--unshare-all"]
    if network == "host":
        argv.append("--share-net")
    argv += [
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/run",
        "--dir",
        "/etc",
    ]
    for kind, path in system_binds():
        if kind == "symlink":
            argv += ["--symlink", os.readlink(path), path]
        else:
            argv += ["--ro-bind", path, path]
    for path in ro_binds:
        argv += ["--ro-bind-try", path, path]
    for option, host, inside in binds:
        argv += [option, host, inside]
    # Last: the tmpfs root itself read-only; only the binds and tmpfs mounts above stay writable.
    argv += ["--remount-ro", "/", "--chdir", chdir]
    return argv


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


# -- git, with the token only in the environment of the process that needs it --------------


def git_env(auth: tuple[str, Secret] | None = None) -> dict[str, str]:
    env = plain_git_env()
    if auth is not None:
        user, token = auth
        env.update(
            {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": basic_auth_header(user, token.reveal()),
            }
        )
    return env


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def run_git(
    args: Sequence[str],
    *,
    auth: tuple[str, Secret] | None = None,
    check: bool = True,
    timeout: float = GIT_TIMEOUT,  # noqa: ASYNC109 - git's whole process group is killed when it passes
    hide: Sequence[str] = (),
) -> str:
    proc = await asyncio.create_subprocess_exec(
        "git",
        "-c",
        "core.hooksPath=/dev/null",
        *args,
        env=git_env(auth),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Its own process group: git runs helpers (git-remote-http holds the connection and the
        # token) that must go when it goes.
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        await _kill_group(proc)
        raise BottleError(f"git {args[0] if args else ''} timed out after {timeout:.0f}s") from None
    except asyncio.CancelledError:
        # Whoever wanted this git no longer does (shutdown, a clone made ahead and not needed):
        # do not leave it running, holding the token, unwatched.
        await asyncio.shield(_kill_group(proc))
        raise
    if check and proc.returncode != 0:
        lines = redact(err.decode(errors="replace"), hide).strip().splitlines()
        # The subcommand: the first word that is neither an option nor the value of -C or -c.
        pairs = zip(args, ["", *args], strict=False)
        verb = next((a for a, before in pairs if not a.startswith("-") and before not in ("-C", "-c")), "")
        raise GitFailed(
            f"git {verb} failed: {(lines or [f'exit {proc.returncode}'])[-1]}",
            detail=f"git {verb} exited {proc.returncode}: " + " | ".join(lines[-5:]),
        )
    return out.decode(errors="replace").strip()


async def clone_workspace(dest: Path, *, clone_url: str, branch: str, git_user: str, token: Secret) -> None:
    """Clone the forge's repository into ``dest`` (absent or empty) with ``branch`` checked out:
    the forge's branch of that name if there is one, else a new branch from the default branch.

    Git works in a fresh directory beside ``dest`` that no agent has seen (the token is given to
    the clone alone; the config never holds it); the finished clone is then renamed into place.
    """
    staging = Path(tempfile.mkdtemp(prefix=".clone-", dir=dest.parent))
    try:
        ws = str(staging / "workspace")
        await run_git(
            [
                "clone",
                "-q",
                "--no-tags",
                "-c",
                f"user.name={git_user}",
                "-c",
                f"user.email={git_user}@users.noreply.forgebottle",
                clone_url,
                ws,
            ],
            auth=(git_user, token),
            hide=[token.reveal()],
        )
        ref = f"refs/remotes/origin/{branch}"
        existing = await run_git(["-C", ws, "rev-parse", "--verify", "-q", ref], check=False)
        await run_git(["-C", ws, "checkout", "-q", "-b", branch, *([f"origin/{branch}"] if existing else [])])
        try:
            os.rename(ws, dest)  # replaces an empty directory, never a populated one
        except OSError as exc:
            raise BottleError(f"cannot put the clone in place of {dest}: {exc.strerror}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_regular(path: Path) -> int | None:
    """A descriptor on ``path`` if it is a non-empty regular file, never through a link or FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        os.close(fd)
        return None
    return fd


def sandbox_output(path: Path, *, limit: int) -> bytes | None:
    """A file the sandbox wrote, if it is a non-empty regular file: its first ``limit`` bytes.

    Whatever ran in the sandbox could have left a symlink (to a secret) or a FIFO (to hang us)
    in its place: never follow one.
    """
    fd = open_regular(path)
    if fd is None:
        return None
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def copy_out(source: Path, dest: Path, *, limit: int) -> Path | None:
    """Copy a file the sandbox wrote to ``dest`` (new, 0600) in bounded chunks; None if there is
    no non-empty regular file at ``source``. PushFailed past ``limit`` bytes."""
    fd = open_regular(source)
    if fd is None:
        return None
    try:
        with open(dest, "xb", opener=lambda p, flags: os.open(p, flags, 0o600)) as out:
            copied = 0
            while chunk := os.read(fd, COPY_CHUNK):
                copied += len(chunk)
                if copied > limit:
                    raise PushFailed(f"the bundle is over the limit of {limit} bytes; nothing was pushed")
                out.write(chunk)
    finally:
        os.close(fd)
    return dest


def check_text(text: str, forbidden: Sequence[str], *, where: str) -> None:
    """Raise TextRefused (-32005) if ``scan_text`` finds anything in an agent-written body."""
    findings = scan_text(text, forbidden, where=where)
    if findings:
        kinds = ", ".join(sorted({f.type for f in findings}))
        raise TextRefused(f"the secret scan refused the {where} ({kinds}); nothing was posted", findings)
