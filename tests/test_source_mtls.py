"""Mutual TLS fails closed: bad files stop ``start()``, and no unverified mirror is ever served.

Refused connections are checked on the wire (nothing arrives on any stream, the
close is a CRYPTO_ERROR) and inside the source (its session never saw a byte).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from mirror_actors.pki import CertificateAuthority, DevPki, write_pair
from mirror_actors.source import SourceConfigError, SourceServer, SourceSession
from mirror_actors.wire import Hello, Subscribe, encode_frame
from mirror_actors.wire.errors import CRYPTO_ERROR_BASE
from tests.helpers import CLUSTER, source_server, thread_names
from tests.rawclient import accepted, mirror, run

ALERT_BAD_CERTIFICATE = 42
ALERT_INTERNAL_ERROR = 80


@pytest.fixture
def session_inputs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bytes]]:
    """Every stream byte any SourceSession is handed, to prove a refused peer reached none."""
    seen: list[tuple[int, bytes]] = []
    real = SourceSession.stream_data

    def spy(self: SourceSession, stream_id: int, data: bytes, end_stream: bool) -> Any:
        seen.append((stream_id, data))
        return real(self, stream_id, data, end_stream)

    monkeypatch.setattr(SourceSession, "stream_data", spy)
    return seen


def stranger_pair(tmp_path: Path) -> Any:
    stranger = CertificateAuthority.create(common_name="someone else's CA")
    cert, key = stranger.issue("mirror", ["mirror"], client=True, server=False)
    return write_pair(tmp_path, "stranger", cert, key)


async def refused_before_any_data(client: Any) -> Any:
    """Send HELLO and SUBSCRIBE at once; the source must close and answer nothing."""
    client.send(0, Hello(CLUSTER, "orders"), end=True)
    client.send(client.open_stream(), Subscribe(1))
    closed = await client.closed()
    assert client.raw == {}, f"the source sent stream data to an unverified mirror: {client.raw}"
    return closed


def mtls_mirror(source: SourceServer, pki: DevPki, pair: Any = None, **kwargs: Any) -> Any:
    pair = pair if pair is not None else pki.mirror
    return mirror(source, pki, certfile=str(pair.cert), keyfile=str(pair.key), **kwargs)


# -- start() checks every file -------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"this is not PEM at all\n", "no certificate in it"),
        (b"", "no certificate in it"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
            "not a PEM certificate file",
        ),
    ],
)
def test_a_garbage_client_ca_file_fails_start_naming_it(
    pki: DevPki, tmp_path: Path, content: bytes, words: str
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(content)
    server = source_server(pki, client_ca_file=str(ca))
    before = set(thread_names())
    with pytest.raises(SourceConfigError) as caught:
        server.start()
    message = str(caught.value)
    assert message.startswith(f"cannot load client_ca_file '{ca}': {words}")
    assert "CA that signs the mirrors' client certificates" in message
    assert (caught.value.setting, caught.value.path) == ("client_ca_file", str(ca))
    assert isinstance(caught.value, ValueError)
    assert not server.running and set(thread_names()) == before
    server.stop()  # harmless


def test_a_client_ca_file_holding_only_a_key_has_no_certificate(pki: DevPki) -> None:
    with pytest.raises(SourceConfigError, match="no certificate in it"):
        source_server(pki, client_ca_file=str(pki.ca.key)).start()


def test_a_missing_client_ca_file_fails_start_naming_it(pki: DevPki, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    server = source_server(pki, client_ca_file=str(missing))
    with pytest.raises(
        SourceConfigError, match=f"cannot load client_ca_file '{missing}': no such file"
    ):
        server.start()
    assert not server.running


def test_a_directory_as_client_ca_file_fails_start(pki: DevPki, tmp_path: Path) -> None:
    with pytest.raises(SourceConfigError, match="is a directory"):
        source_server(pki, client_ca_file=str(tmp_path)).start()


def test_bad_certfile_and_keyfile_fail_start_naming_them(pki: DevPki, tmp_path: Path) -> None:
    pair = pki.source(CLUSTER)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"garbage")
    other = pki.source("eu-west")
    cases = [
        (
            {"certfile": str(tmp_path / "none.pem"), "keyfile": str(pair.key)},
            "certfile",
            "no such file",
        ),
        ({"certfile": str(garbage), "keyfile": str(pair.key)}, "certfile", "no certificate in it"),
        (
            {"certfile": str(pair.cert), "keyfile": str(garbage)},
            "keyfile",
            "not an unencrypted PEM",
        ),
        ({"certfile": str(pair.cert), "keyfile": str(other.key)}, "keyfile", "not the key of"),
    ]
    for files, setting, words in cases:
        server = SourceServer(
            CLUSTER, ("orders",), certfile=files["certfile"], keyfile=files["keyfile"]
        )
        with pytest.raises(SourceConfigError) as caught:
            server.start()
        assert caught.value.setting == setting
        assert f"cannot load {setting} '{files[setting]}'" in str(caught.value)
        assert words in str(caught.value)
        assert not server.running


# -- no unverified mirror is served ------------------------------------------------------


def test_a_client_certificate_from_a_foreign_ca_is_refused_and_served_nothing(
    pki: DevPki, tmp_path: Path, session_inputs: list[Any], warning_logs: list[str]
) -> None:
    with source_server(pki, client_ca_file=str(pki.ca.cert)) as source:

        async def scenario() -> Any:
            # Not waiting for the handshake: HELLO leaves with the client's Finished,
            # so it reaches the source before the certificate check.
            async with mtls_mirror(
                source, pki, stranger_pair(tmp_path), wait_connected=False
            ) as client:
                return await refused_before_any_data(client)

        closed = run(scenario())
    assert closed.error_code == CRYPTO_ERROR_BASE + ALERT_BAD_CERTIFICATE
    assert "client certificate rejected" in closed.reason_phrase
    assert session_inputs == [], "the session must never see an unverified peer's bytes"
    assert any("refused mirror without a valid client certificate" in w for w in warning_logs)


def test_data_sent_with_the_finished_is_served_once_the_certificate_verified(
    pki: DevPki, session_inputs: list[Any]
) -> None:
    with source_server(pki, client_ca_file=str(pki.ca.cert)) as source:
        source.append("orders", b"first")

        async def scenario() -> Any:
            async with mtls_mirror(source, pki, wait_connected=False) as client:
                client.send(0, Hello(CLUSTER, "orders"), end=True)
                stream = client.open_stream()
                client.send(stream, Subscribe(1))
                ack = await client.recv(0)
                return ack, await client.recv(stream)

        ack, entries = run(scenario())
    assert ack.accepted and [e.data for e in entries.entries] == [b"first"]
    assert session_inputs[0][0] == 0 and session_inputs[0][1] == encode_frame(
        Hello(CLUSTER, "orders")
    )


@pytest.mark.parametrize("how", ["garbage", "deleted", "emptied"])
def test_a_client_ca_file_broken_after_start_refuses_every_mirror(
    pki: DevPki, tmp_path: Path, how: str, session_inputs: list[Any], warning_logs: list[str]
) -> None:
    ca = tmp_path / "ca.pem"
    shutil.copy(pki.ca.cert, ca)
    with source_server(pki, client_ca_file=str(ca)) as source:

        async def before() -> Any:
            async with mtls_mirror(source, pki) as client:
                return await accepted(client)

        assert run(before()).accepted
        session_inputs.clear()
        if how == "garbage":
            ca.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        elif how == "deleted":
            ca.unlink()
        else:
            ca.write_bytes(b"")

        async def after() -> Any:
            async with mtls_mirror(source, pki, wait_connected=False) as client:
                return await refused_before_any_data(client)

        closed = run(after())
        # The refusal is per connection: the server itself keeps running.
        assert source.running
    assert closed.error_code == CRYPTO_ERROR_BASE + ALERT_INTERNAL_ERROR
    assert "could not verify the client certificate" in closed.reason_phrase
    assert session_inputs == []
    assert any(f"client_ca_file '{ca}'" in w for w in warning_logs), warning_logs


def test_any_exception_while_verifying_refuses_the_connection(
    pki: DevPki, monkeypatch: pytest.MonkeyPatch, session_inputs: list[Any]
) -> None:
    import mirror_actors.source.server as server_module

    def explode(*_args: Any) -> Any:
        raise RuntimeError("verification blew up")

    monkeypatch.setattr(server_module, "_client_certificate_problem", explode)
    with source_server(pki, client_ca_file=str(pki.ca.cert)) as source:

        async def scenario() -> Any:
            async with mtls_mirror(source, pki, wait_connected=False) as client:
                return await refused_before_any_data(client)

        closed = run(scenario())
    assert closed.error_code == CRYPTO_ERROR_BASE + ALERT_INTERNAL_ERROR
    assert session_inputs == []


def test_a_rotated_client_ca_applies_to_the_next_connection(pki: DevPki, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    shutil.copy(pki.ca.cert, ca)
    with source_server(pki, client_ca_file=str(ca)) as source:
        rotated_ca = CertificateAuthority.create(common_name="rotated CA")
        cert, key = rotated_ca.issue("mirror", ["mirror"], client=True, server=False)
        rotated = write_pair(tmp_path, "rotated", cert, key)
        ca.write_bytes(rotated_ca.cert_pem)

        async def scenario() -> tuple[Any, Any]:
            async with mtls_mirror(source, pki, wait_connected=False) as old:
                refused = await refused_before_any_data(old)
            async with mtls_mirror(source, pki, rotated) as new:
                return refused, await accepted(new)

        refused, ack = run(scenario())
    assert refused.error_code == CRYPTO_ERROR_BASE + ALERT_BAD_CERTIFICATE
    assert ack.accepted
