"""The snapshot byte format of PROTOCOL.md section 3 and its incremental decoder.

A snapshot is MessagePack arrays ``[lsn, term, data]`` one after another (no
outer array), LSNs 1..N, terms never decreasing.  ``SnapshotDecoder`` takes it
in pieces of any size and raises nothing but ``MalformedFrame``.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror_actors.wire import (
    MAX_PAYLOAD,
    Entry,
    MalformedFrame,
    SnapshotDecoder,
    crc32c,
    decode_snapshot,
    encode_snapshot,
)
from mirror_actors.wire.snapshot import encode_snapshot_entry
from tests.helpers import U64_MAX, MiB, entry, traced_memory


def log(count: int, term: int = 1) -> list[Entry]:
    return [entry(lsn, term) for lsn in range(1, count + 1)]


def decode_in(pieces: list[bytes], snapshot_lsn: int | None = None) -> list[Entry]:
    decoder = SnapshotDecoder()
    entries: list[Entry] = []
    for piece in pieces:
        entries += decoder.feed(piece)
    decoder.finish(decoder.last_lsn if snapshot_lsn is None else snapshot_lsn)
    return entries


def outcome(action: Callable[[], list[Entry]]) -> list[Entry] | str:
    """The entries, or "malformed"; any other exception fails the test."""
    try:
        return action()
    except MalformedFrame:
        return "malformed"


# --- CRC-32C ------------------------------------------------------------------------------


def test_crc32c_is_castagnoli() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32c_runs_over_pieces(a: bytes, b: bytes) -> None:
    assert crc32c(b, crc32c(a)) == crc32c(a + b)


# --- encoding -------------------------------------------------------------------------------


def test_an_entry_is_one_three_element_array() -> None:
    assert encode_snapshot_entry(Entry(1, 2, b"ab")) == b"\x93\x01\x02\xc4\x02ab"
    big = encode_snapshot_entry(Entry(U64_MAX, U64_MAX, b""))
    assert big == b"\x93\xcf" + b"\xff" * 8 + b"\xcf" + b"\xff" * 8 + b"\xc4\x00"


def test_a_snapshot_is_entries_back_to_back_not_one_array() -> None:
    entries = log(3)
    blob = encode_snapshot(entries)
    assert blob == b"".join(encode_snapshot_entry(e) for e in entries)
    assert blob[0] == 0x93  # the first entry's array, not an outer one of 3
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(blob)
    assert list(unpacker) == [[e.lsn, e.term, e.data] for e in entries]
    assert encode_snapshot([]) == b""
    assert encode_snapshot(iter(entries)) == blob


# --- decoding -------------------------------------------------------------------------------


def test_round_trip_and_attributes() -> None:
    entries = [Entry(1, 0, b""), Entry(2, 3, bytes(range(256))), Entry(3, U64_MAX, b"x")]
    blob = encode_snapshot(entries)
    assert decode_snapshot(blob) == entries
    assert decode_snapshot(blob, 3) == entries
    decoder = SnapshotDecoder()
    assert (decoder.last_lsn, decoder.next_lsn, decoder.last_term, decoder.bytes_fed) == (
        0,
        1,
        0,
        0,
    )
    assert decoder.feed(blob) == entries
    assert (decoder.last_lsn, decoder.next_lsn, decoder.last_term) == (3, 4, U64_MAX)
    assert decoder.bytes_fed == len(blob)
    decoder.finish(3)
    assert all(type(e.data) is bytes for e in entries)


def test_an_empty_snapshot_holds_nothing() -> None:
    assert decode_snapshot(b"") == []
    with pytest.raises(MalformedFrame, match=r"at LSN 1 holds entries 1\.\.0"):
        decode_snapshot(b"", 1)


@pytest.mark.parametrize("announced", [4, 6, U64_MAX])
def test_the_snapshot_must_end_at_its_lsn(announced: int) -> None:
    with pytest.raises(MalformedFrame, match=rf"at LSN {announced} holds entries 1\.\.5"):
        decode_snapshot(encode_snapshot(log(5)), announced)


@pytest.mark.parametrize(
    ("lsns", "words"),
    [([2], "got LSN 2, expected 1"), ([1, 3], "got LSN 3, expected 2"), ([1, 1], "got LSN 1")],
)
def test_lsns_run_from_one_without_gaps(lsns: list[int], words: str) -> None:
    with pytest.raises(MalformedFrame, match=words):
        decode_snapshot(encode_snapshot(entry(lsn) for lsn in lsns))


def test_terms_may_stay_or_rise_but_never_go_down() -> None:
    terms = [0, 0, 5, 5, 2**63, U64_MAX]
    entries = [entry(i + 1, t) for i, t in enumerate(terms)]
    assert decode_snapshot(encode_snapshot(entries)) == entries
    down = [entry(1, 4), entry(2, 5), entry(3, 4)]
    with pytest.raises(MalformedFrame, match="term goes down at LSN 3: 4 after 5"):
        decode_snapshot(encode_snapshot(down))


@pytest.mark.parametrize(("term", "ok"), [(6, True), (7, True), (5, False)])
def test_previous_term_bounds_the_first_entry(term: int, ok: bool) -> None:
    decoder = SnapshotDecoder(previous_term=6)
    blob = encode_snapshot([entry(1, term)])
    if ok:
        assert decoder.feed(blob) == [entry(1, term)]
    else:
        with pytest.raises(MalformedFrame, match="5 after 6"):
            decoder.feed(blob)


@pytest.mark.parametrize(
    "item",
    [
        [1, 1],
        [1, 1, b"x", 4],
        [1, 1, "text"],
        [1, -1, b""],
        [-1, 1, b""],
        [True, 1, b""],
        [1, False, b""],
        [1.0, 1, b""],
        [1, 1, None],
        [None, None, None],
        {"lsn": 1, "term": 1, "data": b""},
        "a string",
        7,
        None,
        [[1, 1, b"old format: one outer array"]],
        msgpack.ExtType(1, b"x"),
    ],
    ids=repr,
)
def test_anything_but_lsn_term_bin_is_malformed(item: object) -> None:
    with pytest.raises(MalformedFrame):
        decode_snapshot(msgpack.packb(item, use_bin_type=True))


@pytest.mark.parametrize(
    "blob",
    [
        b"\xc1",  # a byte MessagePack never uses
        b"\x91" * 5_000 + b"\xc0",  # nesting deeper than the unpacker's stack
        b"\xd9\x05hello",  # a str where an entry goes
        b"\xdd\xff\xff\xff\xff",  # an array of 4 billion
        b"\xde\x00\x01",  # a map of one
        b"\x93\x01\x01\xc7\x01\x05x",  # ext data
    ],
    ids=["never-used", "deep", "str", "huge-array", "map", "ext-data"],
)
def test_broken_msgpack_is_malformed(blob: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_snapshot(blob)


def test_a_snapshot_ending_inside_an_entry_is_malformed() -> None:
    """Whatever part of the last entry is missing, even just its data (regression).

    The unpacker consumes an incomplete item's header and complete scalars while
    it waits for the rest, so ``Unpacker.tell()`` at the end hid a cut there.
    """
    whole = encode_snapshot(log(3))
    last = len(encode_snapshot_entry(entry(3)))
    for cut in range(1, last):
        short = whole[:-cut]
        for snapshot_lsn in (2, 3):
            with pytest.raises(MalformedFrame, match="inside an entry"):
                decode_snapshot(short, snapshot_lsn)
            with pytest.raises(MalformedFrame, match="inside an entry"):
                decode_in([short[i : i + 3] for i in range(0, len(short), 3)], snapshot_lsn)
    # A stray header after complete entries is the same thing.
    with pytest.raises(MalformedFrame, match=r"inside an entry \(2 bytes"):
        decode_snapshot(encode_snapshot(log(2)) + b"\x93\x03", 2)


def test_entries_are_returned_as_soon_as_they_are_complete() -> None:
    blob = encode_snapshot(log(3))
    first = len(encode_snapshot_entry(entry(1)))
    decoder = SnapshotDecoder()
    assert decoder.feed(blob[: first - 1]) == []
    assert decoder.feed(blob[first - 1 : first]) == [entry(1)]
    assert decoder.feed(b"") == []
    assert decoder.feed(blob[first:]) == [entry(2), entry(3)]
    decoder.finish(3)


def test_the_largest_entry_a_frame_carries_decodes_in_any_pieces() -> None:
    big = Entry(1, 1, b"\xab" * (MAX_PAYLOAD - 64))
    blob = encode_snapshot([big, entry(2)])
    assert decode_snapshot(blob) == [big, entry(2)]
    assert decode_in([blob[i : i + 100_000] for i in range(0, len(blob), 100_000)]) == [
        big,
        entry(2),
    ]
    # Several MiB in one call are fed in bounded pieces internally.
    many = [Entry(lsn, 1, b"m" * 500_000) for lsn in range(1, 9)]
    assert decode_snapshot(encode_snapshot(many)) == many


def test_an_entry_larger_than_any_frame_is_malformed() -> None:
    with pytest.raises(MalformedFrame):
        decode_snapshot(encode_snapshot([Entry(1, 1, b"x" * (MAX_PAYLOAD + 1))]))


def test_a_lying_length_is_refused_before_it_is_buffered() -> None:
    """A bin claiming 4 GiB, then megabytes that keep coming: refused within ~2 frames' worth."""
    piece = b"\x00" * 64 * 1024

    def feed() -> None:
        decoder = SnapshotDecoder()
        with pytest.raises(MalformedFrame, match="larger than any frame"):
            decoder.feed(b"\x93\x01\x01\xc6" + struct.pack(">I", 2**32 - 1))
            for _ in range(64):  # 4 MiB
                decoder.feed(piece)

    assert traced_memory(feed)[0] < 5 * MiB


def test_a_long_snapshot_decodes_in_constant_memory() -> None:
    """64 MiB of snapshot fed in 256 KiB pieces: the decoder holds about one piece and entry."""
    item = encode_snapshot_entry(Entry(1, 1, b"d" * 200_000))
    header = len(encode_snapshot_entry(Entry(1, 1, b"")))

    def feed() -> None:
        decoder = SnapshotDecoder()
        pending = b""
        for lsn in range(1, 321):
            encoded = encode_snapshot_entry(Entry(lsn, 1, b"d" * 200_000))
            pending += encoded
            while len(pending) >= 256 * 1024:
                for _ in decoder.feed(pending[: 256 * 1024]):
                    pass
                pending = pending[256 * 1024 :]
        decoder.feed(pending)
        decoder.finish(320)

    assert len(item) > header
    assert traced_memory(feed)[0] < 4 * MiB


# --- properties -----------------------------------------------------------------------------


@st.composite
def snapshots(draw: st.DrawFn) -> list[Entry]:
    count = draw(st.integers(0, 25))
    term = draw(st.sampled_from([0, 1, 9, 2**63 - 1, U64_MAX - 60]))
    entries = []
    for lsn in range(1, count + 1):
        term = min(U64_MAX, term + draw(st.sampled_from([0, 0, 1, 2])))
        entries.append(Entry(lsn, term, draw(st.binary(max_size=40))))
    return entries


def _cuts(data: st.DataObject, blob: bytes) -> list[bytes]:
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(blob)), max_size=12), label="cuts")))
    edges = [0, *cuts, len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=200)
@given(snapshots(), st.data())
def test_any_valid_snapshot_round_trips_in_any_pieces(
    entries: list[Entry], data: st.DataObject
) -> None:
    blob = encode_snapshot(entries)
    pieces = _cuts(data, blob)
    assert b"".join(pieces) == blob
    assert decode_in(pieces, len(entries)) == entries == decode_snapshot(blob, len(entries))


@settings(max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=200),
        snapshots().map(encode_snapshot),
        st.tuples(
            snapshots().map(encode_snapshot), st.binary(max_size=8), st.integers(0, 10**6)
        ).map(lambda t: t[0][: t[2] % (len(t[0]) + 1)] + t[1] + t[0][t[2] % (len(t[0]) + 1) :]),
    ),
    st.data(),
)
def test_split_decoding_equals_whole_decoding_for_any_bytes(
    blob: bytes, data: st.DataObject
) -> None:
    """Valid, random or spliced: the same entries or the same refusal, however it is cut."""
    whole = outcome(lambda: decode_snapshot(blob))
    pieces = _cuts(data, blob)
    assert outcome(lambda: decode_in(pieces)) == whole
