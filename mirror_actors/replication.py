"""Applying a replication stream, sans-I/O: snapshot reassembly and LSN ordering.

``ReplicationCursor`` takes the frames of one subscription and answers what to
commit; anything out of order, a gap, or a broken snapshot raises a
``ReplicationError`` and the link is restarted.  Nothing here touches a store,
a socket or a thread.
"""

from __future__ import annotations

from attrs import define, frozen

from .errors import MalformedFrame
from .protocol import Entries, Entry, Frame, SnapshotChunk
from .store import crc32c, decode_snapshot


class ReplicationError(MalformedFrame):
    """The source's stream is not a gap-free continuation of what this mirror holds."""


@frozen
class ApplyEntries:
    entries: tuple[Entry, ...]

    @property
    def last_lsn(self) -> int:
        return self.entries[-1].lsn


@frozen
class InstallSnapshot:
    snapshot_lsn: int
    data: bytes
    entries: tuple[Entry, ...]


Commit = ApplyEntries | InstallSnapshot


@define
class SnapshotAssembly:
    """Chunks of one snapshot being put back together."""

    cluster_id: str
    database_id: str
    snapshot_lsn: int
    total_bytes: int
    total_crc32c: int
    parts: list[bytes]
    received: int = 0

    @classmethod
    def begin(cls, chunk: SnapshotChunk) -> SnapshotAssembly:
        if chunk.offset != 0:
            raise ReplicationError(f"snapshot starts at offset {chunk.offset}, not 0")
        return cls(
            chunk.source_cluster_id,
            chunk.source_database_id,
            chunk.snapshot_lsn,
            chunk.total_bytes,
            chunk.total_crc32c,
            [],
        )

    def add(self, chunk: SnapshotChunk) -> InstallSnapshot | None:
        described = (
            chunk.source_cluster_id,
            chunk.source_database_id,
            chunk.snapshot_lsn,
            chunk.total_bytes,
            chunk.total_crc32c,
        )
        expected = (
            self.cluster_id,
            self.database_id,
            self.snapshot_lsn,
            self.total_bytes,
            self.total_crc32c,
        )
        if described != expected:
            raise ReplicationError(
                f"snapshot chunk at offset {chunk.offset} describes another snapshot: "
                f"{described} after {expected}"
            )
        if chunk.offset != self.received:
            raise ReplicationError(
                f"snapshot offset gap: chunk at {chunk.offset}, expected {self.received}"
            )
        if self.received + len(chunk.data) > self.total_bytes:
            raise ReplicationError(
                f"snapshot overruns its {self.total_bytes} bytes at offset {chunk.offset}"
            )
        self.parts.append(chunk.data)
        self.received += len(chunk.data)
        if not chunk.done:
            return None
        if self.received != self.total_bytes:
            raise ReplicationError(f"snapshot ended at {self.received} bytes of {self.total_bytes}")
        data = b"".join(self.parts)
        actual = crc32c(data)
        if actual != self.total_crc32c:
            raise ReplicationError(
                f"snapshot CRC-32C mismatch: computed 0x{actual:08x}, "
                f"the source announced 0x{self.total_crc32c:08x}"
            )
        try:
            entries = decode_snapshot(data)
        except ValueError as error:
            raise ReplicationError(f"snapshot content is unreadable: {error}") from None
        lsns = [entry.lsn for entry in entries]
        if lsns != list(range(1, self.snapshot_lsn + 1)):
            raise ReplicationError(
                f"snapshot at LSN {self.snapshot_lsn} must hold entries 1..{self.snapshot_lsn} "
                f"in order; it holds {len(lsns)} entries"
                + (f" from {lsns[0]} to {lsns[-1]}" if lsns else "")
            )
        return InstallSnapshot(self.snapshot_lsn, data, tuple(entries))


class ReplicationCursor:
    """Where one mirror database stands in its source's log."""

    def __init__(self, cluster_id: str, database_id: str, applied_lsn: int) -> None:
        self.cluster_id = cluster_id
        self.database_id = database_id
        self.applied_lsn = applied_lsn
        # Accepted frames may wait to be committed together; order is checked
        # against what was accepted, durability against what was committed.
        self.accepted_lsn = applied_lsn
        self.highest_seen_lsn = applied_lsn
        self._snapshot: SnapshotAssembly | None = None

    @property
    def subscribe_from(self) -> int:
        return self.applied_lsn + 1

    def restart(self) -> None:
        """A new subscription: whatever snapshot was half received is dropped."""
        self._snapshot = None
        self.accepted_lsn = self.applied_lsn

    def accept(self, frame: Frame) -> Commit | None:
        """What to commit for ``frame`` (None while a snapshot is incomplete)."""
        if isinstance(frame, SnapshotChunk):
            return self._chunk(frame)
        if isinstance(frame, Entries):
            return self._entries(frame)
        raise ReplicationError(f"unexpected {frame.TYPE.name} on a replication stream")

    def committed(self, commit: Commit) -> None:
        """The store holds ``commit`` now."""
        if isinstance(commit, InstallSnapshot):
            self.applied_lsn = commit.snapshot_lsn
        else:
            self.applied_lsn = commit.last_lsn
        self.highest_seen_lsn = max(self.highest_seen_lsn, self.applied_lsn)

    def _chunk(self, chunk: SnapshotChunk) -> InstallSnapshot | None:
        if (chunk.source_cluster_id, chunk.source_database_id) != (
            self.cluster_id,
            self.database_id,
        ):
            raise ReplicationError(
                f"snapshot of {chunk.source_cluster_id}/{chunk.source_database_id} "
                f"on the stream of {self.cluster_id}/{self.database_id}"
            )
        if self._snapshot is None:
            if chunk.snapshot_lsn < self.accepted_lsn:
                raise ReplicationError(
                    f"snapshot at LSN {chunk.snapshot_lsn} is older than LSN "
                    f"{self.accepted_lsn}, which this mirror already holds"
                )
            self._snapshot = SnapshotAssembly.begin(chunk)
        install = self._snapshot.add(chunk)
        if install is not None:
            self._snapshot = None
            self.accepted_lsn = install.snapshot_lsn
            self.highest_seen_lsn = max(self.highest_seen_lsn, install.snapshot_lsn)
        return install

    def _entries(self, frame: Entries) -> ApplyEntries:
        if self._snapshot is not None:
            raise ReplicationError("ENTRIES arrived in the middle of a snapshot")
        expected = self.accepted_lsn + 1
        if frame.first_lsn != expected:
            kind = "gap" if frame.first_lsn > expected else "out-of-order LSN"
            raise ReplicationError(
                f"{kind}: ENTRIES start at LSN {frame.first_lsn}, expected {expected}"
            )
        self.accepted_lsn = frame.last_lsn
        self.highest_seen_lsn = max(self.highest_seen_lsn, frame.last_lsn)
        return ApplyEntries(frame.entries)
