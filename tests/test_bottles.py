"""Host-side handling of what a sandbox leaves behind."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from bottles import (
    GitFailed,
    PushFailed,
    TextRefused,
    check_text,
    copy_out,
    git_env,
    run_git,
    sandbox_output,
)
from config import redact
from scan import MAX_SCAN_BYTES, scan_change, scan_text
from tests.conftest import processes_mentioning


def test_sandbox_output_is_read_only_from_regular_files(tmp_path: Path) -> None:
    secret = tmp_path / "forge-token"
    secret.write_text("a" * 40)
    regular = tmp_path / "head"
    regular.write_text("b" * 40 + "\n")
    link = tmp_path / "link"
    link.symlink_to(secret)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    empty = tmp_path / "empty"
    empty.touch()
    assert sandbox_output(regular, limit=128) == b"b" * 40 + b"\n"
    assert sandbox_output(regular, limit=4) == b"bbbb"
    assert sandbox_output(link, limit=128) is None  # never followed to the secret
    assert sandbox_output(fifo, limit=128) is None  # never blocks on a FIFO
    assert sandbox_output(empty, limit=128) is None
    assert sandbox_output(tmp_path / "missing", limit=128) is None
    assert sandbox_output(tmp_path, limit=128) is None  # a directory


def test_git_and_its_helpers_die_when_the_caller_is_cancelled(tmp_path: Path) -> None:
    # A server that accepts and never answers: the clone's HTTP helper (git-remote-http, a
    # child of git) waits on it, and would outlive a kill of git alone.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        silent.setblocking(False)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/o/r.git"
        held: list[socket.socket] = []

        async def go() -> None:
            task = asyncio.create_task(run_git(["clone", "-q", url, str(tmp_path / "never")]))
            deadline = time.monotonic() + 10
            while not held:  # until the helper has connected
                assert time.monotonic() < deadline, "git never connected"
                with contextlib.suppress(BlockingIOError):
                    held.append(silent.accept()[0])
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        try:
            asyncio.run(go())
            assert processes_mentioning(url) == []
        finally:
            for conn in held:
                conn.close()


TOKEN = "0123456789abcdef0123456789abcdef01234567"


def test_copy_out_copies_regular_files_only_and_bounded(tmp_path: Path) -> None:
    secret = tmp_path / "forge-token"
    secret.write_text(TOKEN)
    out = tmp_path / "out"
    out.mkdir()
    link = tmp_path / "link"
    link.symlink_to(secret)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert copy_out(link, out / "a", limit=1024) is None  # never followed to the secret
    assert copy_out(fifo, out / "b", limit=1024) is None  # never blocks on a FIFO
    assert copy_out(tmp_path, out / "c", limit=1024) is None  # a directory
    bundle = tmp_path / "push.bundle"
    bundle.write_bytes(b"# v2 git bundle\n" + b"x" * 3000)
    copy = copy_out(bundle, out / "d", limit=4096)
    assert copy is not None and copy.read_bytes() == bundle.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    with pytest.raises(PushFailed) as refused:
        copy_out(bundle, out / "e", limit=1024)
    assert str(tmp_path) not in str(refused.value) and "1024" in str(refused.value)
    assert sorted(p.name for p in out.iterdir()) == ["d", "e"]


def test_scan_text_finds_the_secret_however_it_is_dressed() -> None:
    raw = TOKEN.encode()
    dressed = {
        "plain": TOKEN,
        "upper": TOKEN.upper(),
        "hex": raw.hex(),
        "HEX": raw.hex().upper(),
        "wrapped base64": base64.encodebytes(b"config, wrapped across lines: " + raw).decode(),
        "urlsafe base64": base64.urlsafe_b64encode(b"\xfb\xff" + raw).decode(),
    }
    for pad in range(3):  # the three places a secret can start in base64's groups of three bytes
        dressed[f"base64+{pad}"] = "blob: " + base64.b64encode(b"p" * pad + raw + b"q").decode()
    dressed["lone surrogate"] = "\ud800 " + TOKEN + " \udfff"
    missed = [name for name, text in dressed.items() if not scan_text(text, [TOKEN], where="comment")]
    shown = [f for text in dressed.values() for f in scan_text(text, [TOKEN], where="comment")]
    assert missed == []
    assert all(f.file == "comment" and TOKEN not in str(f) for f in shown)
    assert scan_text("a plain note about " + TOKEN[:20], [TOKEN], where="comment") == []
    huge = scan_text("a" * (MAX_SCAN_BYTES + 1), [TOKEN], where="description")
    assert [f.type for f in huge] == [f"over the scan limit of {MAX_SCAN_BYTES} bytes; not pushed"]
    assert redact(f"x {TOKEN.upper()} {raw.hex()} {TOKEN} y", [TOKEN]).count("***") >= 2
    assert TOKEN not in redact(f"fatal: not our ref {TOKEN}", [TOKEN])
    with pytest.raises(TextRefused) as refused:
        check_text(dressed["base64+1"], [TOKEN], where="comment")
    assert refused.value.rpc_code == -32005 and TOKEN not in str(refused.value) and refused.value.findings
    check_text("nothing to see", [TOKEN], where="comment")


def _git(repo: Path, *args: str, **env: str) -> str:
    identity = {
        "GIT_AUTHOR_NAME": "a",
        "GIT_AUTHOR_EMAIL": "a@x",
        "GIT_COMMITTER_NAME": "a",
        "GIT_COMMITTER_EMAIL": "a@x",
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args], env={**git_env(), **identity, **env}, capture_output=True, check=True
    )
    return done.stdout.decode().strip()


def test_scan_change_reads_every_commit_path_and_identity(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _git(tmp_path, "init", "-q", "-b", "main", str(repo))
    (repo / "README").write_text("hello\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    base = _git(repo, "rev-parse", "HEAD")
    # A hostile file name: not UTF-8, a control character, and the token.
    hostile = os.fsencode(repo) + b"/\xff\x1b[2J" + TOKEN.encode() + b"\xed\xa0\x80.txt"
    with open(hostile, "wb") as f:
        f.write(b"harmless\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "names")
    # An evil merge: the merge commit itself brings the secret in.
    _git(repo, "checkout", "-q", "-b", "side", base)
    (repo / "side.txt").write_text("side\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "side")
    _git(repo, "checkout", "-q", "main")
    _git(repo, "merge", "-q", "--no-commit", "side")
    (repo / "merged.txt").write_text(f"key = {TOKEN}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "merge")
    # Gone again at the end: only the commits in between held it.
    for name in ("merged.txt", os.fsdecode(hostile)):
        _git(repo, "rm", "-q", name)
    _git(repo, "commit", "-qm", "tidy", GIT_COMMITTER_NAME=base64.b64encode(b"?" + TOKEN.encode()).decode())
    sha = _git(repo, "rev-parse", "HEAD")
    findings, scanned = scan_change(repo / ".git", base, sha, [TOKEN])
    kinds = {(f.file.startswith("(commit"), f.type) for f in findings}
    assert ("merged.txt", 1, "forge credential") in [(f.file, f.line, f.type) for f in findings]
    assert (False, "forge credential") in kinds and (True, "forge credential (base64)") in kinds
    named = [f for f in findings if "harmless" not in f.file and "***" in f.file]
    assert named and all(f.file.isprintable() for f in findings)
    answer = json.dumps([dataclasses.asdict(f) for f in findings], ensure_ascii=False).encode()
    assert TOKEN.encode() not in answer and scanned >= 3
    assert scan_change(repo / ".git", sha, sha, [TOKEN]) == ([], 0)


def test_git_errors_keep_the_secret_out_of_message_and_detail(tmp_path: Path) -> None:
    async def fail() -> GitFailed:
        try:
            await run_git(["-C", str(tmp_path / f"no-{TOKEN}"), "status"], hide=[TOKEN])
        except GitFailed as exc:
            return exc
        raise AssertionError("git did not fail")

    failed = asyncio.run(fail())
    assert TOKEN not in str(failed) and TOKEN not in failed.detail and "***" in failed.detail
