"""Every aioquic private the source layer relies on, behind one door.

aioquic 1.x has no public API for four things the source needs.  Each
function here wraps one private attribute, says why it is needed, and has a
test in ``tests/test_source_quic_internals.py`` that checks the attribute is
still where this module expects it on aioquic's real classes, so an aioquic
upgrade that moves one fails that test loudly instead of silently changing
what the server does.  Nothing else in ``mirror_actors.source`` touches an
aioquic attribute that starts with an underscore.

``missing_internals()`` lists what is gone; ``require_internals()`` (called
by ``SourceServer.start()``) turns that into an ``AioquicInternalsError``
before the server listens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import aioquic
from aioquic import tls
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.stream import QuicStreamSender
from cryptography import x509

__all__ = [
    "AioquicInternalsError",
    "bound_port",
    "missing_internals",
    "peer_certificate",
    "peer_certificate_chain",
    "request_client_certificate",
    "require_internals",
    "stream_delivered",
]


class AioquicInternalsError(RuntimeError):
    """The installed aioquic lacks a private this source relies on."""


def request_client_certificate(quic: QuicConnection) -> None:
    """Make a server connection ask its client for a certificate (mutual TLS).

    Why private: aioquic 1.x sends a CertificateRequest only when the TLS
    context's private ``_request_client_certificate`` flag is set, and that
    context (``quic.tls``) exists only once ``QuicConnection._initialize``
    ran on the first datagram.  So ``_initialize`` is wrapped to set the flag
    right after it builds the context.
    """
    initialize: Callable[[bytes], None] = quic._initialize

    def initialize_requesting_certificate(peer_cid: bytes) -> None:
        initialize(peer_cid)
        quic.tls._request_client_certificate = True

    quic._initialize = initialize_requesting_certificate  # type: ignore[method-assign]


def peer_certificate(quic: QuicConnection) -> x509.Certificate | None:
    """The certificate the peer presented in the handshake; None if it sent none.

    Why private: aioquic checks a client certificate's signature but never
    its chain, and offers no public getter for it; the source verifies the
    chain itself against ``client_ca_file``.
    """
    return quic.tls._peer_certificate


def peer_certificate_chain(quic: QuicConnection) -> list[x509.Certificate]:
    """The intermediates the peer sent after its certificate (possibly none).

    Why private: as for ``peer_certificate``; the chain is what
    ``aioquic.tls.verify_certificate`` needs to reach the CA.
    """
    return list(quic.tls._peer_certificate_chain)


def stream_delivered(quic: QuicConnection, stream_id: int) -> bool:
    """Whether everything sent on ``stream_id``, its end included, was acknowledged.

    Why private: aioquic emits no event when stream data is delivered; only
    its stream sender (in the private ``_streams`` table) knows.  The source
    closes a connection after a rejection reply only once the reply arrived.
    A stream aioquic does not know (never opened, or already forgotten) has
    nothing left to deliver.
    """
    stream = quic._streams.get(stream_id)
    return stream is None or stream.sender.is_finished


def bound_port(server: QuicServer) -> int:
    """The UDP port a ``QuicServer`` from ``aioquic.asyncio.serve`` is bound to.

    Why private: ``serve()`` returns the ``QuicServer`` protocol, never its
    datagram transport; the port (chosen by the OS for port 0) is known only
    to that transport, the server's private ``_transport``.
    """
    if not hasattr(server, "_transport"):
        raise AioquicInternalsError(_lacks(["QuicServer._transport"]))
    transport = server._transport
    if transport is None:
        raise AioquicInternalsError("the QuicServer has no transport: it is not listening")
    port: int = transport.get_extra_info("sockname")[1]
    return port


def missing_internals() -> list[str]:
    """Every private above that the installed aioquic no longer has, by its dotted name.

    ``QuicServer._transport`` is left out: a ``QuicServer`` cannot be built
    without a running loop, so ``bound_port`` checks it where it is used.
    """
    missing: list[str] = []
    connection = QuicConnection(configuration=QuicConfiguration(is_client=True))
    if not callable(getattr(connection, "_initialize", None)):
        missing.append("QuicConnection._initialize")
    if not isinstance(getattr(connection, "_streams", None), dict):
        missing.append("QuicConnection._streams")
    context = tls.Context(is_client=False)
    for name in ("_request_client_certificate", "_peer_certificate", "_peer_certificate_chain"):
        if not hasattr(context, name):
            missing.append(f"tls.Context.{name}")
    sender = QuicStreamSender(stream_id=0, writable=True)
    if not isinstance(getattr(sender, "is_finished", None), bool):
        missing.append("QuicStreamSender.is_finished")
    return missing


@functools.cache
def require_internals() -> None:
    """Raise ``AioquicInternalsError`` if the installed aioquic lacks one of them (checked once)."""
    missing = missing_internals()
    if missing:
        raise AioquicInternalsError(_lacks(missing))


def _lacks(missing: list[str]) -> str:
    return (
        f"aioquic {aioquic.__version__} lacks {', '.join(missing)}, which "
        "mirror_actors.source.quic_internals relies on; install the aioquic version this "
        "package was tested with, or update that module"
    )
