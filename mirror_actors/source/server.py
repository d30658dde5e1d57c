"""The source cluster's mirror listener: a QUIC shell around ``SourceSession``.

``SourceServer`` runs its own asyncio loop on a thread so synchronous code and
tests can drive it.  Every aioquic object lives on that thread; other threads
reach it only through ``call_soon_threadsafe``/``run_coroutine_threadsafe``.

Mutual TLS fails closed: every certificate file is loaded and checked at
``start()`` (``SourceConfigError`` names the file and the setting), no stream
data reaches a session before the handshake completed and the client
certificate verified, and any failure while verifying refuses the connection.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicFrameType
from aioquic.tls import (
    AlertBadCertificate,
    AlertCertificateExpired,
    load_pem_private_key,
    load_pem_x509_certificates,
    verify_certificate,
)
from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID
from loguru import logger
from OpenSSL import crypto

from mirror_actors.loop_thread import LoopThread
from mirror_actors.source import quic_internals
from mirror_actors.source.log import SourceStore
from mirror_actors.source.session import (
    AbortStream,
    Action,
    CloseConnection,
    ResetStream,
    SendData,
    SourceLimits,
    SourceSession,
    SourceSettings,
)
from mirror_actors.wire.errors import CRYPTO_ERROR_BASE
from mirror_actors.wire.frames import ALPN

ALERT_BAD_CERTIFICATE = 42
ALERT_CERTIFICATE_EXPIRED = 45
ALERT_INTERNAL_ERROR = 80
ALERT_CERTIFICATE_REQUIRED = 116
# How long a rejection or error reply may wait for delivery before the close goes out anyway.
CLOSE_LINGER_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 5.0
# Stream data a peer may send before its handshake completes (held, never acted on).
MAX_HELD_BYTES = 64 * 1024


class SourceConfigError(ValueError):
    """A source setting that cannot work, found at ``start()``: names the setting and the file."""

    def __init__(self, setting: str, path: str, problem: str, hint: str = "") -> None:
        self.setting = setting
        self.path = path
        self.problem = problem
        super().__init__(
            f"cannot load {setting} {path!r}: {problem}" + (f"; {hint}" if hint else "")
        )


@frozen
class ServerLoad:
    """What the server-wide limits see (PROTOCOL.md 5.3)."""

    connections: int  # past an accepted handshake, counted against max_connections
    in_flight: int  # payload bytes in flight across every connection
    waiting: int  # connections queued for the in-flight budget
    awaiting_hello: int = 0  # secured connections yet to send their HELLO (max_awaiting_hello)


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
        # Our own references to the connection and loop we run on, rather than the
        # base class's protected ``_quic`` and ``_loop``.
        self._connection = quic
        self._event_loop = asyncio.get_running_loop()
        self._server = server
        self._peer = ""
        self.session: SourceSession | None = None
        self._pending_close: CloseConnection | None = None
        self._linger: asyncio.TimerHandle | None = None
        # Stream events wait here until the handshake completed (and, with mutual
        # TLS, the client certificate verified); a refused peer's are dropped.
        self._verified = False
        self._refused = False
        self._held: list[events.QuicEvent] = []
        self._held_bytes = 0
        if server.client_ca_file is not None:
            quic_internals.request_client_certificate(quic)

    # -- aioquic hooks ------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        if self.session is None:
            self._peer = f"{addr[0]}:{addr[1]}"
            self.session = SourceSession(
                self._server.cluster_id,
                self._server.store,
                self._server.settings,
                self._peer,
                limits=self._server._limits,
            )
            self._server._connections[self.session] = self
            self.session.arrive(self._event_loop.time())
        super().datagram_received(data, addr)
        self._close_if_delivered()
        self._server._drive_budget()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        session = self.session
        if session is None:
            return
        if (
            isinstance(
                event, events.StreamDataReceived | events.StreamReset | events.StopSendingReceived
            )
            and not self._verified
        ):
            self._hold(event)
            return
        if isinstance(event, events.StreamDataReceived):
            self._apply(session.stream_data(event.stream_id, event.data, event.end_stream))
        elif isinstance(event, events.StreamReset):
            self._apply(session.stream_reset(event.stream_id))
        elif isinstance(event, events.StopSendingReceived):
            self._apply(session.stream_reset(event.stream_id))
            self._quietly(self._connection.reset_stream, event.stream_id, event.error_code)
        elif isinstance(event, events.HandshakeCompleted):
            self._handshake_completed()
        elif isinstance(event, events.ConnectionTerminated):
            self._server._connections.pop(session, None)
            self._held.clear()
            if self._linger is not None:
                self._linger.cancel()
            session.release()
            logger.bind(peer=self._peer, cluster=self._server.cluster_id).debug(
                "mirror connection ended (code 0x{:x}: {})", event.error_code, event.reason_phrase
            )
            self._server._drive_budget()

    def _hold(self, event: events.QuicEvent) -> None:
        if self._refused:
            return
        if isinstance(event, events.StreamDataReceived):
            self._held_bytes += len(event.data)
        if self._held_bytes > MAX_HELD_BYTES:
            self._refuse(
                ALERT_INTERNAL_ERROR, "too much stream data before the handshake completed"
            )
            return
        self._held.append(event)

    # -- actions ------------------------------------------------------------

    def pump(self) -> None:
        if self.session is not None and self._verified:
            self._apply(self.session.pump())
            self.transmit()

    def tick(self, now: float) -> None:
        # Unverified sessions too: the HELLO deadline counts from the first datagram.
        if self.session is not None:
            actions = self.session.tick(now)
            if actions:
                self._apply(actions)
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
                    self._connection.send_stream_data,
                    action.stream_id,
                    action.data,
                    action.end_stream,
                )
            elif isinstance(action, AbortStream):
                self._quietly(self._connection.stop_stream, action.stream_id, action.code)
            elif isinstance(action, ResetStream):
                self._quietly(self._connection.reset_stream, action.stream_id, action.code)
            elif action.after_streams:
                self._pending_close = action
                self._linger = self._event_loop.call_later(CLOSE_LINGER_SECONDS, self._close_now)
                # Push the reply out now; the close waits until the peer acknowledged it.
                self.transmit()
            else:
                self.close(action.code, action.reason[:200])

    def _close_if_delivered(self) -> None:
        pending = self._pending_close
        if pending is None:
            return
        if all(
            quic_internals.stream_delivered(self._connection, stream_id)
            for stream_id in pending.after_streams
        ):
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
            try:
                problem = _client_certificate_problem(self._connection, ca_file)
            except Exception as error:  # fail closed: whatever broke, this peer is not verified
                log.warning(
                    "could not verify a mirror's client certificate against client_ca_file {!r}: "
                    "{}: {}",
                    ca_file,
                    type(error).__name__,
                    error,
                )
                problem = (
                    ALERT_INTERNAL_ERROR,
                    "this source could not verify the client certificate (its client CA "
                    "file is unusable); connection refused",
                )
            if problem is not None:
                alert, detail = problem
                log.warning("refused mirror without a valid client certificate: {}", detail)
                self._refuse(alert, detail)
                return
        if self.session is not None:
            refusal = self.session.secured()
            if refusal:
                self._held.clear()
                self._apply(refusal)
                return
        log.info("mirror connected")
        self._verified = True
        held, self._held = self._held, []
        for event in held:
            if self._refused or self.session is None or self.session.closing:
                break
            self.quic_event_received(event)

    def _refuse(self, alert: int, detail: str) -> None:
        self._refused = True
        self._held.clear()
        self._connection.close(
            error_code=CRYPTO_ERROR_BASE + alert,
            frame_type=QuicFrameType.CRYPTO,
            reason_phrase=detail[:200],
        )
        self.transmit()


def _client_certificate_problem(quic: QuicConnection, ca_file: str) -> tuple[int, str] | None:
    # aioquic checks the client's signature but never its chain: do it here.
    # The CA file is read again for each connection (so a rotated CA applies at
    # once); a file that broke since start() raises, and the caller refuses.
    _load_client_ca(ca_file)
    certificate = quic_internals.peer_certificate(quic)
    if certificate is None:
        return ALERT_CERTIFICATE_REQUIRED, "this source requires a client certificate (mutual TLS)"
    try:
        verify_certificate(
            certificate, chain=quic_internals.peer_certificate_chain(quic), cafile=ca_file
        )
    except AlertCertificateExpired as error:
        return ALERT_CERTIFICATE_EXPIRED, f"client certificate rejected: {error}"
    except AlertBadCertificate as error:
        return ALERT_BAD_CERTIFICATE, f"client certificate rejected: {error}"
    # The chain alone is not enough: one CA may sign source (server) certificates
    # too, and a source's certificate must not pass for a mirror's.
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return (
            ALERT_BAD_CERTIFICATE,
            "client certificate rejected: it is not for client authentication "
            "(its extended key usage lacks clientAuth)",
        )
    return None


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SourceConfigError(setting, path, "no such file") from None
    except IsADirectoryError:
        raise SourceConfigError(setting, path, "it is a directory, not a PEM file") from None
    except OSError as error:
        raise SourceConfigError(
            setting, path, f"cannot read it: {error.strerror or error}"
        ) from None


def _certificates(setting: str, path: str, data: bytes, hint: str) -> list[Any]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        what = " (it holds a private key)" if b"PRIVATE KEY-----" in data else ""
        raise SourceConfigError(setting, path, f"no certificate in it{what}", hint)
    try:
        certificates = load_pem_x509_certificates(data)
    except Exception as error:  # cryptography raises ValueError and others for bad PEM
        reason = str(error).split(".")[0][:120]
        raise SourceConfigError(
            setting, path, f"not a PEM certificate file ({reason})", hint
        ) from None
    if not certificates:
        raise SourceConfigError(setting, path, "no certificate in it", hint)
    return certificates


def _load_client_ca(path: str) -> None:
    """Check ``client_ca_file`` the way verification will read it: PEM, at least one certificate."""
    setting = "client_ca_file"
    hint = "give the PEM file of the CA that signs the mirrors' client certificates"
    _certificates(setting, path, _read(setting, path), hint)
    try:
        crypto.X509Store().load_locations(path)
    except Exception as error:
        raise SourceConfigError(setting, path, f"OpenSSL cannot load it ({error})", hint) from None


def check_source_files(certfile: str, keyfile: str, client_ca_file: str | None) -> None:
    """Load and check every file a source needs; ``SourceConfigError`` for the first that fails."""
    cert_hint = "give the PEM certificate of this source, with the cluster id as a DNS name"
    cert_data = _read("certfile", certfile)
    certificate = _certificates("certfile", certfile, cert_data, cert_hint)[0]
    key_data = _read("keyfile", keyfile)
    try:
        key = load_pem_private_key(key_data, password=None)
    except Exception as error:
        raise SourceConfigError(
            "keyfile",
            keyfile,
            f"not an unencrypted PEM private key ({type(error).__name__}: {error})",
            "give the private key that belongs to certfile",
        ) from None
    if key.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    ) != certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo):
        raise SourceConfigError(
            "keyfile",
            keyfile,
            f"it is not the key of the certificate in certfile {certfile!r}",
            "give the private key that belongs to certfile",
        )
    if client_ca_file is not None:
        _load_client_ca(client_ca_file)


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
        # Every live connection, by its session (the budget's round robin names sessions).
        self._connections: dict[SourceSession, _MirrorConnection] = {}
        self._limits = SourceLimits.from_settings(settings)
        self._tick_handle: asyncio.TimerHandle | None = None
        self._pump_lock = threading.Lock()
        self._pump_scheduled = False
        self._log = logger.bind(cluster=cluster_id, database=None)

    # -- lifecycle ----------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._loop_thread.running

    def start(self) -> SourceServer:
        """Listen; ``SourceConfigError`` (before anything starts) if a certificate file is unusable."""
        if self.running:
            return self
        quic_internals.require_internals()
        check_source_files(self.certfile, self.keyfile, self.client_ca_file)
        configuration = self._configuration()
        self._limits = SourceLimits.from_settings(self.settings)
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
        except TimeoutError:
            # A loop thread too busy to close them all in time (thousands of
            # connections on a starved machine): stopping the loop ends them anyway,
            # and a stop must not fail for it.
            self._log.warning(
                "closing {} mirror connections took over {} s; stopping without waiting",
                len(self._connections), STOP_TIMEOUT_SECONDS,
            )  # fmt: skip
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
            return [_describe(connection) for connection in self._connections.values()]

        return self._loop_thread.submit(collect()).result(STOP_TIMEOUT_SECONDS)

    def load(self) -> ServerLoad:
        """The server-wide connection count and in-flight total (asks the loop thread)."""
        if not self.running:
            return ServerLoad(0, 0, 0)

        async def collect() -> ServerLoad:
            limits = self._limits
            return ServerLoad(
                limits.connections, limits.in_flight, len(limits.waiting()), limits.awaiting_hello
            )

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
        port = quic_internals.bound_port(self._quic_server)
        self._schedule_tick()
        return port

    def _schedule_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._tick_handle = loop.call_later(self.settings.tick_interval, self._tick)

    def _tick(self) -> None:
        """The stall rule's clock: every ``tick_interval`` each session decides with ``now``."""
        now = asyncio.get_running_loop().time()
        try:
            for connection in list(self._connections.values()):
                connection.tick(now)
            self._drive_budget()
        finally:
            self._schedule_tick()

    def _drive_budget(self) -> None:
        """Hand freed server-wide budget to the connections queued for it, in turn."""
        limits = self._limits
        if not limits.runnable:
            return
        for session, actions in limits.drive():
            connection = self._connections.get(session)
            if connection is not None:
                connection._apply(actions)
                connection.transmit()

    def _release(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._quic_server is not None:
            self._quic_server.close()
            self._quic_server = None
        self._connections.clear()

    def _create_protocol(
        self, quic: QuicConnection, stream_handler: Any = None
    ) -> _MirrorConnection:
        return _MirrorConnection(quic, stream_handler, server=self)

    async def _close_all(self) -> None:
        for connection in list(self._connections.values()):
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
        for connection in list(self._connections.values()):
            connection.pump()
        self._drive_budget()


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
