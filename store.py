"""SQLite store: bottle state, webhook inbox, runs, the operation log, transitions, prompts.

WAL; commits are at ``synchronous=NORMAL`` unless a transaction asks to be ``durable`` (see
``Store.transaction``), and what must be on disk before it is answered (webhooks, the records of
the sidecar's writes) is made so by syncing the WAL afterwards (``WalSync`` in the service,
FULL's guarantee without the event loop waiting on the disk); the schema is
versioned with ``PRAGMA user_version`` and migrated forward on open. Every write that must be
atomic runs in one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from statemachine import BottleState, ForgeBottleError, TransitionRecord

BUSY_TIMEOUT_MS = 10_000
MAX_ROWID = 2**63 - 1  # SQLite's largest integer key

log = logging.getLogger("forgebottle")

# MIGRATIONS[i] takes the schema from user_version i to i + 1. Append, never edit.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE forge_state (
        owner TEXT NOT NULL,
        repo TEXT NOT NULL,
        issue_number INTEGER NOT NULL,
        slug TEXT NOT NULL UNIQUE,
        agent_name TEXT NOT NULL,
        bottle_names TEXT NOT NULL DEFAULT '[]',
        backend_name TEXT NOT NULL DEFAULT 'local',
        agent_git_user TEXT NOT NULL DEFAULT '',
        pr_number INTEGER,
        status TEXT NOT NULL,
        last_checkin_at TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        issue_url TEXT NOT NULL DEFAULT '',
        pr_url TEXT NOT NULL DEFAULT '',
        sandbox TEXT NOT NULL DEFAULT '',
        chain_head TEXT NOT NULL DEFAULT '',
        op_count INTEGER NOT NULL DEFAULT 0,
        queued_seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (owner, repo, issue_number)
    );
    CREATE TABLE forge_state_archive (
        slug TEXT PRIMARY KEY,
        row TEXT NOT NULL,
        archived_at TEXT NOT NULL
    );
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at TEXT NOT NULL,
        delivery TEXT NOT NULL DEFAULT '',
        event_type TEXT NOT NULL,
        body BLOB NOT NULL,
        body_sha256 TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL DEFAULT 'pending',
        reason TEXT NOT NULL DEFAULT '',
        slug TEXT NOT NULL DEFAULT '',
        attempts INTEGER NOT NULL DEFAULT 0,
        processed_at TEXT
    );
    CREATE INDEX inbox_pending ON inbox (status, id);
    CREATE TABLE runs (
        slug TEXT NOT NULL,
        n INTEGER NOT NULL,
        trigger TEXT NOT NULL,
        prompt_sha256 TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        exit_code INTEGER,
        signalled_status TEXT,
        signalled_summary TEXT,
        watchdog_fired INTEGER NOT NULL DEFAULT 0,
        secret_findings INTEGER NOT NULL DEFAULT 0,
        network TEXT NOT NULL DEFAULT 'none',
        sandbox TEXT NOT NULL DEFAULT 'bwrap',
        error TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (slug, n)
    );
    CREATE TABLE operations (
        slug TEXT NOT NULL,
        seq INTEGER NOT NULL,
        run INTEGER NOT NULL,
        at TEXT NOT NULL,
        op TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        duration_ms REAL NOT NULL DEFAULT 0,
        hash TEXT NOT NULL,
        PRIMARY KEY (slug, seq)
    );
    CREATE TABLE transitions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        slug TEXT NOT NULL,
        at TEXT NOT NULL,
        trigger TEXT NOT NULL,
        source TEXT NOT NULL,
        dest TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX transitions_slug ON transitions (slug, id);
    CREATE TABLE pending_prompts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        slug TEXT NOT NULL,
        at TEXT NOT NULL,
        trigger TEXT NOT NULL,
        source TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX pending_slug ON pending_prompts (slug, id);
    """,
    # 2: provenance names the forge and org the bottle was made under, not today's config.
    """
    ALTER TABLE forge_state ADD COLUMN api_url TEXT NOT NULL DEFAULT '';
    ALTER TABLE forge_state ADD COLUMN org TEXT NOT NULL DEFAULT '';
    """,
    # 3: the newest comment the launch prompt read, so its webhook does not deliver it twice.
    """
    ALTER TABLE forge_state ADD COLUMN seen_comment_id INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: operations keyed by (slug, seq) alone, WITHOUT ROWID: an append writes one B-tree page
    # rather than a table page and its key index's page (every sidecar call appends one).
    """
    CREATE TABLE operations_by_key (
        slug TEXT NOT NULL,
        seq INTEGER NOT NULL,
        run INTEGER NOT NULL,
        at TEXT NOT NULL,
        op TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        duration_ms REAL NOT NULL DEFAULT 0,
        hash TEXT NOT NULL,
        PRIMARY KEY (slug, seq)
    ) WITHOUT ROWID;
    INSERT INTO operations_by_key (slug, seq, run, at, op, target, outcome, detail, duration_ms, hash)
        SELECT slug, seq, run, at, op, target, outcome, detail, duration_ms, hash FROM operations;
    DROP TABLE operations;
    ALTER TABLE operations_by_key RENAME TO operations;
    """,
]


class StoreError(ForgeBottleError):
    pass


@dataclasses.dataclass
class ForgeState:
    """One row of ``forge_state``: the live (or last) bottle of one issue."""

    owner: str
    repo: str
    issue_number: int
    slug: str
    agent_name: str
    status: BottleState
    created_at: str
    updated_at: str
    bottle_names: tuple[str, ...] = ("local",)
    backend_name: str = "local"
    agent_git_user: str = ""
    pr_number: int | None = None
    last_checkin_at: str | None = None
    issue_url: str = ""
    pr_url: str = ""
    sandbox: str = ""
    chain_head: str = ""
    op_count: int = 0
    queued_seq: int = 0
    api_url: str = ""
    org: str = ""
    seen_comment_id: int = 0

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        data["bottle_names"] = list(self.bottle_names)
        return data


_STATE_COLUMNS = [f.name for f in dataclasses.fields(ForgeState)]
# Selected in field order, so a row maps onto ForgeState positionally: `orchestrate status`
# turns 10,000 rows into states and that loop is most of its run time.
_SELECT_STATE = f"SELECT {', '.join(_STATE_COLUMNS)} FROM forge_state"
_STATUS_AT = _STATE_COLUMNS.index("status")
_NAMES_AT = _STATE_COLUMNS.index("bottle_names")


@functools.lru_cache(maxsize=256)
def _bottle_names(encoded: str) -> tuple[str, ...]:
    return tuple(json.loads(encoded))


def _state_from_row(row: sqlite3.Row | dict[str, Any]) -> ForgeState:
    """A state from a row selected with _SELECT_STATE, or from an archived JSON object."""
    values = [row[k] for k in _STATE_COLUMNS] if isinstance(row, dict) else list(row)
    values[_STATUS_AT] = BottleState(values[_STATUS_AT])
    values[_NAMES_AT] = _bottle_names(values[_NAMES_AT])
    return ForgeState(*values)


def _state_to_row(state: ForgeState) -> dict[str, Any]:
    data = {k: getattr(state, k) for k in _STATE_COLUMNS}
    data["status"] = state.status.value
    data["bottle_names"] = json.dumps(list(state.bottle_names))
    return data


@dataclasses.dataclass(frozen=True)
class NewEvent:
    received_at: str
    delivery: str
    event_type: str
    body: bytes
    ignored: str = ""  # a reason: stored as already ignored, never given to the worker


@dataclasses.dataclass(frozen=True)
class InboxEvent:
    id: int
    received_at: str
    delivery: str
    event_type: str
    body: bytes
    status: str
    reason: str
    slug: str
    attempts: int

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "received_at": self.received_at,
            "delivery": self.delivery,
            "event_type": self.event_type,
            "status": self.status,
            "reason": self.reason,
            "slug": self.slug,
        }


@dataclasses.dataclass(frozen=True)
class Operation:
    seq: int
    run: int
    at: str
    op: str
    target: str
    outcome: str
    detail: str
    duration_ms: float
    hash: str

    def content(self) -> dict[str, Any]:
        """What the hash covers: everything but the hash itself."""
        # Spelled out rather than dataclasses.asdict (a recursive deep copy): this runs on
        # every sidecar call. The hash must not change: tests pin one.
        return {
            "seq": self.seq,
            "run": self.run,
            "at": self.at,
            "op": self.op,
            "target": self.target,
            "outcome": self.outcome,
            "detail": self.detail,
            "duration_ms": self.duration_ms,
        }


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(data: Any) -> str:
    return _CANONICAL.encode(data)


def genesis(slug: str) -> str:
    # Seeding with the slug stops a chain being transplanted from one bottle to another.
    return hashlib.sha256(f"forgebottle.provenance/v1:{slug}".encode()).hexdigest()


def chain_hash(previous: str, op: Operation) -> str:
    return hashlib.sha256((previous + canonical(op.content())).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ChainCheck:
    head: str
    verified: bool
    broken_seq: int | None = None
    problem: str = ""


def verify_chain(slug: str, ops: Sequence[Operation], *, head: str, count: int) -> ChainCheck:
    """Recompute the chain. ``head``/``count`` are what forge_state recorded at the last append."""
    previous = genesis(slug)
    for index, op in enumerate(ops, start=1):
        if op.seq != index:
            return ChainCheck(previous, False, index, f"operation {index} is missing")
        expected = chain_hash(previous, op)
        if op.hash != expected:
            return ChainCheck(previous, False, op.seq, f"operation {op.seq} was altered")
        previous = expected
    if len(ops) != count or (count and previous != head):
        return ChainCheck(previous, False, len(ops) + 1, f"operations after {len(ops)} are missing (expected {count})")
    return ChainCheck(previous, True)


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction on ``db``, committed, or rolled back on any failure
    (its commit's included: the connection is never left inside a transaction). A failing
    rollback does not hide the error that caused it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def sync_file(path: Path) -> None:
    """fdatasync ``path``: everything written to it before the call is on disk after it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


# The helper process behind WalSync: one byte in per sync asked, one byte out once done ("k"), or
# failed ("e"). Asks that arrive together share one fdatasync: each was sent after its commit's
# write() returned, so one sync begun after reading them covers them all. The fd stays open so a
# writeback error is reported to it (a file opened after the error may never hear of it); a new
# WAL file (the database was closed and opened again) is noticed by its inode and reopened.
_WAL_SYNC_HELPER = r"""
import os, signal, sys
# Stopping is the parent's to decide (a terminal's Ctrl-C reaches the whole process group, as may a
# `systemctl stop`): it closes our stdin, or dies, which closes it too; until then syncs are answered.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
path, fd, seen = sys.argv[1], -1, None
try:
    while True:
        asks = os.read(0, 4096)
        if not asks:
            break
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) != seen:
                if fd >= 0:
                    os.close(fd)
                    fd = -1
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                st = os.fstat(fd)
                seen = (st.st_dev, st.st_ino)
            os.fdatasync(fd)
            answer = b"k"
        except OSError:
            answer = b"e"
        os.write(1, answer * len(asks))
except BrokenPipeError:  # the parent let us go with a sync in flight: nobody is waiting for it
    pass
"""


class WalSync:
    """Makes what is committed to a WAL durable without the event loop waiting on the disk.

    A commit at ``synchronous=NORMAL`` writes the WAL but does not sync it; ``await sync()``
    then fdatasyncs it, which is all that FULL adds to a commit in WAL mode. The sync runs in a
    helper process, not a thread: a thread needs the GIL to start and to report, from an event
    loop that holds it nearly all the time, and under a webhook burst those hand-offs cost
    intake more than the inserts and the fsync together (bench/README.md). Should the helper be
    missing, fail or exit, syncs run in a thread instead (the same guarantee, slower; counted in
    ``syncs``) and a new helper is tried ``retry_after`` seconds later.

    The helper is ``python -I -S`` (nothing imported beyond ``os``, ``signal`` and ``sys``: ~9 MB
    resident) with an empty environment and the WAL's path as its only argument. It exits when
    its stdin closes, so also when this process dies, and not before: it ignores SIGINT and
    SIGTERM, which a Ctrl-C or a ``systemctl stop`` may send it along with this process.
    """

    def __init__(self, wal: Path, *, retry_after: float = 30.0, command: Sequence[str] | None = None) -> None:
        self.wal = wal
        self.retry_after = retry_after
        self.syncs: dict[str, int] = {"helper": 0, "thread": 0}
        if command is None:  # an embedded interpreter may not know its executable: no helper then
            command = [sys.executable, "-I", "-S", "-c", _WAL_SYNC_HELPER, str(wal)] if sys.executable else []
        self._command = list(command)
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._lost_at: float | None = None
        self._closed = False
        self._exiting: list[subprocess.Popen[bytes]] = []  # let go of, reaped once they have exited

    @property
    def helper_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def sync(self) -> Literal["helper", "thread"]:
        """Return once everything written to the WAL before the call is on disk: ``"helper"``
        or ``"thread"``, whichever synced it. Raises OSError if neither could."""
        loop = asyncio.get_running_loop()
        if self._proc is not None and self._loop is not loop:  # answers would go to the other loop
            self._detach()
        if self._proc is None and not self._closed and self._may_spawn():
            self._spawn(loop)
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            try:
                os.write(proc.stdin.fileno(), b"s")
            except BlockingIOError:  # 64 KiB of unanswered asks: this one goes to a thread
                pass
            except OSError as exc:
                self._lost(f"could not be asked ({exc})")
            else:
                answered = loop.create_future()
                self._waiting.append(answered)
                if await answered:
                    self.syncs["helper"] += 1
                    return "helper"
        await asyncio.to_thread(sync_file, self.wal)
        self.syncs["thread"] += 1
        return "thread"

    async def close(self) -> None:
        """Stop the helper (it exits once its stdin closes); later syncs run in threads."""
        self._closed = True
        self._detach()
        for proc in self._exiting:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 5)
            if proc.returncode is None:  # stuck in the disk, most likely: left to init
                proc.kill()
        self._exiting = []

    def _may_spawn(self) -> bool:
        return self._lost_at is None or time.monotonic() >= self._lost_at + self.retry_after

    def _spawn(self, loop: asyncio.AbstractEventLoop) -> None:
        self._exiting = [proc for proc in self._exiting if proc.poll() is None]
        if not self._command:
            self._lost_at = math.inf
            log.warning("no Python executable to run the WAL sync helper: syncing in threads")
            return
        try:
            proc = subprocess.Popen(
                self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={}, bufsize=0, close_fds=True
            )
        except OSError as exc:
            self._lost_at = time.monotonic()
            log.warning("cannot start the WAL sync helper (%s): syncing in threads", exc)
            return
        assert proc.stdin is not None and proc.stdout is not None
        os.set_blocking(proc.stdin.fileno(), False)
        os.set_blocking(proc.stdout.fileno(), False)
        loop.add_reader(proc.stdout.fileno(), self._answers)
        self._loop, self._proc = loop, proc

    def _answers(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        try:
            answers = os.read(proc.stdout.fileno(), 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"could not be read ({exc})")
            return
        if not answers:
            self._lost(f"exited ({proc.poll()})")
            return
        failed = False
        for answer in answers:
            if not self._waiting:
                self._lost("answered a sync nobody asked for")
                return
            waiter = self._waiting.popleft()
            failed = failed or answer != ord("k")
            if not waiter.done():
                waiter.set_result(answer == ord("k"))
        if failed:
            log.warning("the WAL sync helper could not sync %s: syncing in a thread", self.wal)

    def _lost(self, reason: str) -> None:
        proc = self._detach()
        if proc is not None:
            proc.kill()  # not waited for: a helper stuck in the disk would stall the event loop
        self._lost_at = time.monotonic()
        log.warning("the WAL sync helper %s; syncing in threads, a new helper in %.0fs", reason, self.retry_after)

    def _detach(self) -> subprocess.Popen[bytes] | None:
        """Let the helper go: close its pipes (its stdin closing stops it) and send every sync
        still waiting on it to a thread."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        self._exiting.append(proc)
        if self._loop is not None and proc.stdout is not None:
            self._loop.remove_reader(proc.stdout.fileno())
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        waiting, self._waiting = self._waiting, collections.deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(False)
        return proc


class Store:
    """All persistent state. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Held for every write transaction, on either connection, so a writer waits exactly as
        # long as the write before it rather than in SQLite's busy-handler sleeps (1, 2, 5 ms...).
        self._writing = threading.Lock()
        self._checkpointing = threading.Lock()
        self._checkpointer: sqlite3.Connection | None = None
        self._db = self._connect()
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._sync = ""
        self._intake: sqlite3.Connection | None = None
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return db

    def close(self) -> None:
        with self._lock, self._writing, self._checkpointing:
            for db in (self._intake, self._checkpointer):
                if db is not None:
                    db.close()
            self._db.close()

    @property
    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self.transaction() as db:
            current = int(db.execute("PRAGMA user_version").fetchone()[0])
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"{self.path}: schema version {current} is newer than this forgebottle ({len(MIGRATIONS)})"
                )
            for version in range(current, len(MIGRATIONS)):
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={version + 1}")

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction.

        ``durable``: fsync the WAL before returning (synchronous=FULL). Otherwise the commit
        survives a crash of this process but may be lost, whole, on power loss, until the next
        durable commit syncs the WAL (synchronous=NORMAL). Webhooks are durable before they are
        answered; everything derived from them can be derived again.
        """
        with self._lock, self._writing:
            mode = "FULL" if durable else "NORMAL"
            if mode != self._sync:  # a statement per transaction otherwise (~10% of a sidecar append)
                self._db.execute(f"PRAGMA synchronous={mode}")
                self._sync = mode
            with _immediate(self._db) as db:
                yield db

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # -- forge_state ---------------------------------------------------------------

    def upsert(self, state: ForgeState, db: sqlite3.Connection | None = None) -> None:
        row = _state_to_row(state)
        sql = f"INSERT OR REPLACE INTO forge_state ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})"
        if db is not None:
            db.execute(sql, list(row.values()))
            return
        with self.transaction() as tx:
            tx.execute(sql, list(row.values()))

    def get(self, owner: str, repo: str, issue: int) -> ForgeState | None:
        rows = self._query(f"{_SELECT_STATE} WHERE owner = ? AND repo = ? AND issue_number = ?", (owner, repo, issue))
        return _state_from_row(rows[0]) if rows else None

    def by_slug(self, slug: str) -> ForgeState | None:
        rows = self._query(f"{_SELECT_STATE} WHERE slug = ?", (slug,))
        if rows:
            return _state_from_row(rows[0])
        archived = self._query("SELECT row FROM forge_state_archive WHERE slug = ?", (slug,))
        return _state_from_row(json.loads(archived[0]["row"])) if archived else None

    def delete(self, owner: str, repo: str, issue: int) -> None:
        with self.transaction() as db:
            db.execute(
                "DELETE FROM forge_state WHERE owner = ? AND repo = ? AND issue_number = ?", (owner, repo, issue)
            )

    def all(self, *, live_only: bool = False) -> list[ForgeState]:
        where = ""
        if live_only:
            where = " WHERE status IN ({})".format(", ".join(f"'{s.value}'" for s in BottleState if s.live))
        rows = self._query(f"{_SELECT_STATE}{where} ORDER BY owner, repo, issue_number")
        return [_state_from_row(r) for r in rows]

    def with_status(self, *states: BottleState) -> list[ForgeState]:
        marks = ", ".join("?" for _ in states)
        rows = self._query(
            f"{_SELECT_STATE} WHERE status IN ({marks}) ORDER BY queued_seq, slug", [s.value for s in states]
        )
        return [_state_from_row(r) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        rows = self._query("SELECT status, COUNT(*) AS n FROM forge_state GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    def slug_taken(self, slug: str, db: sqlite3.Connection) -> bool:
        return bool(
            db.execute(
                "SELECT 1 FROM forge_state WHERE slug = ? UNION SELECT 1 FROM forge_state_archive WHERE slug = ?",
                (slug, slug),
            ).fetchone()
        )

    def archive(self, state: ForgeState, at: str, db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT OR REPLACE INTO forge_state_archive (slug, row, archived_at) VALUES (?, ?, ?)",
            (state.slug, json.dumps(_state_to_row(state)), at),
        )

    def next_queue_seq(self, db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT COALESCE(MAX(queued_seq), 0) + 1 FROM forge_state").fetchone()[0])

    def apply(self, state: ForgeState, record: TransitionRecord, db: sqlite3.Connection | None = None) -> None:
        """Persist a transition the machine made: new status and its record, atomically."""
        state.status = BottleState(record.dest)
        state.updated_at = record.at

        def write(tx: sqlite3.Connection) -> None:
            tx.execute(
                "UPDATE forge_state SET status = ?, updated_at = ?, queued_seq = ? WHERE slug = ?",
                (state.status.value, state.updated_at, state.queued_seq, state.slug),
            )
            tx.execute(
                "INSERT INTO transitions (slug, at, trigger, source, dest, reason) VALUES (?, ?, ?, ?, ?, ?)",
                (state.slug, record.at, record.trigger, record.source, record.dest, record.reason),
            )

        if db is not None:
            write(db)
        else:
            with self.transaction() as tx:
                write(tx)

    def set_fields(self, slug: str, db: sqlite3.Connection | None = None, **fields: Any) -> None:
        assert fields and all(k in _STATE_COLUMNS for k in fields)
        sql = f"UPDATE forge_state SET {', '.join(f'{k} = ?' for k in fields)} WHERE slug = ?"
        if db is not None:
            db.execute(sql, [*fields.values(), slug])
            return
        with self.transaction() as tx:
            tx.execute(sql, [*fields.values(), slug])

    def transitions(self, slug: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT at, trigger, source, dest, reason FROM transitions WHERE slug = ? ORDER BY id", (slug,)
        )
        return [dict(r) for r in rows]

    # -- inbox -----------------------------------------------------------------------

    def add_event(self, *, received_at: str, delivery: str, event_type: str, body: bytes) -> tuple[int, bool]:
        """Store a webhook durably. Returns (id, is_new); a byte-identical body is not new."""
        return self.add_events([NewEvent(received_at, delivery, event_type, body)])[0]

    def add_events(self, events: Sequence[NewEvent]) -> list[tuple[int, bool]]:
        """Store webhooks in one transaction, one fsync (group commit). (id, is_new) for each."""
        results = self.insert_events(events)
        sync_file(self.wal_path)
        return results

    @property
    def wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def insert_events(self, events: Sequence[NewEvent]) -> list[tuple[int, bool]]:
        """Commit webhooks without waiting for the disk: (id, is_new) for each.

        They survive a crash of this process, not yet of the machine, until the WAL is synced
        (``sync_file(wal_path)``, or a ``WalSync``): nothing may answer for them or act on them
        before that (``pending_events(before=...)`` keeps the worker off them). Intake commits
        here, on the event loop, and syncs in a helper process. This connection never
        checkpoints as part of a commit, which would stall the loop on two fsyncs; whoever
        inserts runs ``checkpoint`` elsewhere (as for the main connection after
        ``defer_checkpoints``).
        """
        with self._writing:
            if self._intake is None:
                self._intake = self._connect()
                self._intake.execute("PRAGMA synchronous=NORMAL")
                self._intake.execute("PRAGMA wal_autocheckpoint=0")
                # Each event lands on a random page of the body_sha256 index: a cache larger than
                # the default 2 MB keeps that index in memory instead of re-reading a few pages
                # from disk per batch (16 MB is the index of ~200,000 events).
                self._intake.execute("PRAGMA cache_size=-16384")
            results: list[tuple[int, bool]] = []
            with _immediate(self._intake) as db:
                for event in events:
                    digest = hashlib.sha256(event.body).hexdigest()
                    # Insert first, look up only a replay: one statement for a new event.
                    cursor = db.execute(
                        "INSERT INTO inbox (received_at, delivery, event_type, body, body_sha256, status, reason, "
                        "processed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (body_sha256) DO NOTHING",
                        (
                            event.received_at,
                            event.delivery,
                            event.event_type,
                            event.body,
                            digest,
                            "ignored" if event.ignored else "pending",
                            event.ignored,
                            event.received_at if event.ignored else None,
                        ),
                    )
                    if cursor.rowcount == 1 and cursor.lastrowid is not None:
                        results.append((cursor.lastrowid, True))
                        continue
                    existing = db.execute("SELECT id FROM inbox WHERE body_sha256 = ?", (digest,)).fetchone()
                    results.append((int(existing[0]), False))
        return results

    def defer_checkpoints(self) -> None:
        """Stop the main connection checkpointing inside its commits (SQLite's default, about
        every 1,000 WAL pages: a copy and two fsyncs in whatever commits, on the event loop in
        ``serve``). Whoever calls this checkpoints instead: :meth:`checkpoint`, in a thread."""
        with self._lock, self._writing:
            self._db.execute("PRAGMA wal_autocheckpoint=0")

    @property
    def changes(self) -> int:
        """Rows changed through this store so far: a cheap sign that the WAL has grown."""
        with self._lock:
            return self._db.total_changes + (self._intake.total_changes if self._intake is not None else 0)

    def checkpoint(self) -> None:
        """Copy committed WAL frames into the database (PASSIVE: it waits for no reader or
        writer). Blocking: the service runs it in a thread, on a connection of its own."""
        with self._checkpointing:
            if self._checkpointer is None:
                self._checkpointer = self._connect()
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def pending_events(self, limit: int = 100, *, before: int | None = None) -> list[InboxEvent]:
        """The oldest pending events; ``before``: only those with a smaller id."""
        last = MAX_ROWID if before is None else before - 1
        rows = self._query(
            "SELECT * FROM inbox WHERE status = 'pending' AND id <= ? ORDER BY id LIMIT ?", (last, limit)
        )
        return [self._event(r) for r in rows]

    def event(self, event_id: int) -> InboxEvent | None:
        rows = self._query("SELECT * FROM inbox WHERE id = ?", (event_id,))
        return self._event(rows[0]) if rows else None

    @staticmethod
    def _event(row: sqlite3.Row) -> InboxEvent:
        return InboxEvent(
            int(row["id"]),
            row["received_at"],
            row["delivery"],
            row["event_type"],
            bytes(row["body"]),
            row["status"],
            row["reason"],
            row["slug"],
            int(row["attempts"]),
        )

    def finish_event(
        self, event_id: int, *, status: str, reason: str, slug: str, at: str, db: sqlite3.Connection | None = None
    ) -> None:
        sql = "UPDATE inbox SET status = ?, reason = ?, slug = ?, processed_at = ? WHERE id = ?"
        if db is not None:
            db.execute(sql, (status, reason, slug, at, event_id))
            return
        with self.transaction() as tx:
            tx.execute(sql, (status, reason, slug, at, event_id))

    def bump_attempts(self, event_id: int, reason: str) -> int:
        with self.transaction() as db:
            db.execute("UPDATE inbox SET attempts = attempts + 1, reason = ? WHERE id = ?", (reason, event_id))
            return int(db.execute("SELECT attempts FROM inbox WHERE id = ?", (event_id,)).fetchone()[0])

    def events(self, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM inbox WHERE id < ? ORDER BY id DESC LIMIT ?", (before or 2**62, limit))
        return [self._event(r).summary() for r in rows]

    def count_events(self) -> dict[str, int]:
        rows = self._query("SELECT status, COUNT(*) AS n FROM inbox GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    # -- runs --------------------------------------------------------------------------

    def start_run(
        self,
        slug: str,
        *,
        trigger: str,
        prompt_sha256: str,
        started_at: str,
        network: str,
        sandbox: str,
        db: sqlite3.Connection | None = None,
    ) -> int:
        def write(tx: sqlite3.Connection) -> int:
            n = int(tx.execute("SELECT COALESCE(MAX(n), 0) + 1 FROM runs WHERE slug = ?", (slug,)).fetchone()[0])
            tx.execute(
                "INSERT INTO runs (slug, n, trigger, prompt_sha256, started_at, network, sandbox) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (slug, n, trigger, prompt_sha256, started_at, network, sandbox),
            )
            return n

        if db is not None:
            return write(db)
        with self.transaction() as tx:
            return write(tx)

    def update_run(self, slug: str, n: int, **fields: Any) -> None:
        allowed = {
            "ended_at",
            "exit_code",
            "signalled_status",
            "signalled_summary",
            "watchdog_fired",
            "secret_findings",
            "error",
        }
        assert fields and set(fields) <= allowed
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET {sets} WHERE slug = ? AND n = ?", [*fields.values(), slug, n])

    def runs(self, slug: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM runs WHERE slug = ? ORDER BY n", (slug,))
        return [dict(r) for r in rows]

    def last_run(self, slug: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM runs WHERE slug = ? ORDER BY n DESC LIMIT 1", (slug,))
        return dict(rows[0]) if rows else None

    # -- the operation log ------------------------------------------------------------

    def append_operation(
        self,
        slug: str,
        *,
        run: int,
        at: str,
        op: str,
        target: str,
        outcome: str,
        detail: str,
        duration_ms: float,
    ) -> Operation:
        """Append one operation to ``slug``'s chain, committed at NORMAL: it survives a crash of
        this process at once; the caller syncs the WAL where it promises more (the service does,
        for writes and denials, before the agent hears back)."""
        with self.transaction() as db:
            row = db.execute("SELECT chain_head, op_count FROM forge_state WHERE slug = ?", (slug,)).fetchone()
            if row is None:
                raise StoreError(f"no bottle {slug!r}")
            previous = row["chain_head"] or genesis(slug)
            seq = int(row["op_count"]) + 1
            duration_ms = round(duration_ms, 3)
            draft = Operation(seq, run, at, op, target, outcome, detail, duration_ms, "")
            operation = Operation(seq, run, at, op, target, outcome, detail, duration_ms, chain_hash(previous, draft))
            db.execute(
                "INSERT INTO operations (slug, seq, run, at, op, target, outcome, detail, duration_ms, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (slug, seq, run, at, op, target, outcome, detail, operation.duration_ms, operation.hash),
            )
            db.execute(
                "UPDATE forge_state SET chain_head = ?, op_count = ?, last_checkin_at = ? WHERE slug = ?",
                (operation.hash, seq, at, slug),
            )
            return operation

    def operations(self, slug: str) -> list[Operation]:
        rows = self._query("SELECT * FROM operations WHERE slug = ? ORDER BY seq", (slug,))
        return [
            Operation(
                int(r["seq"]),
                int(r["run"]),
                r["at"],
                r["op"],
                r["target"],
                r["outcome"],
                r["detail"],
                float(r["duration_ms"]),
                r["hash"],
            )
            for r in rows
        ]

    def verify(self, slug: str) -> ChainCheck:
        state = self.by_slug(slug)
        if state is None:
            raise StoreError(f"no bottle {slug!r}")
        return verify_chain(slug, self.operations(slug), head=state.chain_head, count=state.op_count)

    # -- pending prompts -----------------------------------------------------------

    def add_pending(
        self, slug: str, *, at: str, trigger: str, source: str, body: str, db: sqlite3.Connection | None = None
    ) -> None:
        sql = "INSERT INTO pending_prompts (slug, at, trigger, source, body) VALUES (?, ?, ?, ?, ?)"
        if db is not None:
            db.execute(sql, (slug, at, trigger, source, body))
            return
        with self.transaction() as tx:
            tx.execute(sql, (slug, at, trigger, source, body))

    def pending(self, slug: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM pending_prompts WHERE slug = ? ORDER BY id", (slug,))
        return [dict(r) for r in rows]

    def take_pending(self, slug: str, ids: Sequence[int], db: sqlite3.Connection) -> None:
        db.executemany("DELETE FROM pending_prompts WHERE slug = ? AND id = ?", [(slug, i) for i in ids])

    def slugs_with_pending(self) -> list[str]:
        rows = self._query("SELECT slug, MIN(id) AS first FROM pending_prompts GROUP BY slug ORDER BY first")
        return [r["slug"] for r in rows]

    def count_operations(self, slug: str, ops: Sequence[str], *, outcome: str, since: str) -> int:
        marks = ", ".join("?" for _ in ops)
        rows = self._query(
            f"SELECT COUNT(*) AS n FROM operations WHERE slug = ? AND op IN ({marks}) AND outcome = ? AND at >= ?",
            [slug, *ops, outcome, since],
        )
        return int(rows[0]["n"])

    def by_pr(self, owner: str, repo: str, pr: int) -> ForgeState | None:
        rows = self._query(f"{_SELECT_STATE} WHERE owner = ? AND repo = ? AND pr_number = ?", (owner, repo, pr))
        return _state_from_row(rows[0]) if rows else None
