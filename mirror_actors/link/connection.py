"""One QUIC connection of a link, living on the QUIC loop thread: the shell around
``MirrorSession``.

``LinkConnection.open()`` dials, verifies TLS and runs the HELLO/HELLO_ACK
handshake within the handshake timeout; afterwards the connection keeps itself
alive with PINGs and reports its end exactly once through ``on_lost``.  What
the protocol decides (the handshake's checks, which streams are this mirror's,
which frames may come where, the unacknowledged-bytes cap) is the session's;
this shell only moves bytes, runs the timers and closes.  Every method except
``open_stream`` and the ``submit_*`` ones runs on the loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from cryptography import x509
from loguru import logger

from mirror_actors.link import quic_internals
from mirror_actors.link.config import LinkConfig
from mirror_actors.link.loop import QuicLoop
from mirror_actors.link.session import (
    Action,
    CloseConnection,
    ConnectionFailed,
    DeliverFrames,
    HandshakeAccepted,
    MirrorSession,
    SendData,
    StartStream,
    StopStream,
    StreamFailed,
)
from mirror_actors.link.stream import LinkStream, StreamListener
from mirror_actors.wire.errors import (
    ErrorCode,
    HandshakeTimeout,
    MirrorError,
    TlsVerificationError,
    TransportError,
)
from mirror_actors.wire.frames import ALPN, HANDSHAKE_STREAM_ID, HelloAck

_ping_ids = itertools.count(1)


class _ClientProtocol(QuicConnectionProtocol):
    """Hands aioquic's events, and the end of each datagram's processing, to the connection."""

    def __init__(
        self,
        quic: QuicConnection,
        *,
        on_event: Callable[[events.QuicEvent], None],
        after_datagram: Callable[[], None],
    ) -> None:
        super().__init__(quic)
        # Bound over the method, not called from it: a datagram of a large frame
        # raises one event, and a Python call per event is ~2 % of replication.
        self.quic_event_received = on_event  # type: ignore[method-assign,assignment]
        self._mirror_after_datagram = after_datagram

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        super().datagram_received(data, addr)
        self._mirror_after_datagram()


class LinkConnection:
    """A dialed connection to one source database."""

    def __init__(
        self,
        config: LinkConfig,
        quic_loop: QuicLoop,
        on_lost: Callable[[MirrorError], None],
    ) -> None:
        self.config = config
        self.session = MirrorSession(config)
        """The protocol state; only the loop thread touches it."""
        self._quic_loop = quic_loop
        self._on_lost = on_lost
        self._log = logger.bind(
            cluster=config.source_cluster_id, database=config.source_database_id
        )
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._quic_connection: QuicConnection | None = None
        self._protocol: _ClientProtocol | None = None
        self._endpoint: asyncio.DatagramTransport | None = None
        self._ack: asyncio.Future[HelloAck] | None = None
        self._tls_done: asyncio.Future[None] | None = None
        # Stream handles by id, on the loop thread, from their opening until they fail.
        self._handles: dict[int, LinkStream] = {}
        # Stream ids are chosen on the opener's thread, so a handle knows its id at
        # once; the lock keeps the order in which they reach the loop thread (aioquic
        # takes a lower id opened after a higher one for a finished stream).
        self._next_stream_ids = itertools.count(HANDSHAKE_STREAM_ID + 4, 4)
        self._open_lock = threading.Lock()
        self._keepalive: asyncio.Task[None] | None = None
        self._established = False
        self._ended: MirrorError | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_heard = 0.0

    @property
    def unacked_bytes(self) -> int:
        """Payload bytes delivered to streams and not yet acknowledged (the session's count)."""
        return self.session.unacked_bytes

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
        self._event_loop = loop
        resolved = _literal_address(self.config.host, self.config.port)
        if resolved is None:
            infos = await loop.getaddrinfo(
                self.config.host, self.config.port, type=socket.SOCK_DGRAM
            )
            resolved = infos[0][0], infos[0][4]
        family, address = resolved
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
        endpoint, protocol = await loop.create_datagram_endpoint(
            lambda: _ClientProtocol(
                quic,
                on_event=self._on_event,
                after_datagram=self._after_datagram,
            ),
            local_addr=local,
            family=family,
        )
        self._quic_connection = quic
        self._endpoint = endpoint
        self._protocol = protocol
        self._ack = loop.create_future()
        self._tls_done = loop.create_future()
        protocol.connect(address)
        # Not protocol.wait_connected(): it only learns of a failure after the
        # closing period, and its bare ConnectionError says nothing of why.
        await self._tls_done

    async def _handshake(self, last_applied_lsn: int, last_applied_term: int) -> HelloAck:
        assert self._ack is not None
        if self._ended is not None:
            raise self._ended
        self._apply(self.session.start(last_applied_lsn, last_applied_term))
        # The session judges the ack; a refusal fails this future with its typed error.
        return await self._ack

    # -- streams (any thread) --------------------------------------------------------

    def open_stream(
        self,
        on_applied: Callable[[int, int | None], None] | None = None,
        listener: StreamListener | None = None,
    ) -> LinkStream:
        """A new replication stream, its id known at once; the loop thread opens it."""
        with self._open_lock:
            stream = LinkStream(self, next(self._next_stream_ids), on_applied, listener)
            taken = self._quic_loop.call_soon(self._open_stream, stream)
        if not taken:
            stream.fail(TransportError("the QUIC loop thread is not running"))
        return stream

    def submit_send(self, stream_id: int, data: bytes, acked_bytes: int = 0) -> bool:
        return self._quic_loop.call_soon(self._send_on, stream_id, data, acked_bytes)

    def submit_close_stream(self, stream_id: int) -> None:
        self._quic_loop.call_soon(self._close_stream, stream_id)

    def submit_close(self, code: int = int(ErrorCode.NONE), reason: str = "") -> None:
        self._quic_loop.call_soon(self.close, code, reason[:200])

    # -- on the loop thread --------------------------------------------------------------

    def _open_stream(self, stream: LinkStream) -> None:
        self._handles[stream.stream_id] = stream
        self._apply(self.session.open_stream(stream.stream_id))

    def _send_on(self, stream_id: int, data: bytes, acked_bytes: int) -> None:
        self._apply(self.session.send(stream_id, data, acked_bytes))

    def _close_stream(self, stream_id: int) -> None:
        self._handles.pop(stream_id, None)
        self._apply(self.session.close_stream(stream_id))

    def _apply(self, actions: list[Action]) -> None:
        """Carry out what the session decided, in order."""
        for action in actions:
            if isinstance(action, DeliverFrames):
                handle = self._handles.get(action.stream_id)
                if handle is not None:
                    handle.deliver(action.frames)
            elif isinstance(action, SendData):
                self._send(action.stream_id, action.data, action.end_stream)
            elif isinstance(action, StreamFailed):
                handle = self._handles.pop(action.stream_id, None)
                if handle is not None:
                    handle.fail(action.error)
            elif isinstance(action, StartStream):
                if self._quic_connection is not None:
                    # Creates the stream in aioquic now, in id order.
                    self._quic_connection.send_stream_data(action.stream_id, b"")
            elif isinstance(action, StopStream):
                self._stop_stream(action.stream_id)
            elif isinstance(action, CloseConnection):
                if self._protocol is not None:
                    self._protocol.close(action.code, action.reason)
            elif isinstance(action, HandshakeAccepted):
                if self._ack is not None and not self._ack.done():
                    self._ack.set_result(action.ack)
            elif isinstance(action, ConnectionFailed):
                self._teardown(action.error, report=True)

    def _send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if self._quic_connection is None or self._protocol is None:
            return
        try:
            self._quic_connection.send_stream_data(stream_id, data, end_stream)
        except Exception as error:
            self._log.debug("dropped a send on stream {}: {}", stream_id, error)
            return
        self.bytes_out += len(data)
        self._protocol.transmit()

    def _stop_stream(self, stream_id: int) -> None:
        quic, protocol = self._quic_connection, self._protocol
        if quic is None or protocol is None:
            return
        try:
            quic.send_stream_data(stream_id, b"", end_stream=True)
            quic.stop_stream(stream_id, ErrorCode.NONE)
        except Exception as error:  # the source may have finished or reset it already
            self._log.debug("closing stream {}: {}", stream_id, error)
        protocol.transmit()

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
                silent = TransportError(
                    f"source {self.config.target} went silent for {self.config.idle_timeout:g} s"
                )
                self._apply(self.session.fail(silent, int(ErrorCode.NONE)))
                return
            if now >= next_ping and self._quic_connection is not None:
                self._quic_connection.send_ping(next(_ping_ids))
                self._protocol.transmit()
                next_ping = now + interval
            await asyncio.sleep(min(next_ping, silent_until) - now)

    # -- closing ------------------------------------------------------------------

    def close(self, code: int = int(ErrorCode.NONE), reason: str = "") -> None:
        """Close on purpose (idempotent): nothing is reported to ``on_lost``."""
        self._apply(self.session.close(code, reason))
        self._teardown(
            self.session.error or TransportError("connection closed by this mirror"), report=False
        )

    def _teardown(self, error: MirrorError, *, report: bool) -> None:
        """The connection is over: release the socket and the timers, report it once."""
        if self._ended is not None:
            return
        self._ended = error
        _fail_future(self._tls_done, error)
        _fail_future(self._ack, error)
        handles, self._handles = self._handles, {}
        for handle in handles.values():  # the session failed them already; to be sure
            handle.fail(error)
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        # aioquic would keep a timer for its closing period, and re-arms it when
        # it transmits after the event being handled; with the socket gone it has
        # nothing left to do, so silence it once that event is over.
        asyncio.get_running_loop().call_soon(self._silence_timer)
        if report and self._established:
            self._log.warning("link lost: {}", error)
            self._on_lost(error)

    def _silence_timer(self) -> None:
        if self._protocol is not None:
            quic_internals.silence_timer(self._protocol)

    # -- events -------------------------------------------------------------------

    def _after_datagram(self) -> None:
        """A datagram was read: the source was heard, and may have closed."""
        if self._event_loop is not None:
            self.last_heard = self._event_loop.time()
        # aioquic reports a peer's CONNECTION_CLOSE only after its draining period
        # (3 PTO); the close frame itself is already recorded, so act on it now.
        if self._quic_connection is None:
            return
        close = quic_internals.peer_close_event(self._quic_connection)
        if close is not None:
            self._terminated(close.error_code, close.frame_type, close.reason_phrase)

    def _terminated(self, error_code: int, frame_type: int | None, reason: str) -> None:
        self._apply(self.session.connection_terminated(error_code, frame_type, reason))

    def _on_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self.bytes_in += len(event.data)
            actions = self.session.stream_data(event.stream_id, event.data, event.end_stream)
            if actions:
                self._apply(actions)
        elif isinstance(event, events.StreamReset):
            self._apply(self.session.stream_reset(event.stream_id, event.error_code))
        elif isinstance(event, events.HandshakeCompleted):
            if self._tls_done is not None and not self._tls_done.done():
                self._tls_done.set_result(None)
        elif isinstance(event, events.ConnectionTerminated):
            self._terminated(event.error_code, event.frame_type, event.reason_phrase)


def _literal_address(host: str, port: int) -> tuple[socket.AddressFamily, NetworkAddress] | None:
    """What ``getaddrinfo`` would answer first for an IP literal; None for a name.

    ``loop.getaddrinfo`` always runs in the loop's default executor: two thread
    hops and a loop turn per dial (0.18 ms median, 0.25-0.4 ms p90, on 2 shared
    cores: bench figure 1b) to learn what the literal already says.  A name, and
    a literal ``inet_pton`` refuses (a scope id, an octal part), still go there.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        text = socket.inet_ntop(family, packed)
        if family == socket.AF_INET:
            return family, (text, port)
        return family, (text, port, 0, 0)
    return None


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
