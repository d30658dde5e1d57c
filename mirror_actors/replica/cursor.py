"""Applying a replication stream, sans-I/O: snapshot reassembly, LSN and term ordering.

``ReplicationCursor`` takes the frames of one subscription and answers what to
commit.  Anything out of order, a gap, a term going down or a broken snapshot
raises a ``ReplicationError`` (MALFORMED, transient: the link is restarted); a
history that provably differs from what this mirror applied raises
``HistoryDiverged`` (hard); a snapshot over ``max_snapshot_bytes`` raises
``SnapshotTooLarge`` (hard).  Snapshot bytes go to an injected spool as they
arrive, so a bootstrap needs no memory in proportion to the snapshot; nothing
here touches a socket, a thread or a store.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NoReturn

from attrs import define, field, frozen

from mirror_actors.replica.spool import MemorySpool, SnapshotSpool
from mirror_actors.wire.errors import HistoryDiverged, MalformedFrame, SnapshotTooLarge
from mirror_actors.wire.frames import (
    Entries,
    Entry,
    EntryBatch,
    Frame,
    SnapshotChunk,
    as_entry_batch,
)
from mirror_actors.wire.snapshot import SnapshotDecoder, crc32c


class ReplicationError(MalformedFrame):
    """The source's stream is not a gap-free continuation of what this mirror holds."""


@frozen
class ApplyEntries:
    """Append a run of consecutive entries (one batch per ENTRIES frame, no object per entry)."""

    batch: EntryBatch = field(converter=as_entry_batch)

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self.batch.entries()

    @property
    def first_lsn(self) -> int:
        return self.batch.first_lsn

    @property
    def last_lsn(self) -> int:
        return self.batch.last_lsn

    @property
    def last_term(self) -> int:
        return self.batch.last_term


@frozen
class InstallSnapshot:
    """Replace the replica with the snapshot's entries 1..``snapshot_lsn`` (CRC already checked)."""

    snapshot_lsn: int
    last_term: int
    total_bytes: int
    spool: SnapshotSpool = field(eq=False, repr=False)

    def entries(self) -> Iterator[Entry]:
        """The snapshot's entries, decoded from the spool as they are read."""
        decoder = SnapshotDecoder()
        for piece in self.spool.pieces():
            yield from decoder.feed(piece)
        decoder.finish(self.snapshot_lsn)

    @property
    def last_lsn(self) -> int:
        return self.snapshot_lsn


@frozen
class ResetReplica:
    """Drop everything the replica holds (a resync after a divergence), in the same transaction."""

    @property
    def last_lsn(self) -> int:
        return 0

    @property
    def last_term(self) -> int:
        return 0


Commit = ApplyEntries | InstallSnapshot | ResetReplica


@define
class SnapshotAssembly:
    """One snapshot transfer: chunk order, size, running CRC, and its content as it streams past."""

    cluster_id: str
    database_id: str
    snapshot_lsn: int
    total_bytes: int
    total_crc32c: int
    decoder: SnapshotDecoder
    received: int = 0
    running_crc: int = 0

    @classmethod
    def begin(cls, chunk: SnapshotChunk, decoder: SnapshotDecoder) -> SnapshotAssembly:
        if chunk.offset != 0:
            raise ReplicationError(f"snapshot starts at offset {chunk.offset}, not 0")
        return cls(
            chunk.source_cluster_id,
            chunk.source_database_id,
            chunk.snapshot_lsn,
            chunk.total_bytes,
            chunk.total_crc32c,
            decoder,
        )

    def check(self, chunk: SnapshotChunk) -> None:
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

    def add(self, chunk: SnapshotChunk) -> list[Entry]:
        """Take a checked chunk; the entries it completed (for the caller's checks)."""
        self.received += len(chunk.data)
        self.running_crc = crc32c(chunk.data, self.running_crc)
        try:
            return self.decoder.feed(chunk.data)
        except MalformedFrame as error:
            raise ReplicationError(f"snapshot content is unreadable: {error.detail}") from None

    def finish(self) -> None:
        if self.received != self.total_bytes:
            raise ReplicationError(f"snapshot ended at {self.received} bytes of {self.total_bytes}")
        if self.running_crc != self.total_crc32c:
            raise ReplicationError(
                f"snapshot CRC-32C mismatch: computed 0x{self.running_crc:08x}, "
                f"the source announced 0x{self.total_crc32c:08x}"
            )
        try:
            self.decoder.finish(self.snapshot_lsn)
        except MalformedFrame as error:
            raise ReplicationError(
                f"snapshot at LSN {self.snapshot_lsn} must hold entries 1..{self.snapshot_lsn} "
                f"in order: {error.detail}"
            ) from None


class ReplicationCursor:
    """Where one mirror database stands in its source's log.

    ``applied_lsn``/``applied_term`` are what the store committed;
    ``accepted_*`` what this subscription accepted and may not yet be committed.
    """

    def __init__(
        self,
        cluster_id: str,
        database_id: str,
        applied_lsn: int,
        applied_term: int = 0,
        *,
        spool: SnapshotSpool | None = None,
        max_snapshot_bytes: int | None = None,
    ) -> None:
        self.cluster_id = cluster_id
        self.database_id = database_id
        self.applied_lsn = applied_lsn
        self.applied_term = applied_term
        self.accepted_lsn = applied_lsn
        self.accepted_term = applied_term
        self.highest_seen_lsn = applied_lsn
        self.max_snapshot_bytes = max_snapshot_bytes
        self._spool: SnapshotSpool = spool if spool is not None else MemorySpool()
        self._snapshot: SnapshotAssembly | None = None
        # What the store held when this subscription began: an entry right after it
        # whose term is lower proves the source's history differs from ours.
        self._subscribed_after = applied_lsn
        # The transfer that last ended on this subscription: later chunks of it are MALFORMED.
        self._finished_transfer: tuple[int, int, int] | None = None
        # An InstallSnapshot handed out and not yet committed: its entries are still
        # read from the spool, so no other transfer may begin (and clear it) until then.
        self._pending_install: InstallSnapshot | None = None

    @property
    def subscribe_from(self) -> int:
        return self.applied_lsn + 1

    def restart(self) -> None:
        """A new subscription: a snapshot half received, or whole but not installed, is dropped."""
        if self._snapshot is not None or self._pending_install is not None:
            self._spool.discard()
        self._snapshot = None
        self._finished_transfer = None
        self._pending_install = None
        self._subscribed_after = self.applied_lsn
        self.accepted_lsn = self.applied_lsn
        self.accepted_term = self.applied_term

    def reset(self) -> None:
        """Start over from nothing (a resync): the next subscription asks for everything."""
        self.applied_lsn = self.applied_term = 0
        self.highest_seen_lsn = 0
        self.restart()

    def accept(self, frame: Frame) -> Commit | None:
        """What to commit for ``frame`` (None while a snapshot is incomplete)."""
        if isinstance(frame, SnapshotChunk):
            return self._chunk(frame)
        if isinstance(frame, Entries):
            return self._entries(frame)
        raise ReplicationError(f"unexpected {frame.TYPE.name} on a replication stream")

    def committed(self, commit: Commit) -> None:
        """The store holds ``commit`` now."""
        if isinstance(commit, ResetReplica):
            self.applied_lsn = self.applied_term = 0
            return
        self.applied_lsn = commit.last_lsn
        self.applied_term = commit.last_term
        if isinstance(commit, InstallSnapshot):
            commit.spool.discard()
            # Whichever install it was, the spool is empty now: nothing pends on it.
            self._pending_install = None
        self.highest_seen_lsn = max(self.highest_seen_lsn, self.applied_lsn)

    # -- snapshots ----------------------------------------------------------------------

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
            self._snapshot = self._begin_transfer(chunk)
        assembly = self._snapshot
        assembly.check(chunk)
        # Spooled before it is decoded: a chunk that breaks the content still ends
        # the transfer, and the spool is dropped with it.
        self._spool.write(chunk.data)
        for entry in assembly.add(chunk):
            self._check_against_applied(entry)
        if not chunk.done:
            return None
        assembly.finish()
        self._snapshot = None
        self._finished_transfer = (chunk.snapshot_lsn, chunk.total_bytes, chunk.total_crc32c)
        self.accepted_lsn = assembly.snapshot_lsn
        self.accepted_term = assembly.decoder.last_term
        self.highest_seen_lsn = max(self.highest_seen_lsn, assembly.snapshot_lsn)
        install = InstallSnapshot(
            assembly.snapshot_lsn, assembly.decoder.last_term, assembly.total_bytes, self._spool
        )
        self._pending_install = install
        return install

    def _begin_transfer(self, chunk: SnapshotChunk) -> SnapshotAssembly:
        described = (chunk.snapshot_lsn, chunk.total_bytes, chunk.total_crc32c)
        if chunk.offset != 0 and described == self._finished_transfer:
            raise ReplicationError(
                f"a chunk at offset {chunk.offset} of the snapshot at LSN {chunk.snapshot_lsn}, "
                "whose transfer already ended"
            )
        if chunk.snapshot_lsn <= self.accepted_lsn:
            raise ReplicationError(
                f"snapshot at LSN {chunk.snapshot_lsn} is not above LSN {self.accepted_lsn}, "
                "which this mirror already holds"
            )
        if self.max_snapshot_bytes is not None and chunk.total_bytes > self.max_snapshot_bytes:
            raise SnapshotTooLarge(chunk.total_bytes, self.max_snapshot_bytes)
        assembly = SnapshotAssembly.begin(chunk, SnapshotDecoder())
        pending = self._pending_install
        if pending is not None:
            # Beginning would overwrite the spool the pending install reads from.
            # Raised before anything is spooled: what was accepted can still commit.
            raise ReplicationError(
                f"a snapshot at LSN {chunk.snapshot_lsn} began before the one at LSN "
                f"{pending.snapshot_lsn} was committed; commit an InstallSnapshot before "
                "feeding the next transfer's first chunk"
            )
        self._spool.begin(chunk.total_bytes)
        return assembly

    def _check_against_applied(self, entry: Entry) -> None:
        # The snapshot replaces what this mirror holds, which is only right if it
        # holds the same entry where the mirror's history ends.
        if entry.lsn == self.applied_lsn and self.applied_term and entry.term != self.applied_term:
            raise HistoryDiverged(
                f"the source's snapshot has term {entry.term} at LSN {entry.lsn}, where this "
                f"replica holds term {self.applied_term}",
                lsn=entry.lsn,
                mirror_term=self.applied_term,
                source_term=entry.term,
            )

    # -- entries --------------------------------------------------------------------------

    def _entries(self, frame: Entries) -> ApplyEntries:
        if self._snapshot is not None:
            raise ReplicationError("ENTRIES arrived in the middle of a snapshot")
        expected = self.accepted_lsn + 1
        if frame.first_lsn != expected:
            kind = "gap" if frame.first_lsn > expected else "out-of-order LSN"
            raise ReplicationError(
                f"{kind}: ENTRIES start at LSN {frame.first_lsn}, expected {expected}"
            )
        batch = frame.batch
        terms = batch.terms
        previous = self.accepted_term
        # Terms never go down: checked on the whole batch at C speed (one term
        # throughout is a count; otherwise a sorted list sorts in one pass); only a
        # batch that fails is walked to say where.
        first, last = terms[0], terms[-1]
        if first < previous or (
            terms.count(first) != len(terms) if first == last else list(terms) != sorted(terms)
        ):
            self._term_went_down(batch, previous)
        self.accepted_lsn = batch.last_lsn
        self.accepted_term = terms[-1]
        self.highest_seen_lsn = max(self.highest_seen_lsn, batch.last_lsn)
        return ApplyEntries(batch)

    def _term_went_down(self, batch: EntryBatch, previous: int) -> NoReturn:
        for lsn, term, _ in batch.rows():
            if term < previous:
                if lsn == self._subscribed_after + 1:
                    # Right after what this replica held when it subscribed: the
                    # source's entry there cannot have our term (terms never go down).
                    raise HistoryDiverged(
                        f"the source's entry {lsn} has term {term}, below term "
                        f"{previous} of this replica's entry {self._subscribed_after}",
                        lsn=self._subscribed_after,
                        mirror_term=previous,
                        source_term=None,
                    )
                raise ReplicationError(f"term goes down at LSN {lsn}: {term} after {previous}")
            previous = term
        raise AssertionError("called for a batch whose terms never go down")
