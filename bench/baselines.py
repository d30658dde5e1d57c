"""The bare libraries each figure is compared with: aioquic without actors, pykka without links.

The bare mirror speaks PROTOCOL.md by hand (like ``tests/rawclient.py``): dial,
HELLO/HELLO_ACK, SUBSCRIBE, decode ENTRIES, ACK.  Its coroutines time themselves
on their own loop, so no thread hop is charged to the baseline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import msgpack
import pykka
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from mirror_actors.link.state import LinkState, LinkStatus
from mirror_actors.wire.frames import (
    ALPN,
    Ack,
    Frame,
    FrameDecoder,
    Hello,
    HelloAck,
    Subscribe,
    encode_frame,
)

from .common import CLUSTER

T = TypeVar("T")
HANDSHAKE_STREAM_ID = 0


class BareLoop:
    """An asyncio loop on its own thread, for baselines that must run beside blocking code."""

    def __init__(self, name: str = "bench-bare-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_default_executor()

        try:
            self.run(drain(), timeout=10.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10.0)
            self.loop.close()

    def __enter__(self) -> BareLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BareMirror(QuicConnectionProtocol):
    """A mirror in plain aioquic: frames decoded in the event callback, handed to hooks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        loop = asyncio.get_running_loop()
        self.hello_ack: asyncio.Future[HelloAck] = loop.create_future()
        self.terminated: asyncio.Future[float] = loop.create_future()
        self._handshake = FrameDecoder()
        self._decoders: dict[int, FrameDecoder] = {}
        self.on_frame: Callable[[int, Frame, int], None] | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            if event.stream_id == HANDSHAKE_STREAM_ID:
                for frame in self._handshake.feed(event.data):
                    if isinstance(frame, HelloAck) and not self.hello_ack.done():
                        self.hello_ack.set_result(frame)
                return
            decoder = self._decoders.setdefault(event.stream_id, FrameDecoder())
            hook = self.on_frame
            for frame, size in decoder.feed_with_sizes(event.data):
                if hook is not None:
                    hook(event.stream_id, frame, size)
        elif isinstance(event, events.ConnectionTerminated):
            if not self.terminated.done():
                self.terminated.set_result(time.monotonic())
            if not self.hello_ack.done():
                self.hello_ack.set_exception(ConnectionError(event.reason_phrase))

    def send_frame(self, stream_id: int, frame: Frame, end_stream: bool = False) -> None:
        self._quic.send_stream_data(stream_id, encode_frame(frame), end_stream)
        self.transmit()


def bare_configuration(ca_file: str, idle_timeout: float = 5.0) -> QuicConfiguration:
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], server_name=CLUSTER, idle_timeout=idle_timeout
    )
    configuration.load_verify_locations(ca_file)
    return configuration


async def bare_connect(
    port: int, ca_file: str, database: str, *, idle_timeout: float = 5.0
) -> tuple[float, BareMirror, AbstractAsyncContextManager[QuicConnectionProtocol]]:
    """Dial and HELLO/HELLO_ACK; (seconds it took, the client, its context manager to exit).

    The timed part is what ``LinkConnection.open`` does: configuration and CA
    loading, address lookup, QUIC+TLS handshake, HELLO, HELLO_ACK.
    """
    started = time.perf_counter()
    configuration = bare_configuration(ca_file, idle_timeout)
    manager = connect("127.0.0.1", port, configuration=configuration, create_protocol=BareMirror)
    client = await manager.__aenter__()
    assert isinstance(client, BareMirror)
    client.send_frame(HANDSHAKE_STREAM_ID, Hello(CLUSTER, database, 0), end_stream=True)
    ack = await client.hello_ack
    elapsed = time.perf_counter() - started
    if not ack.accepted:
        await manager.__aexit__(None, None, None)
        raise RuntimeError(f"bare handshake rejected: {ack.error_detail}")
    return elapsed, client, manager


async def bare_connect_once(port: int, ca_file: str, database: str) -> float:
    elapsed, _client, manager = await bare_connect(port, ca_file, database)
    await manager.__aexit__(None, None, None)
    return elapsed


async def bare_replicate(
    port: int, ca_file: str, database: str, last_lsn: int, apply: Callable[[Frame], int | None]
) -> tuple[float, float]:
    """Subscribe from LSN 1 and apply every frame, ACKing what ``apply`` says it applied.

    ``apply`` returns the LSN applied so far (None: nothing to ACK yet).  The
    answer is (seconds from the dial, seconds from the SUBSCRIBE) until
    ``last_lsn`` is applied.
    """
    dialed = time.perf_counter()
    _, client, manager = await bare_connect(port, ca_file, database)
    try:
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        def on_frame(stream_id: int, frame: Frame, size: int) -> None:
            applied = apply(frame)
            if applied is None:
                return
            client.send_frame(stream_id, Ack(applied, size))
            if applied >= last_lsn and not done.done():
                done.set_result(time.perf_counter())

        client.on_frame = on_frame
        started = time.perf_counter()
        stream_id = client._quic.get_next_available_stream_id()
        client.send_frame(stream_id, Subscribe(1))
        finished = await asyncio.wait_for(done, 120.0)
        return finished - dialed, finished - started
    finally:
        await manager.__aexit__(None, None, None)


class BareStatusActor(pykka.ThreadingActor):
    """A bare pykka actor answering asks with a ``LinkStatus`` built like the link's."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_applied_lsn = 0

    def on_receive(self, message: Any) -> Any:
        return LinkStatus(
            name=f"{CLUSTER}/orders",
            state=LinkState.CONNECTED,
            connected_since=0.0,
            attempts=1,
            consecutive_failures=0,
            last_error=None,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            last_applied_lsn=self.last_applied_lsn,
            snapshot_lsn=None,
        )


# -- figure 2p: the barest mirror (msgpack by hand, nothing of mirror_actors.wire) -------

_RAW_HEADER = struct.Struct(">BI")
_RAW_HELLO, _RAW_HELLO_ACK, _RAW_SUBSCRIBE, _RAW_ACK = 0x01, 0x02, 0x10, 0x13


def _raw_frame(kind: int, payload: dict[str, Any]) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return _RAW_HEADER.pack(kind, len(body)) + body


class RawBareMirror(QuicConnectionProtocol):
    """HELLO, SUBSCRIBE, ``msgpack.unpackb`` of each frame, an ACK per frame: nothing else.

    ``on_entries(entries)`` gets each ENTRIES frame's decoded list of
    ``{lsn, term, data}`` maps (on the loop thread) and answers nothing; the
    ACK follows it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        loop = asyncio.get_running_loop()
        self.hello_ack: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.done: asyncio.Future[float] = loop.create_future()
        self.last_lsn = 0
        self.on_entries: Callable[[list[dict[str, Any]]], None] = lambda entries: None
        self._buffers: dict[int, bytearray] = {}

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            buffer = self._buffers.setdefault(event.stream_id, bytearray())
            buffer += event.data
            position = 0
            size = len(buffer)
            acked = False
            while size - position >= 5:
                kind, length = _RAW_HEADER.unpack_from(buffer, position)
                end = position + 5 + length
                if size < end:
                    break
                payload = msgpack.unpackb(buffer[position + 5 : end])
                position = end
                if kind == _RAW_HELLO_ACK:
                    if not self.hello_ack.done():
                        self.hello_ack.set_result(payload)
                    continue
                entries = payload["entries"]
                self.on_entries(entries)
                applied = entries[-1]["lsn"]
                self._quic.send_stream_data(
                    event.stream_id, _raw_frame(_RAW_ACK, {"applied_lsn": applied, "bytes": length})
                )
                acked = True
                if applied >= self.last_lsn and not self.done.done():
                    self.done.set_result(time.perf_counter())
            del buffer[:position]
            if acked:
                self.transmit()
        elif isinstance(event, events.ConnectionTerminated):
            for future in (self.hello_ack, self.done):
                if not future.done():
                    future.set_exception(ConnectionError(event.reason_phrase))


async def raw_bare_replicate(
    port: int,
    ca_file: str,
    database: str,
    last_lsn: int,
    on_entries: Callable[[list[dict[str, Any]]], None],
) -> float:
    """Dial, HELLO/HELLO_ACK, then SUBSCRIBE from 1: seconds from the SUBSCRIBE until the
    frame carrying ``last_lsn`` has gone through ``on_entries``."""
    configuration = bare_configuration(ca_file)
    manager = connect("127.0.0.1", port, configuration=configuration, create_protocol=RawBareMirror)
    client = await manager.__aenter__()
    try:
        assert isinstance(client, RawBareMirror)
        client.last_lsn = last_lsn
        client.on_entries = on_entries
        hello = {
            "source_cluster": CLUSTER,
            "source_database_id": database,
            "last_applied_lsn": 0,
            "protocol_version": 1,
        }
        client._quic.send_stream_data(HANDSHAKE_STREAM_ID, _raw_frame(_RAW_HELLO, hello), True)
        client.transmit()
        ack = await asyncio.wait_for(client.hello_ack, 10.0)
        if not ack.get("accepted"):
            raise RuntimeError(f"bare handshake rejected: {ack.get('error_detail')}")
        started = time.perf_counter()
        stream_id = client._quic.get_next_available_stream_id()
        client._quic.send_stream_data(stream_id, _raw_frame(_RAW_SUBSCRIBE, {"from_lsn": 1}))
        client.transmit()
        finished = await asyncio.wait_for(client.done, 300.0)
        return finished - started
    finally:
        await manager.__aexit__(None, None, None)
