"""OVERLOADED on real QUIC (PROTOCOL.md 4 and 5.3): stalled subscribers shed, the
connection limit, the server-wide budget, and healthy mirrors served meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aioquic.quic.events import ConnectionTerminated

from mirror_actors.pki import DevPki
from mirror_actors.source import ServerLoad, SourceSettings
from mirror_actors.wire import Ack, Entries, Error, ErrorCode, Hello, SnapshotChunk, Subscribe
from mirror_actors.wire.frames import encode_payload
from tests.helpers import CLUSTER, source_server
from tests.rawclient import END, RawClient, accepted, handshake, mirror, run

ENTRY = 1000
OVERLOAD_WAIT = 15.0  # a loaded source answers a shed mirror late
RUN_TIMEOUT = 60.0


async def until(predicate: Callable[[], Any], what: str, timeout: float = OVERLOAD_WAIT) -> Any:
    """Wait for a condition the server reports (asked off the test's loop), with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def subscribe(client: RawClient, from_lsn: int = 1) -> int:
    await accepted(client)
    stream = client.open_stream()
    client.send(stream, Subscribe(from_lsn))
    return stream


async def consume_acking(client: RawClient, stream: int, upto_lsn: int) -> list[Any]:
    """A healthy mirror: ACK every frame with its payload bytes, until ``upto_lsn``."""
    entries: list[Any] = []
    while not entries or entries[-1].lsn < upto_lsn:
        frame = await client.recv(stream, timeout=OVERLOAD_WAIT)
        assert isinstance(frame, Entries | SnapshotChunk), frame
        if isinstance(frame, Entries):
            entries.extend(frame.entries)
        client.send(stream, Ack(entries[-1].lsn if entries else 0, len(encode_payload(frame))))
    return entries


async def shed_with_overloaded(client: RawClient, stream: int) -> tuple[Any, Any]:
    """Read what the source sends (never ACK): ERROR{0x08} on the stream, then the close."""
    error = None
    while True:
        item = await client.recv(stream, timeout=OVERLOAD_WAIT)
        if isinstance(item, Error):
            error = item
        elif isinstance(item, ConnectionTerminated) or item is END:
            break
    return error, await client.closed(OVERLOAD_WAIT)


def test_stalled_subscribers_are_shed_and_a_healthy_mirror_gets_everything(pki: DevPki) -> None:
    # A stall timeout short enough for a test, long enough that the healthy mirror's
    # ACKs (on a loaded machine, beside eight other clients) always come in time.
    settings = SourceSettings(flow_control_cap=16 * 1024, batch_bytes=4096, stall_timeout=1.0)
    with source_server(pki, settings=settings) as source:
        for i in range(300):
            source.append("orders", bytes([i % 256]) * ENTRY)

        async def stalled() -> tuple[Any, Any, float]:
            async with mirror(source, pki) as client:
                stream = await subscribe(client)
                started = time.monotonic()
                error, closed = await shed_with_overloaded(client, stream)
                return error, closed, time.monotonic() - started

        all_shed = asyncio.Event()

        async def healthy() -> tuple[list[Any], bool]:
            async with mirror(source, pki) as client:
                stream = await subscribe(client)
                entries = await consume_acking(client, stream, 300)
                # Keep replicating while the stalled ones are shed: every append
                # arrives at once, whatever the eight are doing.
                lsn = 300
                while not all_shed.is_set():
                    lsn = await asyncio.to_thread(source.append, "orders", b"late%d" % lsn)
                    entries += await consume_acking(client, stream, lsn)
                return entries, client.terminated.done()

        async def shed_all() -> list[Any]:
            try:
                return list(await asyncio.gather(*(stalled() for _ in range(8))))
            finally:
                all_shed.set()

        async def scenario() -> tuple[list[Any], Any]:
            outcomes: tuple[list[Any], Any] = await asyncio.gather(shed_all(), healthy())
            return outcomes

        outcomes, (entries, healthy_closed) = run(scenario(), RUN_TIMEOUT)
        load = source.load()
    for error, closed, took in outcomes:
        assert closed.error_code == ErrorCode.OVERLOADED
        assert closed.frame_type is None, "an application close"
        assert "stalled" in closed.reason_phrase
        assert isinstance(error, Error) and error.code == ErrorCode.OVERLOADED
        # Shed after the stall timeout, noticed within a tick or so.
        assert 1.0 <= took < 10.0
    assert [e.lsn for e in entries] == list(range(1, len(entries) + 1))
    assert len(entries) > 300 + 8, "it kept replicating while the eight were shed"
    assert not healthy_closed
    assert load.in_flight <= settings.flow_control_cap + 8192


def test_a_connection_past_max_connections_is_refused_with_overloaded(pki: DevPki) -> None:
    with source_server(pki, settings=SourceSettings(max_connections=2)) as source:

        async def scenario() -> tuple[Any, Any, Any, ServerLoad]:
            async with mirror(source, pki) as first, mirror(source, pki) as second:
                await accepted(first)
                await accepted(second)
                async with mirror(source, pki) as third:
                    ack = await handshake(third, Hello(CLUSTER, "orders"))
                    closed = await third.closed()
                load = await asyncio.to_thread(source.load)
            # Both ended: the slots come back, and a new mirror is admitted.
            await until(lambda: source.load().connections == 0, "the slots to free")
            async with mirror(source, pki) as fourth:
                later = await handshake(fourth, Hello(CLUSTER, "orders"))
            return ack, closed, later, load

        ack, closed, later, load = run(scenario(), RUN_TIMEOUT)
    assert not ack.accepted and ack.error_code == ErrorCode.OVERLOADED
    assert "at most 2 mirror connections" in ack.error_detail
    assert closed.error_code == ErrorCode.OVERLOADED and closed.frame_type is None
    assert load.connections == 2
    assert later.accepted


def test_the_global_budget_holds_and_stalled_connections_cannot_pin_it(pki: DevPki) -> None:
    budget = 48 * 1024
    frame = 4096 + 512  # the largest ENTRIES payload with batch_bytes 4096
    settings = SourceSettings(
        flow_control_cap=1 << 20,  # far above the budget: only the budget stops them
        batch_bytes=4096,
        max_buffered_bytes=budget,
        stall_timeout=1.0,
    )
    stalled_count = 6
    with source_server(pki, settings=settings) as source:
        for i in range(400):
            source.append("orders", bytes([i % 256]) * ENTRY)

        async def scenario() -> tuple[list[ServerLoad], list[Any], list[Any]]:
            contexts = [mirror(source, pki) for _ in range(stalled_count)]
            clients = [await c.__aenter__() for c in contexts]
            try:
                streams = [await subscribe(c) for c in clients]
                # All of them together have reached the budget and wait for it.
                pinned = await until(
                    lambda: (load := source.load()).in_flight >= budget and load, "the budget"
                )
                infos = await asyncio.to_thread(source.connections)
                samples = [pinned]
                async with mirror(source, pki) as good:
                    good_stream = await subscribe(good)
                    samples.append(await asyncio.to_thread(source.load))
                    # The stalled ones are shed after their stall timeout; then the good
                    # mirror gets the budget and everything.
                    entries = await consume_acking(good, good_stream, 400)
                    samples.append(await asyncio.to_thread(source.load))
                closes = [
                    await shed_with_overloaded(c, s) for c, s in zip(clients, streams, strict=True)
                ]
                return samples, closes, [entries, infos]
            finally:
                for context in contexts:
                    await context.__aexit__(None, None, None)

        samples, closes, (entries, infos) = run(scenario(), RUN_TIMEOUT)
    for load in samples:
        assert load.in_flight <= budget + frame * (stalled_count + 1)
    # Tighter than the protocol needs: one frame over the budget at most, in all.
    assert samples[0].in_flight < budget + frame
    assert sum(i.in_flight for i in infos) < budget + frame
    assert all(not i.paused for i in infos), "the budget stopped them, not their caps"
    assert all(closed.error_code == ErrorCode.OVERLOADED for _, closed in closes)
    assert all("in-flight budget" in closed.reason_phrase for _, closed in closes)
    assert [e.lsn for e in entries] == list(range(1, 401))


def test_healthy_mirrors_share_a_tight_budget_without_starving(pki: DevPki) -> None:
    settings = SourceSettings(batch_bytes=4096, max_buffered_bytes=16 * 1024, stall_timeout=30)
    with source_server(pki, settings=settings) as source:
        for i in range(300):
            source.append("orders", bytes([i % 256]) * ENTRY)

        async def one() -> list[Any]:
            async with mirror(source, pki) as client:
                stream = await subscribe(client)
                return await consume_acking(client, stream, 300)

        async def scenario() -> list[list[Any]]:
            return list(await asyncio.gather(*(one() for _ in range(5))))

        results = run(scenario(), RUN_TIMEOUT)
        load = source.load()
    for entries in results:
        assert [e.lsn for e in entries] == list(range(1, 301))
    assert load == ServerLoad(0, 0, 0) or load.waiting == 0


# -- connections that never say HELLO (docs/protocol-notes.md) ----------------------------


def test_a_connection_that_never_says_hello_is_closed_with_overloaded(pki: DevPki) -> None:
    settings = SourceSettings(hello_timeout=0.5)
    with source_server(pki, settings=settings) as source:

        async def scenario() -> tuple[Any, float, bool]:
            began = time.monotonic()  # before the first datagram, so the deadline is later
            async with mirror(source, pki) as silent, mirror(source, pki) as healthy:
                await accepted(healthy)  # said at once: never closed for it
                closed = await silent.closed(OVERLOAD_WAIT)
                waited = time.monotonic() - began
                healthy_closed = healthy.terminated.done()
            # The healthy mirror's own close reaches the source a moment later.
            await until(lambda: source.load().connections == 0, "both connections to end")
            return closed, waited, healthy_closed

        closed, waited, healthy_closed = run(scenario(), RUN_TIMEOUT)
    assert closed.error_code == ErrorCode.OVERLOADED and closed.frame_type is None
    assert "no HELLO within 0.5 s of connecting" in closed.reason_phrase
    assert waited >= 0.5
    assert not healthy_closed


def test_connections_past_max_awaiting_hello_are_closed_at_once_and_a_mirror_still_connects(
    pki: DevPki,
) -> None:
    settings = SourceSettings(max_awaiting_hello=2, hello_timeout=1.0)
    with source_server(pki, settings=settings) as source:

        async def scenario() -> tuple[Any, float, Any, Any]:
            async with mirror(source, pki) as silent, mirror(source, pki):
                await until(lambda: source.load().awaiting_hello == 2, "two waiting for HELLO")
                began = time.monotonic()
                async with mirror(source, pki) as third:
                    refused = await third.closed(OVERLOAD_WAIT)
                refused_after = time.monotonic() - began
                # The two silent ones are closed at their deadline, and leave room.
                deadline_close = await silent.closed(OVERLOAD_WAIT)
                await until(lambda: source.load().awaiting_hello == 0, "the silent ones to go")
            async with mirror(source, pki) as later:
                ack = await handshake(later, Hello(CLUSTER, "orders"))
            return refused, refused_after, deadline_close, ack

        refused, refused_after, deadline_close, ack = run(scenario(), RUN_TIMEOUT)
    assert refused.error_code == ErrorCode.OVERLOADED
    assert "2 connections are waiting to send their HELLO" in refused.reason_phrase
    assert refused_after < 1.0, "closed once its TLS handshake completed, not at a deadline"
    assert deadline_close.error_code == ErrorCode.OVERLOADED
    assert ack.accepted
