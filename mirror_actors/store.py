"""The source's log store: an in-memory append-only log per database, with compaction.

The store is its own object so that a ``SourceServer`` can be stopped and a new
one started over the same store: a source restart that keeps its data.  It is
thread-safe: user threads append while the server's loop thread reads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

import google_crc32c
import msgpack
from attrs import frozen

from .protocol import MAX_PAYLOAD, Entry

# Room for the ENTRIES map around one entry, so a single entry always fits a frame.
ENTRY_FRAME_OVERHEAD = 64
MAX_ENTRY_DATA = MAX_PAYLOAD - ENTRY_FRAME_OVERHEAD

AppendListener = Callable[[str, int], None]


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as PROTOCOL.md's ``total_crc32c`` uses."""
    return int(google_crc32c.value(data))


def encode_snapshot(entries: Iterable[Entry]) -> bytes:
    """The snapshot blob: the compacted entries as a MessagePack array of ``[lsn, term, data]``.

    A log of opaque entries has no state machine to fold them into, so the
    snapshot keeps them; a mirror restores them from it and stays comparable
    entry by entry with its source.
    """
    return msgpack.packb([[e.lsn, e.term, e.data] for e in entries], use_bin_type=True)


def decode_snapshot(blob: bytes) -> list[Entry]:
    """Entries of a snapshot blob; ``ValueError`` if it is not one."""
    try:
        items = msgpack.unpackb(blob, raw=False)
    except Exception as error:
        raise ValueError(f"snapshot is not valid MessagePack: {error}") from None
    if type(items) is not list:
        raise ValueError("snapshot must be an array of [lsn, term, data]")
    entries = []
    for item in items:
        if (
            type(item) is not list
            or len(item) != 3
            or type(item[0]) is not int
            or type(item[1]) is not int
            or type(item[2]) is not bytes
        ):
            raise ValueError(f"snapshot item is not [lsn, term, data]: {item!r:.60}")
        entries.append(Entry(item[0], item[1], item[2]))
    return entries


@frozen
class Snapshot:
    """A compacted prefix of a log: everything up to and including ``lsn``."""

    lsn: int
    data: bytes
    crc32c: int

    @property
    def size(self) -> int:
        return len(self.data)


class DatabaseLog:
    """One database's log: entries ``first_lsn..last_lsn`` plus the snapshot before them."""

    def __init__(self, database_id: str, term: int = 1) -> None:
        self.database_id = database_id
        self.term = term
        self._lock = threading.Lock()
        self._entries: list[Entry] = []
        self._first_lsn = 1
        self._snapshot: Snapshot | None = None
        self._listeners: list[AppendListener] = []

    @property
    def first_lsn(self) -> int:
        """The oldest LSN still held in the log (one past the snapshot)."""
        return self._first_lsn

    @property
    def last_lsn(self) -> int:
        """The newest LSN appended, 0 for an empty log with no snapshot."""
        with self._lock:
            return self._first_lsn + len(self._entries) - 1

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def append(self, data: bytes, term: int | None = None) -> int:
        """Append one entry and return its LSN; subscribed mirrors receive it at once."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"entry data must be bytes, got {type(data).__name__}")
        if len(data) > MAX_ENTRY_DATA:
            raise ValueError(
                f"entry of {len(data)} bytes exceeds the largest that fits one frame "
                f"({MAX_ENTRY_DATA} bytes)"
            )
        with self._lock:
            lsn = self._first_lsn + len(self._entries)
            self._entries.append(Entry(lsn, self.term if term is None else term, bytes(data)))
            listeners = tuple(self._listeners)
        for listener in listeners:
            listener(self.database_id, lsn)
        return lsn

    def compact(self, upto_lsn: int) -> Snapshot:
        """Fold entries up to ``upto_lsn`` into the snapshot and drop them from the log."""
        with self._lock:
            last = self._first_lsn + len(self._entries) - 1
            if upto_lsn > last:
                raise ValueError(f"cannot compact up to LSN {upto_lsn}: the log ends at {last}")
            if upto_lsn < self._first_lsn:
                if self._snapshot is None:
                    raise ValueError(f"nothing to compact up to LSN {upto_lsn}")
                return self._snapshot
            cut = upto_lsn - self._first_lsn + 1
            folded = decode_snapshot(self._snapshot.data) if self._snapshot else []
            folded.extend(self._entries[:cut])
            blob = encode_snapshot(folded)
            self._snapshot = Snapshot(upto_lsn, blob, crc32c(blob))
            del self._entries[:cut]
            self._first_lsn = upto_lsn + 1
            return self._snapshot

    def needs_snapshot(self, from_lsn: int) -> bool:
        """True when entries from ``from_lsn`` on were compacted away."""
        return max(1, from_lsn) < self._first_lsn

    def read(self, from_lsn: int, max_count: int, max_bytes: int) -> list[Entry]:
        """Entries from ``from_lsn`` on, at least one if any, stopping before ``max_bytes`` of data."""
        with self._lock:
            start = max(1, from_lsn) - self._first_lsn
            if start < 0:
                raise LookupError(f"LSN {from_lsn} was compacted; first held is {self._first_lsn}")
            batch: list[Entry] = []
            total = 0
            for entry in self._entries[start : start + max_count]:
                size = len(entry.data) + ENTRY_FRAME_OVERHEAD
                if batch and total + size > max_bytes:
                    break
                batch.append(entry)
                total += size
            return batch

    def entries(self) -> Sequence[Entry]:
        """Every entry, snapshot included, in order (for checks and demos)."""
        with self._lock:
            folded = decode_snapshot(self._snapshot.data) if self._snapshot else []
            return [*folded, *self._entries]

    def add_listener(self, listener: AppendListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: AppendListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)


class SourceStore:
    """The databases of one source cluster, by id; outlives the servers that serve it."""

    def __init__(self, databases: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._databases: dict[str, DatabaseLog] = {}
        for database_id in databases:
            self.ensure(database_id)

    def ensure(self, database_id: str) -> DatabaseLog:
        with self._lock:
            log = self._databases.get(database_id)
            if log is None:
                log = self._databases[database_id] = DatabaseLog(database_id)
            return log

    def get(self, database_id: str) -> DatabaseLog | None:
        with self._lock:
            return self._databases.get(database_id)

    def __getitem__(self, database_id: str) -> DatabaseLog:
        log = self.get(database_id)
        if log is None:
            raise KeyError(
                f"no database {database_id!r} in this store; it holds {sorted(self._databases)}"
            )
        return log

    @property
    def database_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._databases)
