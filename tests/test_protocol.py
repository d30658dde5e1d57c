"""The frame codec against PROTOCOL.md sections 2, 3 and 6, byte by byte.

Round trips for every frame type through arbitrary splits and coalescing, one
test per malformed-input rule, and fuzzing that only ``MalformedFrame`` ever
escapes the decoder.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror_actors.wire import (
    MAX_PAYLOAD,
    NO_SNAPSHOT,
    PROTOCOL_VERSION,
    Ack,
    ConfChange,
    Entries,
    Entry,
    Error,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    FrameType,
    Hello,
    HelloAck,
    MalformedFrame,
    Propose,
    RequestVote,
    SnapshotChunk,
    Subscribe,
    decode_payload,
    encode_frame,
)
from mirror_actors.wire.frames import (
    HANDSHAKE_MAX_PAYLOAD,
    HEADER_SIZE,
    encode_payload,
    max_payload,
)
from tests.helpers import U64_MAX

KNOWN_TYPES = sorted(int(t) for t in FrameType)
UNKNOWN_TYPES = [t for t in range(256) if t not in KNOWN_TYPES]
SMALL_TYPES = [FrameType.HELLO, FrameType.HELLO_ACK, FrameType.ERROR]
LARGE_TYPES = [t for t in FrameType if t not in SMALL_TYPES]

# --- strategies ---------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8"), max_size=40)
blobs = st.binary(max_size=200)
u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, U64_MAX)
# Interesting u64 values: every MessagePack integer width boundary.
u64_edges = st.sampled_from(
    [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, U64_MAX]
)
u64s = st.one_of(u64, u64_edges)

hellos = st.builds(Hello, texts, texts, u64s, u16)
hello_acks = st.builds(HelloAck, st.booleans(), u8, texts, texts, u64s, u64s)
subscribes = st.builds(Subscribe, u64s)
acks = st.builds(Ack, u64s, u64s)
errors = st.builds(Error, u8, texts)
snapshot_chunks = st.builds(
    SnapshotChunk, texts, texts, u64s, u64s, u32, u64s, blobs, st.booleans()
)


@st.composite
def entries_frames(draw: st.DrawFn) -> Entries:
    items = draw(st.lists(st.tuples(u64s, blobs), min_size=1, max_size=8))
    first = draw(st.one_of(st.integers(0, U64_MAX - len(items) + 1), st.just(1)))
    return Entries(Entry(first + i, term, data) for i, (term, data) in enumerate(items))


# MessagePack values that survive a round trip unchanged (no tuples, no NaN).
msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), U64_MAX),
    st.floats(allow_nan=False),
    texts,
    blobs,
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)
    ),
    max_leaves=12,
)
str_maps = st.dictionaries(texts, msgpack_values, max_size=6)
voter_frames = st.one_of(
    st.builds(RequestVote, str_maps),
    st.builds(ConfChange, str_maps),
    st.builds(Propose, str_maps),
)

any_frame: st.SearchStrategy[Frame] = st.one_of(
    hellos,
    hello_acks,
    subscribes,
    entries_frames(),
    snapshot_chunks,
    acks,
    errors,
    voter_frames,
)


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[Frame]:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    previous = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        frames += decoder.feed(data[previous:cut])
        previous = cut
    decoder.eof()
    assert decoder.buffered == 0
    return frames


def frame_bytes(frame_type: int, payload: bytes) -> bytes:
    return struct.pack(">BI", frame_type, len(payload)) + payload


def decode_one(frame_type: int, payload: bytes) -> Frame:
    decoder = FrameDecoder()
    frames = decoder.feed(frame_bytes(frame_type, payload))
    decoder.eof()
    assert len(frames) == 1
    return frames[0]


def assert_malformed(frame_type: int, payload: bytes, *words: str) -> MalformedFrame:
    """Both ``decode_payload`` and a ``FrameDecoder`` reject it, naming what was wrong."""
    with pytest.raises(MalformedFrame) as direct:
        decode_payload(frame_type, payload)
    decoder = FrameDecoder()
    with pytest.raises(MalformedFrame) as fed:
        decoder.feed(frame_bytes(frame_type, payload))
    for error in (direct.value, fed.value):
        for word in words:
            assert word in error.detail, f"{word!r} not in {error.detail!r}"
    return direct.value


def packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# --- round trips ----------------------------------------------------------------


@given(any_frame)
def test_every_frame_round_trips_through_decode_payload(frame: Frame) -> None:
    encoded = encode_frame(frame)
    assert encoded[0] == frame.TYPE
    assert int.from_bytes(encoded[1:5], "big") == len(encoded) - HEADER_SIZE
    assert decode_payload(frame.TYPE, encoded[HEADER_SIZE:]) == frame


@settings(max_examples=300)
@given(any_frame, st.lists(st.integers(0, 10_000), max_size=12))
def test_round_trip_through_decoder_with_arbitrary_splits(frame: Frame, cuts: list[int]) -> None:
    encoded = encode_frame(frame)
    cuts = [c % (len(encoded) + 1) for c in cuts]
    assert feed_in_pieces(encoded, cuts) == [frame]


@given(any_frame)
def test_round_trip_one_byte_at_a_time(frame: Frame) -> None:
    encoded = encode_frame(frame)
    assert feed_in_pieces(encoded, list(range(len(encoded)))) == [frame]


@settings(max_examples=200)
@given(st.lists(any_frame, min_size=1, max_size=6), st.lists(st.integers(0, 100_000), max_size=10))
def test_coalesced_frames_decode_in_order(frames: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    assert feed_in_pieces(stream, []) == frames  # all coalesced in one feed
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert feed_in_pieces(stream, cuts) == frames


def big_entries_frame() -> tuple[Frame, bytes]:
    frame = Entries(Entry(1 + i, 1, bytes([i % 256]) * 700) for i in range(300))
    return frame, encode_frame(frame)


@settings(max_examples=100)
@given(st.lists(st.sampled_from([1, 3, 200, 511, 512, 513, 1_200, 5_000]), min_size=1))
def test_a_large_frame_decodes_from_pieces_large_and_tiny_mixed(sizes: list[int]) -> None:
    # Pieces of at least 512 B are kept as they came and tiny ones copied together:
    # every mixture must give the same frame, with nothing held after it.
    frame, encoded = big_entries_frame()
    cuts = list(itertools.accumulate(itertools.islice(itertools.cycle(sizes), len(encoded))))
    assert feed_in_pieces(encoded, [c for c in cuts if c < len(encoded)]) == [frame]


def test_a_fed_bytearray_changed_afterwards_does_not_change_the_frame() -> None:
    frame, encoded = big_entries_frame()
    decoder = FrameDecoder()
    piece = bytearray(encoded[:4_000])
    assert decoder.feed(piece) == []
    piece[:] = b"\xff" * len(piece)  # the caller reuses its buffer
    assert decoder.feed(encoded[4_000:]) == [frame]


def test_a_frame_sent_a_byte_at_a_time_is_held_in_about_its_own_size() -> None:
    # A peer may send one byte per STREAM frame; holding an object per byte would
    # take ~40 times the frame's size until it completes.
    length = 200_000
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">BI", FrameType.ENTRIES, length))
    tracemalloc.start()
    try:
        for _ in range(length - 1):
            decoder.feed(b"\x00")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.buffered == HEADER_SIZE + length - 1
    assert held < 2 * length


def test_empty_feed_is_harmless() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    decoder.eof()


# --- section 6: the worked example ---------------------------------------------------

WORKED_EXAMPLE_FIELDS = {
    "source_cluster": "us-east",
    "source_database_id": "orders",
    "last_applied_lsn": 0,
    "protocol_version": 1,
}


def test_worked_example_encodes_byte_exactly() -> None:
    encoded = encode_frame(Hello("us-east", "orders", 0, 1))
    payload = encoded[HEADER_SIZE:]
    assert encoded[:1] == b"\x01"
    assert encoded[1:5] == len(payload).to_bytes(4, "big")
    assert payload[0] == 0x84  # a fixmap of four entries
    assert msgpack.unpackb(payload, raw=False) == WORKED_EXAMPLE_FIELDS
    # Our encoder happens to keep declaration order; that gives this exact byte string.
    expected_payload = (
        b"\x84"
        + b"\xaesource_cluster\xa7us-east"
        + b"\xb2source_database_id\xa6orders"
        + b"\xb0last_applied_lsn\x00"
        + b"\xb0protocol_version\x01"
    )
    assert encoded == b"\x01" + len(expected_payload).to_bytes(4, "big") + expected_payload


@pytest.mark.parametrize("order", [list(WORKED_EXAMPLE_FIELDS), list(WORKED_EXAMPLE_FIELDS)[::-1]])
def test_worked_example_decodes_in_any_key_order(order: list[str]) -> None:
    payload = packed({key: WORKED_EXAMPLE_FIELDS[key] for key in order})
    frame = decode_one(0x01, payload)
    assert frame == Hello("us-east", "orders", 0, 1)
    assert PROTOCOL_VERSION == 1


def test_no_snapshot_sentinel() -> None:
    assert NO_SNAPSHOT == U64_MAX
    ack = HelloAck.accept("us-east")
    assert ack.snapshot_lsn == NO_SNAPSHOT and not ack.has_snapshot
    assert ack.snapshot_bytes_total == 0 and ack.error_code == 0 and ack.error_detail == ""
    assert decode_one(0x02, encode_payload(ack)) == ack


# --- unknown type ------------------------------------------------------------------


def test_unknown_type_rejected_from_type_byte_alone() -> None:
    assert len(UNKNOWN_TYPES) == 246
    for frame_type in UNKNOWN_TYPES:
        decoder = FrameDecoder()
        with pytest.raises(MalformedFrame, match=f"unknown frame type 0x{frame_type:02x}"):
            decoder.feed(bytes([frame_type]))


@pytest.mark.parametrize("partial", [1, 2, 3, 4, 5])
def test_unknown_type_rejected_with_partial_header(partial: int) -> None:
    decoder = FrameDecoder()
    data = frame_bytes(0x03, packed({}))
    with pytest.raises(MalformedFrame, match="unknown frame type 0x03"):
        decoder.feed(data[:partial])


def test_unknown_type_after_a_valid_frame_in_same_feed() -> None:
    decoder = FrameDecoder()
    with pytest.raises(MalformedFrame, match="unknown frame type 0x99"):
        decoder.feed(encode_frame(Subscribe(1)) + b"\x99")


@pytest.mark.parametrize("frame_type", UNKNOWN_TYPES[:8] + UNKNOWN_TYPES[-4:])
def test_decode_payload_rejects_unknown_type(frame_type: int) -> None:
    with pytest.raises(MalformedFrame, match="unknown frame type"):
        decode_payload(frame_type, packed({}))


# --- length limits -------------------------------------------------------------------


def test_limits_are_the_documented_ones() -> None:
    for frame_type in SMALL_TYPES:
        assert max_payload(frame_type) == 4096
    for frame_type in LARGE_TYPES:
        assert max_payload(frame_type) == 1_048_576
    assert HANDSHAKE_MAX_PAYLOAD == 4096 and MAX_PAYLOAD == 1_048_576


@pytest.mark.parametrize("frame_type", list(FrameType))
def test_over_limit_length_rejected_from_header_alone(frame_type: FrameType) -> None:
    limit = max_payload(frame_type)
    for length in (limit + 1, 2**32 - 1):
        decoder = FrameDecoder()
        with pytest.raises(MalformedFrame, match=f"length {length} exceeds the limit of {limit}"):
            decoder.feed(struct.pack(">BI", frame_type, length))
        assert decoder.buffered == 0


@pytest.mark.parametrize("frame_type", list(FrameType))
def test_over_limit_rejected_when_header_arrives_byte_by_byte(frame_type: FrameType) -> None:
    header = struct.pack(">BI", frame_type, max_payload(frame_type) + 1)
    decoder = FrameDecoder()
    for byte in header[:-1]:
        assert decoder.feed(bytes([byte])) == []
    with pytest.raises(MalformedFrame, match="exceeds the limit"):
        decoder.feed(header[-1:])


@pytest.mark.parametrize("frame_type", list(FrameType))
def test_at_limit_header_is_buffered_not_rejected(frame_type: FrameType) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(struct.pack(">BI", frame_type, max_payload(frame_type))) == []
    assert decoder.buffered == HEADER_SIZE


def _sized(make: Any, target: int) -> Frame:
    """The frame ``make(n)`` whose payload is exactly ``target`` bytes."""
    base = len(encode_payload(make(0)))
    n = target - base
    while n > 0:
        size = len(encode_payload(make(n)))
        if size == target:
            return make(n)  # type: ignore[no-any-return]
        n -= size - target
    raise AssertionError("could not hit the target size")


SIZED_FRAMES = {
    FrameType.HELLO: lambda n: Hello("c" * n, "db", U64_MAX, 1),
    FrameType.HELLO_ACK: lambda n: HelloAck(False, 1, "d" * n, "c", 5, 6),
    FrameType.ERROR: lambda n: Error(5, "é" * (n // 2) + "x" * (n % 2)),
    FrameType.ENTRIES: lambda n: Entries([Entry(U64_MAX, U64_MAX, b"x" * n)]),
    FrameType.SNAPSHOT_CHUNK: lambda n: SnapshotChunk("c", "db", 1, 2, 3, 4, b"y" * n, True),
    FrameType.REQUEST_VOTE: lambda n: RequestVote({"blob": b"z" * n}),
    FrameType.CONF_CHANGE: lambda n: ConfChange({"k": "v" * n}),
    FrameType.PROPOSE: lambda n: Propose({"p": b"w" * n}),
}


@pytest.mark.parametrize("frame_type", list(SIZED_FRAMES))
def test_exactly_at_limit_is_accepted(frame_type: FrameType) -> None:
    limit = max_payload(frame_type)
    frame = _sized(SIZED_FRAMES[frame_type], limit)
    encoded = encode_frame(frame)
    assert len(encoded) == HEADER_SIZE + limit
    assert feed_in_pieces(encoded, [1, 5, 6, limit // 2]) == [frame]


@pytest.mark.parametrize("frame_type", list(SIZED_FRAMES))
def test_one_over_limit_refused_by_encoder_and_decoder(frame_type: FrameType) -> None:
    limit = max_payload(frame_type)
    frame = _sized(SIZED_FRAMES[frame_type], limit + 1)
    with pytest.raises(FrameTooLarge, match=f"{limit + 1} bytes; the protocol allows {limit}"):
        encode_frame(frame)
    decoder = FrameDecoder()
    with pytest.raises(MalformedFrame, match="exceeds the limit"):
        decoder.feed(frame_bytes(frame_type, encode_payload(frame))[:HEADER_SIZE])


def test_frame_too_large_is_a_value_error() -> None:
    assert issubclass(FrameTooLarge, ValueError)


# --- payload shape ----------------------------------------------------------------

VALID_PAYLOADS: dict[int, dict[str, Any]] = {
    0x01: Hello("c", "db", 7, 1).to_payload(),
    0x02: HelloAck.accept("c", 9, 10).to_payload(),
    0x10: Subscribe(3).to_payload(),
    0x11: Entries([Entry(4, 1, b"a"), Entry(5, 2, b"")]).to_payload(),
    0x12: SnapshotChunk("c", "db", 3, 100, 0xDEADBEEF, 0, b"abc", False).to_payload(),
    0x13: Ack(3, 44).to_payload(),
    0x7F: Error(5, "bad").to_payload(),
}
FIELD_FRAMES: list[type[Any]] = [Hello, HelloAck, Subscribe, SnapshotChunk, Ack, Error]
FIELD_CASES = [(cls.TYPE, name, kind) for cls in FIELD_FRAMES for name, kind in cls.FIELDS]


@pytest.mark.parametrize(
    ("value", "described"),
    [([1, 2], "list"), (7, "int"), (None, "NoneType"), ("map", "str"), (b"x", "bytes")],
)
def test_payload_not_a_map(value: Any, described: str) -> None:
    for frame_type in KNOWN_TYPES:
        assert_malformed(frame_type, packed(value), "payload must be a map", described)


@pytest.mark.parametrize("key", [1, b"bin-key", None, True, 2.5])
def test_non_string_keys(key: Any) -> None:
    for frame_type in KNOWN_TYPES:
        base = VALID_PAYLOADS.get(frame_type, {})
        assert_malformed(frame_type, packed({**base, key: 1}), "keys must be strings")


def test_unhashable_key_is_malformed() -> None:
    # A map key that is an array cannot even become a Python dict.
    payload = b"\x81\x91\x01\x01"  # {[1]: 1}
    assert_malformed(0x10, payload, "SUBSCRIBE")


@pytest.mark.parametrize(("frame_type", "name", "kind"), FIELD_CASES)
def test_missing_field(frame_type: int, name: str, kind: str) -> None:
    payload = dict(VALID_PAYLOADS[frame_type])
    del payload[name]
    assert_malformed(frame_type, packed(payload), "missing field", repr(name))


WRONG_VALUES: dict[str, list[Any]] = {
    "str": [b"bytes-not-str", 1, None, True, ["s"]],
    "bin": ["str-not-bin", 1, None, [1], False],
    "bool": [1, 0, "true", None, 1.0],
    "u8": [True, False, 1.0, "1", b"\x01", None],
    "u16": [True, 1.0, "1", None],
    "u32": [True, 1.0, "1", None],
    "u64": [True, False, 1.0, "1", b"\x01", None, [1]],
}


@pytest.mark.parametrize(("frame_type", "name", "kind"), FIELD_CASES)
def test_wrong_type_for_every_field(frame_type: int, name: str, kind: str) -> None:
    for wrong in WRONG_VALUES[kind]:
        payload = {**VALID_PAYLOADS[frame_type], name: wrong}
        assert_malformed(frame_type, packed(payload), f"field {name!r} must be")


def test_bool_is_not_an_integer_and_integer_is_not_a_bool() -> None:
    assert_malformed(0x10, packed({"from_lsn": True}), "'from_lsn' must be an integer")
    assert_malformed(0x13, packed({"applied_lsn": 1, "bytes": False}), "'bytes' must be an integer")
    ack = {**VALID_PAYLOADS[0x02], "accepted": 1}
    assert_malformed(0x02, packed(ack), "'accepted' must be a boolean", "int 1")
    chunk = {**VALID_PAYLOADS[0x12], "done": 0}
    assert_malformed(0x12, packed(chunk), "'done' must be a boolean")


OUT_OF_RANGE = {
    "u8": [256, 2**16, -1],
    "u16": [65536, 2**32, -1],
    "u32": [2**32, 2**63, -1],
    "u64": [-1, -(2**63)],
}


@pytest.mark.parametrize(
    ("frame_type", "name", "kind"), [c for c in FIELD_CASES if c[2] in OUT_OF_RANGE]
)
def test_out_of_range_integers(frame_type: int, name: str, kind: str) -> None:
    for value in OUT_OF_RANGE[kind]:
        payload = {**VALID_PAYLOADS[frame_type], name: value}
        assert_malformed(frame_type, packed(payload), f"field {name!r} must be an integer in 0..")


def test_u64_cannot_carry_two_to_the_64() -> None:
    # MessagePack has no integer encoding for 2^64; the nearest thing is a float.
    payload = b"\x81\xa8from_lsn\xcb" + struct.pack(">d", 2.0**64)
    assert_malformed(0x10, payload, "'from_lsn' must be an integer")


def test_in_range_extremes_accepted() -> None:
    assert decode_one(0x10, packed({"from_lsn": U64_MAX})) == Subscribe(U64_MAX)
    error = decode_one(0x7F, packed({"code": 255, "detail": ""}))
    assert error == Error(255, "")
    hello = decode_one(0x01, packed({**VALID_PAYLOADS[0x01], "protocol_version": 65535}))
    assert isinstance(hello, Hello) and hello.protocol_version == 65535
    chunk = decode_one(0x12, packed({**VALID_PAYLOADS[0x12], "total_crc32c": 2**32 - 1}))
    assert isinstance(chunk, SnapshotChunk) and chunk.total_crc32c == 2**32 - 1


def _fixstr(text: str) -> bytes:
    raw = text.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


# Every MessagePack integer encoding of a value: (format, value, bytes).
def _encodings(value: int) -> list[bytes]:
    out = []
    if 0 <= value <= 0x7F:
        out.append(bytes([value]))  # positive fixint
    if -32 <= value < 0:
        out.append(struct.pack(">b", value))  # negative fixint
    for prefix, fmt in ((0xCC, ">B"), (0xCD, ">H"), (0xCE, ">I"), (0xCF, ">Q")):
        try:
            out.append(bytes([prefix]) + struct.pack(fmt, value))
        except struct.error:
            pass
    for prefix, fmt in ((0xD0, ">b"), (0xD1, ">h"), (0xD2, ">i"), (0xD3, ">q")):
        try:
            out.append(bytes([prefix]) + struct.pack(fmt, value))
        except struct.error:
            pass
    return out


@pytest.mark.parametrize("value", [0, 1, 5, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**63 - 1])
def test_any_integer_encoding_is_accepted(value: int) -> None:
    encodings = _encodings(value)
    assert len(encodings) >= 2
    for encoded in encodings:
        payload = b"\x81" + _fixstr("from_lsn") + encoded
        assert decode_one(0x10, payload) == Subscribe(value)
        # Mixed widths within one map too.
        ack_payload = (
            b"\x82"
            + _fixstr("applied_lsn")
            + encoded
            + _fixstr("bytes")
            + b"\xcf"
            + struct.pack(">Q", value)
        )
        assert decode_one(0x13, ack_payload) == Ack(value, value)


def test_u8_field_as_uint64_encoding_accepted() -> None:
    payload = (
        b"\x82" + _fixstr("code") + b"\xcf" + struct.pack(">Q", 5) + _fixstr("detail") + b"\xa0"
    )
    assert decode_one(0x7F, payload) == Error(5, "")


@pytest.mark.parametrize("encoded", _encodings(-1))
def test_negative_in_every_encoding_is_rejected(encoded: bytes) -> None:
    payload = b"\x81" + _fixstr("from_lsn") + encoded
    assert_malformed(0x10, payload, "'from_lsn' must be an integer in 0..2^64-1", "-1")


def test_str8_str16_str32_and_bin_formats_accepted() -> None:
    value = "db"
    for header in (b"\xd9\x02", b"\xda\x00\x02", b"\xdb\x00\x00\x00\x02"):
        payload = b"\x82" + _fixstr("code") + b"\x01" + _fixstr("detail") + header + value.encode()
        assert decode_one(0x7F, payload) == Error(1, value)
    for header in (b"\xc4\x01", b"\xc5\x00\x01", b"\xc6\x00\x00\x00\x01"):
        entry = b"\x83" + _fixstr("lsn") + b"\x01" + _fixstr("term") + b"\x01"
        entry += _fixstr("data") + header + b"Z"
        payload = b"\x81" + _fixstr("entries") + b"\x91" + entry
        assert decode_one(0x11, payload) == Entries([Entry(1, 1, b"Z")])


def test_map16_and_map32_accepted() -> None:
    body = _fixstr("from_lsn") + b"\x09"
    for header in (b"\xde\x00\x01", b"\xdf\x00\x00\x00\x01"):
        assert decode_one(0x10, header + body) == Subscribe(9)


# --- bytes after, broken MessagePack, bad UTF-8 -------------------------------------------


@pytest.mark.parametrize("frame_type", sorted(VALID_PAYLOADS))
def test_trailing_bytes_after_the_map(frame_type: int) -> None:
    for trailer in (b"\x00", b"\xc0", b"\x80", b"\xff\xff", packed({"x": 1})):
        payload = packed(VALID_PAYLOADS[frame_type]) + trailer
        assert_malformed(frame_type, payload, "trailing bytes after the map")


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # nothing at all
        b"\xc1",  # the never-used byte
        b"\x81\xa8from_lsn",  # map cut off before the value
        b"\x81\xa8from_lsn\xcf\x00\x00",  # uint64 cut off
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion entries
        b"\x81\xa3key\xdb\xff\xff\xff\xff",  # str32 longer than the payload
    ],
)
def test_invalid_msgpack(payload: bytes) -> None:
    assert_malformed(0x10, payload, "SUBSCRIBE payload is not valid MessagePack")


def test_invalid_utf8_in_a_string_value() -> None:
    payload = b"\x82" + _fixstr("code") + b"\x01" + _fixstr("detail") + b"\xa2\xff\xfe"
    assert_malformed(0x7F, payload, "ERROR payload is not valid MessagePack")


def test_invalid_utf8_in_a_key() -> None:
    assert_malformed(0x10, b"\x81\xa2\xc3\x28\x01", "not valid MessagePack")


def test_surrogate_escapes_are_invalid_utf8() -> None:
    # CESU-style encoded surrogate U+D800 is not UTF-8.
    payload = b"\x82" + _fixstr("code") + b"\x01" + _fixstr("detail") + b"\xa3\xed\xa0\x80"
    assert_malformed(0x7F, payload, "not valid MessagePack")


# --- ENTRIES rules -------------------------------------------------------------------------


def _entry(lsn: Any, term: Any = 1, data: Any = b"d") -> dict[str, Any]:
    return {"lsn": lsn, "term": term, "data": data}


def test_entries_empty_array() -> None:
    assert_malformed(0x11, packed({"entries": []}), "at least one entry")


def test_entries_missing_or_not_an_array() -> None:
    assert_malformed(0x11, packed({}), "missing field 'entries'")
    assert_malformed(0x11, packed({"entries": {"lsn": 1}}), "'entries' must be an array")
    assert_malformed(0x11, packed({"entries": b"\x01"}), "'entries' must be an array")
    with pytest.raises(MalformedFrame):
        decode_payload(0x11, packed({"entries": None}))


@pytest.mark.parametrize(
    ("lsns", "bad_index"),
    [([1, 3], 1), ([2, 1], 1), ([5, 5], 1), ([1, 2, 4], 2), ([7, 8, 9, 8], 3)],
)
def test_entries_not_contiguous_and_increasing(lsns: list[int], bad_index: int) -> None:
    payload = packed({"entries": [_entry(lsn) for lsn in lsns]})
    assert_malformed(0x11, payload, "contiguous and increasing", f"entry {bad_index}")


@pytest.mark.parametrize("item", [1, "entry", None, [1, 1, b"d"], b"map"])
def test_entry_not_a_map(item: Any) -> None:
    payload = packed({"entries": [_entry(1), item]})
    assert_malformed(0x11, payload, "ENTRIES entry 1 must be a map")


@pytest.mark.parametrize("name", ["lsn", "term", "data"])
def test_entry_missing_field(name: str) -> None:
    entry = _entry(1)
    del entry[name]
    assert_malformed(
        0x11, packed({"entries": [entry]}), "ENTRIES entry 0", f"missing field {name!r}"
    )


@pytest.mark.parametrize(
    ("entry", "name"),
    [
        (_entry(True), "lsn"),
        (_entry(-1), "lsn"),
        (_entry(1.0), "lsn"),
        (_entry(1, term=False), "term"),
        (_entry(1, term="1"), "term"),
        (_entry(1, data="text"), "data"),
        (_entry(1, data=None), "data"),
    ],
)
def test_entry_field_wrong_type(entry: dict[str, Any], name: str) -> None:
    assert_malformed(0x11, packed({"entries": [entry]}), f"field {name!r} must be")


def test_entries_ending_at_u64_max_accepted() -> None:
    payload = packed({"entries": [_entry(U64_MAX - 1), _entry(U64_MAX)]})
    frame = decode_one(0x11, payload)
    assert isinstance(frame, Entries)
    assert (frame.first_lsn, frame.last_lsn) == (U64_MAX - 1, U64_MAX)


# --- forward compatibility --------------------------------------------------------------------


@pytest.mark.parametrize("frame_type", sorted(VALID_PAYLOADS))
def test_unknown_keys_are_ignored(frame_type: int) -> None:
    base = VALID_PAYLOADS[frame_type]
    expected = decode_payload(frame_type, packed(base))
    extended = {"zz_future": [1, {"nested": b"x"}], **base, "another": None}
    assert decode_one(frame_type, packed(extended)) == expected


def test_unknown_keys_in_an_entry_are_ignored() -> None:
    payload = packed({"entries": [{**_entry(1), "checksum": 123, "meta": {"a": 1}}]})
    assert decode_one(0x11, payload) == Entries([Entry(1, 1, b"d")])


@given(str_maps)
def test_voter_frames_take_any_string_keyed_map(body: dict[str, Any]) -> None:
    for frame_type, cls in ((0x20, RequestVote), (0x21, ConfChange), (0x22, Propose)):
        frame = decode_one(frame_type, packed(body))
        assert type(frame) is cls and dict(frame.body) == body


# --- decoder lifecycle -----------------------------------------------------------------------


def test_decoder_stays_broken_after_malformed() -> None:
    decoder = FrameDecoder()
    with pytest.raises(MalformedFrame, match="unknown frame type"):
        decoder.feed(b"\x00")
    assert decoder.buffered == 0
    with pytest.raises(MalformedFrame, match="stream already broken: unknown frame type 0x00"):
        decoder.feed(encode_frame(Subscribe(1)))
    with pytest.raises(MalformedFrame, match="already broken"):
        decoder.feed(b"")


def test_decoder_stays_broken_after_a_bad_payload() -> None:
    decoder = FrameDecoder()
    with pytest.raises(MalformedFrame):
        decoder.feed(frame_bytes(0x10, packed([1])))
    with pytest.raises(MalformedFrame, match="already broken"):
        decoder.feed(encode_frame(Ack(1, 1)))


def test_eof_inside_a_frame_is_malformed() -> None:
    encoded = encode_frame(Hello("us-east", "orders"))
    for cut in (1, 4, 5, len(encoded) - 1):
        decoder = FrameDecoder()
        assert decoder.feed(encoded[:cut]) == []
        assert decoder.buffered == cut
        with pytest.raises(MalformedFrame, match=f"stream ended inside a frame \\({cut} bytes"):
            decoder.eof()
        with pytest.raises(MalformedFrame, match="already broken"):
            decoder.feed(encoded[cut:])


def test_eof_at_a_frame_boundary_is_fine() -> None:
    decoder = FrameDecoder()
    decoder.eof()
    frames = decoder.feed(encode_frame(Subscribe(1)) + encode_frame(Ack(1, 2)))
    assert frames == [Subscribe(1), Ack(1, 2)]
    assert decoder.buffered == 0
    decoder.eof()


def test_decoder_keeps_a_partial_frame_across_feeds() -> None:
    first, second = encode_frame(Subscribe(1)), encode_frame(Ack(2, 3))
    decoder = FrameDecoder()
    assert decoder.feed(first + second[:3]) == [Subscribe(1)]
    assert decoder.buffered == 3
    assert decoder.feed(second[3:]) == [Ack(2, 3)]
    assert decoder.buffered == 0


# --- fuzzing ---------------------------------------------------------------------------------


def _only_malformed(data: bytes, cuts: list[int] | None = None) -> None:
    decoder = FrameDecoder()
    pieces = [data]
    if cuts:
        bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    try:
        for piece in pieces:
            decoder.feed(piece)
        decoder.eof()
    except Exception as error:
        assert isinstance(error, MalformedFrame), f"{type(error).__name__}: {error}"


@settings(max_examples=1000)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=4))
def test_random_bytes_raise_only_malformed(data: bytes, cuts: list[int]) -> None:
    _only_malformed(data, cuts)


@settings(max_examples=1000)
@given(st.sampled_from(KNOWN_TYPES), st.binary(max_size=200))
def test_valid_header_random_payload_raises_only_malformed(frame_type: int, payload: bytes) -> None:
    _only_malformed(frame_bytes(frame_type, payload))
    try:
        decode_payload(frame_type, payload)
    except Exception as error:
        assert isinstance(error, MalformedFrame), f"{type(error).__name__}: {error}"


FIELD_NAMES = sorted(
    {name for cls in FIELD_FRAMES for name, _ in cls.FIELDS} | {"entries", "lsn", "term", "data"}
)
any_msgpack = st.recursive(
    st.one_of(msgpack_scalars, st.sampled_from(FIELD_NAMES)),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), texts), children, max_size=6),
        st.lists(
            st.fixed_dictionaries({"lsn": children, "term": children, "data": children}), max_size=3
        ),
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(
    st.sampled_from(KNOWN_TYPES),
    st.dictionaries(st.sampled_from(FIELD_NAMES), any_msgpack, max_size=9),
)
def test_maps_of_plausible_fields_decode_or_raise_malformed(
    frame_type: int, body: dict[str, Any]
) -> None:
    try:
        frame = decode_payload(frame_type, packed(body))
    except Exception as error:
        assert isinstance(error, MalformedFrame), f"{type(error).__name__}: {error}"
    else:
        # Whatever decodes must re-encode to an equivalent frame.
        assert frame.TYPE == frame_type
        assert decode_payload(frame_type, encode_payload(frame)) == frame


@st.composite
def mutated_encodings(draw: st.DrawFn) -> bytes:
    frames = draw(st.lists(any_frame, min_size=1, max_size=3))
    data = bytearray(b"".join(encode_frame(f) for f in frames))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and data:
            del data[at : at + draw(st.integers(1, 4))]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


@settings(max_examples=600)
@given(mutated_encodings(), st.lists(st.integers(0, 2000), max_size=3))
def test_mutated_valid_encodings_raise_only_malformed(data: bytes, cuts: list[int]) -> None:
    _only_malformed(data, cuts)
