"""Fuzzing the frame and snapshot decoders: only ``MalformedFrame``, bounded memory.

The frame decoder gets 100,000+ generated inputs, the snapshot decoder 60,000+.

A seeded ``random.Random`` drives a structured generator (hypothesis would
spend most of the budget on its own bookkeeping at this count): random bytes,
valid headers with random payloads, valid encodings (which must round-trip),
mutated valid encodings, oversize and boundary length prefixes, deep nesting,
type confusion in plausible maps, and MessagePack containers that declare more
than they hold.  Every input is fed in arbitrary pieces.  A failing input is
reproducible from the seed and its index, which the failure message names.

The seed defaults to a fixed value so CI is repeatable; set ``FUZZ_SEED`` to
explore others (the issue asks that schedules no one tuned for pass too).
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import pytest

from mirror_actors.wire import (
    MAX_PAYLOAD,
    Ack,
    ConfChange,
    Entries,
    Entry,
    Error,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    HelloAck,
    MalformedFrame,
    Propose,
    RequestVote,
    SnapshotChunk,
    SnapshotDecoder,
    Subscribe,
    encode_frame,
    encode_snapshot,
)
from mirror_actors.wire.frames import HANDSHAKE_MAX_PAYLOAD, HEADER, HEADER_SIZE, max_payload
from tests.helpers import U64_MAX, MiB, amplifying_entries, traced_memory

SEED = int(os.environ.get("FUZZ_SEED", "20240606"))
INPUTS = 100_000
KNOWN_TYPES = [int(t) for t in FrameType]
FRAME_CLASSES = (
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
# The most a decoder may ever hold: one incomplete frame of the largest kind.
BUFFER_BOUND = HEADER_SIZE + MAX_PAYLOAD
FIELD_NAMES = sorted(
    {name for cls in FRAME_CLASSES for name, _ in getattr(cls, "FIELDS", ())}
    | {"entries", "lsn", "term", "data"}
)


# --- generators --------------------------------------------------------------------


def random_int(r: random.Random) -> int:
    return r.choice(
        [
            r.randint(0, 10),
            r.randint(0, 2**8),
            r.randint(0, 2**16),
            r.randint(0, 2**32),
            r.randint(0, U64_MAX),
            r.choice([-1, -(2**63), 2**64, 2**64 + 1, U64_MAX, 2**63, 2**32 - 1]),
        ]
    )


def random_text(r: random.Random, size: int = 12) -> str:
    return "".join(
        chr(r.choice([r.randint(32, 126), r.randint(0x80, 0xD7FF)]))
        for _ in range(r.randint(0, size))
    )


def random_value(r: random.Random, depth: int = 0) -> Any:
    kind = r.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return r.random() < 0.5
    if kind == 2:
        value = random_int(r)
        return value if -(2**63) <= value <= U64_MAX else -value // 3  # packable
    if kind == 3:
        return r.random() * 1e6
    if kind == 4:
        return random_text(r)
    if kind == 5:
        return r.randbytes(r.randint(0, 16))
    if kind == 6:
        return msgpack.ExtType(r.randint(0, 127), r.randbytes(r.randint(0, 4)))
    if kind == 7:
        return [random_value(r, depth + 1) for _ in range(r.randint(0, 4))]
    return {random_key(r): random_value(r, depth + 1) for _ in range(r.randint(0, 4))}


def random_key(r: random.Random) -> Any:
    roll = r.random()
    if roll < 0.7:
        return r.choice(FIELD_NAMES)
    if roll < 0.9:
        return random_text(r, 6)
    return r.choice([1, b"lsn", None, True, -3])


def valid_entries(r: random.Random) -> Entries:
    first = r.choice([1, r.randint(1, 2**40), U64_MAX - 3])
    count = r.randint(1, 4 if first > U64_MAX - 4 else 6)
    count = min(count, U64_MAX - first + 1)
    return Entries(
        [Entry(first + i, r.randint(0, 9), r.randbytes(r.randint(0, 40))) for i in range(count)]
    )


def valid_frame(r: random.Random) -> Frame:
    u = random_int
    choice = r.randrange(10)
    if choice == 0:
        return Hello(random_text(r), random_text(r), u(r) & U64_MAX, r.randint(0, 2**16 - 1))
    if choice == 1:
        return HelloAck(
            r.random() < 0.5,
            r.randint(0, 255),
            random_text(r),
            random_text(r),
            u(r) & U64_MAX,
            u(r) & U64_MAX,
        )
    if choice == 2:
        return Subscribe(u(r) & U64_MAX)
    if choice == 3:
        return valid_entries(r)
    if choice == 4:
        return SnapshotChunk(
            random_text(r),
            random_text(r),
            u(r) & U64_MAX,
            u(r) & U64_MAX,
            r.randint(0, 2**32 - 1),
            u(r) & U64_MAX,
            r.randbytes(r.randint(0, 64)),
            r.random() < 0.5,
        )
    if choice == 5:
        return Ack(u(r) & U64_MAX, u(r) & U64_MAX)
    if choice == 6:
        return Error(r.randint(0, 255), random_text(r, 40))
    body = {random_text(r, 6): random_value(r) for _ in range(r.randint(0, 4))}
    return (RequestVote, ConfChange, Propose)[r.randrange(3)](body)


def gen_random_bytes(r: random.Random) -> tuple[bytes, None]:
    size = r.choice([r.randint(0, 8), r.randint(0, 64), r.randint(0, 600)])
    return r.randbytes(size), None


def gen_header_random_payload(r: random.Random) -> tuple[bytes, None]:
    frame_type = r.choice(KNOWN_TYPES)
    payload = r.randbytes(r.randint(0, 200))
    if r.random() < 0.5:  # make it start like a map, so msgpack gets further
        payload = bytes([r.choice([0x80 | r.randint(0, 15), 0xDE, 0xDF])]) + payload
    declared = len(payload) if r.random() < 0.8 else r.randint(0, len(payload) + 10)
    return HEADER.pack(frame_type, declared) + payload, None


def gen_valid(r: random.Random) -> tuple[bytes, list[Frame]]:
    frames = [valid_frame(r) for _ in range(r.randint(1, 4))]
    return b"".join(encode_frame(f) for f in frames), frames


def mutate(r: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(r.randint(1, 4)):
        op = r.randrange(6)
        position = r.randrange(len(buffer) + 1)
        if op == 0 and buffer:  # flip a bit
            index = min(position, len(buffer) - 1)
            buffer[index] ^= 1 << r.randrange(8)
        elif op == 1 and buffer:  # replace a byte
            buffer[min(position, len(buffer) - 1)] = r.randrange(256)
        elif op == 2:  # insert bytes
            buffer[position:position] = r.randbytes(r.randint(1, 4))
        elif op == 3:  # delete bytes
            del buffer[position : position + r.randint(1, 4)]
        elif op == 4:  # truncate
            del buffer[position:]
        else:  # duplicate a slice
            end = min(len(buffer), position + r.randint(1, 16))
            buffer[position:position] = buffer[position:end]
    return bytes(buffer)


def gen_mutated(r: random.Random) -> tuple[bytes, None]:
    data, _ = gen_valid(r)
    return mutate(r, data), None


def gen_oversize(r: random.Random) -> tuple[bytes, None]:
    frame_type = r.choice(KNOWN_TYPES)
    limit = max_payload(frame_type)
    length = r.choice([limit + 1, limit + r.randint(2, 1000), 2**32 - 1, 2**31, MAX_PAYLOAD + 1])
    prefix = encode_frame(valid_frame(r)) if r.random() < 0.3 else b""
    return prefix + HEADER.pack(frame_type, length) + r.randbytes(r.randint(0, 64)), None


def gen_boundary_lengths(r: random.Random) -> tuple[bytes, None]:
    # At the limit is legal: the decoder buffers it and waits for the rest.
    frame_type = r.choice(KNOWN_TYPES)
    length = max_payload(frame_type) - r.randint(0, 2)
    return HEADER.pack(frame_type, length) + r.randbytes(r.randint(0, 300)), None


def gen_deep_nesting(r: random.Random) -> tuple[bytes, None]:
    depth = r.choice([100, 1_000, 3_000, r.randint(1, 4000)])
    opener = r.choice([b"\x91", b"\x81\xa1a", b"\x81\xa7entries\x91", b"\xdc\x00\x01"])
    frame_type = r.choice([FrameType.REQUEST_VOTE, FrameType.ENTRIES, FrameType.HELLO])
    payload = (b"\x81\xa1k" + opener * depth + b"\xc0")[: max_payload(frame_type)]
    return HEADER.pack(frame_type, len(payload)) + payload, None


def gen_plausible_map(r: random.Random) -> tuple[bytes, None]:
    frame_type = r.choice(KNOWN_TYPES)
    cls = next(c for c in FRAME_CLASSES if c.TYPE == frame_type)
    fields = [name for name, _ in getattr(cls, "FIELDS", ())] or ["entries"]
    payload_map: dict[Any, Any] = {}
    for name in fields:
        if r.random() < 0.9:
            payload_map[name] = random_value(r)
    if "entries" in fields and r.random() < 0.7:
        payload_map["entries"] = [
            {k: random_value(r) for k in ("lsn", "term", "data") if r.random() < 0.9}
            for _ in range(r.randint(0, 4))
        ]
    for _ in range(r.randint(0, 2)):
        payload_map[random_key(r)] = random_value(r)
    try:
        payload = msgpack.packb(payload_map, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        payload = b"\x80"
    if r.random() < 0.1:
        payload += r.randbytes(r.randint(1, 3))  # trailing bytes
    payload = payload[: max_payload(frame_type)]
    return HEADER.pack(frame_type, len(payload)) + payload, None


def gen_lying_containers(r: random.Random) -> tuple[bytes, None]:
    # Containers and strings that declare far more than the payload holds.
    liar = r.choice(
        [
            b"\xdd" + struct.pack(">I", r.randint(2**20, 2**32 - 1)),  # array32
            b"\xdf" + struct.pack(">I", r.randint(2**20, 2**32 - 1)),  # map32
            b"\xdb" + struct.pack(">I", r.randint(2**20, 2**32 - 1)),  # str32
            b"\xc6" + struct.pack(">I", r.randint(2**20, 2**32 - 1)),  # bin32
            b"\xc9" + struct.pack(">I", r.randint(2**20, 2**32 - 1)) + b"\x01",  # ext32
        ]
    )
    key = r.choice([b"\xa7entries", b"\xa4data", b"\xa1x"])
    payload = b"\x81" + key + liar + r.randbytes(r.randint(0, 32))
    if r.random() < 0.3:
        payload = liar + payload
    frame_type = r.choice(KNOWN_TYPES)
    return HEADER.pack(frame_type, len(payload)) + payload, None


def gen_concatenated(r: random.Random) -> tuple[bytes, None]:
    # A good frame, then garbage: the good frame must still decode first.
    good = encode_frame(valid_frame(r))
    bad, _ = r.choice([gen_random_bytes, gen_oversize, gen_mutated, gen_header_random_payload])(r)
    return good + bad, None


GENERATORS: list[tuple[Callable[[random.Random], tuple[bytes, list[Frame] | None]], int]] = [
    (gen_random_bytes, 15),
    (gen_header_random_payload, 15),
    (gen_valid, 15),
    (gen_mutated, 20),
    (gen_oversize, 5),
    (gen_boundary_lengths, 3),
    (gen_deep_nesting, 2),
    (gen_plausible_map, 15),
    (gen_lying_containers, 5),
    (gen_concatenated, 5),
]


def split(r: random.Random, data: bytes) -> list[bytes]:
    """Arbitrary pieces: whole, byte by byte, or random cuts."""
    mode = r.random()
    if mode < 0.3 or len(data) < 2:
        return [data]
    if mode < 0.4 and len(data) <= 200:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(r.sample(range(1, len(data)), min(len(data) - 1, r.randint(1, 8))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


class Outcome:
    def __init__(self) -> None:
        self.malformed = 0
        self.clean = 0
        self.frames = 0
        self.by_generator: dict[str, int] = {}


def feed_one(
    decoder: FrameDecoder, pieces: list[bytes], where: str
) -> tuple[list[Frame], MalformedFrame | None]:
    frames: list[Frame] = []
    try:
        for piece in pieces:
            frames += decoder.feed(piece)
            assert decoder.buffered <= BUFFER_BOUND, f"{where}: buffered {decoder.buffered}"
        decoder.eof()
    except MalformedFrame as error:
        assert decoder.buffered == 0, f"{where}: a broken decoder keeps no bytes"
        with pytest.raises(MalformedFrame):
            decoder.feed(b"\x10")  # it stays broken
        # Without its traceback: those frames would keep the decoder (and its buffer) alive
        # in a cycle through the caller until a collection.
        return frames, error.with_traceback(None)
    except BaseException as error:
        raise AssertionError(
            f"{where}: {type(error).__name__} escaped the decoder: {error}"
        ) from error
    return frames, None


Generator = Callable[[random.Random], tuple[bytes, Any]]
Check = Callable[[random.Random, bytes, Any, str], tuple[bool, int]]


def drive(
    seed: int, count: int, generators: Sequence[tuple[Generator, int]], check: Check, label: str
) -> Outcome:
    """``count`` inputs from weighted ``generators``; ``check`` says (malformed, items decoded)."""
    r = random.Random(seed)
    functions = [g for g, _ in generators]
    weights = [w for _, w in generators]
    outcome = Outcome()
    for index in range(count):
        generator = r.choices(functions, weights)[0]
        data, expected = generator(r)
        where = f"seed {seed} {label} {index} ({generator.__name__}, {len(data)} bytes)"
        malformed, decoded = check(r, data, expected, where)
        outcome.frames += decoded
        if malformed:
            outcome.malformed += 1
        else:
            outcome.clean += 1
        name = generator.__name__
        outcome.by_generator[name] = outcome.by_generator.get(name, 0) + 1
    return outcome


def check_frames(
    r: random.Random, data: bytes, expected: list[Frame] | None, where: str
) -> tuple[bool, int]:
    frames, error = feed_one(FrameDecoder(), split(r, data), where)
    if expected is not None:
        assert error is None, f"{where}: a valid encoding was refused: {error}"
        assert frames == expected, f"{where}: round trip changed the frames"
    for frame in frames:
        assert isinstance(frame, FRAME_CLASSES), f"{where}: decoded a {type(frame)}"
    return error is not None, len(frames)


def run_fuzz(seed: int, count: int) -> Outcome:
    return drive(seed, count, GENERATORS, check_frames, "input")


@pytest.mark.timeout(120)
def test_100k_generated_inputs_raise_only_malformed_frame() -> None:
    started = time.perf_counter()
    outcome = run_fuzz(SEED, INPUTS)
    elapsed = time.perf_counter() - started
    print(
        f"\nfuzzed {INPUTS} inputs in {elapsed:.1f} s (seed {SEED}): "
        f"{outcome.malformed} malformed, {outcome.clean} clean, {outcome.frames} frames"
    )
    assert outcome.malformed + outcome.clean == INPUTS
    # The generator mix really exercises both outcomes and every generator.
    assert outcome.malformed > INPUTS * 0.4 and outcome.clean > INPUTS * 0.1
    assert set(outcome.by_generator) == {g.__name__ for g, _ in GENERATORS}
    assert elapsed < 60, "the fuzz budget is meant to stay well under a minute"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_other_seeds_pass_too(seed: int) -> None:
    run_fuzz(seed, 3_000)


# --- memory ------------------------------------------------------------------------


def test_a_long_stream_of_large_frames_keeps_memory_to_one_frame() -> None:
    """64 MiB of legal 1 MiB frames fed in 16 KiB pieces: never more than about two frames held."""
    payload_frame = encode_frame(Entries([Entry(1, 1, b"x" * (MAX_PAYLOAD - 64))]))
    piece = 16 * 1024
    decoder = FrameDecoder()
    high_water = 0

    def feed() -> None:
        nonlocal high_water
        for _ in range(64):
            for start in range(0, len(payload_frame), piece):
                for _frame in decoder.feed(payload_frame[start : start + piece]):
                    pass  # dropped at once, as a consumer that applied it would
                high_water = max(high_water, decoder.buffered)

    peak, _ = traced_memory(feed)
    assert high_water <= BUFFER_BOUND
    assert peak < 6 * MiB, f"peak {peak / MiB:.1f} MiB while streaming 64 MiB"


def test_oversize_prefixes_never_buffer_anything() -> None:
    """A hostile peer announcing 4 GiB frames, many times: each refused from the header alone."""

    def feed() -> None:
        for frame_type in KNOWN_TYPES:
            for length in (max_payload(frame_type) + 1, 2**32 - 1):
                decoder = FrameDecoder()
                with pytest.raises(MalformedFrame, match="exceeds the limit"):
                    decoder.feed(HEADER.pack(frame_type, length) + b"\x00" * 1000)
                assert decoder.buffered == 0

    peak, _ = traced_memory(feed)
    assert peak < 1 * MiB


def test_fuzzing_under_tracemalloc_stays_within_a_few_frames() -> None:
    """5,000 fuzz inputs with allocation tracing on: the peak stays a few MiB, nothing is kept."""
    peak, retained = traced_memory(lambda: run_fuzz(SEED + 1, 5_000))
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert retained < 1 * MiB, f"{retained / MiB:.1f} MiB retained after fuzzing"


def test_a_trickled_frame_holds_at_most_its_declared_size() -> None:
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(FrameType.HELLO, HANDSHAKE_MAX_PAYLOAD))
    for _ in range(HANDSHAKE_MAX_PAYLOAD // 64 - 1):
        assert decoder.feed(b"\x00" * 64) == []
    assert decoder.buffered == HEADER_SIZE + HANDSHAKE_MAX_PAYLOAD - 64


def test_deep_nesting_is_refused_without_blowing_the_stack_or_memory() -> None:
    payload = b"\x81\xa1a" * (MAX_PAYLOAD // 3)
    data = HEADER.pack(FrameType.PROPOSE, len(payload)) + payload

    def feed() -> None:
        with pytest.raises(MalformedFrame):
            FrameDecoder().feed(data)

    peak, _ = traced_memory(feed)
    assert peak < 8 * MiB


def test_a_frame_that_expands_in_memory_costs_a_bounded_transient_peak() -> None:
    """MessagePack expands a 1 MiB frame of empty maps into ~70 MiB of Python objects.

    That is the worst case per frame (bounded by the 1 MiB limit times the
    per-object size); it is transient because frames are decoded one at a time.
    """
    data = amplifying_entries()

    def feed() -> None:
        with pytest.raises(MalformedFrame, match="missing field 'lsn'"):
            FrameDecoder().feed(data)

    peak, retained = traced_memory(feed)
    print(f"\n1 MiB amplifying frame: transient peak {peak / MiB:.1f} MiB")
    assert peak < 128 * MiB
    assert retained < 1 * MiB


def test_a_broken_decoder_does_not_keep_the_decoded_payload_alive() -> None:
    data = amplifying_entries()
    decoder = FrameDecoder()

    def feed() -> None:
        with pytest.raises(MalformedFrame):
            decoder.feed(data)

    _, retained = traced_memory(feed)
    assert retained < 4 * MiB, f"{retained / MiB:.1f} MiB retained by a broken decoder"


# --- the snapshot decoder ---------------------------------------------------------------
#
# The same approach for the snapshot byte format (PROTOCOL.md section 3): valid
# snapshots (which must decode to their entries), random bytes, mutated valid
# snapshots, items of the wrong shape, lying lengths, oversize entries, and
# valid snapshots with garbage after them, each fed in arbitrary pieces and
# finished.  Only ``MalformedFrame`` may escape.

SNAPSHOT_INPUTS = 60_000


def valid_snapshot_entries(r: random.Random) -> list[Entry]:
    term = r.choice([0, 1, r.randint(0, 2**32), U64_MAX - 50])
    entries = []
    for lsn in range(1, r.randint(0, 12) + 1):
        term = min(U64_MAX, term + r.choice([0, 0, 1, r.randint(0, 5)]))
        entries.append(Entry(lsn, term, r.randbytes(r.choice([0, r.randint(0, 40), 300]))))
    return entries


def snap_valid(r: random.Random) -> tuple[bytes, list[Entry] | None]:
    entries = valid_snapshot_entries(r)
    return encode_snapshot(entries), entries


def snap_random(r: random.Random) -> tuple[bytes, list[Entry] | None]:
    data, _ = gen_random_bytes(r)
    if r.random() < 0.5:
        data = b"\x93" + data  # looks like an entry at first
    return data, None


def snap_mutated(r: random.Random) -> tuple[bytes, list[Entry] | None]:
    blob, _ = snap_valid(r)
    return mutate(r, blob), None


def snap_wrong_shape(r: random.Random) -> tuple[bytes, list[Entry] | None]:
    # Plausible items: arrays of about three of anything, some of them right.
    items: list[object] = []
    for lsn in range(1, r.randint(1, 5) + 1):
        if r.random() < 0.5:
            items.append([lsn, r.randint(0, 3), r.randbytes(r.randint(0, 8))])
        else:
            items.append([random_value(r) for _ in range(r.choice([2, 3, 3, 4]))])
    if r.random() < 0.2:
        items = [list(items)]  # the old format: one outer array
    try:
        return b"".join(msgpack.packb(item, use_bin_type=True) for item in items), None
    except (TypeError, ValueError, OverflowError):
        return b"\x93\xc0\xc0\xc0", None


def snap_lying(r: random.Random) -> tuple[bytes, list[Entry] | None]:
    prefix = encode_snapshot(valid_snapshot_entries(r)) if r.random() < 0.5 else b""
    declared = r.randint(MAX_PAYLOAD - 2, 2**32 - 1)
    liar = r.choice(
        [
            b"\x93\x01\x01\xc6" + struct.pack(">I", declared),  # bin32 data
            b"\xdd" + struct.pack(">I", declared),  # array32
            b"\xdb" + struct.pack(">I", declared),  # str32
            b"\xdf" + struct.pack(">I", declared),  # map32
        ]
    )
    body = r.randbytes(r.randint(0, 64)) if r.random() < 0.9 else b"\x00" * (MAX_PAYLOAD + 10)
    return prefix + liar + body, None


def snap_trailing(r: random.Random) -> tuple[bytes, list[Entry] | None]:
    blob, _ = snap_valid(r)
    return blob + r.choice([b"\x93", b"\x93\x01", r.randbytes(r.randint(1, 6))]), None


SNAPSHOT_GENERATORS: list[
    tuple[Callable[[random.Random], tuple[bytes, list[Entry] | None]], int]
] = [
    (snap_valid, 20),
    (snap_random, 20),
    (snap_mutated, 30),
    (snap_wrong_shape, 15),
    (snap_lying, 5),
    (snap_trailing, 10),
]


def decode_snapshot_pieces(pieces: list[bytes], where: str) -> list[Entry] | MalformedFrame:
    decoder = SnapshotDecoder()
    entries: list[Entry] = []
    try:
        for piece in pieces:
            entries += decoder.feed(piece)
        decoder.finish(decoder.last_lsn)
    except MalformedFrame as error:
        return error.with_traceback(None)  # as in feed_one: no decoder kept alive
    except BaseException as error:
        raise AssertionError(
            f"{where}: {type(error).__name__} escaped the snapshot decoder: {error}"
        ) from error
    return entries


def check_snapshot(
    r: random.Random, data: bytes, expected: list[Entry] | None, where: str
) -> tuple[bool, int]:
    result = decode_snapshot_pieces(split(r, data), where)
    if expected is not None:
        assert result == expected, f"{where}: a valid snapshot decoded to {result!r:.200}"
    if isinstance(result, MalformedFrame):
        return True, 0
    lsns = [e.lsn for e in result]
    assert lsns == list(range(1, len(result) + 1)), f"{where}: LSNs {lsns}"
    terms = [e.term for e in result]
    assert terms == sorted(terms), f"{where}: terms {terms} go down"
    return False, len(result)


def run_snapshot_fuzz(seed: int, count: int) -> Outcome:
    return drive(seed, count, SNAPSHOT_GENERATORS, check_snapshot, "snapshot input")


@pytest.mark.timeout(120)
def test_snapshot_decoder_fuzz_raises_only_malformed_frame() -> None:
    started = time.perf_counter()
    outcome = run_snapshot_fuzz(SEED, SNAPSHOT_INPUTS)
    elapsed = time.perf_counter() - started
    print(
        f"\nfuzzed the snapshot decoder with {SNAPSHOT_INPUTS} inputs in {elapsed:.1f} s "
        f"(seed {SEED}): {outcome.malformed} malformed, {outcome.clean} clean, "
        f"{outcome.frames} entries"
    )
    assert outcome.malformed + outcome.clean == SNAPSHOT_INPUTS
    assert outcome.malformed > SNAPSHOT_INPUTS * 0.3 and outcome.clean > SNAPSHOT_INPUTS * 0.15
    assert set(outcome.by_generator) == {g.__name__ for g, _ in SNAPSHOT_GENERATORS}
    assert elapsed < 45, "the snapshot fuzz budget is meant to stay well under a minute"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_snapshot_decoder_fuzz_other_seeds(seed: int) -> None:
    run_snapshot_fuzz(seed, 2_000)


def test_snapshot_decoder_fuzz_under_tracemalloc_stays_bounded() -> None:
    """3,000 inputs, lying lengths included, traced: a few MiB at most, nothing kept."""
    peak, retained = traced_memory(lambda: run_snapshot_fuzz(SEED + 2, 3_000))
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert retained < 1 * MiB, f"{retained / MiB:.1f} MiB retained after fuzzing"


def test_snapshot_decoder_refuses_a_lying_length_fed_forever() -> None:
    """An entry announcing 4 GiB of data, then data that keeps coming: refused early."""
    piece = b"\x00" * (256 * 1024)

    def feed() -> None:
        decoder = SnapshotDecoder()
        decoder.feed(b"\x93\x01\x01\xc6" + struct.pack(">I", 2**32 - 1))
        with pytest.raises(MalformedFrame, match="larger than any frame"):
            for _ in range(64):  # 16 MiB, if it kept taking it
                decoder.feed(piece)

    peak, _ = traced_memory(feed)
    assert peak < 2 * MAX_PAYLOAD + 2 * MiB, f"peak {peak / MiB:.1f} MiB"
