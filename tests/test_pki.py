"""Tests for the development PKI, including real QUIC/TLS handshakes over loopback.

The handshake tests double as a record of how aioquic 1.7.2 reports certificate
failures to a client: ``connect()`` raises a bare ``ConnectionError`` and the only
detail is the ``ConnectionTerminated`` event (CRYPTO_ERROR 0x100 + TLS alert).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from aioquic.tls import AlertDescription
from attrs import define, field
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mirror_actors.pki import (
    CertificateAuthority,
    CertKeyPair,
    DevPki,
    PemFileError,
    generate_dev_pki,
    key_matches_certificate,
    load_certificate_file,
    load_private_key_file,
    parse_subject_name,
    update_dev_pki,
    validate_dns_name,
    write_pair,
)

CLUSTERS = ("us-east", "eu-west")
ALPN = ["mirror/1"]
HANDSHAKE_TIMEOUT = 5.0


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return generate_dev_pki(tmp_path / "pki", CLUSTERS)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _dns_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files and certificate contents -------------------------------------------------


def test_generates_all_files_with_owner_only_keys(pki: DevPki) -> None:
    names = {p.name for p in pki.directory.iterdir()}
    expected = {"ca.pem", "ca.key", "mirror.pem", "mirror.key"}
    expected |= {f"source-{c}.{ext}" for c in CLUSTERS for ext in ("pem", "key")}
    assert names == expected  # also: no temporary files left behind
    pairs = [pki.ca, pki.mirror, *pki.sources.values()]
    for pair in pairs:
        assert pair.cert.is_file()
        assert _mode(pair.key) == 0o600, pair.key
        assert _mode(pair.cert) == 0o644, pair.cert
    assert _mode(pki.directory) == 0o700
    assert set(pki.sources) == set(CLUSTERS)
    assert pki.source("us-east") == CertKeyPair(
        pki.directory / "source-us-east.pem", pki.directory / "source-us-east.key"
    )


def test_source_lookup_of_unknown_cluster_lists_known_ids(pki: DevPki) -> None:
    with pytest.raises(KeyError, match=r"'ap-south'.*'eu-west', 'us-east'"):
        pki.source("ap-south")


def test_sources_mapping_is_read_only(pki: DevPki) -> None:
    with pytest.raises(TypeError):
        pki.sources["x"] = pki.mirror  # type: ignore[index]


@pytest.mark.parametrize("cluster_id", CLUSTERS)
def test_source_cert_names_only_its_cluster(pki: DevPki, cluster_id: str) -> None:
    cert = _cert(pki.source(cluster_id).cert)
    assert _dns_sans(cert) == [cluster_id]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(san) == 1  # no localhost, no IP addresses
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == [cluster_id]
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}


def test_mirror_cert_is_a_client_cert(pki: DevPki) -> None:
    cert = _cert(pki.mirror.cert)
    assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _dns_sans(cert) == ["mirror"]


def test_custom_mirror_name(tmp_path: Path) -> None:
    pki = generate_dev_pki(tmp_path, ["us-east"], mirror_name="mirror-1.eu")
    assert _dns_sans(_cert(pki.mirror.cert)) == ["mirror-1.eu"]


def test_chain_verifies_against_ca(pki: DevPki) -> None:
    ca = _cert(pki.ca.cert)
    ca.verify_directly_issued_by(ca)  # self-signed
    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_constraints.ca is True
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    for pair in [pki.mirror, *pki.sources.values()]:
        leaf = _cert(pair.cert)
        leaf.verify_directly_issued_by(ca)
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca is False
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        assert leaf.not_valid_before_utc < dt.datetime.now(dt.UTC) < leaf.not_valid_after_utc


def test_valid_days_sets_expiry(tmp_path: Path) -> None:
    pki = generate_dev_pki(tmp_path, ["us-east"], valid_days=2)
    for path in (pki.ca.cert, pki.source("us-east").cert, pki.mirror.cert):
        remaining = _cert(path).not_valid_after_utc - dt.datetime.now(dt.UTC)
        assert dt.timedelta(days=1) < remaining <= dt.timedelta(days=2)


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "cluster_id",
    ["", "us east", "us_east", "-us", "us-", "a..b", ".us", "us.", "x" * 64, "10.0.0.1", "ü"],
)
def test_invalid_cluster_id_is_rejected(tmp_path: Path, cluster_id: str) -> None:
    with pytest.raises(ValueError, match=r"invalid cluster id .*allowed: DNS labels"):
        generate_dev_pki(tmp_path / "pki", ["us-east", cluster_id])
    assert not (tmp_path / "pki").exists()  # validation happens before any write


@pytest.mark.parametrize("name", ["us-east", "us-east-1", "eu.west", "A1", "x" * 63])
def test_valid_dns_names(name: str) -> None:
    assert validate_dns_name(name) == name


def test_cluster_id_longer_than_a_common_name_is_rejected(tmp_path: Path) -> None:
    long_id = "x" * 63 + ".y"  # a fine DNS name, but too long for a CN
    with pytest.raises(ValueError, match="at most 64 characters"):
        generate_dev_pki(tmp_path, [long_id])


def test_duplicate_cluster_ids_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate cluster id 'US-East'"):
        generate_dev_pki(tmp_path, ["us-east", "US-East"])


def test_single_string_instead_of_cluster_list_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not a single str"):
        generate_dev_pki(tmp_path, "us-east")


def test_invalid_mirror_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid mirror name"):
        generate_dev_pki(tmp_path, ["us-east"], mirror_name="my mirror")


def test_overwrite_false_refuses_existing_files(tmp_path: Path) -> None:
    first = generate_dev_pki(tmp_path, ["us-east"])
    before = first.ca.cert.read_bytes()
    with pytest.raises(FileExistsError, match=r"ca\.pem"):
        generate_dev_pki(tmp_path, ["us-east"], overwrite=False)
    assert first.ca.cert.read_bytes() == before


def test_overwrite_replaces_files_and_tightens_key_mode(tmp_path: Path) -> None:
    first = generate_dev_pki(tmp_path, ["us-east"])
    first_ca = first.ca.cert.read_bytes()
    os.chmod(first.ca.key, 0o644)
    second = generate_dev_pki(tmp_path, ["us-east"])
    assert second.ca.cert.read_bytes() != first_ca  # a fresh CA
    assert _mode(second.ca.key) == 0o600
    _cert(second.source("us-east").cert).verify_directly_issued_by(_cert(second.ca.cert))


# --- lower-level CA: hostile certificates -------------------------------------------


def test_loaded_ca_issues_certs_that_verify(pki: DevPki, tmp_path: Path) -> None:
    ca = CertificateAuthority.load(pki.ca.cert, pki.ca.key)
    cert_pem, _ = ca.issue("ap-south", ["ap-south"])
    x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(_cert(pki.ca.cert))


def test_ca_write_and_load_round_trip(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("test CA", valid_days=1)
    pair = ca.write(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert _mode(pair.key) == 0o600
    assert CertificateAuthority.load(pair.cert, pair.key).certificate == ca.certificate


def test_load_rejects_mismatched_key(pki: DevPki, tmp_path: Path) -> None:
    other = CertificateAuthority.create().write(tmp_path / "o.pem", tmp_path / "o.key")
    with pytest.raises(ValueError, match="does not match"):
        CertificateAuthority.load(pki.ca.cert, other.key)


def test_cert_from_unknown_ca_does_not_verify(pki: DevPki) -> None:
    stranger = CertificateAuthority.create()  # same CN as the dev CA, different key
    cert_pem, _ = stranger.issue("us-east", ["us-east"])
    with pytest.raises(InvalidSignature):
        x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(_cert(pki.ca.cert))


def test_expired_cert(pki: DevPki) -> None:
    ca = CertificateAuthority.load(pki.ca.cert, pki.ca.key)
    now = dt.datetime.now(dt.UTC)
    cert_pem, _ = ca.issue(
        "us-east", ["us-east"], not_before=now - dt.timedelta(days=2), not_after=now
    )
    assert x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc <= now


def test_issue_rejects_bad_validity_and_names(pki: DevPki) -> None:
    ca = CertificateAuthority.load(pki.ca.cert, pki.ca.key)
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        ca.issue("x", ["x"], not_after=dt.datetime(2000, 1, 1))
    with pytest.raises(ValueError, match="must be later"):
        ca.issue("x", ["x"], not_before=now, not_after=now - dt.timedelta(seconds=1))
    with pytest.raises(TypeError, match="not a single str"):
        ca.issue("x", "x")


def test_write_pair_rejects_path_like_stem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stem"):
        write_pair(tmp_path, "../evil", b"", b"")


# --- real QUIC handshakes -----------------------------------------------------------


class _Recorder(QuicConnectionProtocol):
    """Keeps the events that ``connect()`` swallows behind a bare ConnectionError."""

    def __init__(
        self,
        quic: QuicConnection,
        on_handshake: Callable[[_Recorder], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(quic, **kwargs)
        self.handshake_completed = False
        self.terminated: ConnectionTerminated | None = None
        self._on_handshake = on_handshake

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.handshake_completed = True
            if self._on_handshake is not None:
                self._on_handshake(self)
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
        super().quic_event_received(event)


@define
class _Outcome:
    error: BaseException | None = None
    client: _Recorder | None = None
    servers: list[_Recorder] = field(factory=list)

    @property
    def connected(self) -> bool:
        return self.error is None

    @property
    def client_close(self) -> ConnectionTerminated:
        assert self.client is not None and self.client.terminated is not None
        return self.client.terminated


def _recorders(
    sink: list[_Recorder],
    hook: Callable[[QuicConnection], None] | None = None,
    on_handshake: Callable[[_Recorder], None] | None = None,
) -> Callable[..., _Recorder]:
    def create(quic: QuicConnection, **kwargs: Any) -> _Recorder:
        if hook is not None:
            hook(quic)
        recorder = _Recorder(quic, on_handshake, **kwargs)
        sink.append(recorder)
        return recorder

    return create


async def _handshake(
    server_pair: CertKeyPair,
    *,
    ca_file: Path,
    server_name: str,
    client_pair: CertKeyPair | None = None,
    server_verify_ca: Path | None = None,
    server_hook: Callable[[QuicConnection], None] | None = None,
    on_server_handshake: Callable[[_Recorder], None] | None = None,
) -> _Outcome:
    server_config = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    server_config.load_cert_chain(server_pair.cert, server_pair.key)
    if server_verify_ca is not None:
        server_config.verify_mode = ssl.CERT_REQUIRED
        server_config.load_verify_locations(str(server_verify_ca))
    client_config = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name=server_name)
    client_config.load_verify_locations(str(ca_file))
    if client_pair is not None:
        client_config.load_cert_chain(client_pair.cert, client_pair.key)

    outcome = _Outcome()
    clients: list[_Recorder] = []
    server = await serve(
        "127.0.0.1",
        0,
        configuration=server_config,
        create_protocol=_recorders(outcome.servers, server_hook, on_server_handshake),
    )
    try:
        # QuicServer has no public accessor for its bound address.
        port = server._transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        # connect() waits for the handshake with no timeout of its own.
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            try:
                async with connect(
                    "127.0.0.1",
                    port,
                    configuration=client_config,
                    create_protocol=_recorders(clients),
                ) as client:
                    # A round trip proves the server did not reject us right after
                    # the client-side handshake finished.
                    await client.ping()
            except ConnectionError as exc:
                outcome.error = exc
    finally:
        server.close()
    outcome.client = clients[0]
    return outcome


def _crypto_error(alert: AlertDescription) -> int:
    return int(QuicErrorCode.CRYPTO_ERROR) + int(alert)


def test_handshake_succeeds_with_right_name_and_ca(pki: DevPki) -> None:
    outcome = asyncio.run(
        _handshake(pki.source("us-east"), ca_file=pki.ca.cert, server_name="us-east")
    )
    assert outcome.connected, outcome
    assert outcome.client is not None and outcome.client.handshake_completed
    assert outcome.client_close.error_code == QuicErrorCode.NO_ERROR


def test_handshake_fails_on_name_mismatch(pki: DevPki) -> None:
    # The eu-west certificate is genuine, but the mirror asked for us-east.
    outcome = asyncio.run(
        _handshake(pki.source("eu-west"), ca_file=pki.ca.cert, server_name="us-east")
    )
    assert type(outcome.error) is ConnectionError and outcome.error.args == ()
    close = outcome.client_close
    assert close.error_code == _crypto_error(AlertDescription.bad_certificate) == 0x12A
    assert close.frame_type == 0x06  # CRYPTO frame
    assert close.reason_phrase == "hostname 'us-east' doesn't match DNSPattern(pattern=b'eu-west')"


def test_handshake_fails_with_unknown_ca(pki: DevPki, tmp_path: Path) -> None:
    stranger = CertificateAuthority.create()  # same CN as the real dev CA
    forged = write_pair(tmp_path, "forged", *stranger.issue("us-east", ["us-east"]))
    outcome = asyncio.run(_handshake(forged, ca_file=pki.ca.cert, server_name="us-east"))
    assert type(outcome.error) is ConnectionError
    close = outcome.client_close
    # aioquic reports bad_certificate (42), not unknown_ca (48).
    assert close.error_code == _crypto_error(AlertDescription.bad_certificate)
    assert close.reason_phrase == "unable to get local issuer certificate"


def test_handshake_fails_with_expired_cert(pki: DevPki, tmp_path: Path) -> None:
    ca = CertificateAuthority.load(pki.ca.cert, pki.ca.key)
    now = dt.datetime.now(dt.UTC)
    expired = write_pair(
        tmp_path,
        "expired",
        *ca.issue(
            "us-east",
            ["us-east"],
            not_before=now - dt.timedelta(days=10),
            not_after=now - dt.timedelta(days=1),
        ),
    )
    outcome = asyncio.run(_handshake(expired, ca_file=pki.ca.cert, server_name="us-east"))
    assert type(outcome.error) is ConnectionError
    close = outcome.client_close
    assert close.error_code == _crypto_error(AlertDescription.certificate_expired) == 0x12D
    assert close.reason_phrase == "Certificate is no longer valid"


def test_aioquic_server_ignores_cert_required(pki: DevPki) -> None:
    """Tripwire: aioquic 1.7.2 servers never request or verify client certificates.

    ``verify_mode=CERT_REQUIRED`` plus ``load_verify_locations`` on a server
    configuration is silently ignored, so mutual TLS must be enforced by the
    application. If this starts failing, aioquic gained real client-cert support.
    """
    outcome = asyncio.run(
        _handshake(
            pki.source("us-east"),
            ca_file=pki.ca.cert,
            server_name="us-east",
            server_verify_ca=pki.ca.cert,
        )
    )
    assert outcome.connected, outcome


def _request_client_certificate(quic: QuicConnection) -> None:
    # aioquic's only switch for sending a CertificateRequest is a private,
    # "test purposes only" attribute of the TLS context created lazily on the
    # first datagram, hence the wrapper around _initialize.
    initialize = quic._initialize

    def patched(peer_cid: bytes) -> None:
        initialize(peer_cid)
        quic.tls._request_client_certificate = True

    quic._initialize = patched  # type: ignore[method-assign]


def test_mirror_cert_is_presented_when_server_requests_one(pki: DevPki) -> None:
    outcome = asyncio.run(
        _handshake(
            pki.source("us-east"),
            ca_file=pki.ca.cert,
            server_name="us-east",
            client_pair=pki.mirror,
            server_hook=_request_client_certificate,
        )
    )
    assert outcome.connected, outcome
    (server,) = outcome.servers
    peer = server._quic.tls._peer_certificate
    assert peer is not None
    peer.verify_directly_issued_by(_cert(pki.ca.cert))
    assert _eku(peer) == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_requested_client_cert_may_be_omitted(pki: DevPki) -> None:
    """Even when a CertificateRequest is sent, aioquic accepts an empty Certificate."""
    outcome = asyncio.run(
        _handshake(
            pki.source("us-east"),
            ca_file=pki.ca.cert,
            server_name="us-east",
            server_hook=_request_client_certificate,
        )
    )
    assert outcome.connected, outcome
    (server,) = outcome.servers
    assert getattr(server._quic.tls, "_peer_certificate", None) is None


def _reject_missing_client_cert(server: _Recorder) -> None:
    if getattr(server._quic.tls, "_peer_certificate", None) is None:
        server._quic.close(
            error_code=_crypto_error(AlertDescription.certificate_required),
            frame_type=QuicFrameType.CRYPTO,
            reason_phrase="client certificate required",
        )
        server.transmit()


def test_server_side_rejection_reaches_client_after_connect(pki: DevPki) -> None:
    """What a mirror sees when a source enforces mutual TLS itself.

    In TLS 1.3 the client finishes its handshake before the server has judged the
    client certificate, so ``connect()`` returns and the rejection only arrives as
    a CONNECTION_CLOSE afterwards (here: failing the first ping).
    """
    outcome = asyncio.run(
        _handshake(
            pki.source("us-east"),
            ca_file=pki.ca.cert,
            server_name="us-east",
            server_hook=_request_client_certificate,
            on_server_handshake=_reject_missing_client_cert,
        )
    )
    assert type(outcome.error) is ConnectionError
    assert outcome.client is not None and outcome.client.handshake_completed
    close = outcome.client_close
    assert close.error_code == _crypto_error(AlertDescription.certificate_required) == 0x174
    assert close.frame_type == QuicFrameType.CRYPTO
    assert close.reason_phrase == "client certificate required"


# --- adding to an existing PKI (certs without --force) --------------------------------------


def _ip_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(address) for address in san.get_values_for_type(x509.IPAddress)]


def test_update_without_a_ca_makes_the_same_files_as_generate(tmp_path: Path) -> None:
    update = update_dev_pki(tmp_path / "pki", CLUSTERS)
    assert [item.action for item in update.files] == ["created"] * 4
    names = {p.name for p in (tmp_path / "pki").iterdir()}
    assert names == {"ca.pem", "ca.key", "mirror.pem", "mirror.key"} | {
        f"source-{c}.{ext}" for c in CLUSTERS for ext in ("pem", "key")
    }
    assert all(_mode(item.pair.key) == 0o600 for item in update.files)
    ca = _cert(update.ca.pair.cert)
    for item in (*update.sources, update.mirror):
        _cert(item.pair.cert).verify_directly_issued_by(ca)


def test_update_keeps_the_ca_and_what_it_signed_and_adds_new_clusters(tmp_path: Path) -> None:
    first = update_dev_pki(tmp_path, ["us-east"])
    ca_bytes = first.ca.pair.cert.read_bytes()
    key_bytes = first.ca.pair.key.read_bytes()
    source_bytes = first.sources[0].pair.cert.read_bytes()
    second = update_dev_pki(tmp_path, ["us-east", "ap-south"])
    assert second.ca.action == "kept" and first.ca.pair.cert.read_bytes() == ca_bytes
    assert first.ca.pair.key.read_bytes() == key_bytes
    assert [(s.role, s.action) for s in second.sources] == [
        ("source us-east", "kept"), ("source ap-south", "created"),
    ]  # fmt: skip
    assert second.sources[0].pair.cert.read_bytes() == source_bytes
    assert second.mirror.action == "kept"
    ca = _cert(tmp_path / "ca.pem")
    _cert(tmp_path / "source-ap-south.pem").verify_directly_issued_by(ca)
    _cert(tmp_path / "source-us-east.pem").verify_directly_issued_by(ca)


def test_update_reissues_a_source_certificate_for_its_extra_names(tmp_path: Path) -> None:
    update_dev_pki(tmp_path, ["us-east"])
    ca_bytes = (tmp_path / "ca.pem").read_bytes()
    update = update_dev_pki(
        tmp_path, ["us-east"], extra_names=["10.0.0.5", "::1", "db.example.com"]
    )
    (source,) = update.sources
    assert source.action == "reissued" and "db.example.com" in source.reason
    cert = _cert(source.pair.cert)
    assert _dns_sans(cert) == ["us-east", "db.example.com"]
    assert _ip_sans(cert) == ["10.0.0.5", "::1"]
    cert.verify_directly_issued_by(_cert(tmp_path / "ca.pem"))
    assert (tmp_path / "ca.pem").read_bytes() == ca_bytes
    # Asked again for fewer names: the certificate already has them all.
    assert (
        update_dev_pki(tmp_path, ["us-east"], extra_names=["10.0.0.5"]).sources[0].action == "kept"
    )


def test_update_reissues_what_the_ca_did_not_sign(tmp_path: Path) -> None:
    update_dev_pki(tmp_path, ["us-east"])
    stranger = CertificateAuthority.create()
    write_pair(tmp_path, "source-us-east", *stranger.issue("us-east", ["us-east"]))
    (tmp_path / "mirror.key").unlink()
    update = update_dev_pki(tmp_path, ["us-east"])
    assert (
        update.sources[0].action == "reissued"
        and "not signed by this CA" in update.sources[0].reason
    )
    assert update.mirror.action == "reissued" and "missing" in update.mirror.reason
    _cert(tmp_path / "source-us-east.pem").verify_directly_issued_by(_cert(tmp_path / "ca.pem"))


def test_update_refuses_half_a_ca_or_one_it_cannot_load_and_writes_nothing(tmp_path: Path) -> None:
    update_dev_pki(tmp_path, ["us-east"])
    (tmp_path / "ca.key").unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"holds ca\.pem but not ca\.key.*--force"):
        update_dev_pki(tmp_path, ["us-east", "ap-south"])
    (tmp_path / "ca.key").write_text("garbage")
    with pytest.raises(ValueError, match=r"cannot use the CA in .*--force"):
        update_dev_pki(tmp_path, ["us-east", "ap-south"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "ca.key"])


def test_force_replaces_the_ca_and_warns_about_certificates_it_did_not_reissue(
    tmp_path: Path,
) -> None:
    update_dev_pki(tmp_path, ["us-east", "eu-west"])
    old_ca = (tmp_path / "ca.pem").read_bytes()
    update = update_dev_pki(tmp_path, ["us-east"], force=True)
    assert update.ca.action == "replaced" and (tmp_path / "ca.pem").read_bytes() != old_ca
    assert update.sources[0].action == "replaced" and update.mirror.action == "replaced"
    (warning,) = update.warnings
    assert "source-eu-west.pem" in warning and "--cluster eu-west" in warning


def test_a_certificate_with_extra_names_still_verifies_by_cluster_id(tmp_path: Path) -> None:
    update = update_dev_pki(tmp_path, ["us-east"], extra_names=["127.0.0.1", "db.example.com"])
    outcome = asyncio.run(
        _handshake(update.sources[0].pair, ca_file=update.ca.pair.cert, server_name="us-east")
    )
    assert outcome.connected, outcome


def test_subject_names_are_dns_names_or_ip_addresses() -> None:
    assert parse_subject_name("db.example.com") == "db.example.com"
    assert str(parse_subject_name("10.0.0.5")) == "10.0.0.5"
    assert str(parse_subject_name("::1")) == "::1"
    with pytest.raises(ValueError, match="DNS name or an IP address"):
        parse_subject_name("not a name")


def test_pem_file_helpers_name_the_file(pki: DevPki, tmp_path: Path) -> None:
    assert load_certificate_file(pki.ca.cert)
    assert key_matches_certificate(pki.mirror.cert, pki.mirror.key)
    assert not key_matches_certificate(pki.mirror.cert, pki.ca.key)
    with pytest.raises(PemFileError, match="no such file"):
        load_certificate_file(tmp_path / "none.pem")
    with pytest.raises(PemFileError, match="is a directory"):
        load_private_key_file(tmp_path)
    with pytest.raises(PemFileError, match="not a PEM certificate"):
        load_certificate_file(pki.ca.key)
    with pytest.raises(PemFileError, match="not a PEM private key"):
        load_private_key_file(pki.ca.cert)
