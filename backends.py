"""Backends: where and how an agent runs (DESIGN.md §6).

``local`` runs it under bwrap on this host (``bottles.bwrap_argv``); ``command`` hands it to any
launcher by argv templates. Both share the workspace clone and the push path of ``bottles``:
the host runs git only in the bottle's mirror, never in the agent's repository.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

from bottles import (
    BUNDLE_SIGNATURES,
    GATEWAY_LISTEN,
    IN_EGRESS_SOCKET,
    IN_FORGE_DIR,
    IN_HOME,
    IN_MIRROR,
    IN_OUTBOX,
    IN_TOOLS,
    IN_WORKSPACE,
    MAX_BUNDLE_BYTES,
    MAX_RUN_LOG,
    BottleContext,
    BottleError,
    GitFailed,
    PushFailed,
    PushRefused,
    PushResult,
    SandboxUnavailable,
    bwrap_argv,
    clone_workspace,
    copy_out,
    git_env,
    run_git,
    sandbox_output,
)
from config import redact
from scan import GIT_TIMEOUT, ScanFailed, scan_change

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
    # A local file written in pieces as the agent prints: not worth a thread per write.
    with open(log, "ab") as out:  # noqa: ASYNC230
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
        # A fresh file renamed over the old: whatever an unsandboxed agent left at that name
        # (a symlink) is replaced, never written through.
        fd, tmp = tempfile.mkstemp(dir=paths.sidecar_dir, prefix=".mcp-")
        with os.fdopen(fd, "w") as out:
            json.dump(ctx.mcp_config(), out, indent=2)
        os.replace(tmp, paths.mcp_config)
        dot_git = paths.workspace / ".git"
        if dot_git.is_symlink() or dot_git.exists():  # whatever the agent made of it, never re-clone
            return
        await clone_workspace(
            paths.workspace, clone_url=ctx.clone_url, branch=ctx.branch, git_user=ctx.git_user, token=ctx.token
        )

    async def sync_mirror(self, ctx: BottleContext) -> str:
        """Create or refresh the bottle's mirror; its refs/heads are the forge's branches now."""
        auth = (ctx.git_user, ctx.token)
        hide = [ctx.token.reveal()]
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
                hide=hide,
            )
            await run_git(["-C", mirror, "config", "remote.origin.fetch", "+refs/heads/*:refs/heads/*"])
        else:
            await run_git(["-C", mirror, "fetch", "-q", "--prune", "origin"], auth=auth, hide=hide)
        return mirror

    @abc.abstractmethod
    async def start(self, ctx: BottleContext, *, prompt: str, run: int, resume: bool) -> RunHandle: ...

    async def stop(self, ctx: BottleContext, handle: RunHandle, grace: float) -> int:
        return await handle.stop(grace)

    async def recovered(self, ctx: BottleContext) -> None:  # noqa: B027 - a hook; most backends need nothing
        """A restarted forgebottle found this bottle's run unfinished: release what may have
        outlived the old process. Local agents ran under ``bwrap --die-with-parent``: nothing."""

    async def destroy(self, ctx: BottleContext) -> None:
        """Remove what the bottle worked with; its run logs and prompts stay with its record."""
        for directory in (ctx.paths.workspace, ctx.paths.home, ctx.paths.mirror, ctx.paths.outbox):
            remove_tree(directory)
        shutil.rmtree(ctx.paths.sidecar_dir, ignore_errors=True)

    # -- push -------------------------------------------------------------------------

    async def bundle(self, ctx: BottleContext, incoming: Path) -> tuple[str, Path | None]:
        """Run ``git bundle`` in the sandbox; return the HEAD sha and a host-owned copy of the
        bundle in ``incoming`` (None if the sandbox left none).

        The copy is checked to start as a bundle does; its content is the agent's to choose.
        """
        outbox = ctx.paths.outbox
        remove_tree(outbox)
        outbox.mkdir(parents=True, mode=0o700)
        script = (
            "git rev-parse --verify HEAD > /run/outbox/head 2>/run/outbox/err || exit 3; "
            "git bundle create -q /run/outbox/push.bundle HEAD --not --remotes=origin 2>>/run/outbox/err || true"
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
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await asyncio.wait_for(proc.wait(), GIT_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise PushFailed("making the bundle timed out", detail=f"git bundle ran over {GIT_TIMEOUT:.0f}s") from None
        head = sandbox_output(outbox / "head", limit=128)
        sha = head.decode(errors="replace").strip() if head is not None else ""
        if proc.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", sha):
            err = sandbox_output(outbox / "err", limit=2048) or b""
            raise PushFailed(
                "the workspace has no commit to push",
                detail=f"bundle sandbox exited {proc.returncode}: {err.decode(errors='replace').strip()}",
            )
        copy = copy_out(outbox / "push.bundle", incoming / "push.bundle", limit=MAX_BUNDLE_BYTES)
        if copy is None:
            return sha, None
        with open(copy, "rb") as f:  # noqa: ASYNC230 - a host-owned local file; its first lines only
            signature = f.read(len(BUNDLE_SIGNATURES[0]))
            # v3's capabilities follow the signature; a filter would make the mirror a partial clone.
            filtered = False
            while (line := f.readline(4096)).startswith(b"@"):
                filtered = filtered or line.startswith(b"@filter")
        if signature not in BUNDLE_SIGNATURES or filtered:
            raise PushFailed("the workspace did not yield a git bundle", detail=f"bundle starts {signature[:16]!r}")
        return sha, copy

    async def refresh(self, ctx: BottleContext) -> dict[str, str]:
        """``refresh``: the mirror fetches the forge; then, inside the sandbox like the bundle
        step, the workspace fetches the bottle's branch and its base from the mirror (bound
        read-only) as ``refs/remotes/origin/*``. The host never runs git in the workspace."""
        async with _stage("the forge's repository could not be fetched; try again later"):
            mirror = await self.sync_mirror(ctx)
        shas: dict[str, str] = {}
        specs: list[str] = []
        for name in (ctx.branch, ctx.default_branch):
            shas[name] = await run_git(["-C", mirror, "rev-parse", "--verify", "-q", f"refs/heads/{name}"], check=False)
            if shas[name]:
                specs.append(f"+refs/heads/{name}:refs/remotes/origin/{name}")
        script = 'git fetch -q --no-tags --no-write-fetch-head "$0" "$@"'
        if ctx.sandboxed:
            if ctx.bwrap is None:
                raise SandboxUnavailable("bwrap is not installed")
            binds = [("--bind", str(ctx.paths.workspace), IN_WORKSPACE), ("--ro-bind", mirror, IN_MIRROR)]
            argv = [*bwrap_argv(ctx.bwrap, network="none", binds=binds), "/bin/sh", "-c", script, IN_MIRROR, *specs]
            env, cwd = git_env(), None
        else:
            argv = ["/bin/sh", "-c", script, mirror, *specs]
            env, cwd = {**git_env(), "GIT_DIR": ".git"}, str(ctx.paths.workspace)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), GIT_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise PushFailed("the refresh timed out", detail=f"git fetch ran over {GIT_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            detail = f"fetch in the sandbox exited {proc.returncode}: {err[-2048:].decode(errors='replace').strip()}"
            raise PushFailed("the workspace could not fetch from forgebottle's mirror", detail=detail)
        return {"branch_sha": shas[ctx.branch], "base_sha": shas[ctx.default_branch]}

    async def push(self, ctx: BottleContext, *, forbidden: Sequence[str]) -> PushResult:
        """Push the workspace HEAD to the bottle's branch, after the secret scan.

        Raises PushFailed, PushRefused or SandboxUnavailable only, each safe to show the agent
        (see the module docstring); their ``detail`` is redacted of the token and ``forbidden``.
        """
        secrets = [ctx.token.reveal(), *forbidden]
        try:
            return await self._push(ctx, list(forbidden))
        except BottleError as exc:
            detail = redact(exc.detail, secrets)
            if isinstance(exc, (PushFailed, PushRefused, SandboxUnavailable)):
                exc.detail = detail
                raise
            raise PushFailed("the push failed; the operator's log says why", detail=detail) from None
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            detail = redact(f"{type(exc).__name__}: {exc}", secrets)
            raise PushFailed("the push failed; the operator's log says why", detail=detail) from None

    async def _push(self, ctx: BottleContext, forbidden: Sequence[str]) -> PushResult:
        auth = (ctx.git_user, ctx.token)
        hide = [ctx.token.reveal()]
        async with _stage("the forge's repository could not be fetched; try again later"):
            mirror = await self.sync_mirror(ctx)
        with tempfile.TemporaryDirectory(prefix="incoming-", dir=ctx.paths.root) as incoming:
            sha, bundle = await self.bundle(ctx, Path(incoming))
            if not await _git_ok(["-C", mirror, "cat-file", "-e", f"{sha}^{{commit}}"]):
                if bundle is None:
                    raise PushFailed("the bundle from the workspace is empty")
                async with _stage("the bundle does not apply to the forge's history (is origin current?)"):
                    await run_git(["-C", mirror, "bundle", "verify", "-q", str(bundle)])
                async with _stage("the commits could not be taken from the bundle"):
                    await run_git(
                        ["-C", mirror, "fetch", "-q", "--no-tags", str(bundle), f"+HEAD:refs/forgebottle/{ctx.branch}"]
                    )
                    fetched = await run_git(["-C", mirror, "rev-parse", f"refs/forgebottle/{ctx.branch}"])
                if fetched != sha:
                    raise PushFailed("the bundle does not hold the workspace HEAD")
        base = await run_git(
            ["-C", mirror, "rev-parse", "--verify", "-q", f"refs/heads/{ctx.default_branch}"], check=False
        )
        try:
            findings, scanned = await asyncio.to_thread(scan_change, ctx.paths.mirror, base, sha, list(forbidden))
        except ScanFailed as exc:
            raise PushFailed("the secret scan could not read the change", detail=exc.detail) from None
        if findings:
            where = ", ".join(str(f) for f in findings[:5])
            more = f" and {len(findings) - 5} more" if len(findings) > 5 else ""
            raise PushRefused(f"the secret scan refused the push: {where}{more}; nothing was pushed", findings)
        remote = await run_git(["-C", mirror, "rev-parse", "--verify", "-q", f"refs/heads/{ctx.branch}"], check=False)
        if remote == sha:
            return PushResult(ctx.branch, sha, scanned, pushed=False)
        lease = f"--force-with-lease=refs/heads/{ctx.branch}:{remote}"
        async with _stage("the forge did not take the push (did the branch move?); try again later"):
            await run_git(
                ["-C", mirror, "push", "-q", lease, "origin", f"{sha}:refs/heads/{ctx.branch}"],
                auth=auth,
                hide=hide,
            )
        return PushResult(ctx.branch, sha, scanned, pushed=True)


@contextlib.asynccontextmanager
async def _stage(message: str) -> AsyncIterator[None]:
    """A failure of this stage of the push, as PushFailed(message) with git's words as detail."""
    try:
        yield
    except GitFailed as exc:
        raise PushFailed(message, detail=exc.detail) from None


def remove_tree(path: Path) -> None:
    """Remove a directory tree an agent wrote, including directories it made unreadable."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for root, dirs, _ in os.walk(path):  # top-down: each directory is opened up before it is listed
        for name in dirs:
            full = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(full).st_mode):  # never chmod through a link
                    os.chmod(full, 0o700)
    shutil.rmtree(path, ignore_errors=True)


async def _git_ok(args: Sequence[str]) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "git", *args, env=git_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait() == 0


class LocalBackend(Backend):
    """The agent under bwrap on this host (or unsandboxed with ``sandbox = "none"``)."""

    name = "local"

    def agent_argv(self, ctx: BottleContext, *, prompt: str, resume: bool) -> list[str]:
        template = ctx.agent.resume_command if resume else ctx.agent.command
        prompt_file = f"{IN_FORGE_DIR}/prompt.md" if ctx.sandboxed else str(ctx.paths.prompt)
        return fill(template, {"prompt": prompt, "prompt_file": prompt_file, "slug": ctx.slug})

    def agent_env(self, ctx: BottleContext) -> dict[str, str]:
        inside = ctx.sandboxed
        path = f"{IN_TOOLS if inside else ctx.paths.tools}:/usr/local/bin:/usr/bin:/bin"
        env = {
            "PATH": path,
            "HOME": IN_HOME if inside else str(ctx.paths.home),
            "LANG": "C.UTF-8",
            **ctx.forge_env(inside=inside),
            **ctx.gateway_env(),
        }
        env.update({key: value.reveal() for key, value in ctx.agent.env})
        if env["PATH"] != path:  # the agent's own PATH goes first; the forge tool stays on it (§6)
            env["PATH"] = f"{env['PATH']}:{path}" if env["PATH"] else path
        return env

    async def start(self, ctx: BottleContext, *, prompt: str, run: int, resume: bool) -> RunHandle:
        argv = self.agent_argv(ctx, prompt=prompt, resume=resume)
        env = self.agent_env(ctx)
        if ctx.agent.network == "gateway":
            if not ctx.sandboxed:
                raise BottleError('network = "gateway" needs the bwrap sandbox (its own network namespace)')
            # The relay binds 127.0.0.1:3128 inside the bottle, then execs the agent.
            relay = [f"{IN_TOOLS}/forge", "relay", "--listen", GATEWAY_LISTEN, "--socket", IN_EGRESS_SOCKET, "--"]
            argv = [*relay, *argv]
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
        if ctx.agent.network == "gateway":
            env["FORGE_EGRESS_SOCKET"] = str(ctx.paths.egress_socket)
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
