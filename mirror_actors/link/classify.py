"""Turning what the transport reports into typed link errors, sans-I/O."""

from __future__ import annotations

from mirror_actors.link.config import LinkConfig
from mirror_actors.wire.errors import (
    CRYPTO_ERROR_BASE,
    CRYPTO_ERROR_LAST,
    ClusterIdMismatch,
    ErrorCode,
    MalformedFrame,
    MirrorError,
    TlsVerificationError,
    TransportError,
    error_for_code,
)
from mirror_actors.wire.frames import HelloAck

ALERT_INTERNAL_ERROR = 80

# TLS alert numbers (RFC 8446 section 6) and what a user should do about each.
_ALERT_HINTS = {
    42: "check that ca_file is the CA that signed the source's certificate and that the "
    "certificate names the source cluster id as a DNS subjectAltName",
    43: "the certificate is of an unsupported type",
    44: "a certificate was revoked",
    45: "a certificate has expired or is not valid yet: renew it",
    46: "check both sides' certificates",
    48: "the certificate was signed by a CA the other side does not trust: check ca_file",
    116: "this source requires a client certificate: set client_cert_file and client_key_file",
}


def tls_hint(alert: int, reason: str) -> str:
    lowered = reason.lower()
    if "client certificate rejected" in lowered:
        return "the source does not trust this mirror's client certificate: check client_cert_file and the source's client CA"
    if "doesn't match" in lowered:
        return "the source's certificate does not name the cluster id that was dialed: check source_cluster_id and the source's certificate"
    if "issuer" in lowered or "unknown ca" in lowered:
        return "the certificate was signed by a CA this link does not trust: check ca_file"
    return _ALERT_HINTS.get(alert, "check the TLS configuration of both sides")


def error_for_close(
    config: LinkConfig, error_code: int, frame_type: int | None, reason: str
) -> MirrorError:
    """The error for a CONNECTION_CLOSE (or an aioquic-local close such as the idle timeout)."""
    if frame_type is not None and CRYPTO_ERROR_BASE <= error_code <= CRYPTO_ERROR_LAST:
        alert = error_code - CRYPTO_ERROR_BASE
        if alert == ALERT_INTERNAL_ERROR:
            # The peer failed on its side (a source that could not read its client
            # CA mid-rotation): nothing to fix here, so worth a retry, not an escalation.
            return TransportError(
                f"the source's TLS failed internally: {reason or 'internal_error'} "
                f"(TLS alert {alert}); retrying"
            )
        return TlsVerificationError(
            f"{reason or 'TLS alert ' + str(alert)} (TLS alert {alert}, dialing {config.tls_server_name!r})",
            tls_hint(alert, reason),
        )
    if frame_type is None:
        if error_code == ErrorCode.NONE:
            return TransportError(
                f"source {config.target} closed the connection" + (f": {reason}" if reason else "")
            )
        return error_for_code(
            error_code,
            reason,
            expected_cluster=config.source_cluster_id,
            remote_cluster="",
            database_id=config.source_database_id,
            protocol_version=config.protocol_version,
        )
    if reason == "Idle timeout":
        return TransportError(f"source {config.target} went silent for {config.idle_timeout:g} s")
    return TransportError(
        f"connection to {config.target} failed: {reason or 'no reason given'}", error_code
    )


def error_for_ack(config: LinkConfig, ack: HelloAck) -> MirrorError | None:
    """None for an acceptable ack, else the error PROTOCOL.md section 5 prescribes."""
    if ack.accepted and ack.error_code != ErrorCode.NONE:
        return MalformedFrame(
            f"an accepting HELLO_ACK must carry error_code 0, got {ack.error_code}"
        )
    if not ack.accepted:
        error = error_for_code(
            ack.error_code,
            ack.error_detail,
            expected_cluster=config.source_cluster_id,
            remote_cluster=ack.source_cluster_id,
            database_id=config.source_database_id,
            protocol_version=config.protocol_version,
        )
        return error
    if ack.source_cluster_id != config.source_cluster_id:
        return ClusterIdMismatch(
            config.source_cluster_id,
            ack.source_cluster_id,
            "the accepting HELLO_ACK names another cluster",
        )
    return None
