"""The snapshot byte format of PROTOCOL.md section 3, sans-I/O.

A snapshot is a concatenation of MessagePack arrays ``[lsn, term, data]``, one
per entry, LSNs contiguous from 1 up to ``snapshot_lsn``, terms never
decreasing.  ``SnapshotDecoder`` reads it incrementally, in pieces of any size,
holding at most one partial entry, so a receiver never needs the whole snapshot
in memory.  Every problem is a ``MalformedFrame``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

import google_crc32c
import msgpack

from mirror_actors.wire.errors import MalformedFrame
from mirror_actors.wire.frames import MAX_PAYLOAD, Entry

_U64_LIMIT: Final = 1 << 64
# One entry's data fits one ENTRIES frame, so a snapshot item is never larger;
# the unpacker buffers at most one partial item plus the piece being fed.
_MAX_ITEM_DATA: Final = MAX_PAYLOAD
_MAX_FEED: Final = MAX_PAYLOAD


def crc32c(data: bytes, value: int = 0) -> int:
    """CRC-32C (Castagnoli) as ``total_crc32c`` uses; pass ``value`` to continue a running one."""
    return int(google_crc32c.extend(value, data))


def encode_snapshot_entry(entry: Entry) -> bytes:
    packed: bytes = msgpack.packb([entry.lsn, entry.term, entry.data], use_bin_type=True)
    return packed


def encode_snapshot(entries: Iterable[Entry]) -> bytes:
    """The snapshot bytes of ``entries`` (which must be 1..N, terms not decreasing)."""
    return b"".join(encode_snapshot_entry(entry) for entry in entries)


class SnapshotDecoder:
    """Decodes one snapshot's bytes into entries as they arrive.

    ``feed`` returns the entries completed by a piece; ``finish(snapshot_lsn)``
    checks that the snapshot ended on an entry boundary with ``snapshot_lsn``.
    ``previous_term`` is the term a first entry may not go below.
    """

    def __init__(self, previous_term: int = 0) -> None:
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            max_buffer_size=_MAX_FEED + _MAX_ITEM_DATA + 1024,
            max_bin_len=_MAX_ITEM_DATA,
            max_str_len=0,
            max_array_len=3,
            max_map_len=0,
            max_ext_len=0,
        )
        self.next_lsn = 1
        self.last_term = previous_term
        self.bytes_fed = 0
        # Where the last complete item ended. Not ``Unpacker.tell()`` at the end:
        # the unpacker also consumes the header (and complete scalars) of an item
        # it is still waiting for, so tell() would hide a truncated last entry.
        self._boundary = 0

    @property
    def last_lsn(self) -> int:
        """The LSN of the last entry decoded, 0 before the first."""
        return self.next_lsn - 1

    def feed(self, data: bytes) -> list[Entry]:
        entries: list[Entry] = []
        view = memoryview(data)
        for start in range(0, len(view), _MAX_FEED):
            entries.extend(self._feed_piece(bytes(view[start : start + _MAX_FEED])))
        return entries

    def _feed_piece(self, piece: bytes) -> Iterator[Entry]:
        try:
            self._unpacker.feed(piece)
        except msgpack.BufferFull:
            raise MalformedFrame("snapshot entry larger than any frame could carry") from None
        self.bytes_fed += len(piece)
        while True:
            try:
                item = next(self._unpacker)
            except StopIteration:
                return
            except Exception as error:  # msgpack signals bad input with many types
                raise MalformedFrame(
                    f"snapshot is not a sequence of MessagePack [lsn, term, data] arrays: "
                    f"{type(error).__name__}: {error}"
                ) from None
            self._boundary = self._unpacker.tell()
            yield self._entry(item)

    def _entry(self, item: object) -> Entry:
        if (
            type(item) is not list
            or len(item) != 3
            or type(item[0]) is not int
            or type(item[1]) is not int
            or type(item[2]) is not bytes
            or not 0 <= item[0] < _U64_LIMIT
            or not 0 <= item[1] < _U64_LIMIT
        ):
            raise MalformedFrame(
                f"snapshot item is not [lsn: u64, term: u64, data: bin]: {item!r:.60}"
            )
        lsn, term, data = item
        if lsn != self.next_lsn:
            raise MalformedFrame(
                f"snapshot entries must be contiguous from LSN 1: got LSN {lsn}, "
                f"expected {self.next_lsn}"
            )
        if term < self.last_term:
            raise MalformedFrame(
                f"snapshot term goes down at LSN {lsn}: {term} after {self.last_term}"
            )
        self.next_lsn += 1
        self.last_term = term
        return Entry(lsn, term, data)

    def finish(self, snapshot_lsn: int) -> None:
        """The snapshot's bytes are all in: it must end after entry ``snapshot_lsn``."""
        if self.bytes_fed != self._boundary:
            raise MalformedFrame(
                f"snapshot ends inside an entry ({self.bytes_fed - self._boundary} bytes of it)"
            )
        if self.last_lsn != snapshot_lsn:
            raise MalformedFrame(f"snapshot at LSN {snapshot_lsn} holds entries 1..{self.last_lsn}")


def decode_snapshot(blob: bytes, snapshot_lsn: int | None = None) -> list[Entry]:
    """Every entry of a whole snapshot; ``MalformedFrame`` if it is not one."""
    decoder = SnapshotDecoder()
    entries = decoder.feed(blob)
    decoder.finish(decoder.last_lsn if snapshot_lsn is None else snapshot_lsn)
    return entries
