"""Bottles: where agents run. Workspaces, the bwrap sandbox, pushing, secret scanning, backends.

Trust boundary. The agent controls everything in its workspace, ``.git`` included: hooks,
``core.fsmonitor``, ``url.*.insteadOf``, ``http.proxy``... Running git on the host in that
directory with the token in reach would hand the token to the agent. So the host never does:

* forgebottle clones the workspace from the forge into a fresh directory before the agent
  first runs, the token given to that one git process through ``GIT_CONFIG_*`` variables;
* each bottle has a **mirror** (``mirror.git``), made at the first push, that only forgebottle
  writes and the only repository it runs git in once the agent has run;
* to push, ``git bundle`` runs *inside the sandbox* (no network, no token) and writes a bundle
  file; the mirror fetches that file (a pack, verified with fsck), scans the change for secrets,
  and pushes the commit to ``bot-bottle/issue-<N>``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from config import AgentSpec, BottleSpec, Secret, system_binds
from gitea import basic_auth_header, branch_for
from statemachine import ForgeBottleError

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the NUL
GIT_TIMEOUT = 300.0
MAX_SCAN_FILES = 2000
MAX_SCAN_BYTES = 2 * 1024 * 1024
MAX_RUN_LOG = 16 * 1024 * 1024

# Inside the sandbox.
IN_WORKSPACE = "/workspace"
IN_FORGE_DIR = "/run/forge"
IN_TOOLS = "/opt/forgebottle/bin"
IN_HOME = "/home/agent"
IN_OUTBOX = "/run/outbox"


class BottleError(ForgeBottleError):
    """A bottle could not be prepared, started, pushed from or removed."""


class SandboxUnavailable(BottleError):
    pass


class PushRefused(BottleError):
    """The change holds a secret; nothing was pushed."""

    rpc_code = -32005

    def __init__(self, message: str, findings: Sequence[Finding]) -> None:
        super().__init__(message)
        self.findings = list(findings)


class PushFailed(BottleError):
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
    def tools(self) -> Path:
        return self.state_dir / "tools"

    def run_log(self, n: int) -> Path:
        return self.root / f"run-{n}.log"


def check_slug(slug: str) -> str:
    if not SLUG_RE.fullmatch(slug) or ".." in slug:
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


@dataclasses.dataclass(frozen=True)
class Finding:
    file: str
    line: int
    type: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.type})"


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
    network: Literal["none", "host"],
    binds: Sequence[tuple[str, str, str]],
    ro_binds: Sequence[str] = (),
    chdir: str = IN_WORKSPACE,
) -> list[str]:
    """The bwrap command line: a tmpfs root, read-only system dirs, then ``binds``.

    ``binds`` are (option, host path, sandbox path), e.g. ("--bind", workspace, "/workspace").
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
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "/bin/false",
        "LC_ALL": "C",
    }
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
    timeout: float = GIT_TIMEOUT,
    redact: Sequence[str] = (),
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
        message = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        text = message[0]
        for secret in redact:
            text = text.replace(secret, "***")
        raise BottleError(f"git {args[0] if args else ''} failed: {text}")
    return out.decode(errors="replace").strip()


async def clone_workspace(dest: Path, *, clone_url: str, branch: str, git_user: str, token: Secret) -> None:
    """Clone the forge's repository into ``dest`` with ``branch`` checked out: the forge's
    branch of that name if there is one, else a new branch from the default branch."""
    ws = str(dest)
    # A fresh directory no agent has touched yet: safe to clone into with the token
    # (given to this one process; the workspace's config never holds it).
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
        redact=[token.reveal()],
    )
    existing = await run_git(["-C", ws, "rev-parse", "--verify", "-q", f"refs/remotes/origin/{branch}"], check=False)
    if existing:
        await run_git(["-C", ws, "checkout", "-q", "-b", branch, f"origin/{branch}"])
    else:
        await run_git(["-C", ws, "checkout", "-q", "-b", branch])


# -- processes ------------------------------------------------------------------------------


class RunHandle:
    """A running agent: its own process group (session), so the whole tree can be signalled."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.last_output = 0.0  # monotonic time of the agent's last output: activity for the watchdog
        # Copies the agent's output to its run log; may outlive the agent if an unsandboxed
        # child keeps the pipe open, so wait() does not wait for it.
        self.drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait(self) -> int:
        return await self.proc.wait()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM the tree, then SIGKILL after ``grace`` seconds."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            return await self.proc.wait()


async def spawn(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path | None, log: Path) -> RunHandle:
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        cwd=str(cwd) if cwd else None,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    handle = RunHandle(proc)
    handle.drain = asyncio.create_task(drain_to(proc.stdout, log, MAX_RUN_LOG, handle), name=f"log:{log}")
    return handle


async def drain_to(stream: asyncio.StreamReader, log: Path, limit: int, handle: RunHandle | None = None) -> None:
    """Copy ``stream`` into ``log`` up to ``limit`` bytes, then keep reading and discard.

    An agent's output is input too: bounded, so a chatty or hostile agent cannot fill the disk,
    and always drained, so it never blocks on a full pipe.
    """
    written = 0
    with open(log, "ab") as out:
        while chunk := await stream.read(64 * 1024):
            if handle is not None:
                handle.last_output = time.monotonic()
            if written >= limit:
                continue
            part = chunk[: limit - written]
            out.write(part)
            written += len(part)
            if written >= limit:
                out.write(f"\n[forgebottle: run log truncated at {limit} bytes; the rest was discarded]\n".encode())
            out.flush()


def fill(template: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Substitute ``{name}`` placeholders; each element stays one argv element, never a shell."""
    out = []
    for element in template:
        for key, value in values.items():
            element = element.replace("{" + key + "}", value)
        out.append(element)
    return out


# -- backends -------------------------------------------------------------------------------


class Backend(abc.ABC):
    name: str

    async def prepare(self, ctx: BottleContext) -> None:
        """Create the bottle's directories and clone the workspace on first launch."""
        paths = ctx.paths
        for directory in (paths.root, paths.home, paths.sidecar_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(directory, 0o700)
        if (paths.workspace / ".git").exists():
            return
        await clone_workspace(
            paths.workspace, clone_url=ctx.clone_url, branch=ctx.branch, git_user=ctx.git_user, token=ctx.token
        )

    async def sync_mirror(self, ctx: BottleContext) -> str:
        """Create or refresh the bottle's mirror; its refs/heads are the forge's branches now."""
        auth = (ctx.git_user, ctx.token)
        redact = [ctx.token.reveal()]
        mirror = str(ctx.paths.mirror)
        if not (ctx.paths.mirror / "HEAD").exists():
            await run_git(
                [
                    "clone",
                    "-q",
                    "--bare",
                    "--no-tags",
                    "-c",
                    "fetch.fsckObjects=true",
                    "-c",
                    "transfer.fsckObjects=true",
                    ctx.clone_url,
                    mirror,
                ],
                auth=auth,
                redact=redact,
            )
            await run_git(["-C", mirror, "config", "remote.origin.fetch", "+refs/heads/*:refs/heads/*"])
        else:
            await run_git(["-C", mirror, "fetch", "-q", "--prune", "origin"], auth=auth, redact=redact)
        return mirror

    @abc.abstractmethod
    async def start(self, ctx: BottleContext, *, prompt: str, run: int, resume: bool) -> RunHandle: ...

    async def stop(self, ctx: BottleContext, handle: RunHandle, grace: float) -> int:
        return await handle.stop(grace)

    async def recovered(self, ctx: BottleContext) -> None:  # noqa: B027 - a hook; most backends need nothing
        """A restarted forgebottle found this bottle's run unfinished: release what may have
        outlived the old process. Local agents ran under ``bwrap --die-with-parent``: nothing."""

    async def destroy(self, ctx: BottleContext) -> None:
        shutil.rmtree(ctx.paths.workspace, ignore_errors=True)
        shutil.rmtree(ctx.paths.mirror, ignore_errors=True)
        shutil.rmtree(ctx.paths.outbox, ignore_errors=True)
        shutil.rmtree(ctx.paths.sidecar_dir, ignore_errors=True)

    # -- push -------------------------------------------------------------------------

    async def bundle(self, ctx: BottleContext) -> tuple[str, Path | None]:
        """Run ``git bundle`` in the sandbox; return the HEAD sha and the bundle (None if nothing new)."""
        outbox = ctx.paths.outbox
        shutil.rmtree(outbox, ignore_errors=True)
        outbox.mkdir(parents=True, mode=0o700)
        script = (
            "git rev-parse --verify HEAD > /run/outbox/head || exit 3; "
            "git bundle create -q /run/outbox/push.bundle HEAD --not --remotes=origin 2>/run/outbox/err || true"
        )
        if ctx.sandboxed:
            if ctx.bwrap is None:
                raise SandboxUnavailable("bwrap is not installed")
            argv = [
                *bwrap_argv(
                    ctx.bwrap,
                    network="none",
                    binds=[
                        ("--bind", str(ctx.paths.workspace), IN_WORKSPACE),
                        ("--bind", str(outbox), IN_OUTBOX),
                    ],
                ),
                "/bin/sh",
                "-c",
                script,
            ]
            cwd = None
        else:
            argv = ["/bin/sh", "-c", script.replace("/run/outbox", str(outbox))]
            cwd = ctx.paths.workspace
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env={**git_env(), "GIT_DIR": ".git"} if not ctx.sandboxed else git_env(),
            cwd=str(cwd) if cwd else None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await asyncio.wait_for(proc.communicate(), GIT_TIMEOUT)
        except TimeoutError:
            proc.kill()
            raise PushFailed("making the bundle timed out") from None
        head = _sandbox_output(outbox / "head", limit=128)
        sha = head.decode(errors="replace").strip() if head is not None else ""
        if proc.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise PushFailed("the workspace has no commit to push")
        bundle = outbox / "push.bundle"
        if _sandbox_output(bundle, limit=0) is None:
            return sha, None
        return sha, bundle

    async def push(self, ctx: BottleContext, *, forbidden: Sequence[str]) -> PushResult:
        auth = (ctx.git_user, ctx.token)
        redact = [ctx.token.reveal()]
        mirror = await self.sync_mirror(ctx)
        sha, bundle = await self.bundle(ctx)
        if not await _git_ok(["-C", mirror, "cat-file", "-e", f"{sha}^{{commit}}"]):
            if bundle is None:
                raise PushFailed("the bundle from the workspace is empty")
            await run_git(
                ["-C", mirror, "fetch", "-q", "--no-tags", str(bundle), f"+HEAD:refs/forgebottle/{ctx.branch}"]
            )
            fetched = await run_git(["-C", mirror, "rev-parse", f"refs/forgebottle/{ctx.branch}"])
            if fetched != sha:
                raise PushFailed("the bundle does not hold the workspace HEAD")
        base = await run_git(
            ["-C", mirror, "rev-parse", "--verify", "-q", f"refs/heads/{ctx.default_branch}"], check=False
        )
        findings, scanned = await asyncio.to_thread(scan_change, ctx.paths.mirror, base, sha, list(forbidden))
        if findings:
            where = ", ".join(str(f) for f in findings[:5])
            raise PushRefused(f"secret found in {where}; nothing was pushed", findings)
        remote = await run_git(["-C", mirror, "rev-parse", "--verify", "-q", f"refs/heads/{ctx.branch}"], check=False)
        if remote == sha:
            return PushResult(ctx.branch, sha, scanned, pushed=False)
        lease = f"--force-with-lease=refs/heads/{ctx.branch}:{remote}"
        await run_git(
            ["-C", mirror, "push", "-q", lease, "origin", f"{sha}:refs/heads/{ctx.branch}"], auth=auth, redact=redact
        )
        return PushResult(ctx.branch, sha, scanned, pushed=True)


def _sandbox_output(path: Path, *, limit: int) -> bytes | None:
    """A file the sandbox wrote, if it is a non-empty regular file: its first ``limit`` bytes.

    Whatever ran in the sandbox could have left a symlink (to a secret) or a FIFO (to hang us)
    in its place: never follow one.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


async def _git_ok(args: Sequence[str]) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "git", *args, env=git_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait() == 0


def scan_change(mirror: Path, base: str, sha: str, forbidden: Sequence[str]) -> tuple[list[Finding], int]:
    """Scan the files the change adds or modifies (base...sha) and its commit messages.

    detect-secrets finds the usual suspects; any of ``forbidden`` (the forge token, the webhook
    secret) anywhere in an added file or a message is always a finding.
    """
    from detect_secrets.core.secrets_collection import SecretsCollection
    from detect_secrets.settings import default_settings

    def git(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-C", str(mirror), *args], env=git_env(), capture_output=True, check=True, timeout=GIT_TIMEOUT
        ).stdout

    spec = f"{base}...{sha}" if base else sha
    names = (
        [
            n
            for n in git("diff", "--name-only", "-z", "--diff-filter=AMCR", "--no-renames", spec)
            .decode(errors="replace")
            .split("\0")
            if n
        ]
        if base
        else [n for n in git("ls-tree", "-r", "-z", "--name-only", sha).decode(errors="replace").split("\0") if n]
    )
    findings: list[Finding] = []
    messages = git("log", "--format=%B", f"{base}..{sha}" if base else sha).decode(errors="replace")
    for secret in forbidden:
        if secret and secret in messages:
            findings.append(Finding("(commit message)", 0, "forge credential"))
    with tempfile.TemporaryDirectory(prefix="forgebottle-scan-") as tmp, default_settings():
        collection = SecretsCollection(root=tmp)
        for index, name in enumerate(names[:MAX_SCAN_FILES]):
            blob = git("cat-file", "blob", f"{sha}:{name}")[:MAX_SCAN_BYTES]
            text = blob.decode(errors="replace")
            for secret in forbidden:
                if secret and secret in text:
                    line = text[: text.index(secret)].count("\n") + 1
                    findings.append(Finding(name, line, "forge credential"))
            local = Path(tmp) / str(index)
            local.write_bytes(blob)
            collection.scan_file(str(local))
            for found in collection.data.get(str(local), set()):
                findings.append(Finding(name, int(found.line_number), str(found.type)))
    findings.sort(key=lambda f: (f.file, f.line, f.type))
    return findings, min(len(names), MAX_SCAN_FILES)


class LocalBackend(Backend):
    """The agent under bwrap on this host (or unsandboxed with ``sandbox = "none"``)."""

    name = "local"

    def agent_argv(self, ctx: BottleContext, *, prompt: str, resume: bool) -> list[str]:
        template = ctx.agent.resume_command if resume else ctx.agent.command
        prompt_file = f"{IN_FORGE_DIR}/prompt.md" if ctx.sandboxed else str(ctx.paths.prompt)
        return fill(template, {"prompt": prompt, "prompt_file": prompt_file, "slug": ctx.slug})

    def agent_env(self, ctx: BottleContext) -> dict[str, str]:
        inside = ctx.sandboxed
        env = {
            "PATH": f"{IN_TOOLS if inside else ctx.paths.tools}:/usr/local/bin:/usr/bin:/bin",
            "HOME": IN_HOME if inside else str(ctx.paths.home),
            "LANG": "C.UTF-8",
            **ctx.forge_env(inside=inside),
        }
        env.update({key: value.reveal() for key, value in ctx.agent.env})
        return env

    async def start(self, ctx: BottleContext, *, prompt: str, run: int, resume: bool) -> RunHandle:
        argv = self.agent_argv(ctx, prompt=prompt, resume=resume)
        env = self.agent_env(ctx)
        if not ctx.sandboxed:
            return await spawn(argv, env=env, cwd=ctx.paths.workspace, log=ctx.paths.run_log(run))
        if ctx.bwrap is None:
            raise SandboxUnavailable('bwrap is not installed; install bubblewrap or set sandbox = "none"')
        wrapper = bwrap_argv(
            ctx.bwrap,
            network=ctx.agent.network,
            ro_binds=ctx.agent.ro_binds,
            binds=[
                ("--bind", str(ctx.paths.workspace), IN_WORKSPACE),
                ("--bind", str(ctx.paths.home), IN_HOME),
                # The directory, not the socket: the socket is re-created on every run.
                ("--ro-bind", str(ctx.paths.sidecar_dir), IN_FORGE_DIR),
                ("--ro-bind", str(ctx.paths.tools), IN_TOOLS),
            ],
        )
        return await spawn([*wrapper, "--", *argv], env=env, cwd=None, log=ctx.paths.run_log(run))


class CommandBackend(Backend):
    """Any launcher (bot-bottle, a VM, a container runtime) driven by argv templates."""

    name = "command"

    def values(self, ctx: BottleContext) -> dict[str, str]:
        return {
            "slug": ctx.slug,
            "agent": ctx.agent.name,
            "bottle": ctx.bottle.name,
            "prompt_file": str(ctx.paths.prompt),
            "socket_dir": str(ctx.paths.sidecar_dir),
            "workspace": str(ctx.paths.workspace),
        }

    def env(self, ctx: BottleContext) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "FORGE_OWNER": ctx.owner,
            "FORGE_REPO": ctx.repo,
            "FORGE_AGENT": ctx.agent.name,
            **ctx.forge_env(inside=False),
        }
        env.update({key: value.reveal() for key, value in ctx.agent.env})
        return env

    async def start(self, ctx: BottleContext, *, prompt: str, run: int, resume: bool) -> RunHandle:
        template = (ctx.bottle.resume or ctx.bottle.start) if resume else ctx.bottle.start
        if not template:
            raise BottleError(f"bottle {ctx.bottle.name!r} has no start command")
        return await spawn(
            fill(template, self.values(ctx)), env=self.env(ctx), cwd=ctx.paths.root, log=ctx.paths.run_log(run)
        )

    async def _run(self, ctx: BottleContext, template: Sequence[str]) -> None:
        if not template:
            return
        handle = await spawn(
            fill(template, self.values(ctx)), env=self.env(ctx), cwd=ctx.paths.root, log=ctx.paths.root / "launcher.log"
        )
        try:
            await asyncio.wait_for(handle.wait(), 60)
        except TimeoutError:
            await handle.stop(1)

    async def stop(self, ctx: BottleContext, handle: RunHandle, grace: float) -> int:
        await self._run(ctx, ctx.bottle.stop)
        return await handle.stop(grace)

    async def recovered(self, ctx: BottleContext) -> None:
        # The launcher's resources (a VM, a container) do not die with forgebottle; its `stop`
        # command is the one way to release them.
        await self._run(ctx, ctx.bottle.stop)

    async def destroy(self, ctx: BottleContext) -> None:
        await self._run(ctx, ctx.bottle.destroy)
        await super().destroy(ctx)


BACKENDS: dict[str, type[Backend]] = {"local": LocalBackend, "command": CommandBackend}


def scan_text(text: str, forbidden: Sequence[str], *, where: str) -> list[Finding]:
    """Secrets in a text an agent is about to write to the forge (a comment, a description)."""
    from detect_secrets.core.secrets_collection import SecretsCollection
    from detect_secrets.settings import default_settings

    findings = [
        Finding(where, text[: text.index(s)].count("\n") + 1, "forge credential") for s in forbidden if s and s in text
    ]
    with tempfile.TemporaryDirectory(prefix="forgebottle-scan-") as tmp, default_settings():
        local = Path(tmp) / "text"
        local.write_text(text)
        collection = SecretsCollection(root=tmp)
        collection.scan_file(str(local))
        findings += [Finding(where, int(f.line_number), str(f.type)) for f in collection.data.get(str(local), set())]
    return findings
