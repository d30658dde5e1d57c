"""A bare aioquic mirror client for testing the source: no actors, no supervision.

It speaks PROTOCOL.md by hand so tests can check every answer of
``SourceServer``, including answers to misbehaviour a real mirror never sends.
Besides the decoded frames it keeps every byte each stream carried, and
``hand_frame``/``hand_frames`` encode and split frames with nothing but
``struct`` and ``msgpack``, so a check can stay independent of our codec.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import msgpack
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from mirror_actors.pki import DevPki
from mirror_actors.source import SourceServer
from mirror_actors.wire import (
    ALPN,
    Entries,
    Entry,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    HelloAck,
    MalformedFrame,
    encode_frame,
)
from tests.helpers import CLUSTER, DATABASE

RECV_TIMEOUT = 5.0
T = TypeVar("T")


class EndOfStream:
    def __repr__(self) -> str:
        return "EndOfStream"


END = EndOfStream()


class RawClient(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queues: dict[int, asyncio.Queue[Any]] = {}
        self.decoders: dict[int, FrameDecoder] = {}
        self.terminated: asyncio.Future[events.ConnectionTerminated] = (
            asyncio.get_running_loop().create_future()
        )
        self.payload_bytes_received = 0
        # Every byte received per stream, and the streams the source finished.
        self.raw: dict[int, bytearray] = {}
        self.raw_ended: set[int] = set()
        self._raw_changed = asyncio.Event()

    def queue(self, stream_id: int) -> asyncio.Queue[Any]:
        return self.queues.setdefault(stream_id, asyncio.Queue())

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self.raw.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.end_stream:
                self.raw_ended.add(event.stream_id)
            self._raw_changed.set()
            decoder = self.decoders.setdefault(event.stream_id, FrameDecoder())
            queue = self.queue(event.stream_id)
            try:
                for frame in decoder.feed(event.data):
                    queue.put_nowait(frame)
                if event.end_stream:
                    decoder.eof()
                    queue.put_nowait(END)
            except MalformedFrame as error:
                queue.put_nowait(error)
        elif isinstance(event, events.StreamReset):
            self.queue(event.stream_id).put_nowait(event)
        elif isinstance(event, events.ConnectionTerminated):
            self._raw_changed.set()
            if not self.terminated.done():
                self.terminated.set_result(event)
            for queue in self.queues.values():
                queue.put_nowait(event)

    def open_stream(self) -> int:
        return self._quic.get_next_available_stream_id()

    def send(self, stream_id: int, *frames: Frame | bytes, end: bool = False) -> None:
        data = b"".join(f if isinstance(f, bytes) else encode_frame(f) for f in frames)
        self._quic.send_stream_data(stream_id, data, end)
        self.transmit()

    async def recv(self, stream_id: int, timeout: float = RECV_TIMEOUT) -> Any:
        return await asyncio.wait_for(self.queue(stream_id).get(), timeout)

    async def closed(self, timeout: float = RECV_TIMEOUT) -> events.ConnectionTerminated:
        return await asyncio.wait_for(asyncio.shield(self.terminated), timeout)

    def send_raw(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self._quic.send_stream_data(stream_id, data, end)
        self.transmit()

    async def raw_frames(
        self, stream_id: int, count: int, timeout: float = RECV_TIMEOUT
    ) -> list[tuple[int, Any]]:
        """The first ``count`` frames on a stream, split by hand from its bytes."""

        async def enough() -> list[tuple[int, Any]]:
            while True:
                frames = hand_frames(bytes(self.raw.get(stream_id, b"")))
                if len(frames) >= count:
                    return frames[:count]
                if self.terminated.done():
                    raise AssertionError(
                        f"connection closed with {len(frames)} of {count} frames on "
                        f"stream {stream_id}"
                    )
                self._raw_changed.clear()
                await self._raw_changed.wait()

        return await asyncio.wait_for(enough(), timeout)


def hand_frame(frame_type: int, payload: dict[str, Any]) -> bytes:
    """A frame built by hand: type byte, big-endian u32 length, MessagePack map."""
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return struct.pack(">BI", frame_type, len(body)) + body


def hand_frames(data: bytes) -> list[tuple[int, Any]]:
    """Every whole frame in ``data`` as (type, decoded payload); a partial tail is left out."""
    frames: list[tuple[int, Any]] = []
    offset = 0
    while len(data) - offset >= 5:
        frame_type, length = struct.unpack_from(">BI", data, offset)
        if len(data) - offset - 5 < length:
            break
        body = data[offset + 5 : offset + 5 + length]
        frames.append((frame_type, msgpack.unpackb(body, raw=False)))
        offset += 5 + length
    return frames


@asynccontextmanager
async def raw_mirror(
    port: int,
    server_name: str,
    ca_file: str,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    idle_timeout: float = 10.0,
    wait_connected: bool = True,
) -> AsyncIterator[RawClient]:
    """A connected client; with ``wait_connected`` false it is handed over before the
    handshake, so stream data sent at once leaves with the client's TLS Finished."""
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], server_name=server_name, idle_timeout=idle_timeout
    )
    configuration.load_verify_locations(ca_file)
    if certfile is not None:
        configuration.load_cert_chain(certfile, keyfile)
    async with asyncio.timeout(RECV_TIMEOUT):
        manager = connect(
            "127.0.0.1",
            port,
            configuration=configuration,
            create_protocol=RawClient,
            wait_connected=wait_connected,
        )
        client = await manager.__aenter__()
    try:
        assert isinstance(client, RawClient)
        yield client
    finally:
        await manager.__aexit__(None, None, None)


def hand_frame_lengths(data: bytes) -> list[int]:
    """The payload length of every whole frame in ``data``, read from the headers."""
    lengths: list[int] = []
    offset = 0
    while len(data) - offset >= 5:
        (length,) = struct.unpack_from(">I", data, offset + 1)
        if len(data) - offset - 5 < length:
            break
        lengths.append(length)
        offset += 5 + length
    return lengths


# -- a mirror's moves, for tests of the source ------------------------------------------------


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run a scenario on a fresh event loop, failing it after ``timeout``."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def mirror(
    server: SourceServer, pki: DevPki, server_name: str = CLUSTER, **options: Any
) -> AbstractAsyncContextManager[RawClient]:
    """A raw client connected to ``server``, verifying it against the dev CA."""
    return raw_mirror(server.port, server_name, str(pki.ca.cert), **options)


async def handshake(client: RawClient, hello: Hello) -> HelloAck:
    """Send ``hello`` on stream 0; the one HELLO_ACK, after checking the source finished it."""
    client.send(0, hello, end=True)
    ack = await client.recv(0)
    assert isinstance(ack, HelloAck), ack
    assert await client.recv(0) is END, "the source must finish the handshake stream"
    return ack


async def accepted(client: RawClient, last_applied_lsn: int = 0, db: str = DATABASE) -> HelloAck:
    ack = await handshake(client, Hello(CLUSTER, db, last_applied_lsn))
    assert ack.accepted, ack
    return ack


async def collect_entries(client: RawClient, stream_id: int, upto_lsn: int) -> list[Entry]:
    """Every entry on a stream of ENTRIES frames, up to and including ``upto_lsn``."""
    entries: list[Entry] = []
    while not entries or entries[-1].lsn < upto_lsn:
        frame = await client.recv(stream_id)
        assert isinstance(frame, Entries), frame
        entries.extend(frame.entries)
    return entries


async def expect_error_and_close(client: RawClient, stream: int, code: ErrorCode) -> str:
    """An ERROR frame with ``code`` on ``stream``, then a close with it; the detail."""
    frame = await client.recv(stream)
    assert isinstance(frame, Error), frame
    assert frame.code == code
    closed = await client.closed()
    assert closed.error_code == code
    return frame.detail
