"""The source cluster's mirror listener: a QUIC shell around ``SourceSession``.

``SourceServer`` runs its own asyncio loop on a thread so synchronous code and
tests can drive it.  Every aioquic object lives on that thread; other threads
reach it only through ``call_soon_threadsafe``/``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import attrs
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicFrameType
from aioquic.tls import AlertBadCertificate, AlertCertificateExpired, verify_certificate
from attrs import frozen
from loguru import logger

from .errors import CRYPTO_ERROR_BASE
from .loop_thread import LoopThread
from .protocol import ALPN
from .source_session import (
    AbortStream,
    Action,
    CloseConnection,
    ResetStream,
    SendData,
    SourceSession,
    SourceSettings,
)
from .store import SourceStore

ALERT_BAD_CERTIFICATE = 42
ALERT_CERTIFICATE_EXPIRED = 45
ALERT_CERTIFICATE_REQUIRED = 116
# How long a rejection or error reply may wait for delivery before the close goes out anyway.
CLOSE_LINGER_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 5.0


@frozen
class ConnectionInfo:
    """One mirror connection as the source sees it."""

    peer: str
    database_id: str | None
    state: str
    in_flight: int
    paused: bool
    bytes_sent: int
    subscriptions: tuple[tuple[int, int], ...]  # (stream id, applied LSN acked)


class _MirrorConnection(QuicConnectionProtocol):
    """One mirror's QUIC connection; moves events into the session and actions out."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, server: SourceServer):
        super().__init__(quic, stream_handler)
        self._server = server
        self._peer = ""
        self.session: SourceSession | None = None
        self._pending_close: CloseConnection | None = None
        self._linger: asyncio.TimerHandle | None = None
        if server.client_ca_file is not None:
            _request_client_certificate(quic)

    # -- aioquic hooks ------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        if self.session is None:
            self._peer = f"{addr[0]}:{addr[1]}"
            self.session = SourceSession(
                self._server.cluster_id, self._server.store, self._server.settings, self._peer
            )
            self._server._connections.add(self)
        super().datagram_received(data, addr)
        self._close_if_delivered()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        session = self.session
        if session is None:
            return
        if isinstance(event, events.StreamDataReceived):
            self._apply(session.stream_data(event.stream_id, event.data, event.end_stream))
        elif isinstance(event, events.StreamReset):
            self._apply(session.stream_reset(event.stream_id))
        elif isinstance(event, events.StopSendingReceived):
            self._apply(session.stream_reset(event.stream_id))
            self._quietly(self._quic.reset_stream, event.stream_id, event.error_code)
        elif isinstance(event, events.HandshakeCompleted):
            self._handshake_completed()
        elif isinstance(event, events.ConnectionTerminated):
            self._server._connections.discard(self)
            if self._linger is not None:
                self._linger.cancel()
            logger.bind(peer=self._peer, cluster=self._server.cluster_id).debug(
                "mirror connection ended (code 0x{:x}: {})", event.error_code, event.reason_phrase
            )

    # -- actions ------------------------------------------------------------

    def pump(self) -> None:
        if self.session is not None:
            self._apply(self.session.pump())
            self.transmit()

    def shutdown(self) -> None:
        if self.session is not None:
            self._apply(self.session.shutdown())
        else:
            self.close()
        self.transmit()

    def _apply(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, SendData):
                self._quietly(
                    self._quic.send_stream_data, action.stream_id, action.data, action.end_stream
                )
            elif isinstance(action, AbortStream):
                self._quietly(self._quic.stop_stream, action.stream_id, action.code)
            elif isinstance(action, ResetStream):
                self._quietly(self._quic.reset_stream, action.stream_id, action.code)
            elif action.after_streams:
                self._pending_close = action
                self._linger = self._loop.call_later(CLOSE_LINGER_SECONDS, self._close_now)
                # Push the reply out now; the close waits until the peer acknowledged it.
                self.transmit()
            else:
                self.close(action.code, action.reason[:200])

    def _close_if_delivered(self) -> None:
        pending = self._pending_close
        if pending is None:
            return
        # aioquic has no delivery event for stream data; its stream senders know.
        streams = getattr(self._quic, "_streams", {})
        for stream_id in pending.after_streams:
            stream = streams.get(stream_id)
            if stream is not None and not stream.sender.is_finished:
                return
        self._close_now()

    def _close_now(self) -> None:
        pending, self._pending_close = self._pending_close, None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if pending is not None:
            self.close(pending.code, pending.reason[:200])

    def _quietly(self, operation: Any, *args: Any) -> None:
        # A stream the peer already reset or stopped refuses writes; that is the
        # peer's doing and must not take the connection (or the loop) down.
        try:
            operation(*args)
        except Exception as error:
            logger.bind(peer=self._peer, cluster=self._server.cluster_id).debug(
                "dropped a write on a closed stream: {}", error
            )

    # -- mutual TLS ---------------------------------------------------------

    def _handshake_completed(self) -> None:
        log = logger.bind(peer=self._peer, cluster=self._server.cluster_id)
        ca_file = self._server.client_ca_file
        if ca_file is not None:
            problem = _client_certificate_problem(self._quic, ca_file)
            if problem is not None:
                alert, detail = problem
                log.warning("refused mirror without a valid client certificate: {}", detail)
                self._quic.close(
                    error_code=CRYPTO_ERROR_BASE + alert,
                    frame_type=QuicFrameType.CRYPTO,
                    reason_phrase=detail[:200],
                )
                self.transmit()
                return
        log.info("mirror connected")


def _request_client_certificate(quic: QuicConnection) -> None:
    # aioquic 1.x can ask a client for its certificate only through a private
    # flag of its TLS context, which exists once the first datagram arrives.
    initialize = quic._initialize

    def initialize_requesting_certificate(peer_cid: bytes) -> None:
        initialize(peer_cid)
        quic.tls._request_client_certificate = True

    quic._initialize = initialize_requesting_certificate  # type: ignore[method-assign]


def _client_certificate_problem(quic: QuicConnection, ca_file: str) -> tuple[int, str] | None:
    # aioquic checks the client's signature but never its chain: do it here.
    certificate = quic.tls._peer_certificate
    if certificate is None:
        return ALERT_CERTIFICATE_REQUIRED, "this source requires a client certificate (mutual TLS)"
    try:
        verify_certificate(certificate, chain=quic.tls._peer_certificate_chain, cafile=ca_file)
    except AlertCertificateExpired as error:
        return ALERT_CERTIFICATE_EXPIRED, f"client certificate rejected: {error}"
    except AlertBadCertificate as error:
        return ALERT_BAD_CERTIFICATE, f"client certificate rejected: {error}"
    return None


class SourceServer:
    """A source cluster's mirror listener (PROTOCOL.md section 5) on its own loop thread.

    ``start()`` returns once it listens; ``port`` is then the bound port.  Stop it
    with ``stop()`` or use it as a context manager.  Pass ``store`` to keep data
    across a stop and a new start (a source restart).
    """

    def __init__(
        self,
        cluster_id: str,
        databases: Iterable[str] = ("orders",),
        *,
        certfile: str,
        keyfile: str,
        host: str = "127.0.0.1",
        port: int = 0,
        client_ca_file: str | None = None,
        store: SourceStore | None = None,
        settings: SourceSettings | None = None,
        flow_control_cap: int | None = None,
        idle_timeout: float = 30.0,
    ) -> None:
        self.cluster_id = cluster_id
        self.store = store if store is not None else SourceStore()
        for database_id in databases:
            self.store.ensure(database_id)
        if settings is None:
            settings = SourceSettings()
        if flow_control_cap is not None:
            settings = attrs.evolve(settings, flow_control_cap=flow_control_cap)
        self.settings = settings
        self.certfile = str(certfile)
        self.keyfile = str(keyfile)
        self.host = host
        self.client_ca_file = str(client_ca_file) if client_ca_file is not None else None
        self.idle_timeout = idle_timeout
        self._requested_port = port
        self.port = 0
        self._loop_thread = LoopThread(f"source-{cluster_id}")
        self._quic_server: QuicServer | None = None
        self._connections: set[_MirrorConnection] = set()
        self._pump_lock = threading.Lock()
        self._pump_scheduled = False
        self._log = logger.bind(cluster=cluster_id, database=None)

    # -- lifecycle ----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._loop_thread.running

    def start(self) -> SourceServer:
        if self.running:
            return self
        configuration = self._configuration()
        self._pump_scheduled = False
        self._loop_thread = LoopThread(f"source-{self.cluster_id}")
        self.port = self._loop_thread.start(lambda: self._listen(configuration))
        for database_id in self.store.database_ids:
            self.store[database_id].add_listener(self._on_append)
        self._log.info("source listening on {}:{}", self.host, self.port)
        return self

    def stop(self) -> None:
        """Close every mirror connection with SOURCE_SHUTDOWN and stop listening."""
        if not self.running:
            return
        for database_id in self.store.database_ids:
            self.store[database_id].remove_listener(self._on_append)
        try:
            self._loop_thread.submit(self._close_all()).result(STOP_TIMEOUT_SECONDS)
        finally:
            self._loop_thread.stop(teardown=self._release)
        self._log.info("source stopped")

    def __enter__(self) -> SourceServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- data ---------------------------------------------------------------

    def append(self, database_id: str, data: bytes) -> int:
        """Append an entry to a database's log; subscribed mirrors receive it at once."""
        return self.store[database_id].append(data)

    def compact(self, database_id: str, upto_lsn: int) -> None:
        """Fold the log up to ``upto_lsn`` into the snapshot."""
        self.store[database_id].compact(upto_lsn)

    def connections(self) -> list[ConnectionInfo]:
        """What each connected mirror looks like from here (asks the loop thread)."""
        if not self.running:
            return []

        async def collect() -> list[ConnectionInfo]:
            return [_describe(connection) for connection in self._connections]

        return self._loop_thread.submit(collect()).result(STOP_TIMEOUT_SECONDS)

    # -- loop thread ----------------------------------------------------------

    def _configuration(self) -> QuicConfiguration:
        configuration = QuicConfiguration(
            is_client=False, alpn_protocols=[ALPN], idle_timeout=self.idle_timeout
        )
        configuration.load_cert_chain(self.certfile, self.keyfile)
        if self.client_ca_file is not None:
            configuration.verify_mode = ssl.CERT_REQUIRED
        return configuration

    async def _listen(self, configuration: QuicConfiguration) -> int:
        self._quic_server = await serve(
            self.host,
            self._requested_port,
            configuration=configuration,
            create_protocol=self._create_protocol,
        )
        transport = self._quic_server._transport
        assert transport is not None
        port: int = transport.get_extra_info("sockname")[1]
        return port

    def _release(self) -> None:
        if self._quic_server is not None:
            self._quic_server.close()
            self._quic_server = None
        self._connections.clear()

    def _create_protocol(
        self, quic: QuicConnection, stream_handler: Any = None
    ) -> _MirrorConnection:
        return _MirrorConnection(quic, stream_handler, server=self)

    async def _close_all(self) -> None:
        for connection in list(self._connections):
            connection.shutdown()

    def _on_append(self, database_id: str, lsn: int) -> None:
        # Called on the appending thread: coalesce into one pump on the loop thread.
        with self._pump_lock:
            if self._pump_scheduled:
                return
            self._pump_scheduled = True
        if not self._loop_thread.call_soon(self._pump_all):
            # Stopped or not yet started (an append racing stop() or start()):
            # nothing will run the pump, so the next append must schedule it.
            with self._pump_lock:
                self._pump_scheduled = False

    def _pump_all(self) -> None:
        with self._pump_lock:
            self._pump_scheduled = False
        for connection in list(self._connections):
            connection.pump()


def _describe(connection: _MirrorConnection) -> ConnectionInfo:
    session = connection.session
    assert session is not None
    return ConnectionInfo(
        peer=connection._peer,
        database_id=session.database.database_id if session.database else None,
        state=session.state.value,
        in_flight=session.in_flight,
        paused=session.paused,
        bytes_sent=session.bytes_sent,
        subscriptions=tuple((s.stream_id, s.applied_lsn) for s in session.subscriptions()),
    )
