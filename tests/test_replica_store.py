"""Mirror-side stores: the in-memory one and the SQLite (WAL) file, held to the same contract.

SQLite keeps u64 LSNs and terms from 2^63 on as their two's complement, refuses
files that are not replicas of this link (``StoreUnusable``, hard) and turns a
file locked for too long into ``StoreFailure`` (transient).  Snapshots are
installed from their spool, streamed, in the same transaction as what follows.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mirror_actors.replica import (
    ApplyEntries,
    Commit,
    FileSpool,
    InstallSnapshot,
    MemoryReplicaStore,
    MemorySpool,
    ReplicaStore,
    ReplicationCursor,
    ResetReplica,
    SnapshotSpool,
    SqliteReplicaStore,
    StoreFailure,
    StoreMismatch,
    StoreUnusable,
    entries_digest,
    read_replica_file,
)
from mirror_actors.replica import spool as snapshot_spool
from mirror_actors.replica.stores import from_sqlite, to_sqlite
from mirror_actors.wire import (
    Entry,
    MalformedFrame,
    MirrorError,
    SnapshotChunk,
    crc32c,
    encode_snapshot,
)
from tests.helpers import LINK, U64_MAX, MiB, entry

OTHER = "eu-west/orders"


def apply(first: int, last: int, term: int = 1, tag: str = "") -> ApplyEntries:
    return ApplyEntries(tuple(entry(lsn, term, tag) for lsn in range(first, last + 1)))


def snapshot_entries(upto: int, term: int = 1, tag: str = "") -> list[Entry]:
    return [entry(lsn, term, tag) for lsn in range(1, upto + 1)]


def spooled(blob: bytes) -> MemorySpool:
    spool = MemorySpool()
    spool.begin(len(blob))
    spool.write(blob)
    return spool


def snapshot(upto: int, term: int = 1, tag: str = "") -> InstallSnapshot:
    """An install as a cursor hands it over: its bytes wait in a spool."""
    blob = encode_snapshot(snapshot_entries(upto, term, tag))
    return InstallSnapshot(upto, term if upto else 0, len(blob), spooled(blob))


class FailingSpool(MemorySpool):
    """Reads back ``good`` pieces of its content, then fails like a disk would."""

    def __init__(self, blob: bytes, good: int) -> None:
        super().__init__()
        self.begin(len(blob))
        self.write(blob)
        self.good = good

    def pieces(self) -> Iterator[bytes]:
        data = b"".join(super().pieces())
        step = max(1, len(data) // (self.good + 1))
        for index in range(self.good):
            yield data[index * step : (index + 1) * step]
        raise StoreFailure("cannot read the snapshot spool: Input/output error")


StoreFactory = Callable[[], ReplicaStore]


@pytest.fixture(params=["memory", "sqlite"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(kind: str, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens the store under test; for SQLite, the same file each time."""
    opened: list[ReplicaStore] = []
    memory = MemoryReplicaStore()

    def factory() -> ReplicaStore:
        store: ReplicaStore = (
            memory if kind == "memory" else SqliteReplicaStore(tmp_path / "replica.db", LINK)
        )
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def lsns(store: ReplicaStore) -> list[int]:
    return [e.lsn for e in store.entries()]


# --- both stores ------------------------------------------------------------------------


def test_a_new_store_is_empty(open_store: StoreFactory) -> None:
    store = open_store()
    assert store.last_applied_lsn() == 0
    assert store.entries() == []
    store.commit([])
    assert store.last_applied_lsn() == 0


def test_commit_entries(open_store: StoreFactory) -> None:
    store = open_store()
    store.commit([apply(1, 3)])
    assert store.last_applied_lsn() == 3
    assert store.entries() == list(apply(1, 3).entries)
    store.commit([apply(4, 5, term=2), apply(6, 6, term=3)])
    assert store.last_applied_lsn() == 6
    assert store.entries() == [*apply(1, 3).entries, *apply(4, 5, 2).entries, entry(6, 3)]


def test_entries_keep_their_bytes_exactly(open_store: StoreFactory) -> None:
    store = open_store()
    odd = (Entry(1, 7, b""), Entry(2, 2**63 - 1, bytes(range(256))), Entry(3, 0, b"\x00" * 10))
    store.commit([ApplyEntries(odd)])
    assert store.entries() == list(odd)
    assert all(type(e.data) is bytes for e in store.entries())


def test_install_snapshot_replaces_entries(open_store: StoreFactory) -> None:
    store = open_store()
    store.commit([apply(1, 3, tag="-old")])
    store.commit([snapshot(10, term=2)])
    assert store.last_applied_lsn() == 10
    assert store.last_applied_term() == 2
    assert store.entries() == snapshot_entries(10, term=2)
    store.commit([apply(11, 12, term=2)])
    assert lsns(store) == list(range(1, 13))
    assert store.last_applied_lsn() == 12


def test_snapshot_and_entries_in_one_commit(open_store: StoreFactory) -> None:
    store = open_store()
    store.commit([apply(1, 2)])
    store.commit([snapshot(5), apply(6, 7), snapshot(9, tag="-new"), apply(10, 10)])
    assert store.last_applied_lsn() == 10
    assert store.entries() == [*snapshot_entries(9, tag="-new"), entry(10)]


def test_memory_store_remembers_the_snapshot_lsn() -> None:
    store = MemoryReplicaStore()
    assert store.snapshot_lsn is None
    store.commit([snapshot(4)])
    assert store.snapshot_lsn == 4


def test_sqlite_store_records_the_snapshot_lsn_but_not_its_bytes_twice(tmp_path: Path) -> None:
    store = SqliteReplicaStore(tmp_path / "r.db", LINK)
    try:
        store.commit([snapshot(3), snapshot(6)])
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "r.db") as db:
        rows = db.execute("SELECT id, lsn, data FROM snapshot").fetchall()
        held = db.execute("SELECT count(*) FROM entries").fetchone()
    db.close()
    # The entries are the snapshot's content; the blob itself is not kept.
    assert rows == [(1, 6, b"")]
    assert held == (6,)


@pytest.mark.parametrize("kind", ["sqlite", "memory"], indirect=True)
def test_duplicate_lsn_rolls_the_whole_commit_back(open_store: StoreFactory) -> None:
    store = open_store()
    store.commit([apply(1, 3)])
    with pytest.raises(Exception):  # noqa: B017 - sqlite3.IntegrityError for SQLite
        store.commit([apply(4, 5), apply(5, 6)])
    assert store.last_applied_lsn() == 3
    assert store.entries() == list(apply(1, 3).entries)
    # Still usable, from where it was.
    store.commit([apply(4, 4)])
    assert lsns(store) == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["sqlite", "memory"], indirect=True)
def test_a_commit_whose_second_part_fails_leaves_the_store_as_before(
    open_store: StoreFactory,
) -> None:
    store = open_store()
    store.commit([apply(1, 3)])
    # An ApplyEntries with nothing in it has no last LSN: the second part raises.
    with pytest.raises((IndexError, ValueError)):
        store.commit([apply(4, 6), ApplyEntries(())])
    assert store.last_applied_lsn() == 3
    assert store.entries() == list(apply(1, 3).entries)


@pytest.mark.parametrize("kind", ["sqlite", "memory"], indirect=True)
@pytest.mark.parametrize("broken", ["truncated", "too-short", "unreadable-spool"])
def test_a_failed_snapshot_install_keeps_the_old_entries(
    open_store: StoreFactory, broken: str
) -> None:
    store = open_store()
    store.commit([apply(1, 3)])
    blob = encode_snapshot(snapshot_entries(5))
    install: InstallSnapshot
    if broken == "truncated":  # entries 1..4 and half of 5: noticed after 4 rows went in
        install = InstallSnapshot(5, 1, len(blob), spooled(blob[:-4]))
    elif broken == "too-short":  # a whole snapshot, but of LSN 4
        install = InstallSnapshot(5, 1, len(blob), spooled(encode_snapshot(snapshot_entries(4))))
    else:
        install = InstallSnapshot(5, 1, len(blob), FailingSpool(blob, good=2))
    error = StoreFailure if broken == "unreadable-spool" else MalformedFrame
    with pytest.raises(error):
        store.commit([install, apply(6, 6)])
    assert store.last_applied_lsn() == 3
    assert store.last_applied_term() == 1
    assert lsns(store) == [1, 2, 3]


def test_sqlite_failed_snapshot_install_keeps_the_old_entries(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = SqliteReplicaStore(path, LINK)
    try:
        store.commit([apply(1, 3)])
        blob = encode_snapshot(snapshot_entries(5))
        broken = InstallSnapshot(5, 1, len(blob), spooled(blob[:-1]))
        with pytest.raises(MalformedFrame):
            store.commit([broken])
        assert store.last_applied_lsn() == 3
        assert lsns(store) == [1, 2, 3]
    finally:
        store.close()
    reopened = SqliteReplicaStore(path, LINK)
    try:
        assert reopened.last_applied_lsn() == 3
        assert lsns(reopened) == [1, 2, 3]
    finally:
        reopened.close()


# --- SQLite: durability, binding, WAL --------------------------------------------------


def test_sqlite_reopen_resumes_where_it_left(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    store = SqliteReplicaStore(path, LINK)
    store.commit([snapshot(4), apply(5, 7)])
    before = store.entries()
    store.close()

    store = SqliteReplicaStore(str(path), LINK)
    try:
        assert store.path == str(path)
        assert store.last_applied_lsn() == 7
        assert store.entries() == before
        store.commit([apply(8, 8)])
    finally:
        store.close()
    store = SqliteReplicaStore(path, LINK)
    try:
        assert store.last_applied_lsn() == 8
        assert lsns(store) == list(range(1, 9))
    finally:
        store.close()


def test_sqlite_reopened_for_another_source_is_a_hard_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    store = SqliteReplicaStore(path, LINK)
    store.commit([apply(1, 2)])
    store.close()
    with open(path, "rb") as file:
        before = hashlib.sha256(file.read()).hexdigest()
    with pytest.raises(StoreMismatch) as raised:
        SqliteReplicaStore(path, OTHER)
    message = str(raised.value)
    assert str(path) in message
    assert LINK in message and OTHER in message
    assert raised.value.hard is True
    assert isinstance(raised.value, StoreUnusable)
    with open(path, "rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == before
    # The file is untouched and still opens for its own source.
    store = SqliteReplicaStore(path, LINK)
    try:
        assert store.last_applied_lsn() == 2
        assert lsns(store) == [1, 2]
    finally:
        store.close()


def test_sqlite_mismatch_binds_on_first_open_even_when_empty(tmp_path: Path) -> None:
    SqliteReplicaStore(tmp_path / "r.db", LINK).close()
    with pytest.raises(StoreMismatch):
        SqliteReplicaStore(tmp_path / "r.db", OTHER)


def test_sqlite_store_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    store = SqliteReplicaStore(path, LINK)
    try:
        (mode,) = store._db.execute("PRAGMA journal_mode").fetchone()
        assert mode == "wal"
        store.commit([apply(1, 1)])
        other = sqlite3.connect(path)
        try:
            # WAL is a property of the file: another connection sees it too.
            assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        finally:
            other.close()
    finally:
        store.close()


def test_a_second_connection_reads_what_the_first_committed(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    store = SqliteReplicaStore(path, LINK)
    try:
        store.commit([apply(1, 3)])
        # The way the runner reads beside a live replica: another store on the file.
        beside = SqliteReplicaStore(path, LINK)
        try:
            assert beside.last_applied_lsn() == 3
            assert beside.entries() == store.entries()
        finally:
            beside.close()
        reader = sqlite3.connect(path, isolation_level=None)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM entries").fetchone() == (3,)
            # The writer commits while a read transaction is open (WAL: no lock-out)...
            store.commit([apply(4, 5)])
            # ...and the reader keeps its consistent view until it ends it.
            assert reader.execute("SELECT count(*) FROM entries").fetchone() == (3,)
            reader.execute("COMMIT")
            assert reader.execute("SELECT count(*) FROM entries").fetchone() == (5,)
            assert reader.execute("SELECT last_applied_lsn FROM state").fetchone() == (5,)
        finally:
            reader.close()
    finally:
        store.close()


# --- u64 LSNs and terms ------------------------------------------------------------------

I63 = 2**63


@pytest.mark.parametrize(
    "value", [0, 1, I63 - 1, I63, I63 + 1, U64_MAX - 1, U64_MAX], ids=lambda v: hex(v)
)
def test_sqlite_integers_hold_every_u64(value: int) -> None:
    stored = to_sqlite(value)
    assert -(2**63) <= stored < 2**63
    assert from_sqlite(stored) == value
    # Values below 2^63 are stored as they are: files written before read the same.
    assert (stored == value) == (value < I63)


@given(st.integers(0, U64_MAX), st.integers(0, U64_MAX))
def test_sqlite_order_of_stored_values_is_u64_order(a: int, b: int) -> None:
    def key(value: int) -> tuple[bool, int]:
        return (value < 0, value)  # as ORDER BY lsn < 0, lsn sorts them

    assert (key(to_sqlite(a)) < key(to_sqlite(b))) == (a < b)


def _u64_run(first: int, count: int, term: int) -> ApplyEntries:
    return ApplyEntries(
        tuple(Entry(first + i, term, f"at-{first + i}".encode()) for i in range(count))
    )


@pytest.mark.parametrize(
    ("first", "term"),
    [(I63 - 2, I63 - 1), (I63 - 2, I63), (U64_MAX - 3, U64_MAX), (U64_MAX - 3, I63)],
    ids=["across-2^63-term-below", "across-2^63-term-2^63", "up-to-u64-max", "term-2^63"],
)
def test_sqlite_u64_lsns_and_terms_round_trip(tmp_path: Path, first: int, term: int) -> None:
    path = tmp_path / "r.db"
    run = _u64_run(first, 4, term)  # up to first + 3: crosses 2^63 or ends at 2^64 - 1
    store = SqliteReplicaStore(path, LINK)
    try:
        store.commit([run])
        assert store.entries() == list(run.entries)
        assert store.last_applied_lsn() == first + 3
        assert store.last_applied_term() == term
    finally:
        store.close()
    assert read_replica_file(path) == (first + 3, list(run.entries))
    with sqlite3.connect(path) as raw:
        stored = sorted(row[0] for row in raw.execute("SELECT lsn FROM entries"))
    raw.close()
    assert stored == sorted(to_sqlite(e.lsn) for e in run.entries)
    assert any(value < 0 for value in stored)  # kept as two's complement
    reopened = SqliteReplicaStore(path, LINK)
    try:
        assert reopened.last_applied_lsn() == first + 3
        assert reopened.last_applied_term() == term
        assert reopened.entries() == list(run.entries)
    finally:
        reopened.close()


def test_sqlite_entries_come_back_in_u64_order_across_2_63(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    lsns_in = [I63 + 1, 5, U64_MAX, I63 - 1, I63, 0, 2**32]
    store = SqliteReplicaStore(path, LINK)
    try:
        # The store does not check contiguity; it only has to keep u64 order.
        for lsn in lsns_in:
            store.commit([ApplyEntries((Entry(lsn, U64_MAX - lsn % 7, b"x"),))])
        assert lsns(store) == sorted(lsns_in)
        assert store.last_applied_lsn() == 2**32  # the last commit's
    finally:
        store.close()
    applied, read = read_replica_file(path)
    assert applied == 2**32 and [e.lsn for e in read] == sorted(lsns_in)


def test_sqlite_a_snapshot_commit_keeps_a_u64_term(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = SqliteReplicaStore(path, LINK)
    try:
        store.commit([snapshot(3, term=U64_MAX), apply(4, 4, term=U64_MAX)])
        assert store.last_applied_term() == U64_MAX
    finally:
        store.close()
    reopened = SqliteReplicaStore(path, LINK)
    try:
        assert (reopened.last_applied_lsn(), reopened.last_applied_term()) == (4, U64_MAX)
        assert {e.term for e in reopened.entries()} == {U64_MAX}
    finally:
        reopened.close()


# --- files that are not this link's replica ------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_db(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "statements",
    [
        [
            "CREATE TABLE entries (id INTEGER PRIMARY KEY, body TEXT)",
            "INSERT INTO entries VALUES (1, 'x')",
        ],
        [
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
            "INSERT INTO users VALUES (1, 'ann')",
        ],
        ["CREATE TABLE state (id INTEGER PRIMARY KEY, mood TEXT)"],
        [
            "CREATE TABLE entries (lsn INTEGER PRIMARY KEY, term INTEGER NOT NULL, data BLOB NOT NULL)",
            "CREATE TABLE snapshot (id INTEGER PRIMARY KEY, lsn INTEGER, data BLOB)",
            "CREATE TABLE state (id INTEGER PRIMARY KEY, source TEXT)",
        ],
    ],
    ids=["entries-of-something-else", "an-app-database", "another-state-table", "older-schema"],
)
def test_sqlite_a_foreign_schema_is_unusable_and_left_alone(
    tmp_path: Path, statements: list[str]
) -> None:
    path = tmp_path / "app.db"
    _make_db(path, *statements)
    before = _digest(path)
    with pytest.raises(StoreUnusable) as raised:
        SqliteReplicaStore(path, LINK)
    error = raised.value
    assert error.hard is True and not isinstance(error, StoreMismatch)
    assert str(path) in str(error) and "another file" in str(error)
    # Not even its journal mode changed, and no WAL or spool file appeared beside it.
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    db.close()


@pytest.mark.parametrize(
    "content",
    [b"\x00\x01garbage" * 700, b"SQLite format 3\x00" + b"\xff" * 4000, b"hello, not a db\n"],
    ids=["random", "bad-header", "text"],
)
def test_sqlite_a_file_that_is_not_sqlite_is_unusable(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    with pytest.raises(StoreUnusable) as raised:
        SqliteReplicaStore(path, LINK)
    assert raised.value.hard is True
    assert str(path) in str(raised.value)
    assert path.read_bytes() == content


def test_sqlite_an_empty_file_is_a_new_replica(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    path.write_bytes(b"")
    store = SqliteReplicaStore(path, LINK)
    try:
        assert store.last_applied_lsn() == 0 and store.last_applied_term() == 0
        store.commit([apply(1, 1)])
    finally:
        store.close()


# --- a file another process holds locked ---------------------------------------------------

_LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute(sys.argv[2])
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
db.execute("ROLLBACK")
db.close()
"""


@pytest.mark.parametrize("begin", ["BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"])
def test_sqlite_a_store_locked_by_another_process_fails_transiently(
    tmp_path: Path, begin: str
) -> None:
    path = tmp_path / "r.db"
    store = SqliteReplicaStore(path, LINK, busy_timeout=0.2)
    try:
        store.commit([apply(1, 3)])
        before = read_replica_file(path)
        locker = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, str(path), begin],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
            started = time.monotonic()
            with pytest.raises(StoreFailure) as raised:
                store.commit([apply(4, 5)])
            waited = time.monotonic() - started
            error = raised.value
            assert error.hard is False and isinstance(error, MirrorError)
            assert not isinstance(error, StoreUnusable)
            assert str(path) in str(error) and "locked" in str(error)
            assert 0.15 <= waited < 5, f"waited {waited:.2f} s with busy_timeout 0.2 s"
            # Nothing changed, for this store and for a reader of the file.
            assert store.last_applied_lsn() == 3 and store.last_applied_term() == 1
            assert read_replica_file(path) == before
        finally:
            assert locker.stdin is not None
            locker.stdin.close()
            assert locker.wait(timeout=10) == 0
            assert locker.stdout is not None
            locker.stdout.close()
        # Released: the same commit goes through.
        store.commit([apply(4, 5)])
        assert store.last_applied_lsn() == 5
        assert read_replica_file(path) == (5, list(apply(1, 5).entries))
    finally:
        store.close()


# --- resets ----------------------------------------------------------------------------------


def test_reset_and_new_entries_replace_everything_in_one_commit(
    open_store: StoreFactory,
) -> None:
    store = open_store()
    store.commit([snapshot(3, term=4), apply(4, 6, term=5)])
    store.commit([ResetReplica(), apply(1, 2, term=1, tag="-new")])
    assert store.entries() == list(apply(1, 2, term=1, tag="-new").entries)
    assert (store.last_applied_lsn(), store.last_applied_term()) == (2, 1)
    store.commit([ResetReplica(), snapshot(4, term=2, tag="-s"), apply(5, 5, term=2)])
    assert store.entries() == [*snapshot_entries(4, 2, "-s"), entry(5, 2)]
    assert (store.last_applied_lsn(), store.last_applied_term()) == (5, 2)
    store.commit([ResetReplica()])
    assert store.entries() == [] and store.last_applied_lsn() == store.last_applied_term() == 0


def test_sqlite_a_reset_survives_reopen_and_drops_the_snapshot_row(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = SqliteReplicaStore(path, LINK)
    try:
        store.commit([snapshot(6, term=3)])
        store.commit([ResetReplica(), apply(1, 1, term=1)])
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM snapshot").fetchone() == (0,)
    db.close()
    reopened = SqliteReplicaStore(path, LINK)
    try:
        assert (reopened.last_applied_lsn(), reopened.last_applied_term()) == (1, 1)
        assert reopened.entries() == [entry(1)]
    finally:
        reopened.close()


@pytest.mark.parametrize("kind", ["sqlite", "memory"], indirect=True)
@pytest.mark.parametrize("failure", ["spool-io-error", "broken-snapshot", "bad-entries"])
def test_a_reset_whose_commit_fails_leaves_the_old_content(
    open_store: StoreFactory, failure: str
) -> None:
    store = open_store()
    store.commit([apply(1, 4, term=3)])
    blob = encode_snapshot(snapshot_entries(8, term=1))
    failing: list[Commit]
    if failure == "spool-io-error":
        # Rows of the new history already went in when the spool fails.
        failing = [ResetReplica(), InstallSnapshot(8, 1, len(blob), FailingSpool(blob, good=3))]
    elif failure == "broken-snapshot":
        failing = [ResetReplica(), InstallSnapshot(8, 1, len(blob), spooled(blob[:-2]))]
    else:
        failing = [ResetReplica(), apply(1, 2), ApplyEntries(())]
    with pytest.raises((StoreFailure, MalformedFrame, IndexError, ValueError)):
        store.commit(failing)
    assert store.entries() == list(apply(1, 4, term=3).entries)
    assert (store.last_applied_lsn(), store.last_applied_term()) == (4, 3)
    reopened = open_store()
    assert reopened.entries() == list(apply(1, 4, term=3).entries)
    assert (reopened.last_applied_lsn(), reopened.last_applied_term()) == (4, 3)


# --- snapshots from a file spool --------------------------------------------------------------


def test_a_few_mb_snapshot_streams_from_a_file_spool_into_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    store = SqliteReplicaStore(path, LINK)
    try:
        spool = store.snapshot_spool()
        assert isinstance(spool, FileSpool)
        cursor = ReplicationCursor("us-east", "orders", 0, spool=spool)
        items = [Entry(lsn, 1 + lsn // 100, bytes([lsn % 256]) * 10_000) for lsn in range(1, 1201)]
        blob = encode_snapshot(items)
        assert len(blob) > 11 * MiB
        crc, step = crc32c(blob), (1 << 20) - 512
        install = None
        for offset in range(0, len(blob), step):
            data = blob[offset : offset + step]
            chunk = SnapshotChunk(
                "us-east", "orders", 1200, len(blob), crc, offset, data, offset + step >= len(blob)
            )
            install = cursor.accept(chunk)
        del blob
        assert isinstance(install, InstallSnapshot)
        spool_file = spool.path
        assert spool_file == Path(f"{path}.snapshot-spool") and spool_file.exists()

        tracemalloc.start()
        try:
            store.commit([install, ApplyEntries((Entry(1201, 7, b"after"),))])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Streamed: a spool piece, the decoder's buffer and one piece's entries at a
        # time (about 5 MiB whatever the size), not the 11 MiB snapshot.
        assert peak < 7 * MiB, (
            f"peak {peak / MiB:.1f} MiB installing {len(items) * 10_000 / MiB:.1f} MiB"
        )
        cursor.committed(install)
        assert spool.path is None and not spool_file.exists()
        assert (store.last_applied_lsn(), store.last_applied_term()) == (1201, 7)
        assert entries_digest(store.entries()) == entries_digest([*items, Entry(1201, 7, b"after")])
    finally:
        store.close()
    assert read_replica_file(path)[0] == 1201


def test_memory_store_spools_to_a_temporary_file() -> None:
    spool = MemoryReplicaStore().snapshot_spool()
    assert isinstance(spool, FileSpool) and spool.path is None
    spool.begin(3)
    try:
        assert spool.path is not None and spool.path.exists()
        spool.write(b"abc")
        assert b"".join(spool.pieces()) == b"abc"
    finally:
        spool.discard()
    assert spool.path is None


def test_file_spool_refuses_a_snapshot_larger_than_the_free_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage

    def small_disk(where: str | Path) -> object:
        usage = real(where)
        return type(usage)(usage.total, usage.used, 1000)

    monkeypatch.setattr(shutil, "disk_usage", small_disk)  # as snapshot_spool calls it
    spool = FileSpool(tmp_path / "s.spool")
    spool.begin(1000)  # exactly what is free: fine
    spool.write(b"x")
    with pytest.raises(StoreFailure) as raised:
        spool.begin(1001)
    assert raised.value.hard is False
    assert "1001" in str(raised.value) and "1000" in str(raised.value)
    assert not (tmp_path / "s.spool").exists()  # the old content went with the new begin
    # Through a cursor, at the first chunk: a transient failure, retried later.
    cursor = ReplicationCursor("c", "d", 0, spool=FileSpool(tmp_path / "t.spool"))
    blob = encode_snapshot(snapshot_entries(200))
    assert len(blob) > 1000
    chunk = SnapshotChunk("c", "d", 200, len(blob), crc32c(blob), 0, blob, True)
    with pytest.raises(StoreFailure):
        cursor.accept(chunk)


def test_file_spool_pieces_are_bounded_and_in_order(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "s.spool")
    spool.begin(3 * MiB)
    data = bytes(range(256)) * (3 * MiB // 256)
    for start in range(0, len(data), 100_000):
        spool.write(data[start : start + 100_000])
    pieces = list(spool.pieces())
    assert b"".join(pieces) == data
    assert max(len(piece) for piece in pieces) <= snapshot_spool.READ_PIECE
    spool.discard()
    spool.discard()  # twice is fine
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreFailure, match="before begin"):
        spool.write(b"late")


def _spool_protocol_check(spool: SnapshotSpool) -> None:
    spool.begin(2)
    spool.write(b"ab")
    assert b"".join(spool.pieces()) == b"ab"
    spool.discard()


def test_both_spools_meet_the_protocol(tmp_path: Path) -> None:
    _spool_protocol_check(MemorySpool())
    _spool_protocol_check(FileSpool(tmp_path / "x"))
    _spool_protocol_check(FileSpool())


# --- properties -------------------------------------------------------------------------

_entry_lists = st.lists(
    st.builds(Entry, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=8)),
    max_size=8,
)


@given(_entry_lists)
def test_digest_is_a_function_of_the_entries(items: list[Entry]) -> None:
    copy = [Entry(e.lsn, e.term, bytes(e.data)) for e in items]
    assert entries_digest(items) == entries_digest(copy) == entries_digest(iter(copy))
    assert len(entries_digest(items)) == 64


@given(_entry_lists, st.randoms(use_true_random=False))
def test_digest_is_order_sensitive(items: list[Entry], random: object) -> None:
    shuffled = list(items)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    assume(shuffled != items)
    assert entries_digest(shuffled) != entries_digest(items)


@given(
    _entry_lists.filter(bool),
    st.data(),
)
def test_digest_is_content_sensitive(items: list[Entry], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(items) - 1), label="index")
    old = items[index]
    new = data.draw(
        st.one_of(
            st.builds(Entry, st.integers(0, 2**64 - 1), st.just(old.term), st.just(old.data)),
            st.builds(Entry, st.just(old.lsn), st.integers(0, 2**64 - 1), st.just(old.data)),
            st.builds(Entry, st.just(old.lsn), st.just(old.term), st.binary(max_size=9)),
        ),
        label="replacement",
    )
    assume(new != old)
    changed = [*items[:index], new, *items[index + 1 :]]
    assert entries_digest(changed) != entries_digest(items)
    # Dropping or adding an entry changes it too.
    assert entries_digest(items[:index] + items[index + 1 :]) != entries_digest(items)
    assert entries_digest([*items, old]) != entries_digest(items)


@given(st.binary(max_size=12), st.integers(0, 12))
def test_digest_separates_entry_boundaries(blob: bytes, cut: int) -> None:
    """The same bytes split differently between two entries give another digest."""
    cut = min(cut, len(blob))
    assume(cut != len(blob) - cut or blob[:cut] != blob[cut:])
    one = [Entry(1, 1, blob[:cut]), Entry(2, 1, blob[cut:])]
    other = [Entry(1, 1, blob[: len(blob) - cut]), Entry(2, 1, blob[len(blob) - cut :])]
    assume(one != other)
    assert entries_digest(one) != entries_digest(other)


@st.composite
def commit_batches(draw: st.DrawFn) -> list[list[Commit]]:
    """Batches of commits a cursor could produce: contiguous entries and newer snapshots."""
    batches: list[list[Commit]] = []
    last = 0
    for _ in range(draw(st.integers(0, 6))):
        batch: list[Commit] = []
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                size = draw(st.integers(1, 4))
                term = draw(st.integers(1, 3))
                batch.append(apply(last + 1, last + size, term))
                last += size
            else:
                last += draw(st.integers(0, 4))
                batch.append(snapshot(last, draw(st.integers(1, 3)), tag="-s"))
        batches.append(batch)
    return batches


@settings(max_examples=50, deadline=None)
@given(commit_batches())
def test_both_stores_agree_and_sqlite_survives_reopen(batches: list[list[Commit]]) -> None:
    memory = MemoryReplicaStore()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.db"
        sqlite = SqliteReplicaStore(path, LINK)
        try:
            for batch in batches:
                memory.commit(batch)
                sqlite.commit(batch)
                assert sqlite.last_applied_lsn() == memory.last_applied_lsn()
            assert sqlite.entries() == memory.entries()
        finally:
            sqlite.close()
        reopened = SqliteReplicaStore(path, LINK)
        try:
            assert reopened.last_applied_lsn() == memory.last_applied_lsn()
            assert entries_digest(reopened.entries()) == entries_digest(memory.entries())
        finally:
            reopened.close()
