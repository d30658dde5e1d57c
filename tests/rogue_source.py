"""A scripted source that says whatever a test wants: for answers SourceServer never gives.

It speaks real QUIC and TLS; only its replies are scripted.  ``on_hello`` gets
the decoded HELLO and returns the raw bytes to send back on stream 0 (sent
with FIN); ``on_subscribe`` gets each SUBSCRIBE and returns the raw bytes to send
on that stream; ``close_after_hello`` closes the connection with that code
right after the handshake reply.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

import msgpack
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from mirror_actors.wire.frames import (
    ALPN,
    Ack,
    FrameDecoder,
    Hello,
    HelloAck,
    SnapshotChunk,
    Subscribe,
    encode_frame,
)


def accept(cluster: str) -> Callable[[Hello], bytes]:
    return lambda hello: encode_frame(HelloAck.accept(cluster))


class _Rogue(QuicConnectionProtocol):
    def __init__(self, *args: Any, source: RogueSource, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source
        self.decoders: dict[int, FrameDecoder] = {}

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if not isinstance(event, events.StreamDataReceived):
            return
        decoder = self.decoders.setdefault(event.stream_id, FrameDecoder())
        for frame in decoder.feed(event.data):
            self.source.received.append(frame)
            if isinstance(frame, Hello):
                self._quic.send_stream_data(event.stream_id, self.source.on_hello(frame), True)
                if self.source.close_after_hello is not None:
                    # The ack and the close go in separate datagrams, back to back.
                    self.transmit()
                    self._quic.close(self.source.close_after_hello, reason_phrase="going away")
            elif isinstance(frame, Subscribe) and self.source.on_subscribe is not None:
                self._quic.send_stream_data(
                    event.stream_id, self.source.on_subscribe(frame), self.source.finish_streams
                )
        self.transmit()


class RogueSource:
    def __init__(
        self,
        certfile: str,
        keyfile: str,
        on_hello: Callable[[Hello], bytes],
        on_subscribe: Callable[[Subscribe], bytes] | None = None,
        *,
        finish_streams: bool = False,
        close_after_hello: int | None = None,
    ) -> None:
        self.on_hello = on_hello
        self.close_after_hello = close_after_hello
        self.finish_streams = finish_streams
        self.on_subscribe = on_subscribe
        self.received: list[Any] = []
        self._configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        self._configuration.load_cert_chain(certfile, keyfile)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="rogue-source", daemon=True)
        self._server: QuicServer | None = None
        self._protocol_factory: Callable[..., QuicConnectionProtocol] = lambda *a, **k: _Rogue(
            *a, source=self, **k
        )
        self.port = 0

    def _run(self, started: concurrent.futures.Future[int]) -> None:
        loop = self._loop
        try:
            self._server = loop.run_until_complete(
                serve(
                    "127.0.0.1",
                    0,
                    configuration=self._configuration,
                    create_protocol=self._protocol_factory,
                )
            )
            assert self._server._transport is not None
            started.set_result(self._server._transport.get_extra_info("sockname")[1])
            loop.run_forever()
        finally:
            if self._server is not None:
                self._server.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def __enter__(self) -> RogueSource:
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="rogue-source")
        self._thread.start()
        self.port = started.result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class _Flood(QuicConnectionProtocol):
    def __init__(self, *args: Any, source: SnapshotFloodSource, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source
        self.decoders: dict[int, FrameDecoder] = {}
        self.stream_id: int | None = None
        self.offset = 0
        self.in_flight = 0
        self.next_lsn = 1
        self.pending = b""

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if not isinstance(event, events.StreamDataReceived):
            return
        decoder = self.decoders.setdefault(event.stream_id, FrameDecoder())
        for frame in decoder.feed(event.data):
            if isinstance(frame, Hello):
                ack = HelloAck.accept(
                    self.source.cluster,
                    snapshot_lsn=10**12,
                    snapshot_bytes_total=self.source.announced,
                )
                self._quic.send_stream_data(event.stream_id, encode_frame(ack), True)
            elif isinstance(frame, Subscribe):
                self.stream_id = event.stream_id
            elif isinstance(frame, Ack):
                self.in_flight = max(0, self.in_flight - frame.bytes)
        self._pump()
        self.transmit()

    def _pump(self) -> None:
        source = self.source
        while (
            self.stream_id is not None
            and self.in_flight < source.window
            and self.offset < source.send_bytes
        ):
            while len(self.pending) < source.chunk_size:
                item = [self.next_lsn, 1, b"s" * source.entry_size]
                self.pending += msgpack.packb(item, use_bin_type=True)
                self.next_lsn += 1
            data, self.pending = (
                self.pending[: source.chunk_size],
                self.pending[source.chunk_size :],
            )
            chunk = SnapshotChunk(
                source.cluster,
                source.database,
                10**12,
                source.announced,
                0,
                self.offset,
                data,
                False,
            )
            payload_size = len(encode_frame(chunk)) - 5
            self._quic.send_stream_data(self.stream_id, encode_frame(chunk))
            self.offset += len(data)
            self.in_flight += payload_size
            source.sent_bytes = self.offset


class SnapshotFloodSource:
    """Announces a huge snapshot and streams valid-looking chunks of it, flow-controlled.

    It sends ``send_bytes`` of a snapshot it says is ``announced`` bytes long,
    keeping at most ``window`` payload bytes unacknowledged, then goes quiet.
    """

    def __init__(
        self,
        certfile: str,
        keyfile: str,
        cluster: str,
        database: str,
        *,
        announced: int,
        send_bytes: int,
        window: int = 8 << 20,
        chunk_size: int = 1 << 19,
        entry_size: int = 60_000,
    ) -> None:
        self.cluster, self.database = cluster, database
        self.announced, self.send_bytes, self.window = announced, send_bytes, window
        self.chunk_size, self.entry_size = chunk_size, entry_size
        self.sent_bytes = 0
        self._rogue = RogueSource(certfile, keyfile, lambda hello: b"")
        self._rogue._protocol_factory = lambda *a, **k: _Flood(*a, source=self, **k)

    @property
    def port(self) -> int:
        return self._rogue.port

    def __enter__(self) -> SnapshotFloodSource:
        self._rogue.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._rogue.__exit__(*exc)


def _serve_flood_until_stdin_closes() -> None:
    """``python -m tests.rogue_source CERT KEY CLUSTER DATABASE ANNOUNCED SEND``: a flood in
    a process of its own (prints its port), so a test measures the mirror alone."""
    import sys

    cert, key, cluster, database, announced, send = sys.argv[1:7]
    with SnapshotFloodSource(
        cert, key, cluster, database, announced=int(announced), send_bytes=int(send)
    ) as flood:
        print(flood.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    _serve_flood_until_stdin_closes()
