"""One QUIC connection of a link, living on the QUIC loop thread.

``LinkConnection.open()`` dials, verifies TLS and runs the HELLO/HELLO_ACK
handshake within the handshake timeout; afterwards the connection keeps itself
alive with PINGs and reports its end exactly once through ``on_lost``.  Every
method except the ``submit_*`` ones runs on the loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from cryptography import x509
from loguru import logger

from mirror_actors.link.classify import error_for_ack, error_for_close
from mirror_actors.link.config import LinkConfig
from mirror_actors.link.loop import QuicLoop
from mirror_actors.link.stream import LinkStream
from mirror_actors.wire.errors import (
    ErrorCode,
    HandshakeTimeout,
    HistoryDiverged,
    MalformedFrame,
    MirrorError,
    ObserverRoleViolation,
    TlsVerificationError,
    TransportError,
    error_for_code,
)
from mirror_actors.wire.frames import (
    ALPN,
    HANDSHAKE_STREAM_ID,
    Entries,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    HelloAck,
    SnapshotChunk,
    encode_frame,
    is_voter_class,
)

_ping_ids = itertools.count(1)


class _ClientProtocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, *, owner: LinkConnection) -> None:
        super().__init__(quic)
        self._owner = owner

    def quic_event_received(self, event: events.QuicEvent) -> None:
        self._owner._on_event(event)

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        self._owner.last_heard = self._loop.time()
        super().datagram_received(data, addr)
        # aioquic reports a peer's CONNECTION_CLOSE only after its draining period
        # (3 PTO); the close frame itself is already recorded, so act on it now.
        close = getattr(self._quic, "_close_event", None)
        if close is not None:
            self._owner._terminated(close.error_code, close.frame_type, close.reason_phrase)


class LinkConnection:
    """A dialed connection to one source database."""

    def __init__(
        self,
        config: LinkConfig,
        quic_loop: QuicLoop,
        on_lost: Callable[[MirrorError], None],
    ) -> None:
        self.config = config
        self._quic_loop = quic_loop
        self._on_lost = on_lost
        self._log = logger.bind(
            cluster=config.source_cluster_id, database=config.source_database_id
        )
        self._protocol: _ClientProtocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._ack: asyncio.Future[HelloAck] | None = None
        self._tls_done: asyncio.Future[None] | None = None
        self._handshake_decoder = FrameDecoder()
        self._streams: dict[int, tuple[LinkStream, FrameDecoder]] = {}
        # Streams this mirror closed: what the source had already sent on them
        # still arrives, and is dropped rather than taken for a violation.
        self._discarded_streams: set[int] = set()
        self._keepalive: asyncio.Task[None] | None = None
        self._established = False
        self._ended: MirrorError | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_heard = 0.0
        # Payload bytes delivered to streams and not yet acknowledged: a source
        # that honours flow control never lets this pass its cap by much.
        self.unacked_bytes = 0

    # -- dialing ------------------------------------------------------------------

    async def open(self, last_applied_lsn: int, last_applied_term: int = 0) -> HelloAck:
        """Dial and handshake; the accepted ack, or a typed error (the connection then closed)."""
        try:
            # The timeout starts once the dial is admitted: waiting for a slot
            # says nothing about the source.
            async with self._quic_loop.dial_slots, asyncio.timeout(self.config.handshake_timeout):
                await self._dial()
                ack = await self._handshake(last_applied_lsn, last_applied_term)
        except TimeoutError:
            self.close()
            raise HandshakeTimeout(self.config.handshake_timeout, self.config.target) from None
        except MirrorError:
            self.close()
            raise
        except OSError as error:
            self.close()
            raise TransportError(f"cannot reach {self.config.target}: {error}") from None
        except BaseException:
            self.close()
            raise
        if self._ended is not None:
            # The ack came with a violation in the same packet: the connection is gone.
            raise self._ended
        self._established = True
        self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive())
        return ack

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.config.host, self.config.port, type=socket.SOCK_DGRAM)
        family, _, _, _, address = infos[0]
        configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            server_name=self.config.tls_server_name,
            idle_timeout=self.config.idle_timeout,
        )
        configuration.cadata = _read_ca(self.config.ca_file)
        if self.config.client_cert_file is not None:
            try:
                configuration.load_cert_chain(
                    self.config.client_cert_file, self.config.client_key_file
                )
            except (OSError, ValueError) as error:
                raise TlsVerificationError(
                    f"cannot load the client certificate {self.config.client_cert_file!r} "
                    f"or its key {self.config.client_key_file!r}: {error}",
                    "fix client_cert_file and client_key_file",
                ) from None
        quic = QuicConnection(configuration=configuration)
        local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _ClientProtocol(quic, owner=self), local_addr=local, family=family
        )
        self._transport = transport
        self._protocol = protocol
        self._ack = loop.create_future()
        self._tls_done = loop.create_future()
        protocol.connect(address)
        # Not protocol.wait_connected(): it only learns of a failure after the
        # closing period, and its bare ConnectionError says nothing of why.
        await self._tls_done

    async def _handshake(self, last_applied_lsn: int, last_applied_term: int) -> HelloAck:
        assert self._protocol is not None and self._ack is not None
        if self._ended is not None:
            raise self._ended
        hello = Hello(
            self.config.source_cluster_id,
            self.config.source_database_id,
            last_applied_lsn,
            self.config.protocol_version,
            last_applied_term,
        )
        self._send(HANDSHAKE_STREAM_ID, encode_frame(hello), end_stream=True)
        ack = await self._ack
        error = error_for_ack(self.config, ack)
        if isinstance(error, HistoryDiverged):
            # The source's detail says why; the position it judged is this HELLO's.
            error = HistoryDiverged(
                f"{error.detail} (this replica's last applied LSN {last_applied_lsn}, "
                f"term {last_applied_term})",
                lsn=last_applied_lsn,
                mirror_term=last_applied_term,
            )
        if error is not None:
            if ack.accepted:  # the source accepted, we refuse: tell it why
                self.close(int(ErrorCode.CLUSTER_ID), str(error)[:200])
            raise error
        return ack

    # -- after the handshake ---------------------------------------------------------

    def submit_open_stream(self, stream: LinkStream) -> None:
        if not self._quic_loop.call_soon(self._open_stream, stream):
            stream._fail(TransportError("the QUIC loop thread is not running"))

    def submit_send(self, stream: LinkStream, data: bytes, acked_bytes: int = 0) -> None:
        if not self._quic_loop.call_soon(self._send_on, stream, data, acked_bytes):
            stream._fail(TransportError("the QUIC loop thread is not running"))

    def submit_close_stream(self, stream: LinkStream) -> None:
        self._quic_loop.call_soon(self._close_stream, stream)

    def submit_close(self, code: int = int(ErrorCode.NONE), reason: str = "") -> None:
        self._quic_loop.call_soon(self.close, code, reason[:200])

    def _open_stream(self, stream: LinkStream) -> None:
        if self._ended is not None or self._protocol is None:
            stream._fail(self._ended or TransportError("connection is not open"))
            return
        quic = self._protocol._quic
        stream_id = quic.get_next_available_stream_id()
        # Registers the stream now, so the next open gets the next id.
        quic.send_stream_data(stream_id, b"")
        self._streams[stream_id] = (stream, FrameDecoder())
        stream._opened_as(stream_id)

    def _send_on(self, stream: LinkStream, data: bytes, acked_bytes: int) -> None:
        if self._ended is not None:
            stream._fail(self._ended)
            return
        self.unacked_bytes = max(0, self.unacked_bytes - acked_bytes)
        self._send(stream.stream_id, data)

    def _close_stream(self, stream: LinkStream) -> None:
        entry = (
            self._streams.pop(stream._stream_id, None) if stream._stream_id is not None else None
        )
        if entry is None or self._protocol is None or self._ended is not None:
            return
        self._discarded_streams.add(stream.stream_id)
        quic = self._protocol._quic
        try:
            quic.send_stream_data(stream.stream_id, b"", end_stream=True)
            quic.stop_stream(stream.stream_id, ErrorCode.NONE)
        except Exception as error:  # the source may have finished or reset it already
            self._log.debug("closing stream {}: {}", stream.stream_id, error)
        self._protocol.transmit()

    def _send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        assert self._protocol is not None
        try:
            self._protocol._quic.send_stream_data(stream_id, data, end_stream)
        except Exception as error:
            self._log.debug("dropped a send on stream {}: {}", stream_id, error)
            return
        self.bytes_out += len(data)
        self._protocol.transmit()

    async def _keep_alive(self) -> None:
        # aioquic restarts its idle timer whenever it sends a PING, so a silent
        # source would be noticed up to one keepalive interval late; this
        # watchdog counts from the last datagram heard instead.
        loop = asyncio.get_running_loop()
        interval = self.config.keepalive_interval
        next_ping = loop.time() + interval
        while self._ended is None and self._protocol is not None:
            now = loop.time()
            silent_until = self.last_heard + self.config.idle_timeout
            if now >= silent_until:
                self._end(
                    TransportError(
                        f"source {self.config.target} went silent for {self.config.idle_timeout:g} s"
                    ),
                    int(ErrorCode.NONE),
                )
                return
            if now >= next_ping:
                self._protocol._quic.send_ping(next(_ping_ids))
                self._protocol.transmit()
                next_ping = now + interval
            await asyncio.sleep(min(next_ping, silent_until) - now)

    # -- closing ------------------------------------------------------------------

    def close(self, code: int = int(ErrorCode.NONE), reason: str = "") -> None:
        """Close on purpose (idempotent): nothing is reported to ``on_lost``."""
        self._shut(TransportError("connection closed by this mirror"), code, reason, report=False)

    def _terminated(self, error_code: int, frame_type: int | None, reason: str) -> None:
        if self._ended is None:
            self._end(error_for_close(self.config, error_code, frame_type, reason))

    def _end(self, error: MirrorError, code: int | None = None) -> None:
        """The network or the source ended the connection: report it once.

        ``code`` closes the connection from this side too (a violation by the source).
        """
        self._shut(error, code, str(error), report=True)

    def _shut(self, error: MirrorError, code: int | None, reason: str, *, report: bool) -> None:
        if self._ended is not None:
            return
        self._ended = error
        _fail_future(self._tls_done, error)
        _fail_future(self._ack, error)
        for stream, _ in self._streams.values():
            stream._fail(error)
        self._streams.clear()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if code is not None and self._protocol is not None:
            self._protocol.close(code, reason[:200])
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        # aioquic would keep a timer for its closing period, and re-arms it when
        # it transmits after the event being handled; with the socket gone it has
        # nothing left to do, so silence it once that event is over.
        asyncio.get_running_loop().call_soon(self._silence_timer)
        if report and self._established:
            self._log.warning("link lost: {}", error)
            self._on_lost(error)

    def _silence_timer(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol._timer is not None:
            protocol._timer.cancel()
            protocol._timer = None

    # -- events -------------------------------------------------------------------

    def _on_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self.bytes_in += len(event.data)
            if event.stream_id == HANDSHAKE_STREAM_ID:
                self._handshake_data(event.data, event.end_stream)
            else:
                self._stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            entry = self._streams.pop(event.stream_id, None)
            if entry is not None:
                entry[0]._fail(
                    TransportError(f"the source reset stream {event.stream_id}", event.error_code)
                )
        elif isinstance(event, events.HandshakeCompleted):
            if self._tls_done is not None and not self._tls_done.done():
                self._tls_done.set_result(None)
        elif isinstance(event, events.ConnectionTerminated):
            self._terminated(event.error_code, event.frame_type, event.reason_phrase)

    def _handshake_data(self, data: bytes, end_stream: bool) -> None:
        try:
            frames = self._handshake_decoder.feed(data)
            if end_stream:
                self._handshake_decoder.eof()
        except MalformedFrame as error:
            self._protocol_violation(error)
            return
        if end_stream and not frames and self._ack is not None and not self._ack.done():
            self._protocol_violation(
                MalformedFrame("the handshake stream ended without a HELLO_ACK")
            )
            return
        for frame in frames:
            if self._ack is None or self._ack.done() or not isinstance(frame, HelloAck):
                self._protocol_violation(
                    ObserverRoleViolation(f"the source sent {frame.TYPE.name}")
                    if is_voter_class(frame)
                    else MalformedFrame(
                        f"expected one HELLO_ACK on the handshake stream, got {frame.TYPE.name}"
                    )
                )
                return
            self._ack.set_result(frame)

    def _stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        entry = self._streams.get(stream_id)
        if entry is None:
            if stream_id in self._discarded_streams:
                return
            self._protocol_violation(
                MalformedFrame(f"data on stream {stream_id}, which this mirror did not open")
            )
            return
        stream, decoder = entry
        try:
            frames = decoder.feed_with_sizes(data)
        except MalformedFrame as error:
            self._protocol_violation(error)
            return
        good: list[tuple[Frame, int]] = []
        for frame, payload_size in frames:
            problem = _problem_with(frame)
            if problem is not None:
                if good:
                    stream._deliver(good)
                if isinstance(frame, Error):
                    # The source explains before it closes; do not wait for it to.
                    stream._fail(problem)
                    self._end(problem, int(ErrorCode.NONE))
                    return
                self._protocol_violation(problem)
                return
            good.append((frame, payload_size))
            self.unacked_bytes += payload_size
        if self.unacked_bytes > self.config.max_unacked_bytes:
            self._protocol_violation(
                MalformedFrame(
                    f"the source ignored flow control: {self.unacked_bytes} bytes unacknowledged, "
                    f"more than the {self.config.max_unacked_bytes} this mirror accepts"
                )
            )
            return
        if good:
            stream._deliver(good)
        if end_stream:
            self._streams.pop(stream_id, None)
            stream._fail(TransportError(f"the source finished stream {stream_id}"))

    def _protocol_violation(self, error: MirrorError) -> None:
        self._log.warning("source broke the protocol: {}", error)
        code = error.code if error.code is not None else ErrorCode.MALFORMED
        self._end(error, int(code))


def _read_ca(path: str) -> bytes:
    """The CA certificates a link trusts, checked here so a bad path is a hard error.

    aioquic reads ``cafile`` only when it verifies the source, on the loop thread,
    where a failure would surface as a mere handshake timeout.
    """
    try:
        data = Path(path).read_bytes()
        if not x509.load_pem_x509_certificates(data):
            raise ValueError("no certificate in it")
    except (OSError, ValueError) as error:
        raise TlsVerificationError(
            f"cannot load ca_file {path!r}: {error}", "fix ca_file in the link configuration"
        ) from None
    return data


def _fail_future(future: asyncio.Future[Any] | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)
        # Marks it retrieved: whoever awaits it still gets the error, and nobody
        # awaiting it is not worth a "never retrieved" warning.
        future.exception()


def _problem_with(frame: Frame) -> MirrorError | None:
    """Why a frame may not arrive on a replication stream at the mirror, if it may not."""
    if isinstance(frame, Entries | SnapshotChunk):
        return None
    if isinstance(frame, Error):
        return error_for_code(frame.code, frame.detail)
    if is_voter_class(frame):
        return ObserverRoleViolation(f"the source sent {frame.TYPE.name}")
    return MalformedFrame(f"a source does not send {frame.TYPE.name} on a replication stream")
