"""Host-side handling of what a sandbox leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

from bottles import _sandbox_output, run_git
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
    assert _sandbox_output(regular, limit=128) == b"b" * 40 + b"\n"
    assert _sandbox_output(regular, limit=4) == b"bbbb"
    assert _sandbox_output(link, limit=128) is None  # never followed to the secret
    assert _sandbox_output(fifo, limit=128) is None  # never blocks on a FIFO
    assert _sandbox_output(empty, limit=128) is None
    assert _sandbox_output(tmp_path / "missing", limit=128) is None
    assert _sandbox_output(tmp_path, limit=128) is None  # a directory


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
