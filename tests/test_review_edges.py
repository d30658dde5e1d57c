"""Edges a review found: a source certificate posing as a mirror's, a source failing its
own TLS, an accepting ack with an error code, a resync of a divergence the mirror found."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror_actors.link import Connect, SourceLink
from mirror_actors.link.classify import error_for_ack, error_for_close
from mirror_actors.pki import DevPki
from mirror_actors.replica import (
    ApplyEntries,
    MirrorDatabase,
    SqliteReplicaStore,
    entries_digest,
    read_replica_file,
)
from mirror_actors.wire import (
    NO_SNAPSHOT,
    Entries,
    Entry,
    HelloAck,
    MalformedFrame,
    Subscribe,
    TlsVerificationError,
    TransportError,
    encode_frame,
)
from mirror_actors.wire.errors import CRYPTO_ERROR_BASE
from tests.helpers import (
    CLUSTER,
    LINK,
    WAIT,
    Escalations,
    config_for,
    connect,
    fast_strategy,
    replica_status,
    source_server,
    wait_until,
)
from tests.rogue_source import rogue

CRYPTO_FRAME = 0x06


def test_a_source_that_fails_its_own_tls_is_retried_not_escalated(pki: DevPki) -> None:
    config = config_for(pki, 4433)
    internal = error_for_close(config, CRYPTO_ERROR_BASE + 80, CRYPTO_FRAME, "internal error")
    assert isinstance(internal, TransportError) and not internal.hard
    refused = error_for_close(config, CRYPTO_ERROR_BASE + 42, CRYPTO_FRAME, "bad certificate")
    assert isinstance(refused, TlsVerificationError) and refused.hard


def test_an_accepting_ack_with_an_error_code_is_malformed(pki: DevPki) -> None:
    ack = HelloAck(True, 4, "", CLUSTER, NO_SNAPSHOT, 0)
    error = error_for_ack(config_for(pki, 4433), ack)
    assert isinstance(error, MalformedFrame) and "error_code 0" in str(error)
    assert error_for_ack(config_for(pki, 4433), HelloAck.accept(CLUSTER)) is None


def test_a_source_certificate_does_not_pass_for_a_mirrors(pki: DevPki) -> None:
    """One CA signs both; only a certificate for client authentication is a mirror's."""
    other = pki.source("eu-west")  # serverAuth only, signed by the same CA
    server = source_server(pki, client_ca_file=str(pki.ca.cert)).start()
    try:
        impostor = SourceLink.start(
            config_for(
                pki,
                server.port,
                client_cert_file=str(other.cert),
                client_key_file=str(other.key),
            )
        )
        mirror = SourceLink.start(
            config_for(
                pki,
                server.port,
                client_cert_file=str(pki.mirror.cert),
                client_key_file=str(pki.mirror.key),
            )
        )
        try:
            assert connect(mirror, timeout=WAIT).accepted
            with pytest.raises(TlsVerificationError, match="not for client authentication"):
                impostor.ask(Connect(), timeout=WAIT)
        finally:
            impostor.stop()
            mirror.stop()
    finally:
        server.stop()


def test_resync_of_a_divergence_the_mirror_found_itself(pki: DevPki, tmp_path: Path) -> None:
    """A source that checks no history: the replica sees the term go down and starts over."""
    path = tmp_path / "replica.db"
    seeded = SqliteReplicaStore(path, LINK)
    seeded.commit([ApplyEntries(tuple(Entry(lsn, 5, b"old") for lsn in range(1, 4)))])
    seeded.close()
    new_history = [Entry(lsn, 3, b"new %d" % lsn) for lsn in range(1, 7)]

    def serve_from(subscribe: Subscribe) -> bytes:
        return encode_frame(Entries(new_history[subscribe.first_lsn - 1 :]))

    escalations = Escalations()
    with rogue(pki, on_subscribe=serve_from) as source:
        replica = MirrorDatabase.start(
            config_for(pki, source.port),
            SqliteReplicaStore(path, LINK),
            on_divergence="resync",
            on_escalation=escalations,
            strategy=fast_strategy(),
        )
        try:
            wait_until(lambda: replica_status(replica).applied_lsn == 6, what="the resync")
        finally:
            replica.stop()
    assert not escalations.events
    applied, entries = read_replica_file(path)
    assert applied == 6 and entries_digest(entries) == entries_digest(new_history)
