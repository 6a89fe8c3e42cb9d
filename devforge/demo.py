"""``forgebottle demo``: the whole loop on this machine, against a real ``serve`` process.

A devforge in a thread, ``serve`` as a subprocess configured the way a user configures it (a
TOML file, secret files), a scripted agent; the story is read back over the service's HTTP read
API only (``/api/bottles``, ``/provenance/<slug>``), which answers loopback clients without a
token. Nothing of forgebottle's service is imported: the demo is one more client of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx

from .ci import scripted_ci
from .forge import DevForge
from .seed import Seeded, seed
from .serving import ServerThread, loopback_socket

DEMO_AGENT = r"""#!/bin/sh
# The demo agent: uses nothing but git and the forge tool.
set -eu
issue="$FORGE_ISSUE_NUMBER"
if grep -q "### CI failed" "$FORGE_PROMPT_FILE"; then
  forge checks > /dev/null
  forge progress "- [x] Opened a pull request
- [x] Read the failing check and its log
- [x] Fixed it" > /dev/null
  printf 'Hello from forgebottle (issue #%s).\nThe greeting test passes now.\n' "$issue" > HELLO.md
  git commit -q -am "Make the greeting test pass (#$issue)"
  forge push
  forge done success "Fixed the failing greeting test"
elif [ -z "${FORGE_PR_NUMBER:-}" ] && ! grep -q "New input since your last run" "$FORGE_PROMPT_FILE"; then
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

FAILING_LOG = (
    "Run python -m pytest\n"
    "\x1b[31mFAILED\x1b[0m test_hello.py::test_greeting - assert 'passes' in 'Hello from forgebottle'\n"
    "Error: Process completed with exit code 1.\n"
)
# The conversation events a devforge hook carries by default; the demo adds the CI ones.
HOOK_EVENTS = ("issues", "issue_comment", "pull_request", "pull_request_comment", "pull_request_review")
WAIT_SECONDS = 60.0
POLL_SECONDS = 0.05
STOP_SECONDS = 30.0
# The bottle's view of the state dir's tools/ (bottles.IN_TOOLS), where the agent script lives.
IN_TOOLS = "/opt/forgebottle/bin"


class DemoError(Exception):
    """A step that did not happen; ``run_demo`` prints it and answers 1."""


def run_demo(
    root: Path,
    echo: Callable[[str], None],
    serve_command: Sequence[str],
    *,
    sandbox: Literal["bwrap", "none"] | None = None,
) -> int:
    """Run the demo in ``root`` (a fresh directory), printing each step through ``echo``.

    ``serve_command`` runs forgebottle (``[python, forgebottle.py]``, or the ``.pyz``); the demo
    adds ``serve --config <file>``. ``sandbox`` defaults to ``bwrap`` when it is on PATH.
    Answers 0 when the provenance chain verified, 1 otherwise; ``serve`` and the devforge are
    always stopped.
    """
    demo = _Demo(Path(root), echo, sandbox or ("bwrap" if shutil.which("bwrap") else "none"))
    try:
        return demo.run(list(serve_command))
    except DemoError as exc:
        echo(f"demo failed: {exc}")
        return 1
    finally:
        demo.stop()


class _Demo:
    def __init__(self, root: Path, echo: Callable[[str], None], sandbox: Literal["bwrap", "none"]) -> None:
        self.t0 = time.monotonic()
        self.root = root
        self.echo = echo
        self.sandbox = sandbox
        self.state_dir = root / "state"
        self.log = root / "serve.log"
        self.forge_thread: ServerThread | None = None
        self.dev: DevForge | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: httpx.Client | None = None
        self.seen_transitions = 0
        self.seen_ops = 0

    def step(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self.t0:5.1f}s] {text}")

    # -- the story ---------------------------------------------------------------------

    def run(self, serve_command: list[str]) -> int:
        dev, world = self.start_forge()
        secret = os.urandom(16).hex()
        port = _free_port()
        config = self.write_config(world, secret, port)
        self.start_serve(serve_command, config, port)
        events = (*HOOK_EVENTS, "status", "workflow_job", "workflow_run")
        dev.add_hook(world.owner, world.repo, f"http://127.0.0.1:{port}/webhook", secret, events=events)
        # CI on the bot's branch: the first push fails its test, every later one passes.
        dev.on_push = scripted_ci(dev, ["failure", "success"], logs={"failure": FAILING_LOG})
        self.step("devforge CI: the first push to a branch fails its test, later pushes pass")

        issue = dev.create_issue(
            world.owner,
            world.repo,
            title="Add a HELLO.md",
            user=world.member.login,
            body="Please add a HELLO.md that greets the reader.",
            labels=["bot-bottle:demo"],
            assignees=[world.member.login],
        )
        self.step(f"issue #{issue.number} opened by {world.member.login}, labelled bot-bottle:demo, assigned")
        slug = self.until(lambda: self.bottle_for(world, issue.number), "the launch")
        # The first push fails CI: the bottle is woken again with the failure and fixes it.
        doc = self.until(self.status_is(slug, "frozen", runs=2), "the CI fix to finish")
        pr, pr_url = doc["forge"]["pr"], doc["forge"]["pr_url"]
        if not isinstance(pr, int):
            raise DemoError(f"the first run ended without a pull request (bottle {slug})")
        self.step(f"pull request #{pr} open: {pr_url}")
        dev.review(
            world.owner,
            world.repo,
            pr,
            "Nearly there: could you add a closing line?",
            user=world.member.login,
            kind="rejected",
        )
        self.step(f"{world.member.login} (org member) reviewed the PR, requesting changes: rehydrating")
        self.until(self.status_is(slug, "frozen", runs=3), "the review's run to finish")
        dev.merge_pr(world.owner, world.repo, pr, user=world.member.login)
        self.step(f"{world.member.login} merged pull request #{pr}")
        doc = self.until(self.status_is(slug, "destroyed", runs=3), "the bottle to be destroyed")
        self.show_status(dev, world, issue.number)
        self.summary(doc)
        self.step("demo complete")
        return 0 if doc["chain"]["verified"] else 1

    def show_status(self, dev: DevForge, world: Seeded, number: int) -> None:
        """The bot's status comment on the issue, once it shows the end (edits are debounced)."""

        def final() -> str | None:
            for comment in dev.issue(world.owner, world.repo, number).comments:
                if comment.body.startswith("<!-- forgebottle:status ") and "**destroyed**" in comment.body:
                    return comment.body
            return None

        body: str = self.until(final, "the status comment to show the end")
        self.step(f"status comment on issue #{number} (the one comment the bot keeps editing):")
        for line in body.splitlines()[1:]:
            if line.strip():
                self.echo(f"  | {line}")

    def summary(self, doc: dict[str, Any]) -> None:
        self.step("provenance:")
        self.echo(f"  slug {doc['slug']}  agent {doc['agent']}  status {doc['status']}  sandbox {doc['sandbox']}")
        for run in doc["runs"]:
            signalled = run["signalled"] or {}
            self.echo(
                f"  run {run['n']}: trigger {run['trigger']}, exit {run['exit_code']}, "
                f"signalled {signalled.get('status')}: {signalled.get('summary', '')}"
            )
        chain = doc["chain"]
        self.echo(
            f"  {len(doc['operations'])} operations, {len(doc['transitions'])} transitions, "
            f"chain {'verified' if chain['verified'] else 'BROKEN'} (head {str(chain['head'])[:16]})"
        )

    # -- the parts -----------------------------------------------------------------------

    def start_forge(self) -> tuple[DevForge, Seeded]:
        self.forge_thread = ServerThread()
        url = self.forge_thread.url + "/"
        self.dev = DevForge(self.root / "forge", base_url=url)
        world = seed(self.dev)
        self.forge_thread.app = self.dev.app
        self.forge_thread.start()
        self.step(f"devforge up at {url} with org {world.org}, repo {world.owner}/{world.repo}, bot {world.bot.login}")
        return self.dev, world

    def write_config(self, world: Seeded, secret: str, port: int) -> Path:
        """config.toml, the token and webhook secret files (0600) and the agent, in the state dir."""
        assert self.forge_thread is not None
        try:
            # A fresh directory: nothing in it (a planted symlink, an old database) is ours.
            self.state_dir.mkdir(parents=True)
        except FileExistsError:
            raise DemoError(f"{self.state_dir} already exists: the demo starts from a fresh directory") from None
        tools = self.state_dir / "tools"
        tools.mkdir()
        (tools / "demo-agent").write_text(DEMO_AGENT)
        (tools / "demo-agent").chmod(0o755)
        _write_private(self.state_dir / "token", world.bot.token + "\n")
        _write_private(self.state_dir / "webhook-secret", secret + "\n")
        # Inside bwrap the state dir's tools/ is mounted at IN_TOOLS; unsandboxed, the agent
        # runs the script where it is.
        agent = f"{IN_TOOLS}/demo-agent" if self.sandbox == "bwrap" else str(tools / "demo-agent")
        lines = [
            "[forge]",
            f"api_url = {_toml(self.forge_thread.url + '/api/v1')}",
            'token_file = "token"',
            'webhook_secret_file = "webhook-secret"',
            f"org = {_toml(world.org)}",
            "[server]",
            f"state_dir = {_toml(str(self.state_dir))}",
            f'listen = "127.0.0.1:{port}"',
            "[watchdog]",
            'timeout = "2m"',
            'interval = "5s"',
            "[sidecar]",
            'done_grace = "10s"',
            "[agents.demo]",
            f'command = ["/bin/sh", {_toml(agent)}]',
        ]
        if self.sandbox == "none":
            lines += ["[bottles.local]", 'sandbox = "none"']
        config = self.state_dir / "config.toml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start_serve(self, serve_command: list[str], config: Path, port: int) -> None:
        # FORGE_* and FORGEBOTTLE_* variables override the config file: the caller's own must
        # not point the demo's server at another forge or state dir.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FORGE", "FORGEBOTTLE"))}
        with open(self.log, "ab") as log:
            try:
                self.proc = subprocess.Popen(
                    [*serve_command, "serve", "--config", str(config)],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                )
            except OSError as exc:
                raise DemoError(f"cannot run {serve_command[0]}: {exc.strerror}") from None
        # trust_env off: a proxy from the environment must not stand between us and loopback.
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, trust_env=False)
        self.until(self.healthy, "serve to answer /healthz")
        self.step(
            f"forgebottle serving on 127.0.0.1:{port} (pid {self.proc.pid}, log {self.log}), "
            f"sandbox: {'bwrap' if self.sandbox == 'bwrap' else 'NONE'}"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.echo(f"serve did not stop within {STOP_SECONDS:.0f}s of SIGTERM: killed")
                self.proc.kill()
                self.proc.wait()
        if self.http is not None:
            self.http.close()
        if self.forge_thread is not None:
            self.forge_thread.stop()
        if self.dev is not None:
            self.dev.close()

    # -- reading the service ---------------------------------------------------------------

    def until(self, probe: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
        """Poll ``probe`` until it answers something truthy; fail if ``serve`` exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:.0f}s waiting for {what} (serve log: {self.log})")
            time.sleep(POLL_SECONDS)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-5:] if self.log.exists() else []
            raise DemoError(f"serve exited with {self.proc.returncode}: " + " | ".join(tail))

    def get(self, path: str) -> Any:
        assert self.http is not None
        try:
            response = self.http.get(path)
        except httpx.HTTPError as exc:
            self.check_alive()  # a serve that died says more than the broken connection
            raise DemoError(f"GET {path}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise DemoError(f"GET {path} answered {response.status_code}: {response.text[:200]}")
        return response.json()

    def healthy(self) -> bool:
        assert self.http is not None
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def bottle_for(self, world: Seeded, number: int) -> str | None:
        for bottle in self.get("/api/bottles"):
            if (bottle["owner"], bottle["repo"], bottle["issue_number"]) == (world.owner, world.repo, number):
                return str(bottle["slug"])
        return None

    def status_is(self, slug: str, wanted: str, *, runs: int) -> Callable[[], dict[str, Any] | None]:
        def probe() -> dict[str, Any] | None:
            doc: dict[str, Any] = self.get(f"/provenance/{slug}")
            self.report(slug, doc)
            return doc if doc["status"] == wanted and len(doc["runs"]) >= runs else None

        return probe

    def report(self, slug: str, doc: dict[str, Any]) -> None:
        """Print what is new in ``doc``: transitions with their reasons, each agent operation."""
        for tr in doc["transitions"][self.seen_transitions :]:
            self.step(f"bottle {slug}: {tr['source']} -> {tr['dest']} ({tr['trigger']}: {tr['reason'][:70]})")
            self.seen_transitions += 1
        for op in doc["operations"][self.seen_ops :]:
            self.step(f"  agent: {op['detail']}")
            self.seen_ops += 1


def _free_port() -> int:
    # serve binds it itself: the address goes into its config, so it is chosen here and freed.
    with loopback_socket() as sock:
        return int(sock.getsockname()[1])


def _toml(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, raw non-ASCII is valid in both (DEL is
    the one control character JSON leaves raw and TOML refuses)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _write_private(path: Path, text: str) -> None:
    """Write a secret file created 0600, never readable by others even for an instant."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
