from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from statemachine import Bottle, BottleState, Trigger, fire
from store import MIGRATIONS, ForgeState, NewEvent, Operation, Store, StoreError, chain_hash, genesis
from tests.conftest import schema_version, verified_chain


def state(owner: str = "acme", repo: str = "widgets", issue: int = 17, **kw: object) -> ForgeState:
    values: dict[str, object] = {
        "owner": owner,
        "repo": repo,
        "issue_number": issue,
        "slug": f"{owner}-{repo}-{issue}",
        "agent_name": "implementer",
        "status": BottleState.QUEUED,
        "created_at": "2026-01-01T00:00:00+00:00",
        "updated_at": "2026-01-01T00:00:00+00:00",
    }
    values.update(kw)
    return ForgeState(**values)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "bot-bottle.db")


def test_round_trip_keeps_every_field(store: Store) -> None:
    original = state(
        bottle_names=("local", "gpu"),
        backend_name="command",
        agent_git_user="bot",
        pr_number=18,
        status=BottleState.FROZEN,
        last_checkin_at="2026-01-01T00:05:00+00:00",
        issue_url="http://x/issues/17",
        pr_url="http://x/pulls/18",
        sandbox="bwrap",
    )
    store.upsert(original)
    assert store.get("acme", "widgets", 17) == original
    assert store.by_slug("acme-widgets-17") == original


def test_missing_is_none(store: Store) -> None:
    assert store.get("acme", "widgets", 99) is None
    assert store.by_slug("nope") is None


def test_upsert_replaces_keeping_one_row(store: Store) -> None:
    store.upsert(state())
    store.upsert(state(agent_name="reviewer", pr_number=5))
    rows = store.all()
    assert len(rows) == 1
    assert (rows[0].agent_name, rows[0].pr_number) == ("reviewer", 5)


def test_all_is_ordered_by_owner_repo_issue(store: Store) -> None:
    for owner, repo, issue in [("b", "a", 1), ("a", "b", 2), ("a", "b", 10), ("a", "a", 5)]:
        store.upsert(state(owner, repo, issue))
    assert [(s.owner, s.repo, s.issue_number) for s in store.all()] == [
        ("a", "a", 5),
        ("a", "b", 2),
        ("a", "b", 10),
        ("b", "a", 1),
    ]


def test_records_survive_a_reopen(tmp_path: Path) -> None:
    first = Store(tmp_path / "db")
    first.upsert(state())
    first.add_events([NewEvent("t", "d", "issues", b"{}")])
    first.close()
    second = Store(tmp_path / "db")
    assert second.get("acme", "widgets", 17) == state()
    assert len(second.pending_events()) == 1


def test_migrates_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    store = Store(path)
    assert schema_version(store.path) == len(MIGRATIONS)
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"forge_state", "inbox", "runs", "operations", "transitions", "pending_prompts"} <= tables


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="newer"):
        Store(path)


def test_identical_body_is_not_new(store: Store) -> None:
    first = store.add_events([NewEvent("t", "a", "issues", b'{"x": 1}')])[0]
    again = store.add_events([NewEvent("t", "b", "issues", b'{"x": 1}')])[0]
    other = store.add_events([NewEvent("t", "c", "issues", b'{"x": 2}')])[0]
    assert first == (first[0], True)
    assert again == (first[0], False)
    assert other[1] and other[0] != first[0]


def event(body: bytes, delivery: str = "d") -> NewEvent:
    return NewEvent(received_at="t", delivery=delivery, event_type="issues", body=body)


def test_a_batch_repeating_a_body_stores_it_once(store: Store) -> None:
    old = store.add_events([event(b"old")])[0][0]
    results = store.add_events([event(b"a"), event(b"old"), event(b"b"), event(b"a", "again")])
    a, b = results[0][0], results[2][0]
    assert results == [(a, True), (old, False), (b, True), (a, False)]
    assert [e.body for e in store.pending_events()] == [b"old", b"a", b"b"]


def test_a_failed_batch_stores_nothing_and_frees_the_store(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store.add_events([event(b"first"), NewEvent("t", "d", None, b"no type")])  # type: ignore[arg-type]
    assert store.add_events([event(b"first")])[0][1]  # not a replay: the failed batch left nothing
    store.upsert(state())  # and writers are not locked out
    assert [e.body for e in store.pending_events()] == [b"first"]


def test_transition_is_persisted_with_its_record(store: Store) -> None:
    row = state()
    store.upsert(row)
    record = fire(
        Bottle(row.slug, row.status), Trigger.LAUNCH, at="2026-01-02T00:00:00+00:00", reason="slot", free_slots=1
    )
    store.apply(row, record)
    assert store.get("acme", "widgets", 17).status is BottleState.RUNNING  # type: ignore[union-attr]
    assert store.transitions(row.slug) == [
        {
            "at": "2026-01-02T00:00:00+00:00",
            "trigger": "launch",
            "source": "queued",
            "dest": "running",
            "reason": "slot",
        }
    ]


def append_read(store: Store, n: int) -> Operation:
    return store.append_operation(
        "acme-widgets-17",
        run=1,
        at=f"2026-01-01T00:00:0{n}",
        op="read_issue",
        target="#17",
        outcome="ok",
        detail="read issue #17",
        duration_ms=1.5,
    )


def test_operations_written_before_the_without_rowid_migration_still_verify(tmp_path: Path) -> None:
    path = tmp_path / "db"
    old = Store(path)
    old.upsert(state())
    appended = [append_read(old, n) for n in range(3)]
    old.close()
    with contextlib.closing(sqlite3.connect(path)) as db:  # back to the rowid table of version 3
        db.executescript(
            "CREATE TABLE ops_rowid AS SELECT slug, seq, run, at, op, target, outcome, detail, duration_ms, hash "
            "FROM operations; DROP TABLE operations; ALTER TABLE runs DROP COLUMN budget_tokens;"
            + MIGRATIONS[0][MIGRATIONS[0].index("CREATE TABLE operations") :].split(";")[0]
            + "; INSERT INTO operations SELECT * FROM ops_rowid; DROP TABLE ops_rowid; PRAGMA user_version = 3;"
        )
        assert (
            "WITHOUT ROWID" not in db.execute("SELECT sql FROM sqlite_master WHERE name = 'operations'").fetchone()[0]
        )
    store = Store(path)
    assert schema_version(store.path) == len(MIGRATIONS)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert "WITHOUT ROWID" in db.execute("SELECT sql FROM sqlite_master WHERE name = 'operations'").fetchone()[0]
    assert store.operations("acme-widgets-17") == appended
    assert verified_chain(store, "acme-widgets-17").verified
    append_read(store, 3)
    assert verified_chain(store, "acme-widgets-17").verified


def test_operation_chain_detects_edits_and_deletions(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.upsert(state())
    for n in range(4):
        append_read(store, n)
    assert verified_chain(store, "acme-widgets-17").verified
    with sqlite3.connect(tmp_path / "db") as db:
        db.execute("UPDATE operations SET detail = 'nothing' WHERE seq = 2")
    check = verified_chain(store, "acme-widgets-17")
    assert (check.verified, check.broken_seq) == (False, 2)
    with sqlite3.connect(tmp_path / "db") as db:
        db.execute("UPDATE operations SET detail = 'read issue #17' WHERE seq = 2")
        db.execute("DELETE FROM operations WHERE seq = 4")
    check = verified_chain(store, "acme-widgets-17")
    assert not check.verified and "missing" in check.problem


def test_the_chain_hash_of_an_operation_never_changes() -> None:
    # Records written by any earlier forgebottle must still verify: this value is pinned.
    op = Operation(3, 2, "2026-11-26T00:00:00.000+00:00", "post_comment", "issue #7", "ok", "«héllo» — x", 12.345, "")
    # A new field must be put under the hash (Operation.content) or left out of it, on purpose.
    names = [field.name for field in dataclasses.fields(Operation)]
    assert names == ["seq", "run", "at", "op", "target", "outcome", "detail", "duration_ms", "hash", "data"]
    assert (
        chain_hash(genesis("acme-widgets-7"), op) == "9c46d76a7a5154c757df5c0021af2e88d8aacb0a1ae9bd44beb8ccffac87f391"
    )


def test_pending_prompts_keep_order(store: Store) -> None:
    store.upsert(state())
    for n in range(3):
        store.add_pending("acme-widgets-17", at="t", trigger="issue_comment", source=f"c{n}", body=f"body {n}")
    assert [p["body"] for p in store.pending("acme-widgets-17")] == ["body 0", "body 1", "body 2"]


def test_migrates_forward_from_version_1(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        for statement in MIGRATIONS[0].split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute(
            "INSERT INTO forge_state (owner, repo, issue_number, slug, agent_name, status, created_at, "
            "updated_at) VALUES ('o', 'r', 1, 'o-r-1', 'a', 'frozen', 't', 't')"
        )
    store = Store(path)
    assert schema_version(store.path) == len(MIGRATIONS)
    old = store.by_slug("o-r-1")
    assert old is not None and old.status is BottleState.FROZEN and (old.api_url, old.org) == ("", "")


def test_durable_transactions_sync_fully_and_others_normally(store: Store) -> None:
    # SQLite: synchronous 2 is FULL (fsync per commit), 1 is NORMAL. The mode is set only when
    # it changes, so check it across every switch.
    seen = []
    for durable in (True, True, False, False, True, False):
        with store.transaction(durable=durable) as db:
            seen.append(int(db.execute("PRAGMA synchronous").fetchone()[0]))
    assert seen == [2, 2, 1, 1, 2, 1]
