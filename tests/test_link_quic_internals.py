"""The aioquic privates behind ``mirror_actors.link.quic_internals``: still there, still doing
what the link relies on.  An aioquic upgrade that moves one fails here, loudly.

Also: no other module of the link layer reads a private attribute of another object.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

import mirror_actors.link as link_package
from mirror_actors.link import quic_internals
from mirror_actors.pki import DevPki
from mirror_actors.wire import ALPN
from tests.helpers import CLUSTER

CLIENT_ADDRESS = ("127.0.0.1", 1234)
SERVER_ADDRESS = ("127.0.0.1", 4433)


def test_every_private_the_link_relies_on_is_there() -> None:
    missing = quic_internals.missing_internals()
    assert not missing, quic_internals.describe_missing(missing)


# -- a client and a server connection in memory, the way aioquic's own tests run them ---------


def exchange(sender: QuicConnection, receiver: QuicConnection, now: float) -> int:
    address = CLIENT_ADDRESS if sender.configuration.is_client else SERVER_ADDRESS
    count = 0
    for data, _ in sender.datagrams_to_send(now=now):
        receiver.receive_datagram(data, address, now=now)
        count += 1
    return count


def drain(connection: QuicConnection) -> list[events.QuicEvent]:
    seen = []
    while (event := connection.next_event()) is not None:
        seen.append(event)
    return seen


def connected_pair(pki: DevPki) -> tuple[QuicConnection, QuicConnection]:
    client_configuration = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], server_name=CLUSTER
    )
    client_configuration.load_verify_locations(cafile=str(pki.ca.cert))
    server_configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    pair = pki.source(CLUSTER)
    server_configuration.load_cert_chain(str(pair.cert), str(pair.key))
    client = QuicConnection(configuration=client_configuration)
    client.connect(SERVER_ADDRESS, now=0.0)
    server = QuicConnection(
        configuration=server_configuration,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    for _ in range(10):
        if not exchange(client, server, 0.0) + exchange(server, client, 0.0):
            break
    assert any(isinstance(e, events.HandshakeCompleted) for e in drain(client))
    drain(server)
    return client, server


def test_a_peer_close_is_recorded_before_aioquic_reports_it(pki: DevPki) -> None:
    """Why ``peer_close_event`` exists: the event comes only after the draining period."""
    client, server = connected_pair(pki)
    assert quic_internals.peer_close_event(client) is None
    server.close(error_code=0x06, reason_phrase="stopping")
    assert exchange(server, client, 0.1)
    recorded = quic_internals.peer_close_event(client)
    assert recorded is not None
    assert (recorded.error_code, recorded.frame_type, recorded.reason_phrase) == (
        0x06,
        None,
        "stopping",
    )
    assert not any(isinstance(e, events.ConnectionTerminated) for e in drain(client)), (
        "aioquic now reports a peer's close at once: peer_close_event may be unnecessary"
    )
    timer = client.get_timer()
    assert timer is not None
    client.handle_timer(now=timer)
    (reported,) = [e for e in drain(client) if isinstance(e, events.ConnectionTerminated)]
    assert reported is recorded, "the recorded close is the one aioquic reports later"


class _Socket(asyncio.DatagramTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent.append(bytes(data))


def test_silence_timer_cancels_the_armed_quic_timer() -> None:
    async def run() -> None:
        quic = QuicConnection(
            configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
        )
        protocol = QuicConnectionProtocol(quic)
        socket = _Socket()
        protocol.connection_made(socket)
        protocol.connect(SERVER_ADDRESS)  # sends the first flight and arms the timer
        assert socket.sent
        timer = protocol._timer
        assert isinstance(timer, asyncio.TimerHandle), "aioquic keeps its timer elsewhere now"
        quic_internals.silence_timer(protocol)
        assert timer.cancelled() and protocol._timer is None
        quic_internals.silence_timer(protocol)  # nothing armed: nothing to do

    asyncio.run(run())


def test_the_door_degrades_quietly_where_the_privates_are_gone() -> None:
    class Bare:
        pass

    assert quic_internals.peer_close_event(Bare()) is None  # type: ignore[arg-type]
    quic_internals.silence_timer(Bare())  # type: ignore[arg-type]


# -- nowhere else -----------------------------------------------------------------------------


def _link_modules() -> list[Path]:
    assert link_package.__file__ is not None
    return sorted(Path(link_package.__file__).parent.glob("*.py"))


@pytest.mark.parametrize("path", _link_modules(), ids=lambda path: path.name)
def test_no_other_link_module_reads_a_private_of_another_object(path: Path) -> None:
    """``x._name`` only for ``self``/``cls``; ``quic_internals`` is the one exception."""
    if path.name == "quic_internals.py":
        return
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"line {node.lineno}: .{node.attr}")
    assert not found, f"{path.name} reads privates of other objects: {found}"
