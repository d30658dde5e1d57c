"""A bare aioquic mirror client for testing the source: no actors, no supervision.

It speaks PROTOCOL.md by hand so tests can check every answer of
``SourceServer``, including answers to misbehaviour a real mirror never sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from mirror_actors.errors import MalformedFrame
from mirror_actors.protocol import ALPN, Frame, FrameDecoder, encode_frame

RECV_TIMEOUT = 5.0


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

    def queue(self, stream_id: int) -> asyncio.Queue[Any]:
        return self.queues.setdefault(stream_id, asyncio.Queue())

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
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


@asynccontextmanager
async def raw_mirror(
    port: int,
    server_name: str,
    ca_file: str,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    idle_timeout: float = 10.0,
) -> AsyncIterator[RawClient]:
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], server_name=server_name, idle_timeout=idle_timeout
    )
    configuration.load_verify_locations(ca_file)
    if certfile is not None:
        configuration.load_cert_chain(certfile, keyfile)
    async with asyncio.timeout(RECV_TIMEOUT):
        manager = connect("127.0.0.1", port, configuration=configuration, create_protocol=RawClient)
        client = await manager.__aenter__()
    try:
        assert isinstance(client, RawClient)
        yield client
    finally:
        await manager.__aexit__(None, None, None)
