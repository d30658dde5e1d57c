"""The door to aioquic's privates: each one is still where ``quic_internals`` expects it.

The first group asserts each private attribute or method on aioquic's real
classes, so an aioquic upgrade that renames or removes one fails here, loudly,
with the name of what moved.  The second group drives a real client and server
``QuicConnection`` in memory (no sockets, a fake clock) to show each function
of the door still does what the source relies on.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aioquic import tls
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.stream import QuicStreamSender
from cryptography import x509

from mirror_actors.pki import DevPki
from mirror_actors.source import quic_internals
from mirror_actors.source.quic_internals import (
    AioquicInternalsError,
    bound_port,
    missing_internals,
    peer_certificate,
    peer_certificate_chain,
    request_client_certificate,
    require_internals,
    stream_delivered,
)
from tests.helpers import CLUSTER

CLIENT_ADDR = ("10.0.0.1", 40000)
SERVER_ADDR = ("10.0.0.2", 4433)


def server_configuration(pki: DevPki) -> QuicConfiguration:
    configuration = QuicConfiguration(is_client=False)
    pair = pki.source(CLUSTER)
    configuration.load_cert_chain(str(pair.cert), str(pair.key))
    return configuration


def server_connection(pki: DevPki, client: QuicConnection | None = None) -> QuicConnection:
    odcid = client.original_destination_connection_id if client is not None else b"\x00" * 8
    return QuicConnection(
        configuration=server_configuration(pki), original_destination_connection_id=odcid
    )


# -- the privates are where the door expects them -------------------------------------------


def test_quic_connection_has_initialize_taking_the_peer_cid(pki: DevPki) -> None:
    quic = server_connection(pki)
    initialize = quic._initialize
    assert callable(initialize), "QuicConnection._initialize is gone"
    assert list(inspect.signature(initialize).parameters) == ["peer_cid"], (
        "QuicConnection._initialize no longer takes just the peer's connection id"
    )
    # Until the first datagram, there is no TLS context to set the flag on (the
    # handshake tests below show _initialize builds it).
    assert getattr(quic, "tls", None) is None, "the TLS context now exists before _initialize"


def test_quic_connection_keeps_its_streams_in_streams(pki: DevPki) -> None:
    quic = server_connection(pki)
    assert isinstance(quic._streams, dict), "QuicConnection._streams is gone"


def test_tls_context_has_the_client_certificate_privates() -> None:
    context = tls.Context(is_client=False)
    assert context._request_client_certificate is False, (
        "tls.Context._request_client_certificate is gone (or now on by default)"
    )
    assert context._peer_certificate is None, "tls.Context._peer_certificate is gone"
    assert context._peer_certificate_chain == [], "tls.Context._peer_certificate_chain is gone"


def test_stream_sender_says_when_it_is_finished() -> None:
    assert QuicStreamSender(stream_id=0, writable=True).is_finished is False
    assert QuicStreamSender(stream_id=0, writable=False).is_finished is True


def test_quic_server_keeps_its_transport(pki: DevPki) -> None:
    async def scenario() -> None:
        server = QuicServer(configuration=server_configuration(pki))
        assert hasattr(server, "_transport"), "QuicServer._transport is gone"
        assert server._transport is None

    asyncio.run(scenario())


def test_nothing_is_missing_and_start_would_go_ahead() -> None:
    assert missing_internals() == []
    require_internals()


def test_a_missing_private_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quic_internals, "missing_internals", lambda: ["QuicConnection._streams"])
    with pytest.raises(AioquicInternalsError, match=r"lacks QuicConnection\._streams"):
        require_internals.__wrapped__()


# -- each function does what the source relies on -------------------------------------------


class Pair:
    """A client and a server QuicConnection wired back to back, on a fake clock."""

    def __init__(self, pki: DevPki, *, client_certificate: bool, request: bool) -> None:
        self.now = 0.0
        client_configuration = QuicConfiguration(
            is_client=True, server_name=CLUSTER, cafile=str(pki.ca.cert)
        )
        if client_certificate:
            client_configuration.load_cert_chain(str(pki.mirror.cert), str(pki.mirror.key))
        self.client = QuicConnection(configuration=client_configuration)
        self.server = server_connection(pki, self.client)
        if request:
            request_client_certificate(self.server)
        self.server_events: list[events.QuicEvent] = []
        self.client.connect(SERVER_ADDR, now=self.now)
        self.exchange()
        assert any(isinstance(e, events.HandshakeCompleted) for e in self.server_events)

    def exchange(self, rounds: int = 20, step: float = 0.05) -> None:
        """Move datagrams both ways for ``rounds`` steps of the clock (pacing and ack delay)."""
        for _ in range(rounds):
            self.now += step
            for data, _addr in self.client.datagrams_to_send(now=self.now):
                self.server.receive_datagram(data, CLIENT_ADDR, now=self.now)
            for data, _addr in self.server.datagrams_to_send(now=self.now):
                self.client.receive_datagram(data, SERVER_ADDR, now=self.now)
            while (event := self.server.next_event()) is not None:
                self.server_events.append(event)
            while self.client.next_event() is not None:
                pass


@pytest.fixture
def mutual(pki: DevPki) -> Iterator[Pair]:
    yield Pair(pki, client_certificate=True, request=True)


def test_request_client_certificate_makes_the_server_ask(pki: DevPki, mutual: Pair) -> None:
    certificate = peer_certificate(mutual.server)
    assert certificate is not None, "the server did not ask for (or keep) the client certificate"
    expected = x509.load_pem_x509_certificate(pki.mirror.cert.read_bytes())
    assert certificate == expected


def test_without_the_request_there_is_no_client_certificate(pki: DevPki) -> None:
    pair = Pair(pki, client_certificate=True, request=False)
    assert peer_certificate(pair.server) is None
    assert peer_certificate_chain(pair.server) == []


def test_the_peer_chain_verifies_against_the_ca(pki: DevPki, mutual: Pair) -> None:
    certificate = peer_certificate(mutual.server)
    assert certificate is not None
    chain = peer_certificate_chain(mutual.server)
    assert all(isinstance(c, x509.Certificate) for c in chain)
    tls.verify_certificate(certificate, chain=chain, cafile=str(pki.ca.cert))
    chain.append(certificate)  # a copy: the connection's own list is untouched
    assert peer_certificate_chain(mutual.server) == chain[:-1]


def test_stream_delivered_once_the_peer_acknowledged_the_end(mutual: Pair) -> None:
    stream_id = mutual.client.get_next_available_stream_id()
    mutual.client.send_stream_data(stream_id, b"hello", end_stream=True)
    mutual.exchange()
    assert stream_delivered(mutual.server, stream_id + 4), "an unknown stream has nothing to send"
    mutual.server.send_stream_data(stream_id, b"reply", end_stream=False)
    assert not stream_delivered(mutual.server, stream_id), "no end sent yet"
    mutual.server.send_stream_data(stream_id, b"", end_stream=True)
    assert not stream_delivered(mutual.server, stream_id), "sent, not yet acknowledged"
    mutual.exchange()
    assert stream_delivered(mutual.server, stream_id)


def test_bound_port_is_the_port_the_server_listens_on(pki: DevPki) -> None:
    async def scenario() -> int:
        server = await serve("127.0.0.1", 0, configuration=server_configuration(pki))
        try:
            port = bound_port(server)
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                with pytest.raises(OSError) as taken:
                    probe.bind(("127.0.0.1", port))
                assert taken.value.errno == errno.EADDRINUSE
            finally:
                probe.close()
            return port
        finally:
            server.close()

    assert asyncio.run(scenario()) > 0


def test_bound_port_of_a_server_without_its_transport_is_an_error() -> None:
    class Moved:
        pass

    stand_in: Any = Moved()
    with pytest.raises(AioquicInternalsError, match=r"QuicServer\._transport"):
        bound_port(stand_in)
    stand_in._transport = None
    with pytest.raises(AioquicInternalsError, match="not listening"):
        bound_port(stand_in)
