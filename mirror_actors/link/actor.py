"""``SourceLink``: one source link (cluster + database) as a supervised pykka actor.

The actor owns the link's state and answers its mailbox; the QUIC work runs on
the process's QUIC loop thread and comes back as messages.  The actor never
waits for the loop, so a ``Disconnect`` can always cancel a dial in progress.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import pykka
from attrs import frozen
from loguru import logger

from mirror_actors.link.config import LinkConfig
from mirror_actors.link.connection import LinkConnection
from mirror_actors.link.loop import QuicLoop
from mirror_actors.link.state import LinkLifecycle, LinkState, LinkStatus
from mirror_actors.link.stream import LinkStream, StreamListener
from mirror_actors.wire.errors import LinkNotConnected, MirrorError, MirrorPromoted, TransportError
from mirror_actors.wire.frames import HelloAck
from supervisors import DeferredReplies, ExponentialBackoff, SupervisedActor, reply, reply_error
from supervisors.backoff import JitterKind

# -- the mailbox ----------------------------------------------------------------


@frozen
class Connect:
    """Dial and handshake; answers the accepted HELLO_ACK or raises the typed error.

    ``last_applied_lsn`` None keeps the position the link last recorded;
    ``last_applied_term`` is the term of that entry (0: unknown, or nothing held),
    which the source checks against its own history (PROTOCOL.md section 5.1).
    """

    last_applied_lsn: int | None = None
    last_applied_term: int = 0


@frozen
class SetPosition:
    """Where the next HELLO starts: what the link's user holds now (a resync sends 0, 0)."""

    last_applied_lsn: int
    last_applied_term: int = 0


@frozen
class Disconnect:
    """Close the connection (or cancel a dial); a supervisor will not bring it back."""


@frozen
class OpenStream:
    """Answers a ``LinkStream``; fails at once with ``LinkNotConnected`` when not connected.

    With a ``listener`` the stream pushes frames to it (on the QUIC loop thread)
    instead of queueing them for ``recv``.  With ``reply_to`` (an actor, which must
    not wait on this link) the answer comes as a ``StreamOpened`` message instead.
    """

    listener: StreamListener | None = None
    reply_to: pykka.ActorRef[Any] | None = None


@frozen(eq=False)
class StreamOpened:
    """The answer to an ``OpenStream`` with ``reply_to``: the stream, or why there is none."""

    link: pykka.ActorRef[Any]
    request: OpenStream
    stream: LinkStream | None
    error: MirrorError | None


@frozen
class FailLink:
    """The link's user found the source breaking the protocol: drop the connection as failed.

    The connection closes with the error's code and the failure goes to the
    supervisor like any other (a transient one is retried with backoff).
    """

    error: MirrorError
    stream: LinkStream | None = None
    """The stream the problem came on: a report about an older connection is ignored."""


@frozen
class _Applied:
    """A stream of this link acknowledged up to ``lsn`` (whose entry has ``term``, if known)."""

    lsn: int
    term: int | None


@frozen
class LinkUp:
    """Told to a link's watcher once a connection is established."""

    link: pykka.ActorRef[Any]
    ack: HelloAck
    status: LinkStatus


@frozen
class LinkDialing:
    """Told to a link's watcher when a dial starts, so it knows the link's state without asking."""

    link: pykka.ActorRef[Any]
    status: LinkStatus


@frozen
class LinkDown:
    """Told to a link's watcher when a connection or a dial ends, on purpose or not."""

    link: pykka.ActorRef[Any]
    error: MirrorError | None
    status: LinkStatus


@frozen
class Promote:
    """The mirror was promoted: disconnect for good; later ``Connect`` raises ``MirrorPromoted``."""


@frozen
class GetStatus:
    """Answers a ``LinkStatus``."""


@frozen
class _DialFinished:
    generation: int
    connection: LinkConnection
    ack: HelloAck | None
    error: MirrorError | None


@frozen
class _ConnectionLost:
    generation: int
    error: MirrorError


def link_strategy(
    *,
    base: float = 0.5,
    factor: float = 2.0,
    max_delay: float = 30.0,
    jitter: float = 0.25,
    jitter_kind: JitterKind = JitterKind.UNIFORM,
    **kwargs: Any,
) -> ExponentialBackoff:
    """The default strategy for links: 0.5 s doubling to 30 s, ±25 % jitter, hard errors escalate.

    Other keywords (``reset_after``, ``max_restarts``, ``within``, ``random``,
    ``escalate_on``, ``scope``) go to ``ExponentialBackoff``.
    """
    return ExponentialBackoff(
        base=base,
        factor=factor,
        max_delay=max_delay,
        jitter=jitter,
        jitter_kind=jitter_kind,
        **kwargs,
    )


class SourceLink(DeferredReplies, SupervisedActor):
    """The mirror side of PROTOCOL.md for one source database.

    Supervised (``parent`` given), it connects as soon as it starts and reports
    every failure to its supervisor, which restarts it in place after the
    backoff delay.  Standalone, it waits for ``Connect``.

    ``quic_loop`` is the loop thread that does its QUIC I/O; by default the
    process's shared one (``QuicLoop.acquire()``), else one its caller owns,
    starts and stops.
    """

    def __init__(
        self,
        config: LinkConfig,
        *,
        parent: pykka.ActorRef[Any] | None = None,
        watcher: pykka.ActorRef[Any] | None = None,
        last_applied_lsn: int = 0,
        last_applied_term: int = 0,
        clock: Callable[[], float] = time.time,
        quic_loop: QuicLoop | None = None,
    ) -> None:
        super().__init__(parent=parent)
        self.config = config
        self._clock = clock
        self._lifecycle = LinkLifecycle()
        self._log = logger.bind(
            cluster=config.source_cluster_id, database=config.source_database_id
        )
        self._quic_loop: QuicLoop | None = None
        # A loop handed in is its owner's: never acquired, released or replaced here.
        self._given_loop = quic_loop
        self._generation = 0
        self._connection: LinkConnection | None = None
        self._dial: concurrent.futures.Future[None] | None = None
        self._ack: HelloAck | None = None
        self._waiters: list[pykka.Future[Any]] = []
        self._wanted = parent is not None
        self._promoted = False
        self._watcher = watcher
        self.last_applied_lsn = last_applied_lsn
        self.last_applied_term = last_applied_term
        # Traffic of connections already gone, so the status counts the link's whole life.
        self._bytes_in_before = 0
        self._bytes_out_before = 0

    # -- lifecycle ------------------------------------------------------------------

    def on_start(self) -> None:
        self._quic_loop = self._given_loop if self._given_loop is not None else QuicLoop.acquire()
        self._log.debug("link started ({})", "supervised" if self.supervised else "standalone")
        if self._wanted:
            self._start_dial()

    def on_stop(self) -> None:
        self._shut("link stopped")

    def _before_abnormal_exit(self) -> None:
        self._shut("link crashed")

    def on_restart(self) -> None:
        if self._wanted and not self._promoted and self._lifecycle.state is LinkState.DISCONNECTED:
            self._log.info("reconnecting (attempt {})", self._lifecycle.attempts + 1)
            self._start_dial()

    def _shut(self, why: str) -> None:
        self._cancel(LinkNotConnected(why, "start a new link"))
        self._lifecycle.closed()
        if self._quic_loop is not None:
            self._quic_loop = None
            if self._given_loop is None:
                QuicLoop.release()

    # -- messages -------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        match message:
            case Connect(last_applied_lsn=lsn, last_applied_term=term):
                return self._connect(lsn, term)
            case SetPosition(last_applied_lsn=lsn, last_applied_term=term):
                self.last_applied_lsn, self.last_applied_term = lsn, term
                return None
            case Disconnect():
                self._wanted = False
                self._cancel(LinkNotConnected("cancelled by Disconnect"))
                return None
            case OpenStream(listener=listener, reply_to=None):
                return self._open_stream(listener)
            case OpenStream(listener=listener, reply_to=reply_to) if reply_to is not None:
                self._answer_open_stream(message, reply_to, listener)
                return None
            case FailLink(error=error, stream=stream):
                self._fail_connection(error, stream)
                return None
            case _Applied(lsn=lsn, term=term):
                if lsn > self.last_applied_lsn:
                    self.last_applied_lsn = lsn
                    self.last_applied_term = term if term is not None else 0
                elif lsn == self.last_applied_lsn and term is not None:
                    self.last_applied_term = term
                return None
            case Promote():
                self._promoted = True
                self._wanted = False
                self._cancel(MirrorPromoted("the link closed on promotion"))
                self._lifecycle.closed()
                self._log.warning("mirror promoted: link closed for good")
                return None
            case GetStatus():
                return self.status()
            case _DialFinished():
                self._dial_finished(message)
                return None
            case _ConnectionLost():
                self._connection_lost(message)
                return None
        return super().on_receive(message)

    def status(self) -> LinkStatus:
        connection = self._connection
        lifecycle = self._lifecycle
        return LinkStatus(
            name=self.config.name,
            state=lifecycle.state,
            connected_since=lifecycle.connected_since,
            attempts=lifecycle.attempts,
            consecutive_failures=lifecycle.consecutive_failures,
            last_error=lifecycle.last_error,
            bytes_in=self._bytes_in_before + (connection.bytes_in if connection else 0),
            bytes_out=self._bytes_out_before + (connection.bytes_out if connection else 0),
            last_applied_lsn=self.last_applied_lsn,
            snapshot_lsn=self._ack.snapshot_lsn if self._ack and self._ack.has_snapshot else None,
        )

    def _connect(self, last_applied_lsn: int | None, last_applied_term: int) -> Any:
        if self._promoted:
            raise MirrorPromoted("Connect refused")
        if last_applied_lsn is not None:
            self.last_applied_lsn = last_applied_lsn
            self.last_applied_term = last_applied_term
        self._wanted = True
        if self._lifecycle.state is LinkState.CONNECTED:
            return self._ack
        waiter = self.defer_reply()
        if waiter is not None:
            self._waiters.append(waiter)
        if self._lifecycle.state is LinkState.DISCONNECTED:
            self._start_dial()
        return None

    def _open_stream(self, listener: StreamListener | None) -> LinkStream:
        connection = self._connection
        if self._lifecycle.state is not LinkState.CONNECTED or connection is None:
            hint = (
                "wait for it to connect (a watcher gets LinkUp)"
                if self._lifecycle.state is LinkState.CONNECTING
                else "send Connect first"
            )
            raise LinkNotConnected(f"{self.config.name} is {self._lifecycle.state.value}", hint)
        return connection.open_stream(on_applied=self._record_applied, listener=listener)

    def _answer_open_stream(
        self,
        request: OpenStream,
        reply_to: pykka.ActorRef[Any],
        listener: StreamListener | None,
    ) -> None:
        try:
            stream = self._open_stream(listener)
        except MirrorError as error:
            _tell(reply_to, StreamOpened(self.actor_ref, request, None, error))
            return
        _tell(reply_to, StreamOpened(self.actor_ref, request, stream, None))

    def _record_applied(self, lsn: int, term: int | None) -> None:
        # Called on whatever thread acks: the state change goes through the mailbox.
        _tell(self.actor_ref, _Applied(lsn, term))

    # -- dialing --------------------------------------------------------------------

    def _start_dial(self) -> None:
        assert self._quic_loop is not None
        self._generation += 1
        generation = self._generation
        self._lifecycle.dial_started()
        me = self.actor_ref
        connection = LinkConnection(
            self.config,
            self._quic_loop,
            on_lost=lambda error: _tell(me, _ConnectionLost(generation, error)),
        )
        self._log.info(
            "dialing {} (last applied LSN {})", self.config.target, self.last_applied_lsn
        )
        self._notify_watcher(LinkDialing(me, self.status()))
        dial = _dial_and_report(
            me, generation, connection, self.last_applied_lsn, self.last_applied_term
        )
        try:
            self._dial = self._quic_loop.submit(dial)
        except Exception as error:
            # The loop thread is gone. Reported as a failed dial, so the link is
            # DISCONNECTED again and its next attempt dials on a new loop instead
            # of finding the link CONNECTING with nothing running.
            dial.close()
            self._log.exception("could not start a dial")
            if self._given_loop is None:
                QuicLoop.release()
                self._quic_loop = None  # released: not to be released again should acquire fail
                self._quic_loop = QuicLoop.acquire()
            self._failed(TransportError(f"could not start a dial: {error!r}"), during_dial=True)
            return
        self._connection = connection

    def _dial_finished(self, result: _DialFinished) -> None:
        if result.generation != self._generation:
            # A Disconnect overtook this dial: whatever it opened goes.
            result.connection.submit_close()
            return
        self._dial = None
        if result.ack is not None:
            self._ack = result.ack
            self._lifecycle.dial_succeeded(self._clock())
            self._log.info("connected to {}", self.config.target)
            for waiter in self._take_waiters():
                reply(waiter, result.ack)
            self._notify_watcher(LinkUp(self.actor_ref, result.ack, self.status()))
            return
        assert result.error is not None
        self._forget_connection()
        self._failed(result.error, during_dial=True)

    def _connection_lost(self, lost: _ConnectionLost) -> None:
        if lost.generation != self._generation or self._lifecycle.state is not LinkState.CONNECTED:
            return
        self._forget_connection()
        self._failed(lost.error, during_dial=False)

    def _fail_connection(self, error: MirrorError, stream: LinkStream | None) -> None:
        if self._lifecycle.state is not LinkState.CONNECTED or self._connection is None:
            return
        if stream is not None and not stream.belongs_to(self._connection):
            return  # about a connection already gone; this one is fine
        self._generation += 1  # the close below must not come back as a second loss
        self._connection.submit_close(int(error.code) if error.code is not None else 0, str(error))
        self._forget_connection()
        self._failed(error, during_dial=False)

    def _notify_watcher(self, message: LinkUp | LinkDown | LinkDialing) -> None:
        if self._watcher is not None:
            _tell(self._watcher, message)

    def _failed(self, error: MirrorError, *, during_dial: bool) -> None:
        self._lifecycle.failed(error)
        self._notify_watcher(LinkDown(self.actor_ref, error, self.status()))
        what = "dial failed" if during_dial else "connection lost"
        if error.hard:
            self._log.error("{}: {} (hard: not retried)", what, error)
        else:
            self._log.warning("{}: {}", what, error)
        for waiter in self._take_waiters():
            reply_error(waiter, error)
        if self.supervised and self._wanted:
            self.report_failure(error)

    def _cancel(self, error: MirrorError) -> None:
        """End any dial or connection on purpose; waiters get ``error``."""
        self._generation += 1
        if self._dial is not None:
            self._dial.cancel()
            self._dial = None
        if self._connection is not None:
            self._connection.submit_close()
            self._forget_connection()
        was_active = self._lifecycle.state in (LinkState.CONNECTED, LinkState.CONNECTING)
        self._lifecycle.disconnected()
        if was_active:
            self._notify_watcher(LinkDown(self.actor_ref, None, self.status()))
        for waiter in self._take_waiters():
            reply_error(waiter, error)

    def _forget_connection(self) -> None:
        self._ack = None
        connection, self._connection = self._connection, None
        if connection is not None:
            self._bytes_in_before += connection.bytes_in
            self._bytes_out_before += connection.bytes_out

    def _take_waiters(self) -> list[pykka.Future[Any]]:
        waiters, self._waiters = self._waiters, []
        return waiters


async def _dial_and_report(
    link: pykka.ActorRef[Any],
    generation: int,
    connection: LinkConnection,
    last_applied_lsn: int,
    last_applied_term: int,
) -> None:
    """Dial on the loop thread and tell the link the outcome.

    The outcome is told from inside the dial's own task, in the same step that
    makes the connection established: a loss the connection reports later is
    then always behind it in the link's mailbox.  (A done-callback on the
    task's future runs a loop iteration later, and a CONNECTION_CLOSE read in
    between used to overtake it, leaving the link CONNECTED on a dead connection.)
    """
    try:
        ack = await connection.open(last_applied_lsn, last_applied_term)
    except asyncio.CancelledError:
        raise  # cancelled by the link itself, which expects no answer
    except MirrorError as error:
        _tell(link, _DialFinished(generation, connection, None, error))
    except Exception as error:
        failure = TransportError(f"dial failed: {type(error).__name__}: {error}")
        _tell(link, _DialFinished(generation, connection, None, failure))
    else:
        _tell(link, _DialFinished(generation, connection, ack, None))


def _tell(ref: pykka.ActorRef[Any], message: object) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass  # the link stopped meanwhile; nobody is left to care
