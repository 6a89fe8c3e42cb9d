"""SQLite store: bottle state, webhook inbox, runs, the operation log, transitions, prompts.

WAL mode. What must survive a power loss before anyone is told it happened (a webhook before
its 202, the record of a sidecar write before the agent hears back) is committed with
``synchronous=FULL`` (``durable=True``); the service runs those commits in a thread, so the
event loop never waits on the disk. Everything else commits at ``NORMAL``: it survives a crash
of this process, and what a power loss could take is derived again from the durable inbox.
Checkpoints are SQLite's own. The schema is versioned with ``PRAGMA user_version`` and migrated
forward on open. Every write that must be atomic runs in one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from config import valid_slug
from statemachine import BottleState, ForgeBottleError, TransitionRecord

BUSY_TIMEOUT_MS = 10_000

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
    # 5: egress connections and model calls carry structured data (host, bytes, tokens), and a
    # run keeps the token budget it ran under; denials are counted for `orchestrate status`.
    """
    ALTER TABLE operations ADD COLUMN data TEXT;
    ALTER TABLE runs ADD COLUMN budget_tokens INTEGER;
    CREATE INDEX operations_egress_denied ON operations (slug) WHERE outcome = 'denied' AND op IN ('egress', 'model');
    """,
    # 6: what the bot said on the forge (conversation.py): explanations once per issue and
    # reason, each bottle's status comment, CI fix attempts per pull request head.
    """
    CREATE TABLE IF NOT EXISTS conversation (
        owner TEXT NOT NULL,
        repo TEXT NOT NULL,
        issue INTEGER NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL DEFAULT '',
        at TEXT NOT NULL,
        PRIMARY KEY (owner, repo, issue, kind, key)
    ) WITHOUT ROWID;
    """,
    # 7: model tokens per bottle for `orchestrate status`, without a scan of every operation.
    """
    CREATE INDEX operations_model ON operations (slug) WHERE op = 'model';
    """,
]


# Tokens read and written by model calls, as the gateway recorded them.
_TOKENS = (
    "COALESCE(SUM(json_extract(data, '$.usage.input_tokens')), 0) "
    "+ COALESCE(SUM(json_extract(data, '$.usage.output_tokens')), 0)"
)
_MODEL_CALLS = "op = 'model' AND data IS NOT NULL"


class StoreError(ForgeBottleError):
    pass


class UnknownBottle(StoreError):
    http_status = 404


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
    data: dict[str, Any] | None = None  # egress and model operations: host, bytes, tokens

    def content(self) -> dict[str, Any]:
        """What the hash covers: everything but the hash itself (``data`` only when present, so
        every chain written before it existed still verifies)."""
        content = {
            "seq": self.seq,
            "run": self.run,
            "at": self.at,
            "op": self.op,
            "target": self.target,
            "outcome": self.outcome,
            "detail": self.detail,
            "duration_ms": self.duration_ms,
        }
        if self.data is not None:
            content["data"] = self.data
        return content


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


def _hash_matches(previous: str, op: Operation) -> str | None:
    """The chain hash ``op`` carries if it is right, else None.

    Records written before durations were always floats hashed a rejection's ``0`` as an
    integer while the REAL column reads it back as ``0.0``: those verify under the integer form.
    """
    expected = chain_hash(previous, op)
    if op.hash == expected:
        return expected
    if op.duration_ms.is_integer():
        legacy = hashlib.sha256((previous + canonical({**op.content(), "duration_ms": int(op.duration_ms)})).encode())
        if op.hash == legacy.hexdigest():
            return op.hash
    return None


def verify_chain(slug: str, ops: Sequence[Operation], *, head: str, count: int) -> ChainCheck:
    """Recompute the chain. ``head``/``count`` are what forge_state recorded at the last append."""
    previous = genesis(slug)
    for index, op in enumerate(ops, start=1):
        if op.seq != index:
            return ChainCheck(previous, False, index, f"operation {index} is missing")
        found = _hash_matches(previous, op)
        if found is None:
            return ChainCheck(previous, False, op.seq, f"operation {op.seq} was altered")
        previous = found
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


class _Database:
    """One SQLite connection behind a lock, its schema kept current: what the parts of Store share."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._sync = ""
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

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

        ``durable``: committed with ``synchronous=FULL`` (the WAL is synced before this returns).
        Otherwise ``NORMAL``: it survives a crash of this process at once, and a power loss once
        a later durable commit (or a checkpoint) has synced the WAL. Blocking on the disk: the
        service runs durable transactions in a thread.
        """
        with self._lock:
            mode = "FULL" if durable else "NORMAL"
            if mode != self._sync:
                self._db.execute(f"PRAGMA synchronous={mode}")
                self._sync = mode
            with _immediate(self._db) as db:
                yield db

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())


class _Inbox(_Database):
    """The webhook inbox: every delivery, stored durably before it is answered."""

    # -- inbox -----------------------------------------------------------------------

    def add_events(self, events: Sequence[NewEvent]) -> list[tuple[int, bool]]:
        """Store webhooks in one durable transaction (group commit): (id, is_new) for each.
        Blocks on the disk: call it from a thread."""
        results: list[tuple[int, bool]] = []
        with self.transaction(durable=True) as db:
            for event in events:
                digest = hashlib.sha256(event.body).hexdigest()
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

    def pending_events(self, limit: int = 100) -> list[InboxEvent]:
        """The oldest pending events, in arrival order."""
        rows = self._query("SELECT * FROM inbox WHERE status = 'pending' ORDER BY id LIMIT ?", (limit,))
        return [self._event(r) for r in rows]

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


class _Runs(_Database):
    """Runs, the hash-chained operation log, and the prompts waiting for a run."""

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
            "budget_tokens",
        }
        assert fields and set(fields) <= allowed
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET {sets} WHERE slug = ? AND n = ?", [*fields.values(), slug, n])

    def end_run(self, slug: str, n: int, *, at: str, error: str, db: sqlite3.Connection) -> None:
        db.execute("UPDATE runs SET ended_at = ?, error = ? WHERE slug = ? AND n = ?", (at, error, slug, n))

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
        durable: bool = False,
        data: dict[str, Any] | None = None,
    ) -> Operation:
        """Append one operation to ``slug``'s chain (``durable``: see ``transaction``)."""
        with self.transaction(durable=durable) as db:
            row = db.execute("SELECT chain_head, op_count FROM forge_state WHERE slug = ?", (slug,)).fetchone()
            if row is None:
                raise StoreError(f"no bottle {slug!r}")
            previous = row["chain_head"] or genesis(slug)
            seq = int(row["op_count"]) + 1
            # Always a float: the column is REAL, and the hash must read back as it was written.
            duration_ms = round(float(duration_ms), 3)
            # Through canonical JSON and back: the hash covers exactly what a reader will load.
            stored = canonical(data) if data is not None else None
            loaded = json.loads(stored) if stored is not None else None
            draft = Operation(seq, run, at, op, target, outcome, detail, duration_ms, "", loaded)
            operation = dataclasses.replace(draft, hash=chain_hash(previous, draft))
            db.execute(
                "INSERT INTO operations (slug, seq, run, at, op, target, outcome, detail, duration_ms, hash, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (slug, seq, run, at, op, target, outcome, detail, duration_ms, operation.hash, stored),
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
                json.loads(r["data"]) if r["data"] is not None else None,
            )
            for r in rows
        ]

    def egress_denials(self) -> dict[str, int]:
        """Refused egress connections and model calls, per bottle."""
        rows = self._query(
            "SELECT slug, COUNT(*) AS n FROM operations WHERE outcome = 'denied' AND op IN ('egress', 'model') "
            "GROUP BY slug"
        )
        return {r["slug"]: int(r["n"]) for r in rows}

    def model_tokens_by_bottle(self) -> dict[str, int]:
        """Tokens (read and written) each bottle's model calls used, over all its runs."""
        rows = self._query(f"SELECT slug, {_TOKENS} AS n FROM operations WHERE {_MODEL_CALLS} GROUP BY slug")
        return {r["slug"]: int(r["n"]) for r in rows}

    def model_tokens(self, slug: str) -> int:
        """Tokens (read and written) the bottle's model calls used, over all its runs."""
        rows = self._query(f"SELECT {_TOKENS} AS n FROM operations WHERE slug = ? AND {_MODEL_CALLS}", (slug,))
        return int(rows[0]["n"])

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

    def count_writes(self, slug: str, ops: Sequence[str], *, since: str) -> int:
        """Write attempts of ``ops`` since ``since``: every one that was not denied (those that
        reached the forge or git, failed or not), and every push, refused ones included."""
        marks = ", ".join("?" for _ in ops)
        rows = self._query(
            f"SELECT COUNT(*) AS n FROM operations WHERE slug = ? AND op IN ({marks}) AND at >= ? "
            "AND (outcome != 'denied' OR op = 'push')",
            [slug, *ops, since],
        )
        return int(rows[0]["n"])


class Store(_Inbox, _Runs):
    """All persistent state. Thread-safe: one connection behind a lock."""

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

    def known(self, slug: str) -> ForgeState:
        """The bottle called ``slug``, live or not; UnknownBottle (404) for anything else."""
        state = self.by_slug(slug) if valid_slug(slug) else None
        if state is None:
            raise UnknownBottle(f"no bottle {slug[:80]!r}" if valid_slug(slug) else f"invalid slug {slug[:80]!r}")
        return state

    def by_slug(self, slug: str) -> ForgeState | None:
        rows = self._query(f"{_SELECT_STATE} WHERE slug = ?", (slug,))
        if rows:
            return _state_from_row(rows[0])
        archived = self._query("SELECT row FROM forge_state_archive WHERE slug = ?", (slug,))
        return _state_from_row(json.loads(archived[0]["row"])) if archived else None

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

    def by_pr(self, owner: str, repo: str, pr: int) -> ForgeState | None:
        rows = self._query(f"{_SELECT_STATE} WHERE owner = ? AND repo = ? AND pr_number = ?", (owner, repo, pr))
        return _state_from_row(rows[0]) if rows else None

    # -- the conversation on the forge (conversation.py) --------------------------------

    def noted(self, owner: str, repo: str, issue: int, kind: str, key: str) -> str | None:
        """The value kept for (issue, kind, key), or None if nothing is."""
        rows = self._query(
            "SELECT value FROM conversation WHERE owner = ? AND repo = ? AND issue = ? AND kind = ? AND key = ?",
            (owner, repo, issue, kind, key),
        )
        return str(rows[0]["value"]) if rows else None

    def note(
        self,
        owner: str,
        repo: str,
        issue: int,
        kind: str,
        key: str,
        value: str = "",
        *,
        at: str,
        once: bool = False,
        db: sqlite3.Connection | None = None,
    ) -> bool:
        """Keep ``value`` for (issue, kind, key); with ``once``, only if nothing is kept there
        yet. True if this call wrote it."""
        verb = "INSERT OR IGNORE" if once else "INSERT OR REPLACE"
        sql = f"{verb} INTO conversation (owner, repo, issue, kind, key, value, at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        args = (owner, repo, issue, kind, key, value, at)
        if db is not None:
            return db.execute(sql, args).rowcount > 0
        with self.transaction() as tx:
            return tx.execute(sql, args).rowcount > 0

    def noted_keys(self, owner: str, repo: str, issue: int, kind: str) -> list[str]:
        rows = self._query(
            "SELECT key FROM conversation WHERE owner = ? AND repo = ? AND issue = ? AND kind = ? ORDER BY at",
            (owner, repo, issue, kind),
        )
        return [str(r["key"]) for r in rows]

    def drop_pending(self, slug: str, trigger: str, db: sqlite3.Connection) -> int:
        """Remove ``slug``'s waiting prompts of ``trigger`` (a newer one replaces them)."""
        return db.execute("DELETE FROM pending_prompts WHERE slug = ? AND trigger = ?", (slug, trigger)).rowcount
