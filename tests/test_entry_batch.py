"""The compact ENTRIES batch (issue 13): one object per frame, the same checks as before."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror_actors.replica import MemoryReplicaStore, ReplicationCursor
from mirror_actors.replica.cursor import ApplyEntries, ReplicationError
from mirror_actors.wire import Entries, Entry, FrameDecoder, HistoryDiverged, MalformedFrame
from mirror_actors.wire.frames import (
    HEADER,
    EntryBatch,
    FrameType,
    decode_payload,
    encode_frame,
)

U64 = st.integers(min_value=0, max_value=2**64 - 1)
TERMS = st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=40)


def raw_entries(items: list[object]) -> bytes:
    return msgpack.packb({"entries": items}, use_bin_type=True)


@given(st.integers(min_value=0, max_value=2**63), TERMS, st.data())
def test_a_batch_round_trips_and_reads_as_its_entries(
    first: int, terms: list[int], data: st.DataObject
) -> None:
    payloads = tuple(data.draw(st.binary(max_size=20)) for _ in terms)
    batch = EntryBatch(first, tuple(terms), payloads)
    frame = Entries(batch)
    decoded = FrameDecoder().feed(encode_frame(frame))
    assert decoded == [frame]
    assert isinstance(decoded[0], Entries)
    assert decoded[0].batch == batch
    assert decoded[0].last_lsn == first + len(terms) - 1
    assert decoded[0].entries == tuple(
        Entry(first + i, term, payload)
        for i, (term, payload) in enumerate(zip(terms, payloads, strict=True))
    )
    assert Entries(decoded[0].entries) == frame  # built from Entry objects: the same frame


def test_entry_objects_with_a_gap_cannot_make_a_batch() -> None:
    with pytest.raises(ValueError, match="consecutive LSNs: entry 1 has LSN 3, expected 2"):
        Entries([Entry(1, 1, b"a"), Entry(3, 1, b"b")])
    with pytest.raises(ValueError, match="one term per payload"):
        EntryBatch(1, (1, 1), (b"a",))


@pytest.mark.parametrize(
    ("items", "words"),
    [
        ([{"lsn": 1, "term": 1, "data": b"a"}, 7], "entry 1 must be a map"),
        ([{"term": 1, "data": b"a"}], "entry 0 is missing field 'lsn'"),
        ([{"lsn": 1, "term": 1, "data": b"a"}, {"lsn": 2, "data": b"b"}], "missing field 'term'"),
        ([{"lsn": True, "term": 1, "data": b"a"}], "field 'lsn' must be an integer"),
        ([{"lsn": 1, "term": True, "data": b"a"}], "field 'term' must be an integer"),
        ([{"lsn": 1, "term": -1, "data": b"a"}], "field 'term' must be an integer"),
        ([{"lsn": 1.0, "term": 1, "data": b"a"}], "field 'lsn' must be an integer"),
        ([{"lsn": 1, "term": 1, "data": "text"}], "field 'data' must be a byte string"),
        (
            [{"lsn": 1, "term": 1, "data": b"a"}, {"lsn": 1.0 + 1, "term": 1, "data": b"b"}],
            "entry 1 field 'lsn' must be an integer",
        ),
        (
            [{"lsn": 4, "term": 1, "data": b"a"}, {"lsn": 6, "term": 1, "data": b"b"}],
            "entry 1 has LSN 6, expected 5",
        ),
    ],
)
def test_each_bad_entry_is_named_by_the_fast_decoder(items: list[object], words: str) -> None:
    with pytest.raises(MalformedFrame, match=words):
        decode_payload(FrameType.ENTRIES, raw_entries(items))


@given(st.lists(st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.booleans(), st.none(), st.binary(), st.text())))
def test_any_field_values_decode_or_raise_malformed_only(values: list[object]) -> None:
    items: list[object] = [
        {"lsn": values[i], "term": values[i + 1], "data": values[i + 2]}
        for i in range(0, len(values) - 2, 3)
    ]
    try:
        frame = decode_payload(FrameType.ENTRIES, raw_entries(items))
    except MalformedFrame:
        return
    assert isinstance(frame, Entries)
    assert len(frame.entries) == len(items)


@given(st.binary(max_size=600), st.lists(st.integers(min_value=1, max_value=64), max_size=30))
def test_a_frame_fed_in_pieces_decodes_once_whatever_the_cuts(
    data: bytes, cuts: list[int]
) -> None:
    frames = [Entries([Entry(1, 1, data)]), Entries([Entry(2, 2, data[::-1]), Entry(3, 2, b"")])]
    wire = b"".join(encode_frame(frame) for frame in frames)
    decoder = FrameDecoder()
    got = []
    position = 0
    for cut in cuts:
        got += decoder.feed(wire[position : position + cut])
        position += cut
    got += decoder.feed(wire[position:])
    decoder.eof()
    assert got == frames and decoder.buffered == 0


def test_a_bad_header_after_a_long_frame_is_still_caught() -> None:
    decoder = FrameDecoder()
    wire = encode_frame(Entries([Entry(1, 1, b"x" * 5000)]))
    decoder.feed(wire[:100])
    decoder.feed(wire[100:4000])
    with pytest.raises(MalformedFrame, match="unknown frame type 0x00"):
        decoder.feed(wire[4000:] + b"\x00")


@given(st.integers(min_value=0, max_value=5), TERMS)
def test_the_cursor_takes_a_batch_exactly_when_its_terms_never_go_down(
    applied_term: int, terms: list[int]
) -> None:
    terms = [term % 8 for term in terms]
    cursor = ReplicationCursor("alpha", "orders", 10, applied_term=applied_term)
    frame = Entries(EntryBatch(11, tuple(terms), tuple(b"x" for _ in terms)))
    fine = all(a <= b for a, b in zip([applied_term, *terms], terms, strict=False))
    if fine:
        commit = cursor.accept(frame)
        assert isinstance(commit, ApplyEntries) and commit.batch == frame.batch
        assert (cursor.accepted_lsn, cursor.accepted_term) == (10 + len(terms), terms[-1])
    else:
        with pytest.raises((ReplicationError, HistoryDiverged)):
            cursor.accept(frame)


def test_a_dip_between_equal_ends_is_caught() -> None:
    cursor = ReplicationCursor("alpha", "orders", 0)
    with pytest.raises(ReplicationError, match="term goes down at LSN 2: 3 after 5"):
        cursor.accept(Entries(EntryBatch(1, (5, 3, 5), (b"a", b"b", b"c"))))


def test_the_memory_store_appends_batches_and_reads_entries_back() -> None:
    store = MemoryReplicaStore()
    store.commit([ApplyEntries(EntryBatch(1, (1, 1), (b"a", b"b")))])
    store.commit([ApplyEntries(EntryBatch(3, (2,), (b"c",)))])
    assert store.last_applied_lsn() == 3 and store.last_applied_term() == 2
    assert store.entries() == [Entry(1, 1, b"a"), Entry(2, 1, b"b"), Entry(3, 2, b"c")]
    with pytest.raises(ValueError, match="do not follow"):
        store.commit([ApplyEntries(EntryBatch(4, (2,), (b"d",))), ApplyEntries(EntryBatch(9, (2,), (b"e",)))])
    assert store.last_applied_lsn() == 3 and len(store.entries()) == 3


def test_header_size_is_what_the_protocol_says() -> None:
    assert HEADER.size == 5
