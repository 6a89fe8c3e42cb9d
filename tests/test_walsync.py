"""WalSync: intake's WAL synced by a helper process, and by a thread whenever the helper fails."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine
from pathlib import Path

import pytest

from store import NewEvent, Store, WalSync
from tests.conftest import wait_until


def run(test: Callable[[], Coroutine[object, object, None]]) -> None:
    asyncio.run(test())


def open_files(pid: int) -> set[str]:
    fds = Path(f"/proc/{pid}/fd")
    return {os.readlink(fds / fd) for fd in os.listdir(fds)}


def exited(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody has reaped yet


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "bot-bottle.db")
    store.insert_events([NewEvent("t", "d", "issues", b'{"n": 1}')])
    return store


def test_the_helper_syncs_the_wal_it_holds_open_and_knows_nothing_else(store: Store) -> None:
    async def go() -> None:
        wal = WalSync(store.wal_path)
        assert await wal.sync() == "helper"
        assert await wal.sync() == "helper"
        pid = wal.helper_pid
        assert pid is not None
        assert str(store.wal_path) in open_files(pid)
        assert Path(f"/proc/{pid}/environ").read_bytes() == b""  # nothing of the service's environment
        await wal.close()
        assert exited(pid)
        assert await wal.sync() == "thread"  # closed: no new helper
        assert wal.syncs == {"helper": 2, "thread": 1}

    run(go)


def test_the_helper_outlives_signals_meant_for_its_parent(store: Store) -> None:
    # A Ctrl-C reaches the whole process group; the service still syncs while it shuts down.
    async def go() -> None:
        wal = WalSync(store.wal_path)
        assert await wal.sync() == "helper"
        pid = wal.helper_pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        assert await wal.sync() == "helper"
        assert wal.helper_pid == pid
        await wal.close()
        assert exited(pid)

    run(go)


def test_a_helper_that_dies_is_replaced_and_meanwhile_syncs_run_in_threads(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        wal = WalSync(store.wal_path, retry_after=3600)
        assert await wal.sync() == "helper"
        first = wal.helper_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        # Asked before or after its death is noticed, the sync is still made, in a thread.
        assert await wal.sync() == "thread"
        assert await wal.sync() == "thread"
        assert wal.helper_pid is None
        wal.retry_after = 0
        assert await wal.sync() == "helper"
        assert wal.helper_pid not in (None, first)
        await wal.close()
        assert exited(first)

    with caplog.at_level(logging.WARNING, logger="forgebottle"):
        run(go)
    assert any("syncing in threads" in r.getMessage() for r in caplog.records)


def test_a_helper_that_cannot_sync_hands_each_sync_to_a_thread(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    failing = [sys.executable, "-c", "import os\nwhile os.read(0, 1): os.write(1, b'e')"]

    async def go() -> None:
        wal = WalSync(store.wal_path, command=failing)
        assert [await wal.sync() for _ in range(3)] == ["thread"] * 3
        assert wal.helper_pid is not None  # it answers, so it stays
        await wal.close()

    with caplog.at_level(logging.WARNING, logger="forgebottle"):
        run(go)
    assert sum("could not sync" in r.getMessage() for r in caplog.records) == 3


def test_without_a_helper_every_sync_runs_in_a_thread(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        wal = WalSync(store.wal_path, command=[str(store.path.parent / "no-such-python")])
        assert await wal.sync() == "thread"
        assert await wal.sync() == "thread"
        await wal.close()

    with caplog.at_level(logging.WARNING, logger="forgebottle"):
        run(go)
    assert sum("cannot start the WAL sync helper" in r.getMessage() for r in caplog.records) == 1


def test_an_interpreter_that_does_not_know_its_executable_syncs_in_threads(
    store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", "")  # as embedded interpreters may report

    async def go() -> None:
        wal = WalSync(store.wal_path, retry_after=0)
        assert [await wal.sync() for _ in range(3)] == ["thread"] * 3
        await wal.close()

    with caplog.at_level(logging.WARNING, logger="forgebottle"):
        run(go)
    assert sum("no Python executable" in r.getMessage() for r in caplog.records) == 1


def test_a_sync_neither_can_make_raises(tmp_path: Path) -> None:
    async def go() -> None:
        wal = WalSync(tmp_path / "missing-wal")
        with pytest.raises(FileNotFoundError):
            await wal.sync()
        assert wal.syncs == {"helper": 0, "thread": 0}
        await wal.close()

    run(go)


def test_the_helper_follows_the_wal_into_a_new_file(tmp_path: Path) -> None:
    async def go() -> None:
        store = Store(tmp_path / "bot-bottle.db")
        store.insert_events([NewEvent("t", "d", "issues", b"1")])
        wal = WalSync(store.wal_path)
        assert await wal.sync() == "helper"
        pid = wal.helper_pid
        assert pid is not None
        wals = [f for f in open_files(pid) if f.startswith(str(store.wal_path))]
        assert wals == [str(store.wal_path)]
        store.close()  # the last connection: SQLite checkpoints and deletes the WAL
        assert not store.wal_path.exists()
        assert [f for f in open_files(pid) if f.startswith(str(store.wal_path))] == [f"{store.wal_path} (deleted)"]
        store = Store(tmp_path / "bot-bottle.db")
        store.insert_events([NewEvent("t", "d", "issues", b"2")])
        assert await wal.sync() == "helper"
        assert [f for f in open_files(pid) if f.startswith(str(store.wal_path))] == [str(store.wal_path)]
        await wal.close()
        store.close()

    run(go)


def test_a_cancelled_sync_leaves_the_next_answers_in_order(store: Store) -> None:
    async def go() -> None:
        wal = WalSync(store.wal_path)
        assert await wal.sync() == "helper"
        abandoned = asyncio.create_task(wal.sync())
        await asyncio.sleep(0)  # it has asked
        abandoned.cancel()
        assert [await wal.sync() for _ in range(3)] == ["helper"] * 3
        await wal.close()

    run(go)


def test_the_helper_exits_with_its_parent(tmp_path: Path) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import asyncio, sys, time
                sys.path.insert(0, {str(Path(__file__).parents[1])!r})
                from store import NewEvent, Store, WalSync
                store = Store({str(tmp_path / "bot-bottle.db")!r})
                store.insert_events([NewEvent("t", "d", "issues", b"1")])
                async def go():
                    wal = WalSync(store.wal_path)
                    await wal.sync()
                    print(wal.helper_pid, flush=True)
                    time.sleep(3600)
                asyncio.run(go())
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as parent:
        try:
            assert parent.stdout is not None
            helper = int(parent.stdout.readline())
            assert not exited(helper)
        finally:
            parent.kill()

    wait_until(lambda: exited(helper), what="the orphaned helper to exit")
