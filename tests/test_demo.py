"""``devforge.demo.run_demo``: the whole loop against a real ``forgebottle serve`` subprocess.

The demo is a client of the service like any other: these tests read what it printed, the
files it wrote and the processes it left (none), never its insides.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import httpx
import pytest

from devforge.demo import run_demo
from tests.conftest import HAVE_BWRAP, ROOT, processes_mentioning

SERVE = [sys.executable, str(ROOT / "forgebottle.py")]
STEP = re.compile(r"^\[\s*\d+\.\d+s\] ")

# The story, in the order it must be told.
STORY = [
    r"devforge up at http://127\.0\.0\.1:\d+/ with org bot-bottle, repo alice/demo, bot bottle-bot",
    r"forgebottle serving on 127\.0\.0\.1:\d+ \(pid \d+, log .*serve\.log\), sandbox: ",
    r"devforge CI: the first push to a branch fails its test, later pushes pass",
    r"issue #1 opened by alice, labelled bot-bottle:demo, assigned",
    r"bottle alice-demo-1: queued -> running \(launch: issue #1",
    r"  agent: read issue #1",
    r"  agent: opened pull request #2 from bot-bottle/issue-1",
    r"bottle alice-demo-1: running -> frozen \(done: agent signalled success: Opened a pull request",
    # The first push failed CI: the bottle is woken with the failed check and fixes it.
    r"bottle alice-demo-1: frozen -> running \(rehydrate: (?:status|workflow_\w+) test failed on [0-9a-f]{12}\)",
    r"  agent: read checks of the PR head",
    r"  agent: updated progress in the status comment",
    r"  agent: signalled done: success: Fixed the failing greeting test",
    r"pull request #2 open: http://127\.0\.0\.1:\d+/alice/demo/pulls/2",
    r"alice \(org member\) reviewed the PR, requesting changes: rehydrating",
    r"bottle alice-demo-1: frozen -> running \(rehydrate: pull_request_review_rejected by alice\)",
    r"  agent: signalled done: success: Addressed the review comment",
    r"bottle alice-demo-1: running -> frozen \(done: ",
    r"alice merged pull request #2",
    r"bottle alice-demo-1: frozen -> destroyed \(destroy: pull request #2 merged\)",
    r"status comment on issue #1 \(the one comment the bot keeps editing\):",
    r"  \| \*\*forgebottle\*\* · bottle `alice-demo-1` · \*\*destroyed\*\* · run 3",
    r"  \| - \[x\] Read the failing check and its log",
    r"  \| \*\*Pull request:\*\* #2",
    r"  \| \*\*Last run:\*\* run 3 ended: \*\*success\*\*: Addressed the review comment",
    r"  \| \*\*CI:\*\* passing on `[0-9a-f]{12}` after 1 fix attempt\.",
    r"provenance:",
    r"run 1: trigger issues, exit 0, signalled success: Opened a pull request with HELLO\.md",
    r"run 2: trigger ci, exit 0, signalled success: Fixed the failing greeting test",
    r"run 3: trigger pull_request_review_rejected, exit 0, signalled success: Addressed the review comment",
    r"\d+ operations, 7 transitions, chain verified \(head [0-9a-f]{16}\)",
    r"demo complete",
]


def told_in_order(lines: list[str], story: list[str]) -> None:
    at = 0
    for pattern in story:
        found = next((i for i in range(at, len(lines)) if re.search(pattern, lines[i])), None)
        assert found is not None, f"{pattern!r} not found after line {at}:\n" + "\n".join(lines)
        at = found + 1


def assert_everything_stopped(root: Path, lines: list[str]) -> None:
    serving = next(line for line in lines if "forgebottle serving on" in line)
    pid = int(re.search(r"\(pid (\d+)", serving).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not merely signalled
    assert processes_mentioning(str(root)) == [], "serve or an agent outlived the demo"
    forge_url = re.search(r"devforge up at (\S+)", lines[0]).group(1)  # type: ignore[union-attr]
    with pytest.raises(httpx.ConnectError):
        httpx.get(forge_url, timeout=5)


def serve_log(root: Path) -> str:
    log = root / "serve.log"
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no serve.log)"


def test_the_demo_tells_the_whole_loop_against_a_real_serve_process(short_tmp: Path) -> None:
    lines: list[str] = []
    code = run_demo(short_tmp, lines.append, SERVE)
    print("\n".join(lines))
    assert code == 0, serve_log(short_tmp)
    told_in_order(lines, STORY)
    assert f"sandbox: {'bwrap' if HAVE_BWRAP else 'NONE'}" in lines[1]
    # Every line is a timed step or an indented part of the provenance summary.
    assert all(STEP.match(line) or line.startswith("  ") for line in lines), lines
    assert_everything_stopped(short_tmp, lines)

    # The secrets went to files only their owner can read, and nowhere else.
    state = short_tmp / "state"
    for name in ("token", "webhook-secret"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    token = (state / "token").read_text().strip()
    secret = (state / "webhook-secret").read_text().strip()
    assert len(token) == 40 and len(secret) == 32
    for text in ("\n".join(lines), serve_log(short_tmp), (state / "config.toml").read_text()):
        assert token not in text and secret not in text


def test_unsandboxed_the_demo_runs_the_agent_from_the_state_dir_and_ignores_the_callers_forge_env(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were these passed on, serve would talk to a forge that is not there and never launch.
    monkeypatch.setenv("FORGE_GITEA_API", "http://127.0.0.1:9/api/v1")
    monkeypatch.setenv("FORGEBOTTLE_STATE_DIR", str(short_tmp / "elsewhere"))
    lines: list[str] = []
    code = run_demo(short_tmp, lines.append, SERVE, sandbox="none")
    print("\n".join(lines))
    assert code == 0, serve_log(short_tmp)
    told_in_order(lines, STORY)
    assert lines[1].endswith("sandbox: NONE")
    assert any(line.startswith("  slug alice-demo-1  agent demo  status destroyed  sandbox none") for line in lines)
    config = (short_tmp / "state" / "config.toml").read_text()
    assert f'command = ["/bin/sh", "{short_tmp}/state/tools/demo-agent"]' in config
    assert '[bottles.local]\nsandbox = "none"' in config
    assert not (short_tmp / "elsewhere").exists()
    assert_everything_stopped(short_tmp, lines)


def test_a_serve_that_cannot_start_fails_the_demo_with_its_last_words(short_tmp: Path) -> None:
    broken = [sys.executable, "-c", "import sys; print('no such command: ' + ' '.join(sys.argv[1:])); sys.exit(3)"]
    lines: list[str] = []
    assert run_demo(short_tmp, lines.append, broken) == 1
    assert lines[-1].startswith("demo failed: serve exited with 3: no such command: serve --config ")
    assert lines[-1].endswith("/state/config.toml")
    assert not any("issue #1 opened" in line for line in lines)
    forge_url = re.search(r"devforge up at (\S+)", lines[0]).group(1)  # type: ignore[union-attr]
    with pytest.raises(httpx.ConnectError):
        httpx.get(forge_url, timeout=5)


def test_the_demo_refuses_a_state_dir_that_is_already_there(short_tmp: Path) -> None:
    # Someone who can write to the demo's directory plants the token file as a symlink.
    victim = short_tmp / "victim"
    victim.write_text("precious\n")
    (short_tmp / "state").mkdir()
    (short_tmp / "state" / "token").symlink_to(victim)
    lines: list[str] = []
    assert run_demo(short_tmp, lines.append, SERVE) == 1
    assert lines[-1] == f"demo failed: {short_tmp}/state already exists: the demo starts from a fresh directory"
    assert victim.read_text() == "precious\n"
    assert not (short_tmp / "serve.log").exists()


def test_a_serve_command_that_does_not_exist_fails_the_demo_in_one_line(short_tmp: Path) -> None:
    lines: list[str] = []
    assert run_demo(short_tmp, lines.append, [str(short_tmp / "no-such-forgebottle")]) == 1
    assert lines[-1] == f"demo failed: cannot run {short_tmp}/no-such-forgebottle: No such file or directory"
