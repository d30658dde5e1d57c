"""Where a mirror keeps what it replicated: in memory, or in an SQLite file (WAL).

Every commit writes the entries (or the snapshot) and ``last_applied_lsn``
together, so a mirror process killed at any moment restarts exactly where its
last commit left it: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from mirror_actors.replica.cursor import Commit, InstallSnapshot, ResetReplica
from mirror_actors.replica.spool import FileSpool, SnapshotSpool, StoreFailure, StoreUnusable
from mirror_actors.wire.frames import Entry, EntryBatch


def entries_digest(entries: Iterable[Entry]) -> str:
    """A content hash of a log, to compare a mirror with its source."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry.lsn.to_bytes(8, "big"))
        digest.update(entry.term.to_bytes(8, "big"))
        digest.update(len(entry.data).to_bytes(4, "big"))
        digest.update(entry.data)
    return digest.hexdigest()


class StoreMismatch(StoreUnusable):
    """A replica file belongs to another source database."""

    def __init__(self, path: str, holds: str, wanted: str) -> None:
        super().__init__(f"{path} holds {holds}, not {wanted}; use another file for this link")


class ReplicaStore(Protocol):
    def last_applied_lsn(self) -> int: ...

    def last_applied_term(self) -> int:
        """The term of the entry at ``last_applied_lsn`` (0 when empty)."""

    def commit(self, commits: Sequence[Commit]) -> None:
        """Apply ``commits`` all together or not at all; ``StoreFailure``/``StoreUnusable`` if not."""

    def snapshot_spool(self) -> SnapshotSpool:
        """Where an incoming snapshot waits until it is checked and installed."""

    def entries(self) -> list[Entry]: ...

    def close(self) -> None: ...


class MemoryReplicaStore:
    """For tests and demos: gone with the process (snapshots spool to a temporary file).

    Entries are kept as the batches they came in (one per ENTRIES frame), so a
    commit appends a few references instead of an object per entry.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: list[EntryBatch] = []
        self._applied = 0
        self._applied_term = 0
        self.snapshot_lsn: int | None = None

    def last_applied_lsn(self) -> int:
        return self._applied

    def last_applied_term(self) -> int:
        return self._applied_term

    def snapshot_spool(self) -> SnapshotSpool:
        return FileSpool()

    def commit(self, commits: Sequence[Commit]) -> None:
        with self._lock:
            # Staged and applied at the end: all or nothing, like SQLite.
            staged: list[EntryBatch] = []
            replace = False
            applied, term, snapshot_lsn = self._applied, self._applied_term, self.snapshot_lsn
            for commit in commits:
                if isinstance(commit, ResetReplica):
                    staged, replace = [], True
                    applied, term, snapshot_lsn = 0, 0, None
                    continue
                if isinstance(commit, InstallSnapshot):
                    staged, replace = [EntryBatch.of(commit.entries())], True
                    snapshot_lsn = applied = commit.snapshot_lsn
                    term = commit.last_term
                    continue
                if not commit.batch.payloads:
                    raise ValueError("an ApplyEntries commit must carry entries")
                if commit.first_lsn != applied + 1:
                    raise ValueError(
                        f"entries from LSN {commit.first_lsn} do not follow LSN {applied}"
                    )
                staged.append(commit.batch)
                applied, term = commit.last_lsn, commit.last_term
            if replace:
                self._batches = staged
            else:
                self._batches.extend(staged)
            self._applied, self._applied_term, self.snapshot_lsn = applied, term, snapshot_lsn

    def entries(self) -> list[Entry]:
        with self._lock:
            batches = list(self._batches)
        return [entry for batch in batches for entry in batch.entries()]

    def close(self) -> None:
        pass


# The replica file's tables (public: the bench's bare baseline writes the same).
REPLICA_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (lsn INTEGER PRIMARY KEY, term INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), lsn INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    source TEXT NOT NULL,
    last_applied_lsn INTEGER NOT NULL
);
"""
_COLUMNS = {
    "entries": ["lsn", "term", "data"],
    "snapshot": ["id", "lsn", "data"],
    "state": ["id", "source", "last_applied_lsn"],
}
# SQLite integers are signed 64-bit; LSNs and terms are u64. Values from 2^63 on
# are kept as their two's complement (negative), so every file written before
# (all values below 2^63) reads the same, and the whole u64 range round-trips.
_U64_WRAP = 1 << 64
_I64_LIMIT = 1 << 63
# Ordering by LSN with the wrapped values after the others.
_ORDER_BY_LSN = "ORDER BY lsn < 0, lsn"
DEFAULT_BUSY_TIMEOUT = 5.0


def to_sqlite(value: int) -> int:
    return value - _U64_WRAP if value >= _I64_LIMIT else value


def from_sqlite(value: int) -> int:
    return value + _U64_WRAP if value < 0 else value


def _store_error(path: str, action: str, error: sqlite3.Error) -> StoreFailure | StoreUnusable:
    """What an SQLite error means for a replica: retry it, or fix the file."""
    text = str(error)
    lowered = text.lower()
    transient = isinstance(error, sqlite3.OperationalError) and any(
        marker in lowered for marker in ("locked", "busy", "disk i/o", "full", "interrupt")
    )
    if transient:
        return StoreFailure(f"{action} {path}: {text}")
    if any(marker in lowered for marker in ("readonly", "unable to open", "permission")):
        return StoreUnusable(
            f"{action} {path}: {text}; check that its directory exists and that this "
            "process may write the file"
        )
    return StoreUnusable(
        f"{action} {path}: {text}; the file is not a replica this version can use: "
        "move it away or point the link at another file"
    )


class SqliteReplicaStore:
    """An SQLite file in WAL mode; bound to one source database on first use.

    A file that another process keeps locked for longer than ``busy_timeout``
    fails a commit with ``StoreFailure`` (transient: the replica retries from
    its last commit); a file that is not a replica of this link raises
    ``StoreUnusable``/``StoreMismatch`` (hard).
    """

    def __init__(
        self, path: str | Path, source: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    ) -> None:
        self.path = str(path)
        self.source = source
        try:
            # Opened by whoever builds the replica, used by its actor thread alone.
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout
            )
        except sqlite3.Error as error:
            raise _store_error(self.path, "cannot open", error) from None
        try:
            self._applied, self._applied_term = self._open(source)
        except BaseException:
            self._db.close()
            raise

    def _open(self, source: str) -> tuple[int, int]:
        db = self._db
        try:
            # Before anything writes to it: a file of something else is left as it was
            # (journal_mode=WAL alone would rewrite its header).
            self._check_schema()
            db.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL survives a killed process; FULL would
            # also survive power loss at the cost of an fsync per commit.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(REPLICA_SCHEMA)
            row = db.execute("SELECT source, last_applied_lsn FROM state").fetchone()
            if row is None:
                db.execute("INSERT INTO state VALUES (1, ?, 0)", (source,))
                return 0, 0
            if row[0] != source:
                raise StoreMismatch(self.path, row[0], source)
            applied = from_sqlite(int(row[1]))
            term = db.execute(
                "SELECT term FROM entries WHERE lsn = ?", (to_sqlite(applied),)
            ).fetchone()
            return applied, from_sqlite(int(term[0])) if term else 0
        except sqlite3.Error as error:
            raise _store_error(self.path, "cannot open", error) from None

    def _check_schema(self) -> None:
        _check_schema(self._db, self.path)

    @staticmethod
    def check_file(path: str | Path, source: str) -> None:
        """Whether ``path`` could serve as ``source``'s replica, read-only: the file is not
        changed (a missing or empty one is fine). Raises ``StoreUnusable``/``StoreMismatch``."""
        if not Path(path).exists() or Path(path).stat().st_size == 0:
            return
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        except sqlite3.Error as error:
            raise _store_error(str(path), "cannot open", error) from None
        try:
            _check_schema(db, str(path))
            row = db.execute("SELECT source FROM state").fetchone()
        except sqlite3.Error as error:
            if "no such table" in str(error):
                return  # a replica not yet initialised
            raise _store_error(str(path), "cannot read", error) from None
        finally:
            db.close()
        if row is not None and row[0] != source:
            raise StoreMismatch(str(path), row[0], source)

    def last_applied_lsn(self) -> int:
        return self._applied

    def last_applied_term(self) -> int:
        return self._applied_term

    def snapshot_spool(self) -> SnapshotSpool:
        return FileSpool(self.path + ".snapshot-spool")

    def commit(self, commits: Sequence[Commit]) -> None:
        if not commits:
            return
        try:
            applied, term = self._commit(commits)
        except sqlite3.Error as error:
            raise _store_error(self.path, "cannot commit to", error) from None
        self._applied, self._applied_term = applied, term

    def _commit(self, commits: Sequence[Commit]) -> tuple[int, int]:
        db = self._db
        applied, term = self._applied, self._applied_term
        db.execute("BEGIN IMMEDIATE")
        try:
            for commit in commits:
                rows: Iterable[tuple[int, int, bytes]]
                if isinstance(commit, ResetReplica):
                    db.execute("DELETE FROM entries")
                    db.execute("DELETE FROM snapshot")
                    applied, term = 0, 0
                    continue
                if isinstance(commit, InstallSnapshot):
                    db.execute("DELETE FROM entries")
                    # The entries are the snapshot's content; its bytes are not kept twice.
                    db.execute(
                        "INSERT OR REPLACE INTO snapshot VALUES (1, ?, ?)",
                        (to_sqlite(commit.snapshot_lsn), b""),
                    )
                    rows = (
                        (to_sqlite(e.lsn), to_sqlite(e.term), e.data) for e in commit.entries()
                    )
                else:
                    rows = _sqlite_rows(commit.batch)
                db.executemany("INSERT INTO entries VALUES (?, ?, ?)", rows)
                applied, term = commit.last_lsn, commit.last_term
            db.execute("UPDATE state SET last_applied_lsn = ?", (to_sqlite(applied),))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return applied, term

    def entries(self) -> list[Entry]:
        rows = self._db.execute(f"SELECT lsn, term, data FROM entries {_ORDER_BY_LSN}").fetchall()
        return _entries_of(rows)

    def close(self) -> None:
        self._db.close()


def _sqlite_rows(batch: EntryBatch) -> Iterable[tuple[int, int, bytes]]:
    """The batch's rows as SQLite keeps them; as they are when every value is below 2^63."""
    if batch.last_lsn < _I64_LIMIT and max(batch.terms) < _I64_LIMIT:
        return batch.rows()
    return ((to_sqlite(lsn), to_sqlite(term), data) for lsn, term, data in batch.rows())


def _check_schema(db: sqlite3.Connection, path: str) -> None:
    tables = {
        name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    for table, wanted in _COLUMNS.items():
        if table not in tables:
            continue
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        if columns != wanted:
            raise StoreUnusable(
                f"{path} has a table {table!r} with columns {columns}, not {wanted}: "
                "it is not a mirror-actors replica; point the link at another file"
            )
    foreign = tables - set(_COLUMNS)
    if foreign and not tables & set(_COLUMNS):
        raise StoreUnusable(
            f"{path} is an SQLite database of something else (tables "
            f"{sorted(foreign)}); point the link at another file"
        )


def _entries_of(rows: Iterable[tuple[int, int, bytes]]) -> list[Entry]:
    return [
        Entry(from_sqlite(int(lsn)), from_sqlite(int(term)), bytes(data))
        for lsn, term, data in rows
    ]


def read_replica_file(path: str | Path) -> tuple[int, list[Entry]]:
    """Applied LSN and entries of a replica file, read-only, beside a live replica.

    A file that does not exist yet, or that its replica has not initialised,
    reads as empty.
    """
    if not Path(path).exists():
        return 0, []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0, []
    try:
        row = db.execute("SELECT last_applied_lsn FROM state").fetchone()
        rows = db.execute(f"SELECT lsn, term, data FROM entries {_ORDER_BY_LSN}").fetchall()
    except sqlite3.Error:
        return 0, []
    finally:
        db.close()
    return (from_sqlite(int(row[0])) if row else 0), _entries_of(rows)
