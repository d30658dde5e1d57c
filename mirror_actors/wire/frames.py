"""The frame codec of PROTOCOL.md sections 2 and 3, sans-I/O.

``encode_frame`` turns a frame object into bytes; ``FrameDecoder`` turns a
stream's bytes, fed in arbitrary pieces, back into frame objects.  Nothing here
touches a socket, a thread or a clock.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import IntEnum
from typing import Any, ClassVar, Final, NoReturn, TypeAlias

import msgpack
from attrs import field, frozen

from mirror_actors.wire.errors import ErrorCode, MalformedFrame

PROTOCOL_VERSION: Final = 1
ALPN: Final = "mirror/1"
NO_SNAPSHOT: Final = 2**64 - 1
HANDSHAKE_STREAM_ID: Final = 0  # the first client-initiated bidirectional stream
HEADER: Final = struct.Struct(">BI")
HEADER_SIZE: Final = HEADER.size
HANDSHAKE_MAX_PAYLOAD: Final = 4096
MAX_PAYLOAD: Final = 1 << 20


class FrameType(IntEnum):
    HELLO = 0x01
    HELLO_ACK = 0x02
    SUBSCRIBE = 0x10
    ENTRIES = 0x11
    SNAPSHOT_CHUNK = 0x12
    ACK = 0x13
    REQUEST_VOTE = 0x20
    CONF_CHANGE = 0x21
    PROPOSE = 0x22
    ERROR = 0x7F


VOTER_CLASS_TYPES: Final = frozenset(
    {FrameType.REQUEST_VOTE, FrameType.CONF_CHANGE, FrameType.PROPOSE}
)
_SMALL_FRAME_TYPES: Final = frozenset({FrameType.HELLO, FrameType.HELLO_ACK, FrameType.ERROR})


def max_payload(frame_type: int) -> int:
    """The largest payload PROTOCOL.md section 2 allows for ``frame_type``."""
    return HANDSHAKE_MAX_PAYLOAD if frame_type in _SMALL_FRAME_TYPES else MAX_PAYLOAD


class FrameTooLarge(ValueError):
    """A frame this side tried to encode exceeds its type's payload limit."""


# --- field checking -------------------------------------------------------

_Checker: TypeAlias = Callable[[object], bool]


def _unsigned(bits: int) -> _Checker:
    limit = 1 << bits
    # bool is an int subclass, but MessagePack true/false is not an integer.
    return lambda value: type(value) is int and 0 <= value < limit


_KINDS: Final[dict[str, _Checker]] = {
    "str": lambda value: type(value) is str,
    "bin": lambda value: type(value) is bytes,
    "bool": lambda value: type(value) is bool,
    "u8": _unsigned(8),
    "u16": _unsigned(16),
    "u32": _unsigned(32),
    "u64": _unsigned(64),
}

_KIND_NAMES: Final = {
    "str": "a string",
    "bin": "a byte string (bin)",
    "bool": "a boolean",
    "u8": "an integer in 0..2^8-1",
    "u16": "an integer in 0..2^16-1",
    "u32": "an integer in 0..2^32-1",
    "u64": "an integer in 0..2^64-1",
}


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _take(where: str, payload: Mapping[str, Any], name: str, kind: str) -> Any:
    if name not in payload:
        raise MalformedFrame(f"{where} is missing field {name!r}")
    value = payload[name]
    if not _KINDS[kind](value):
        raise MalformedFrame(
            f"{where} field {name!r} must be {_KIND_NAMES[kind]}, got {_describe(value)}"
        )
    return value


def _is_int_enum_in(value: object, kind: str) -> bool:
    # Error codes are IntEnums; on the wire they are plain integers.
    return isinstance(value, IntEnum) and _KINDS[kind](int(value))


class _FieldFrame:
    """A frame whose payload is a flat map of typed fields, declared in FIELDS."""

    TYPE: ClassVar[FrameType]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]
    # Fields a peer may leave out, with the value an absent one reads as.
    OPTIONAL_FIELDS: ClassVar[tuple[tuple[str, str, object], ...]] = ()

    def to_payload(self) -> dict[str, Any]:
        # An optional field at its default is left out: a HELLO of a mirror that
        # holds nothing stays byte for byte NodeDB's (and section 6's example).
        declared = self.FIELDS + tuple(
            (name, kind)
            for name, kind, default in self.OPTIONAL_FIELDS
            if getattr(self, name) != default
        )
        payload = {name: getattr(self, name) for name, _ in declared}
        for name, kind in declared:
            value = payload[name]
            if not _KINDS[kind](value) and not (
                kind.startswith("u") and _is_int_enum_in(value, kind)
            ):
                raise ValueError(
                    f"{self.TYPE.name} field {name!r} must be {_KIND_NAMES[kind]}, got {_describe(value)}"
                )
        return payload

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Any:
        where = cls.TYPE.name
        values = {name: _take(where, payload, name, kind) for name, kind in cls.FIELDS}
        for name, kind, default in cls.OPTIONAL_FIELDS:
            values[name] = _take(where, payload, name, kind) if name in payload else default
        return cls(**values)


# --- frames -----------------------------------------------------------------


@frozen
class Hello(_FieldFrame):
    TYPE = FrameType.HELLO
    FIELDS = (
        ("source_cluster", "str"),
        ("source_database_id", "str"),
        ("last_applied_lsn", "u64"),
        ("protocol_version", "u16"),
    )
    # PROTOCOL.md section 3: this project's addition; NodeDB's HELLO has no such
    # key, and an absent one reads as 0 ("the mirror holds nothing" / unknown).
    OPTIONAL_FIELDS = (("last_applied_term", "u64", 0),)
    source_cluster: str
    source_database_id: str
    last_applied_lsn: int = 0
    protocol_version: int = PROTOCOL_VERSION
    last_applied_term: int = 0


@frozen
class HelloAck(_FieldFrame):
    TYPE = FrameType.HELLO_ACK
    FIELDS = (
        ("accepted", "bool"),
        ("error_code", "u8"),
        ("error_detail", "str"),
        ("source_cluster_id", "str"),
        ("snapshot_lsn", "u64"),
        ("snapshot_bytes_total", "u64"),
    )
    accepted: bool
    error_code: int
    error_detail: str
    source_cluster_id: str
    snapshot_lsn: int = NO_SNAPSHOT
    snapshot_bytes_total: int = 0

    @classmethod
    def accept(
        cls, source_cluster_id: str, snapshot_lsn: int = NO_SNAPSHOT, snapshot_bytes_total: int = 0
    ) -> HelloAck:
        return cls(
            True, int(ErrorCode.NONE), "", source_cluster_id, snapshot_lsn, snapshot_bytes_total
        )

    @classmethod
    def reject(cls, source_cluster_id: str, code: ErrorCode, detail: str) -> HelloAck:
        return cls(False, int(code), detail, source_cluster_id, NO_SNAPSHOT, 0)

    @property
    def has_snapshot(self) -> bool:
        return self.snapshot_lsn != NO_SNAPSHOT


@frozen
class Subscribe(_FieldFrame):
    TYPE = FrameType.SUBSCRIBE
    FIELDS = (("from_lsn", "u64"),)
    from_lsn: int

    @property
    def first_lsn(self) -> int:
        """The first LSN wanted: PROTOCOL.md reads 0 as 1."""
        return max(1, self.from_lsn)


@frozen
class Entry:
    lsn: int
    term: int
    data: bytes


@frozen
class EntryBatch:
    """Contiguous entries ``first_lsn``.. as parallel tuples: one object per frame, not per entry.

    What a replica applies is a run of consecutive LSNs, so the LSNs need not be
    kept one by one; terms and payloads stay as the decoder produced them.
    """

    first_lsn: int
    terms: tuple[int, ...]
    payloads: tuple[bytes, ...]

    def __attrs_post_init__(self) -> None:
        if len(self.terms) != len(self.payloads):
            raise ValueError(
                f"an entry batch needs one term per payload, got {len(self.terms)} terms "
                f"for {len(self.payloads)} payloads"
            )

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> EntryBatch:
        """The batch of ``entries``, which must have consecutive LSNs (ValueError if not)."""
        entries = tuple(entries)
        first = entries[0].lsn if entries else 1
        for offset, entry in enumerate(entries):
            if entry.lsn != first + offset:
                raise ValueError(
                    f"entries must have consecutive LSNs: entry {offset} has LSN {entry.lsn}, "
                    f"expected {first + offset}"
                )
        return cls(
            first, tuple(entry.term for entry in entries), tuple(entry.data for entry in entries)
        )

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def last_lsn(self) -> int:
        """The LSN of the last entry (``first_lsn - 1`` for an empty batch)."""
        return self.first_lsn + len(self.payloads) - 1

    @property
    def last_term(self) -> int:
        return self.terms[-1] if self.terms else 0

    def rows(self) -> Iterator[tuple[int, int, bytes]]:
        """``(lsn, term, data)`` per entry, without building an ``Entry`` each."""
        return zip(
            range(self.first_lsn, self.first_lsn + len(self.payloads)),
            self.terms,
            self.payloads,
            strict=True,
        )

    def entries(self) -> tuple[Entry, ...]:
        """One ``Entry`` per entry: for tests and tools, not the hot path."""
        return tuple(Entry(lsn, term, data) for lsn, term, data in self.rows())


def as_entry_batch(entries: EntryBatch | Iterable[Entry]) -> EntryBatch:
    """``entries`` as a batch: a batch as it is, ``Entry`` objects with consecutive LSNs packed."""
    if isinstance(entries, EntryBatch):
        return entries
    return EntryBatch.of(entries)


_U64_LIMIT: Final = 1 << 64


@frozen
class Entries:
    """An ENTRIES frame: held as one ``EntryBatch`` (built from ``Entry`` objects or a batch)."""

    TYPE: ClassVar[FrameType] = FrameType.ENTRIES
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

    def to_payload(self) -> dict[str, Any]:
        if not self.batch.payloads:
            raise ValueError("ENTRIES must carry at least one entry")
        return {
            "entries": [
                {"lsn": lsn, "term": term, "data": data} for lsn, term, data in self.batch.rows()
            ]
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Entries:
        items = payload.get("entries")
        if items is None:
            raise MalformedFrame("ENTRIES is missing field 'entries'")
        if type(items) is not list:
            raise MalformedFrame(
                f"ENTRIES field 'entries' must be an array, got {_describe(items)}"
            )
        if not items:
            raise MalformedFrame("ENTRIES must carry at least one entry")
        # The hot path of replication: every check runs at C speed over the whole
        # frame (itemgetter, type sets, a range comparison), with no object and no
        # Python step per entry. A frame that fails any of them is walked entry by
        # entry, which names the problem. One pass per field: a 3-key itemgetter
        # transposed by zip built a tuple per entry and cost 4x as much (1.6 ms
        # against 0.4 ms for a 3,500-entry frame; msgpack's unpackb is 1.2 ms).
        try:
            # A non-map entry fails the subscript (TypeError), a missing field KeyError.
            lsns = list(map(_LSN, items))
            terms = tuple(map(_TERM, items))
            payloads = tuple(map(_DATA, items))
        except (KeyError, TypeError):
            _first_entry_problem(items)
        first = lsns[0]
        if not (
            set(map(type, lsns)) == _INTS
            and 0 <= first
            and lsns[-1] < _U64_LIMIT
            and lsns == list(range(first, first + len(lsns)))
            and set(map(type, terms)) == _INTS
            and min(terms) >= 0
            and max(terms) < _U64_LIMIT
            and set(map(type, payloads)) == _BYTES
        ):
            _first_entry_problem(items)
        return cls(EntryBatch(first, terms, payloads))


_LSN: Final = operator.itemgetter("lsn")
_TERM: Final = operator.itemgetter("term")
_DATA: Final = operator.itemgetter("data")
_INTS: Final = {int}
_BYTES: Final = {bytes}


def _first_entry_problem(items: list[Any]) -> NoReturn:
    """Raise the ``MalformedFrame`` naming the first bad entry of an ENTRIES frame."""
    first = items[0].get("lsn") if type(items[0]) is dict else None
    if type(first) is not int or not 0 <= first < _U64_LIMIT:
        _entry_problem(0, items[0], None)
    for index, item in enumerate(items):
        if type(item) is not dict:
            _entry_problem(index, item, first + index)
        lsn, term, data = item.get("lsn"), item.get("term"), item.get("data")
        if (
            lsn != first + index
            or type(lsn) is not int
            or type(term) is not int
            or not 0 <= term < _U64_LIMIT
            or type(data) is not bytes
        ):
            _entry_problem(index, item, first + index)
    raise AssertionError("called for ENTRIES whose entries are all well formed")


def _entry_problem(index: int, item: object, expected: int | None) -> NoReturn:
    """Raise the ``MalformedFrame`` that says what is wrong with ENTRIES entry ``index``."""
    where = f"ENTRIES entry {index}"
    if type(item) is not dict:
        raise MalformedFrame(f"{where} must be a map, got {_describe(item)}")
    lsn = _take(where, item, "lsn", "u64")
    _take(where, item, "term", "u64")
    _take(where, item, "data", "bin")
    raise MalformedFrame(
        f"ENTRIES LSNs must be contiguous and increasing: entry {index} has LSN {lsn}, "
        f"expected {expected}"
    )


@frozen
class SnapshotChunk(_FieldFrame):
    TYPE = FrameType.SNAPSHOT_CHUNK
    FIELDS = (
        ("source_cluster_id", "str"),
        ("source_database_id", "str"),
        ("snapshot_lsn", "u64"),
        ("total_bytes", "u64"),
        ("total_crc32c", "u32"),
        ("offset", "u64"),
        ("data", "bin"),
        ("done", "bool"),
    )
    source_cluster_id: str
    source_database_id: str
    snapshot_lsn: int
    total_bytes: int
    total_crc32c: int
    offset: int
    data: bytes
    done: bool


@frozen
class Ack(_FieldFrame):
    TYPE = FrameType.ACK
    FIELDS = (("applied_lsn", "u64"), ("bytes", "u64"))
    applied_lsn: int
    bytes: int


@frozen
class Error(_FieldFrame):
    TYPE = FrameType.ERROR
    FIELDS = (("code", "u8"), ("detail", "str"))
    code: int
    detail: str


@frozen
class _VoterFrame:
    """A voter-class frame: any map. A mirror never sends one; receiving one is OBSERVER_ONLY."""

    TYPE: ClassVar[FrameType]
    body: Mapping[str, Any] = field(factory=dict, hash=False)

    def to_payload(self) -> dict[str, Any]:
        return dict(self.body)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Any:
        return cls(payload)


@frozen
class RequestVote(_VoterFrame):
    TYPE = FrameType.REQUEST_VOTE


@frozen
class ConfChange(_VoterFrame):
    TYPE = FrameType.CONF_CHANGE


@frozen
class Propose(_VoterFrame):
    TYPE = FrameType.PROPOSE


Frame: TypeAlias = (
    Hello
    | HelloAck
    | Subscribe
    | Entries
    | SnapshotChunk
    | Ack
    | Error
    | RequestVote
    | ConfChange
    | Propose
)

_FRAME_CLASSES: Final[dict[int, Any]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        HelloAck,
        Subscribe,
        Entries,
        SnapshotChunk,
        Ack,
        Error,
        RequestVote,
        ConfChange,
        Propose,
    )
}


def is_voter_class(frame: Frame) -> bool:
    return frame.TYPE in VOTER_CLASS_TYPES


# --- encoding ---------------------------------------------------------------


def encode_payload(frame: Frame) -> bytes:
    return msgpack.packb(frame.to_payload(), use_bin_type=True)


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of one frame: type, big-endian length, MessagePack map."""
    payload = encode_payload(frame)
    limit = max_payload(frame.TYPE)
    if len(payload) > limit:
        raise FrameTooLarge(
            f"{frame.TYPE.name} payload is {len(payload)} bytes; the protocol allows {limit}"
        )
    return HEADER.pack(frame.TYPE, len(payload)) + payload


def encoded_size(frame: Frame) -> int:
    return HEADER_SIZE + len(encode_payload(frame))


# --- decoding ---------------------------------------------------------------


def decode_payload(frame_type: int, payload: bytes) -> Frame:
    """Decode one frame's payload, raising only ``MalformedFrame``."""
    cls = _FRAME_CLASSES.get(frame_type)
    name = cls.TYPE.name if cls is not None else f"0x{frame_type:02x}"
    if cls is None:
        raise MalformedFrame(f"unknown frame type 0x{frame_type:02x}")
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except msgpack.ExtraData:
        raise MalformedFrame(f"{name} payload has trailing bytes after the map") from None
    except Exception as error:  # msgpack signals bad input with many exception types
        raise MalformedFrame(f"{name} payload is not valid MessagePack: {error}") from None
    if type(value) is not dict:
        raise MalformedFrame(f"{name} payload must be a map, got {_describe(value)}")
    for key in value:
        if type(key) is not str:
            raise MalformedFrame(f"{name} payload keys must be strings, got {_describe(key)}")
    frame: Frame = cls.from_payload(value)
    return frame


_SMALL_PIECE = 512
"""Received pieces shorter than this are copied together rather than kept apart."""


class FrameDecoder:
    """Incremental decoder for one stream: ``feed(data) -> [frames]``.

    The length limit is checked as soon as a header is complete, before any of
    the payload is kept.  After a ``MalformedFrame`` the decoder stays broken:
    the stream it reads is to be closed.
    """

    def __init__(self) -> None:
        # The received bytes not yet decoded, in the pieces they came in: a frame of
        # 1 MiB arrives in ~1,000 datagrams, and joining them once costs 0.05 ms
        # where growing a bytearray by each costs ~2 ms.
        self._pending: list[bytes | bytearray] = []
        self._pending_size = 0
        self._failure: MalformedFrame | None = None
        # Bytes the pending pieces must add up to before there is anything to parse:
        # the whole frame whose header was checked, or a whole header.
        self._wanted = 0

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return self._pending_size

    def feed(self, data: bytes | bytearray) -> list[Frame]:
        return [frame for frame, _ in self.feed_with_sizes(data)]

    def feed_with_sizes(self, data: bytes | bytearray) -> list[tuple[Frame, int]]:
        """Like ``feed``, pairing each frame with its payload length (what ACK ``bytes`` counts)."""
        if self._failure is not None:
            raise MalformedFrame(f"stream already broken: {self._failure.detail}")
        if not data:
            return []
        pieces = self._pending
        if len(data) >= _SMALL_PIECE:
            # Kept as given, not copied: only bytes cannot change under the decoder.
            pieces.append(data if type(data) is bytes else bytes(data))
        elif pieces and type(pieces[-1]) is bytearray:
            pieces[-1] += data
        else:
            # Tiny pieces (a peer may send a byte per STREAM frame) share one
            # bytearray: an object per byte would hold ~40 times the data.
            pieces.append(bytearray(data))
        self._pending_size += len(data)
        if self._pending_size < self._wanted:
            return []  # inside a frame whose header was checked: most pieces of a large one
        try:
            return self._parse()
        except MalformedFrame as error:
            detail = error.detail
        except Exception as error:  # a decoder must never leak another exception type
            detail = f"undecodable input: {type(error).__name__}: {error}"
        # A fresh error, raised here: the original's traceback would keep the
        # frames that decoded the bad payload, and their locals, alive with it.
        failure = MalformedFrame(detail)
        self._fail(failure)
        raise failure

    def eof(self) -> None:
        """The stream ended: a partial frame left in the buffer is malformed."""
        if self._failure is None and self._pending_size:
            failure = MalformedFrame(
                f"stream ended inside a frame ({self._pending_size} bytes of it received)"
            )
            self._fail(failure)
            raise failure

    def _fail(self, error: MalformedFrame) -> None:
        self._failure = error
        self._pending = []
        self._pending_size = 0
        self._wanted = 0

    def _parse(self) -> list[tuple[Frame, int]]:
        pieces = self._pending
        buffer = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        frames: list[tuple[Frame, int]] = []
        position = 0
        available = len(buffer)
        wanted = 0
        while available - position >= HEADER_SIZE:
            frame_type, length = HEADER.unpack_from(buffer, position)
            self._check_header(frame_type, length)
            end = position + HEADER_SIZE + length
            if end > available:
                wanted = end - position
                break
            payload = bytes(buffer[position + HEADER_SIZE : end])
            frames.append((decode_payload(frame_type, payload), length))
            position = end
        rest = available - position
        if 0 < rest < HEADER_SIZE:
            # Reject an unknown type as soon as its byte arrives.
            self._check_type(buffer[position])
            wanted = HEADER_SIZE
        if not rest:
            self._pending = []
        elif position or len(pieces) > 1:
            self._pending = [buffer[position:]]
        self._pending_size = rest
        self._wanted = wanted
        return frames

    @staticmethod
    def _check_type(frame_type: int) -> None:
        if frame_type not in _FRAME_CLASSES:
            raise MalformedFrame(f"unknown frame type 0x{frame_type:02x}")

    @classmethod
    def _check_header(cls, frame_type: int, length: int) -> None:
        cls._check_type(frame_type)
        limit = max_payload(frame_type)
        if length > limit:
            raise MalformedFrame(
                f"{FrameType(frame_type).name} length {length} exceeds the limit of {limit} bytes"
            )
