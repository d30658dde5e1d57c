"""Every aioquic private the link layer relies on, behind one door.

aioquic 1.x has no public API for two things the mirror's QUIC shell
(``link.connection``) needs.  Each function here wraps one private attribute,
says why it is needed, and has a test in ``tests/test_link_quic_internals.py``
that checks the attribute is still where this module expects it on aioquic's
real classes and still behaves as relied on, so an aioquic upgrade that moves
one fails that test loudly.  Both degrade quietly at run time (the link then
notices a closing source only after aioquic's draining period, or leaves a
closed connection's timer to fire once for nothing), never crash a link.

Nothing else in ``mirror_actors.link`` touches an aioquic attribute that
starts with an underscore.  In particular the shell never reads
``QuicConnectionProtocol._quic``: it keeps the ``QuicConnection`` it built and
handed to the protocol.
"""

from __future__ import annotations

import asyncio

import aioquic
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

__all__ = ["describe_missing", "missing_internals", "peer_close_event", "silence_timer"]


def peer_close_event(quic: QuicConnection) -> events.ConnectionTerminated | None:
    """The CONNECTION_CLOSE this connection has recorded, if any, before aioquic reports it.

    Why private: aioquic emits ``ConnectionTerminated`` for a peer's
    CONNECTION_CLOSE only at the end of its draining period (3 PTO, tens of
    milliseconds or more), but records the close frame in the private
    ``QuicConnection._close_event`` as soon as the datagram is read.  A mirror
    must notice a source that closes (``SOURCE_SHUTDOWN``) at once, so the shell
    reads it after every datagram.  It is also set when this side closes; the
    shell ends a session at most once, so that reading is harmless.
    """
    event: events.ConnectionTerminated | None = getattr(quic, "_close_event", None)
    return event


def silence_timer(protocol: QuicConnectionProtocol) -> None:
    """Cancel the protocol's pending QUIC timer, for a connection whose socket is gone.

    Why private: after a close aioquic keeps a timer for its closing period and
    re-arms it whenever it transmits (``QuicConnectionProtocol._timer``); with
    the datagram transport closed it has nothing left to do, yet would wake the
    loop thread and write to a closed socket.  aioquic offers no public way to
    drop it.
    """
    timer: asyncio.TimerHandle | None = getattr(protocol, "_timer", None)
    if timer is not None:
        timer.cancel()
        protocol._timer = None


def missing_internals() -> list[str]:
    """Every private above that the installed aioquic no longer has, by its dotted name.

    Builds a throwaway protocol on a loop of its own: call it from a thread
    that runs no event loop (a test), not from the QUIC loop thread.
    """
    missing: list[str] = []
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    if not hasattr(quic, "_close_event"):
        missing.append("QuicConnection._close_event")

    async def probe() -> bool:
        return hasattr(QuicConnectionProtocol(quic), "_timer")

    loop = asyncio.new_event_loop()
    try:
        if not loop.run_until_complete(probe()):
            missing.append("QuicConnectionProtocol._timer")
    finally:
        loop.close()
    return missing


def describe_missing(missing: list[str]) -> str:
    """What to tell whoever upgraded aioquic."""
    return (
        f"aioquic {aioquic.__version__} lacks {', '.join(missing)}, which "
        "mirror_actors.link.quic_internals relies on; install the aioquic version this "
        "package was tested with, or update that module"
    )
