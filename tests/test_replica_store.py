"""Mirror-side stores: the in-memory one and the SQLite (WAL) file, held to the same contract."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mirror_actors.protocol import Entry
from mirror_actors.replica_store import (
    MemoryReplicaStore,
    ReplicaStore,
    SqliteReplicaStore,
    StoreMismatch,
    entries_digest,
)
from mirror_actors.replication import ApplyEntries, Commit, InstallSnapshot
from mirror_actors.store import encode_snapshot

SOURCE = "us-east/orders"
OTHER = "eu-west/orders"


def entry(lsn: int, term: int = 1, tag: str = "") -> Entry:
    return Entry(lsn, term, f"entry-{lsn}{tag}".encode())


def apply(first: int, last: int, term: int = 1, tag: str = "") -> ApplyEntries:
    return ApplyEntries(tuple(entry(lsn, term, tag) for lsn in range(first, last + 1)))


def snapshot(upto: int, term: int = 1, tag: str = "") -> InstallSnapshot:
    items = tuple(entry(lsn, term, tag) for lsn in range(1, upto + 1))
    return InstallSnapshot(upto, encode_snapshot(items), items)


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
            memory if kind == "memory" else SqliteReplicaStore(tmp_path / "replica.db", SOURCE)
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
    assert store.entries() == list(snapshot(10, term=2).entries)
    store.commit([apply(11, 12, term=2)])
    assert lsns(store) == list(range(1, 13))
    assert store.last_applied_lsn() == 12


def test_snapshot_and_entries_in_one_commit(open_store: StoreFactory) -> None:
    store = open_store()
    store.commit([apply(1, 2)])
    store.commit([snapshot(5), apply(6, 7), snapshot(9, tag="-new"), apply(10, 10)])
    assert store.last_applied_lsn() == 10
    assert store.entries() == [*snapshot(9, tag="-new").entries, entry(10)]


def test_memory_store_remembers_the_snapshot_lsn() -> None:
    store = MemoryReplicaStore()
    assert store.snapshot_lsn is None
    store.commit([snapshot(4)])
    assert store.snapshot_lsn == 4


def test_sqlite_store_keeps_the_snapshot_blob(tmp_path: Path) -> None:
    store = SqliteReplicaStore(tmp_path / "r.db", SOURCE)
    try:
        store.commit([snapshot(3), snapshot(6)])
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "r.db") as db:
        rows = db.execute("SELECT id, lsn, data FROM snapshot").fetchall()
    db.close()
    assert rows == [(1, 6, snapshot(6).data)]


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


def test_sqlite_failed_snapshot_install_keeps_the_old_entries(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = SqliteReplicaStore(path, SOURCE)
    try:
        store.commit([apply(1, 3)])
        broken = InstallSnapshot(5, b"blob", (entry(1), entry(1), entry(5)))
        with pytest.raises(sqlite3.IntegrityError):
            store.commit([broken])
        assert store.last_applied_lsn() == 3
        assert lsns(store) == [1, 2, 3]
    finally:
        store.close()
    reopened = SqliteReplicaStore(path, SOURCE)
    try:
        assert reopened.last_applied_lsn() == 3
        assert lsns(reopened) == [1, 2, 3]
    finally:
        reopened.close()


# --- SQLite: durability, binding, WAL --------------------------------------------------


def test_sqlite_reopen_resumes_where_it_left(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    store = SqliteReplicaStore(path, SOURCE)
    store.commit([snapshot(4), apply(5, 7)])
    before = store.entries()
    store.close()

    store = SqliteReplicaStore(str(path), SOURCE)
    try:
        assert store.path == str(path)
        assert store.last_applied_lsn() == 7
        assert store.entries() == before
        store.commit([apply(8, 8)])
    finally:
        store.close()
    store = SqliteReplicaStore(path, SOURCE)
    try:
        assert store.last_applied_lsn() == 8
        assert lsns(store) == list(range(1, 9))
    finally:
        store.close()


def test_sqlite_reopened_for_another_source_is_a_hard_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    store = SqliteReplicaStore(path, SOURCE)
    store.commit([apply(1, 2)])
    store.close()
    with pytest.raises(StoreMismatch) as raised:
        SqliteReplicaStore(path, OTHER)
    message = str(raised.value)
    assert str(path) in message
    assert SOURCE in message and OTHER in message
    assert raised.value.hard is True
    # The file is untouched and still opens for its own source.
    store = SqliteReplicaStore(path, SOURCE)
    try:
        assert store.last_applied_lsn() == 2
        assert lsns(store) == [1, 2]
    finally:
        store.close()


def test_sqlite_mismatch_binds_on_first_open_even_when_empty(tmp_path: Path) -> None:
    SqliteReplicaStore(tmp_path / "r.db", SOURCE).close()
    with pytest.raises(StoreMismatch):
        SqliteReplicaStore(tmp_path / "r.db", OTHER)


def test_sqlite_store_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "replica.db"
    store = SqliteReplicaStore(path, SOURCE)
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
    store = SqliteReplicaStore(path, SOURCE)
    try:
        store.commit([apply(1, 3)])
        # The way the runner reads beside a live replica: another store on the file.
        beside = SqliteReplicaStore(path, SOURCE)
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
        sqlite = SqliteReplicaStore(path, SOURCE)
        try:
            for batch in batches:
                memory.commit(batch)
                sqlite.commit(batch)
                assert sqlite.last_applied_lsn() == memory.last_applied_lsn()
            assert sqlite.entries() == memory.entries()
        finally:
            sqlite.close()
        reopened = SqliteReplicaStore(path, SOURCE)
        try:
            assert reopened.last_applied_lsn() == memory.last_applied_lsn()
            assert entries_digest(reopened.entries()) == entries_digest(memory.entries())
        finally:
            reopened.close()
