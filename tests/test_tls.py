"""TLS misconfigurations: each a hard ``TlsVerificationError`` that escalates and says what to fix.

Every case runs twice: standalone (``Connect`` raises, and the message is
checked for the words that tell a user what to change) and supervised (the
supervisor's ``on_escalation`` is called after exactly one handshake and no
restart is ever scheduled, however long the clock runs).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import frozen

from mirror_actors import Connect, SourceLink, TlsVerificationError, link_strategy
from mirror_actors.link import LinkConfig
from mirror_actors.pki import CertificateAuthority, CertKeyPair, DevPki, write_pair
from mirror_actors.source import SourceServer
from supervisors import ChildSpec, ChildState, Supervisor
from supervisors.testing import ManualClock
from tests.helpers import CLUSTER, WAIT, Escalations, children, config_for, connect, source_server

NOW = dt.datetime.now(dt.UTC)


@frozen
class Case:
    """A source certificate, maybe mutual TLS, and the link's own settings."""

    server_pair: CertKeyPair
    client_ca_file: str | None
    link: dict[str, Any]


@pytest.fixture(scope="module")
def certs(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Deliberately broken certificates, made once."""
    directory = tmp_path_factory.mktemp("hostile-certs")
    ours = CertificateAuthority.load(pki.ca.cert, pki.ca.key)
    stranger = CertificateAuthority.create(common_name="someone else's CA")

    def pair(stem: str, issued: tuple[bytes, bytes]) -> CertKeyPair:
        return write_pair(directory, stem, *issued)

    return {
        "stranger_ca": str(
            stranger.write(directory / "stranger.pem", directory / "stranger.key").cert
        ),
        "stranger_server": pair("stranger-server", stranger.issue(CLUSTER, [CLUSTER])),
        "no_cluster_id": pair("no-cluster-id", ours.issue(CLUSTER, ["somewhere-else"])),
        "no_san": pair("no-san", ours.issue(CLUSTER, [])),
        "expired": pair(
            "expired",
            ours.issue(
                CLUSTER,
                [CLUSTER],
                not_before=NOW - dt.timedelta(days=30),
                not_after=NOW - dt.timedelta(days=1),
            ),
        ),
        "not_yet_valid": pair(
            "not-yet-valid",
            ours.issue(
                CLUSTER,
                [CLUSTER],
                not_before=NOW + dt.timedelta(days=1),
                not_after=NOW + dt.timedelta(days=30),
            ),
        ),
        "stranger_client": pair(
            "stranger-client", stranger.issue("mirror", ["mirror"], client=True, server=False)
        ),
        "expired_client": pair(
            "expired-client",
            ours.issue(
                "mirror",
                ["mirror"],
                client=True,
                server=False,
                not_before=NOW - dt.timedelta(days=30),
                not_after=NOW - dt.timedelta(days=1),
            ),
        ),
    }


def client_cert(pair: CertKeyPair) -> dict[str, str]:
    return {"client_cert_file": str(pair.cert), "client_key_file": str(pair.key)}


# name -> (build the case, words the message must contain)
CASES: dict[str, tuple[Callable[[DevPki, dict[str, Any]], Case], list[str]]] = {
    "unknown CA (the link trusts another CA)": (
        lambda pki, c: Case(pki.source(CLUSTER), None, {"ca_file": c["stranger_ca"]}),
        ["check ca_file"],
    ),
    "source certificate from an unknown CA": (
        lambda pki, c: Case(c["stranger_server"], None, {}),
        ["check ca_file"],
    ),
    "certificate without the cluster id": (
        lambda pki, c: Case(c["no_cluster_id"], None, {}),
        ["does not name the cluster id", "source_cluster_id"],
    ),
    "certificate with no subjectAltName at all": (
        lambda pki, c: Case(c["no_san"], None, {}),
        ["subjectAltName", "names the source cluster id"],
    ),
    "expired source certificate": (
        lambda pki, c: Case(c["expired"], None, {}),
        ["expired", "renew"],
    ),
    "source certificate not yet valid": (
        lambda pki, c: Case(c["not_yet_valid"], None, {}),
        ["not valid yet", "renew"],
    ),
    "mutual TLS required, no client certificate": (
        lambda pki, c: Case(pki.source(CLUSTER), str(pki.ca.cert), {}),
        ["requires a client certificate", "client_cert_file", "client_key_file"],
    ),
    "client certificate from another CA": (
        lambda pki, c: Case(
            pki.source(CLUSTER), str(pki.ca.cert), client_cert(c["stranger_client"])
        ),
        ["does not trust this mirror's client certificate", "client_cert_file"],
    ),
    "expired client certificate": (
        lambda pki, c: Case(
            pki.source(CLUSTER), str(pki.ca.cert), client_cert(c["expired_client"])
        ),
        ["client certificate rejected", "no longer valid", "client_cert_file"],
    ),
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest, pki: DevPki, certs: dict[str, Any]) -> Iterator[Any]:
    build, words = CASES[request.param]
    built = build(pki, certs)
    server = SourceServer(
        CLUSTER,
        ("orders",),
        certfile=str(built.server_pair.cert),
        keyfile=str(built.server_pair.key),
        client_ca_file=built.client_ca_file,
    )
    with server:
        yield config_for(pki, server.port, **built.link), words


def test_standalone_connect_raises_a_hard_error_that_says_what_to_fix(case: Any) -> None:
    config, words = case
    link = SourceLink.start(config)
    try:
        with pytest.raises(TlsVerificationError) as raised:
            link.ask(Connect())
    finally:
        link.stop()
    error = raised.value
    assert error.hard
    message = str(error)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert error.hint, "a TLS error always carries a hint"


def test_supervised_it_escalates_after_one_handshake_with_zero_restarts(case: Any) -> None:
    config: LinkConfig = case[0]
    clock = ManualClock()
    escalations = Escalations()
    supervisor = Supervisor.start(
        strategy=link_strategy(random=random.Random(3)),
        children=[ChildSpec("link", lambda parent: SourceLink.start(config, parent=parent))],
        clock=clock,
        on_escalation=escalations,
    )
    try:
        assert escalations.arrived.wait(WAIT), "the hard TLS error was not escalated"
        clock.advance(3600)  # nothing is pending: no retry, however long we wait
        (child,) = children(supervisor)
        assert clock.pending() == []
    finally:
        supervisor.stop()
    (event,) = escalations.events
    assert isinstance(event.root_cause, TlsVerificationError)
    assert child.state is ChildState.FAILED and child.restarts == 0
    for word in case[1]:
        assert word in str(event.root_cause)


def test_a_good_configuration_next_to_the_bad_ones_still_connects(
    pki: DevPki, tmp_path: Path
) -> None:
    """Control: the same CA, names and mutual TLS, correctly set up, connect fine."""
    with source_server(pki, client_ca_file=str(pki.ca.cert)) as server:
        link = SourceLink.start(config_for(pki, server.port, **client_cert(pki.mirror)))
        try:
            assert connect(link).accepted
        finally:
            link.stop()
