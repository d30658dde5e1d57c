"""Malicious mirrors against ``SourceServer``: each gets a clear answer, nobody else is harmed.

Every attack runs beside a well-behaved mirror subscribed to the same source.
The attacker must get the ERROR frame and close code PROTOCOL.md prescribes
(or, where the protocol says it is harmless, nothing at all), while the good
mirror's subscription keeps delivering every entry in order and the process
keeps the same threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from aioquic.quic.events import StreamReset

from mirror_actors.pki import DevPki
from mirror_actors.source import SourceServer, SourceSettings
from mirror_actors.wire import (
    Ack,
    ConfChange,
    Entries,
    Error,
    ErrorCode,
    FrameType,
    Hello,
    Propose,
    RequestVote,
    Subscribe,
    encode_frame,
)
from mirror_actors.wire.frames import HEADER
from tests.helpers import CLUSTER, thread_names
from tests.rawclient import (
    END,
    RawClient,
    accepted,
    collect_entries,
    expect_error_and_close,
    mirror,
)

Attack = Callable[[SourceServer, DevPki], Awaitable[Any]]
T = TypeVar("T")
MAX_SUBSCRIPTIONS = 64


@pytest.fixture
def source_settings() -> SourceSettings:
    """The ``source`` fixture's limit, pinned here: a test counts up to it."""
    return SourceSettings(max_subscriptions=MAX_SUBSCRIPTIONS)


def beside_a_good_mirror(source: SourceServer, pki: DevPki, attack: Attack) -> Any:
    """Run ``attack`` while a good mirror tails the log; check it lost nothing and the threads."""
    threads = thread_names()

    async def scenario() -> Any:
        async with mirror(source, pki) as good:
            await accepted(good)
            stream = good.open_stream()
            good.send(stream, Subscribe(1))
            first = await asyncio.to_thread(source.append, "orders", b"before")
            assert [e.lsn for e in await collect_entries(good, stream, first)] == [first]
            outcome = await attack(source, pki)
            # The good mirror still receives, in order, with nothing missing.
            lsns = [
                await asyncio.to_thread(source.append, "orders", b"after%d" % i) for i in range(20)
            ]
            entries = await collect_entries(good, stream, lsns[-1])
            # (Some attacks append entries of their own; the good mirror gets those too.)
            assert [e.lsn for e in entries] == list(range(first + 1, lsns[-1] + 1))
            assert [e.data for e in entries[-20:]] == [b"after%d" % i for i in range(20)]
            assert not good.terminated.done(), "the good mirror's connection must live"
            return outcome

    outcome = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert thread_names() == threads, "the attack changed the process's threads"
    return outcome


async def attacked(
    source: SourceServer, pki: DevPki, act: Callable[[RawClient], Awaitable[T]]
) -> T:
    async with mirror(source, pki) as bad:
        return await act(bad)


# -- garbage and framing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("garbage", "words"),
    [
        (b"\x00garbage, not a frame", "unknown frame type 0x00"),
        (b"GET / HTTP/1.1\r\n\r\n", "unknown frame type 0x47"),
        (HEADER.pack(FrameType.HELLO, 3) + b"\xc1\xc1\xc1", "not valid MessagePack"),
        (HEADER.pack(FrameType.HELLO, 1) + b"\x90", "must be a map"),
    ],
)
def test_garbage_before_hello(
    source: SourceServer, pki: DevPki, garbage: bytes, words: str
) -> None:
    async def attack(source: SourceServer, pki: DevPki) -> str:
        async def act(bad: RawClient) -> str:
            bad.send(0, garbage)
            return await expect_error_and_close(bad, 0, ErrorCode.MALFORMED)

        return await attacked(source, pki, act)

    assert words in beside_a_good_mirror(source, pki, attack)


def test_garbage_on_a_replication_stream(source: SourceServer, pki: DevPki) -> None:
    async def attack(source: SourceServer, pki: DevPki) -> str:
        async def act(bad: RawClient) -> str:
            await accepted(bad)
            stream = bad.open_stream()
            bad.send(stream, Subscribe(1), b"\xee" * 100)
            # The subscription may deliver an entry before the error: skip it.
            frame = await bad.recv(stream)
            while isinstance(frame, Entries):
                frame = await bad.recv(stream)
            assert isinstance(frame, Error) and frame.code == ErrorCode.MALFORMED
            assert (await bad.closed()).error_code == ErrorCode.MALFORMED
            return frame.detail

        return await attacked(source, pki, act)

    assert "unknown frame type 0xee" in beside_a_good_mirror(source, pki, attack)


@pytest.mark.parametrize(
    ("stream_kind", "frame_type", "length"),
    [
        ("handshake", FrameType.HELLO, 4097),
        ("handshake", FrameType.HELLO, 2**32 - 1),
        ("replication", FrameType.ACK, (1 << 20) + 1),
        ("replication", FrameType.SUBSCRIBE, 2**32 - 1),
    ],
)
def test_an_oversize_length_prefix_is_refused_from_the_header(
    source: SourceServer, pki: DevPki, stream_kind: str, frame_type: int, length: int
) -> None:
    async def attack(source: SourceServer, pki: DevPki) -> str:
        async def act(bad: RawClient) -> str:
            stream = 0
            if stream_kind == "replication":
                await accepted(bad)
                stream = bad.open_stream()
            # Only the header and a few bytes: the source must not wait for 4 GiB.
            bad.send(stream, HEADER.pack(frame_type, length) + b"\x00" * 16)
            return await expect_error_and_close(bad, stream, ErrorCode.MALFORMED)

        return await attacked(source, pki, act)

    assert "exceeds the limit" in beside_a_good_mirror(source, pki, attack)


@pytest.mark.parametrize("where", ["handshake", "replication"])
def test_half_a_frame_then_silence_holds_only_that_connection(
    source: SourceServer, pki: DevPki, where: str
) -> None:
    """The source waits for the rest (no error: it may be slow), serving everyone else meanwhile."""
    silent: list[RawClient] = []

    async def attack(source: SourceServer, pki: DevPki) -> Any:
        context = mirror(source, pki)
        bad = await context.__aenter__()
        silent.append(bad)
        stream = 0
        if where == "replication":
            await accepted(bad)
            stream = bad.open_stream()
            half = encode_frame(Subscribe(5))
        else:
            half = encode_frame(Hello(CLUSTER, "orders"))
        bad.send(stream, half[: len(half) // 2])
        return context, bad

    async def scenario_check(source: SourceServer, pki: DevPki) -> Any:
        context, bad = await attack(source, pki)
        infos = await asyncio.to_thread(source.connections)
        states = sorted(i.state for i in infos)
        assert len(infos) == 2, "the half-frame connection is still held, not dropped"
        assert not bad.terminated.done()
        await context.__aexit__(None, None, None)
        return states

    states = beside_a_good_mirror(source, pki, scenario_check)
    expected = "awaiting-hello" if where == "handshake" else "established"
    assert expected in states


def test_a_fin_inside_a_frame_is_malformed(source: SourceServer, pki: DevPki) -> None:
    async def attack(source: SourceServer, pki: DevPki) -> str:
        async def act(bad: RawClient) -> str:
            await accepted(bad)
            stream = bad.open_stream()
            bad.send(stream, encode_frame(Subscribe(1))[:4], end=True)
            return await expect_error_and_close(bad, stream, ErrorCode.MALFORMED)

        return await attacked(source, pki, act)

    assert "inside a frame" in beside_a_good_mirror(source, pki, attack)


def test_a_unidirectional_stream_closes_with_malformed(source: SourceServer, pki: DevPki) -> None:
    async def attack(source: SourceServer, pki: DevPki) -> int:
        async def act(bad: RawClient) -> int:
            await accepted(bad)
            uni = bad._quic.get_next_available_stream_id(is_unidirectional=True)
            bad.send(uni, Subscribe(1))
            closed = await bad.closed()
            return closed.error_code

        return await attacked(source, pki, act)

    assert beside_a_good_mirror(source, pki, attack) == ErrorCode.MALFORMED


# -- roles and order -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame", [RequestVote({"term": 9}), ConfChange({"add": "me"}), Propose({})]
)
@pytest.mark.parametrize("where", ["handshake", "replication"])
def test_a_voter_class_frame_is_observer_only(
    source: SourceServer, pki: DevPki, frame: Any, where: str
) -> None:
    async def attack(source: SourceServer, pki: DevPki) -> str:
        async def act(bad: RawClient) -> str:
            stream = 0
            if where == "replication":
                await accepted(bad)
                stream = bad.open_stream()
            bad.send(stream, frame)
            return await expect_error_and_close(bad, stream, ErrorCode.OBSERVER_ONLY)

        return await attacked(source, pki, act)

    detail = beside_a_good_mirror(source, pki, attack)
    assert frame.TYPE.name in detail and "observer" in detail


@pytest.mark.parametrize("how", ["coalesced", "after the ack", "on a replication stream"])
def test_hello_repeated(source: SourceServer, pki: DevPki, how: str) -> None:
    async def attack(source: SourceServer, pki: DevPki) -> tuple[str, int]:
        async def act(bad: RawClient) -> tuple[str, int]:
            hello = Hello(CLUSTER, "orders")
            if how == "coalesced":
                bad.send(0, hello, hello)
                detail = await expect_error_and_close(bad, 0, ErrorCode.MALFORMED)
                return detail, ErrorCode.MALFORMED
            if how == "after the ack":
                bad.send(0, hello)  # no FIN, so a second HELLO can follow
                assert (await bad.recv(0)).accepted
                assert await bad.recv(0) is END
                bad.send(0, hello)
                # The source finished stream 0 already: no stream left for an ERROR frame.
                closed = await bad.closed()
                return closed.reason_phrase, closed.error_code
            await accepted(bad)
            stream = bad.open_stream()
            bad.send(stream, hello)
            detail = await expect_error_and_close(bad, stream, ErrorCode.MALFORMED)
            return detail, ErrorCode.MALFORMED

        return await attacked(source, pki, act)

    detail, code = beside_a_good_mirror(source, pki, attack)
    assert code == ErrorCode.MALFORMED
    words = {
        "coalesced": "more than one frame",
        "after the ack": "after HELLO",
        "on a replication stream": "must start with SUBSCRIBE",
    }[how]
    assert words in detail


@pytest.mark.parametrize("where", ["on the handshake stream", "on a new stream"])
def test_subscribe_before_hello(source: SourceServer, pki: DevPki, where: str) -> None:
    async def attack(source: SourceServer, pki: DevPki) -> str:
        async def act(bad: RawClient) -> str:
            if where == "on the handshake stream":
                bad.send(0, Subscribe(1))
                return await expect_error_and_close(bad, 0, ErrorCode.MALFORMED)
            bad.send(0, b"")  # stream 0 exists, HELLO never comes
            stream = bad.open_stream()
            bad.send(stream, Subscribe(1))
            return await expect_error_and_close(bad, stream, ErrorCode.MALFORMED)

        return await attacked(source, pki, act)

    detail = beside_a_good_mirror(source, pki, attack)
    assert ("expected HELLO first" if "handshake" in where else "before the HELLO_ACK") in detail


# -- flow control ---------------------------------------------------------------------------


def test_an_ack_for_more_bytes_than_sent_is_clamped_and_harmless(
    source: SourceServer, pki: DevPki
) -> None:
    async def attack(source: SourceServer, pki: DevPki) -> Any:
        async def act(bad: RawClient) -> Any:
            await accepted(bad)
            stream = bad.open_stream()
            bad.send(stream, Subscribe(1))
            await bad.recv(stream)
            bad.send(stream, Ack(2**64 - 1, 2**64 - 1), Ack(0, 2**63))
            # Still served afterwards: nothing broke.
            lsn = await asyncio.to_thread(source.append, "orders", b"for the liar too")
            await collect_entries(bad, stream, lsn)
            assert not bad.terminated.done()
            infos = await asyncio.to_thread(source.connections)
            (liar,) = [i for i in infos if i.subscriptions[0][1] == 2**64 - 1]
            return liar

        return await attacked(source, pki, act)

    liar = beside_a_good_mirror(source, pki, attack)
    # Clamped at zero (then at most the one frame sent since): never negative, never paused.
    assert 0 <= liar.in_flight < 1000 and not liar.paused


def test_an_ack_flood_is_absorbed(source: SourceServer, pki: DevPki) -> None:
    """20,000 ACK frames in one burst: processed, nobody starves."""

    async def attack(source: SourceServer, pki: DevPki) -> bool:
        async def act(bad: RawClient) -> bool:
            await accepted(bad)
            stream = bad.open_stream()
            bad.send(stream, Subscribe(1), *[Ack(1, 1)] * 20_000)
            lsn = await asyncio.to_thread(source.append, "orders", b"after the flood")
            await collect_entries(bad, stream, lsn)
            return not bad.terminated.done()

        return await attacked(source, pki, act)

    assert beside_a_good_mirror(source, pki, attack)


# -- streams -------------------------------------------------------------------------------


async def refused(bad: RawClient, stream: int) -> StreamReset:
    event = await bad.recv(stream)
    assert isinstance(event, StreamReset), event
    # Give the stream back, as a polite client would after STOP_SENDING.
    bad._quic.reset_stream(stream, 0)
    bad.transmit()
    return event


def test_two_thousand_stream_opens_on_one_connection(source: SourceServer, pki: DevPki) -> None:
    """64 subscriptions are served; the other 1,936 are refused one by one, the connection lives.

    aioquic lets a peer hold 128 streams at once and raises the limit as streams
    finish, so the attacker opens them in waves and gives each refused one back.
    """
    total, wave = 2_000, 32

    async def attack(source: SourceServer, pki: DevPki) -> tuple[int, int]:
        async def act(bad: RawClient) -> tuple[int, int]:
            await accepted(bad)
            served = []
            for _ in range(MAX_SUBSCRIPTIONS):
                served.append(bad.open_stream())
                bad.send(served[-1], Subscribe(1))
            for stream in served:
                assert isinstance(await bad.recv(stream), Entries)
            refusals = 0
            while MAX_SUBSCRIPTIONS + refusals < total:
                streams = []
                for _ in range(min(wave, total - MAX_SUBSCRIPTIONS - refusals)):
                    streams.append(bad.open_stream())
                    bad.send(streams[-1], Subscribe(1))
                for stream in streams:
                    reset = await refused(bad, stream)
                    assert reset.error_code == ErrorCode.MALFORMED
                    refusals += 1
            # The 64 served subscriptions still tail.
            lsn = await asyncio.to_thread(source.append, "orders", b"still served")
            for stream in served:
                await collect_entries(bad, stream, lsn)
            infos = await asyncio.to_thread(source.connections)
            assert not bad.terminated.done()
            return refusals, max(len(i.subscriptions) for i in infos)

        return await attacked(source, pki, act)

    refusals, subscriptions = beside_a_good_mirror(source, pki, attack)
    assert refusals == total - MAX_SUBSCRIPTIONS
    assert subscriptions == MAX_SUBSCRIPTIONS


def test_cycling_subscriptions_frees_their_slots(source: SourceServer, pki: DevPki) -> None:
    """Subscribe, read, cancel, 300 times: a cancelled stream gives its slot back."""

    async def attack(source: SourceServer, pki: DevPki) -> int:
        async def act(bad: RawClient) -> int:
            await accepted(bad)
            for _ in range(300):
                stream = bad.open_stream()
                bad.send(stream, Subscribe(1))
                frame = await bad.recv(stream)
                assert isinstance(frame, Entries), f"stream {stream}: {frame}"
                bad._quic.reset_stream(stream, 0)
                bad._quic.stop_stream(stream, 0)
                bad.transmit()
            infos = await asyncio.to_thread(source.connections)
            assert not bad.terminated.done()
            return max(len(i.subscriptions) for i in infos)

        return await attacked(source, pki, act)

    assert beside_a_good_mirror(source, pki, attack) <= 2


def test_many_silent_connections_do_not_starve_a_good_mirror(
    source: SourceServer, pki: DevPki
) -> None:
    """Thirty handshaken QUIC connections that never send HELLO: held, nobody else is slowed."""

    async def attack(source: SourceServer, pki: DevPki) -> int:
        contexts = [mirror(source, pki) for _ in range(30)]
        clients = [await c.__aenter__() for c in contexts]
        for client in clients:
            client.send(0, b"")
        infos = await asyncio.to_thread(source.connections)
        for context in contexts:
            await context.__aexit__(None, None, None)
        return sum(1 for i in infos if i.state == "awaiting-hello")

    assert beside_a_good_mirror(source, pki, attack) == 30
