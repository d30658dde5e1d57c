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

from mirror_actors.link import quic_internals
from mirror_actors.pki import DevPki
from mirror_actors.wire import (
    ALPN,
    Ack,
    Frame,
    FrameDecoder,
    Hello,
    HelloAck,
    SnapshotChunk,
    Subscribe,
    encode_frame,
)
from tests.helpers import CLUSTER, WAIT, encode_frames, wait_until


def accept(cluster: str) -> Callable[[Hello], bytes]:
    """An ``on_hello`` that accepts, naming ``cluster``."""
    return lambda hello: encode_frame(HelloAck.accept(cluster))


def frames(*items: Frame | bytes) -> Callable[[Any], bytes]:
    """An ``on_hello`` or ``on_subscribe`` that answers with these frames, whatever it got."""
    data = encode_frames(*items)
    return lambda _request: data


class _Rogue(QuicConnectionProtocol):
    def __init__(self, *args: Any, source: RogueSource, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source
        self.decoders: dict[int, FrameDecoder] = {}

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        # aioquic reports a peer's close only after its draining period; read it at once.
        close = quic_internals.peer_close_event(self._quic)
        if close is not None:
            self.source.record_close(close)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.source.record_close(event)
        elif isinstance(event, events.StopSendingReceived | events.StreamReset):
            self.source.stopped_streams.add(event.stream_id)
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
    """A QUIC server on loopback whose replies are scripted (see the module's doc).

    It also records what the mirror did: every frame it sent (``received``), how it
    closed the connection (``closes``, ``close_code()``) and the streams it stopped
    or reset (``stopped_streams``); ``send`` pushes more bytes at any time.  A
    ``create_protocol`` factory replaces the scripted protocol (``SnapshotFloodSource``).
    """

    def __init__(
        self,
        certfile: str,
        keyfile: str,
        on_hello: Callable[[Hello], bytes],
        on_subscribe: Callable[[Subscribe], bytes] | None = None,
        *,
        finish_streams: bool = False,
        close_after_hello: int | None = None,
        create_protocol: Callable[..., QuicConnectionProtocol] | None = None,
    ) -> None:
        self.on_hello = on_hello
        self.close_after_hello = close_after_hello
        self.finish_streams = finish_streams
        self.on_subscribe = on_subscribe
        self.received: list[Any] = []
        self.closes: list[events.ConnectionTerminated] = []
        self.stopped_streams: set[int] = set()
        # Only the latest connection: a link that redials a thousand times leaves one here.
        self.protocol: QuicConnectionProtocol | None = None
        self._configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        self._configuration.load_cert_chain(certfile, keyfile)
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: QuicServer | None = None
        self._protocol_factory: Callable[..., QuicConnectionProtocol] = create_protocol or (
            lambda *a, **k: _Rogue(*a, source=self, **k)
        )
        self.port = 0

    # -- what the mirror did ---------------------------------------------------------------

    def record_close(self, event: events.ConnectionTerminated) -> None:
        if not self.closes or self.closes[-1] is not event:
            self.closes.append(event)

    def close_code(self, timeout: float = WAIT) -> int:
        """The error code of the mirror's CONNECTION_CLOSE, once it came."""
        wait_until(lambda: bool(self.closes), timeout, "the mirror's CONNECTION_CLOSE")
        return self.closes[0].error_code

    # -- acting on the loop thread ---------------------------------------------------------

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the rogue's loop thread and return its result."""

        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(WAIT)

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """Send more bytes on a stream of the latest mirror connection."""

        def push() -> None:
            protocol = self.protocol
            assert protocol is not None, "no mirror connected"
            protocol._quic.send_stream_data(stream_id, data, end)
            protocol.transmit()

        self.call(push)

    # -- running ---------------------------------------------------------------------------

    def _create_protocol(self, *args: Any, **kwargs: Any) -> QuicConnectionProtocol:
        protocol = self._protocol_factory(*args, **kwargs)
        self.protocol = protocol
        return protocol

    def _run(self, started: concurrent.futures.Future[int]) -> None:
        loop = self._loop
        try:
            self._server = loop.run_until_complete(
                serve(
                    "127.0.0.1",
                    0,
                    configuration=self._configuration,
                    create_protocol=self._create_protocol,
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
        if self._thread is not None:
            self._thread.join(5)


def rogue(
    pki: DevPki,
    on_hello: Callable[[Hello], bytes] | None = None,
    on_subscribe: Callable[[Subscribe], bytes] | None = None,
    **options: Any,
) -> RogueSource:
    """A ``RogueSource`` with ``CLUSTER``'s certificate that accepts every HELLO unless told."""
    pair = pki.source(CLUSTER)
    return RogueSource(
        str(pair.cert),
        str(pair.key),
        accept(CLUSTER) if on_hello is None else on_hello,
        on_subscribe,
        **options,
    )


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
        self._rogue = RogueSource(
            certfile,
            keyfile,
            lambda hello: b"",
            create_protocol=lambda *a, **k: _Flood(*a, source=self, **k),
        )

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
