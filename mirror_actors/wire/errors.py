"""Error codes of PROTOCOL.md section 4 and the typed errors built on them.

Every error says whether retrying can help (``hard``) and, where the protocol
has one, which wire ``code`` carries it.  A supervisor reads ``hard`` to
decide between backing off and escalating.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ErrorCode(IntEnum):
    """Codes used in HELLO_ACK ``error_code``, ERROR ``code`` and as QUIC application close codes."""

    NONE = 0x00
    CLUSTER_ID = 0x01
    OBSERVER_ONLY = 0x02
    BAD_VERSION = 0x03
    UNKNOWN_DATABASE = 0x04
    MALFORMED = 0x05
    SOURCE_SHUTDOWN = 0x06
    DIVERGED = 0x07
    OVERLOADED = 0x08


# TLS alerts travel as QUIC CRYPTO_ERROR codes: 0x100 + alert number (RFC 9001 4.8).
CRYPTO_ERROR_BASE = 0x100
CRYPTO_ERROR_LAST = 0x1FF


class MirrorError(Exception):
    """Base of every error this package raises about a link.

    ``hard`` errors are configuration errors that no retry can fix; the rest
    are transient and worth retrying with backoff.
    """

    hard: ClassVar[bool] = False
    code: ClassVar[ErrorCode | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:
        # Subclasses take other constructor arguments; rebuild through the base
        # so errors survive pickling (pykka futures and multiprocessing use it).
        return (_rebuild_error, (type(self), self.__dict__))


def _rebuild_error(cls: type[MirrorError], state: dict[str, object]) -> MirrorError:
    error = Exception.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class ClusterIdMismatch(MirrorError):
    """The source answering is not the cluster this link was configured for."""

    hard = True
    code = ErrorCode.CLUSTER_ID

    def __init__(self, expected: str, actual: str, detail: str = "") -> None:
        self.expected = expected
        self.actual = actual
        self.detail = detail
        super().__init__(
            f"cluster id mismatch: this link is configured for source cluster {expected!r} "
            f"but the source answered as {actual!r}"
            + (f" ({detail})" if detail else "")
            + "; fix source_cluster_id in the link configuration or the address it dials"
        )


class ObserverRoleViolation(MirrorError):
    """A voter-class frame was sent or received; a mirror is an observer only."""

    hard = True
    code = ErrorCode.OBSERVER_ONLY

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__(
            "observer role violation: a mirror may not send or receive voter-class frames "
            "(REQUEST_VOTE, CONF_CHANGE, PROPOSE)" + (f": {detail}" if detail else "")
        )


class ProtocolVersionMismatch(MirrorError):
    """The two sides speak different protocol versions."""

    hard = True
    code = ErrorCode.BAD_VERSION

    def __init__(self, ours: int | None, detail: str = "") -> None:
        self.ours = ours
        self.detail = detail
        super().__init__(
            f"protocol version mismatch: this side speaks version {ours}"
            + (f"; the peer said: {detail}" if detail else "")
            + "; upgrade the older side"
        )


class UnknownDatabase(MirrorError):
    """The source holds no database of the requested id."""

    hard = True
    code = ErrorCode.UNKNOWN_DATABASE

    def __init__(self, database_id: str, cluster_id: str = "", detail: str = "") -> None:
        self.database_id = database_id
        self.cluster_id = cluster_id
        self.detail = detail
        where = f"source cluster {cluster_id!r}" if cluster_id else "the source"
        super().__init__(
            f"unknown database: {where} holds no database {database_id!r}"
            + (f" ({detail})" if detail else "")
            + "; fix source_database_id in the link configuration"
        )


class MalformedFrame(MirrorError):
    """Bytes from the peer broke PROTOCOL.md section 2, or a frame came where section 5 allows none."""

    code = ErrorCode.MALFORMED

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"malformed frame: {detail}")


class SourceShutdown(MirrorError):
    """The source is stopping; reconnect later."""

    code = ErrorCode.SOURCE_SHUTDOWN

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__("source shut down" + (f": {detail}" if detail else ""))


class HistoryDiverged(MirrorError):
    """The mirror's history is not the source's: never retried, never applied on top of."""

    hard = True
    code = ErrorCode.DIVERGED

    def __init__(
        self,
        detail: str,
        *,
        lsn: int | None = None,
        mirror_term: int | None = None,
        source_term: int | None = None,
    ) -> None:
        self.detail = detail
        self.lsn = lsn
        self.mirror_term = mirror_term
        self.source_term = source_term
        super().__init__(
            f"history diverged: {detail}; the replica is left as it was. Point the link at "
            "the source this replica came from, or let it start over with "
            'on_divergence="resync" (drops the replica\'s contents)'
        )


class SourceOverloaded(MirrorError):
    """The source shed this connection (over its connection limit, or stalled); retry later."""

    code = ErrorCode.OVERLOADED

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__("source overloaded" + (f": {detail}" if detail else ""))


class SnapshotTooLarge(MirrorError):
    """The source announced a snapshot larger than this mirror is configured to accept."""

    hard = True

    def __init__(self, total_bytes: int, limit: int) -> None:
        self.total_bytes = total_bytes
        self.limit = limit
        super().__init__(
            f"the source's snapshot is {total_bytes} bytes, more than max_snapshot_bytes "
            f"({limit}); raise max_snapshot_bytes in the link configuration or compact less "
            "on the source"
        )


class TlsVerificationError(MirrorError):
    """The TLS handshake failed verification (unknown CA, name mismatch, expiry, missing client cert)."""

    hard = True

    def __init__(self, detail: str, hint: str = "") -> None:
        self.detail = detail
        self.hint = hint
        super().__init__(f"TLS verification failed: {detail}" + (f"; {hint}" if hint else ""))


class HandshakeTimeout(MirrorError):
    """No accepted handshake within the configured timeout (dead port, lost packets, slow source)."""

    def __init__(self, timeout: float, target: str = "") -> None:
        self.timeout = timeout
        self.target = target
        super().__init__(
            f"handshake with {target or 'the source'} did not complete within {timeout:g} s"
        )


class TransportError(MirrorError):
    """The QUIC connection failed or was lost for a reason that may go away."""

    def __init__(self, detail: str, quic_error_code: int | None = None) -> None:
        self.detail = detail
        self.quic_error_code = quic_error_code
        suffix = f" (QUIC error 0x{quic_error_code:x})" if quic_error_code is not None else ""
        super().__init__(f"transport error: {detail}{suffix}")


class MirrorPromoted(MirrorError):
    """The mirror was promoted; its links stay down for good."""

    hard = True

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__(
            "this mirror was promoted and no longer follows a source"
            + (f": {detail}" if detail else "")
        )


class LinkNotConnected(MirrorError):
    """An operation needs a connected link and this one is not connected."""

    def __init__(self, detail: str = "", hint: str = "send Connect first") -> None:
        self.detail = detail
        self.hint = hint
        super().__init__(
            "link is not connected"
            + (f": {detail}" if detail else "")
            + (f"; {hint}" if hint else "")
        )


def error_for_code(
    code: int,
    detail: str,
    *,
    expected_cluster: str = "",
    remote_cluster: str = "",
    database_id: str = "",
    protocol_version: int | None = None,
) -> MirrorError:
    """The typed error a mirror raises when the source reports ``code`` (in an ack, ERROR or close)."""
    match code:
        case ErrorCode.CLUSTER_ID:
            return ClusterIdMismatch(expected_cluster, remote_cluster, detail)
        case ErrorCode.OBSERVER_ONLY:
            return ObserverRoleViolation(detail)
        case ErrorCode.BAD_VERSION:
            return ProtocolVersionMismatch(protocol_version, detail)
        case ErrorCode.UNKNOWN_DATABASE:
            return UnknownDatabase(database_id, remote_cluster or expected_cluster, detail)
        case ErrorCode.MALFORMED:
            return MalformedFrame(
                f"the source reported: {detail}" if detail else "reported by the source"
            )
        case ErrorCode.SOURCE_SHUTDOWN:
            return SourceShutdown(detail)
        case ErrorCode.DIVERGED:
            return HistoryDiverged(
                f"the source reported: {detail}" if detail else "reported by the source"
            )
        case ErrorCode.OVERLOADED:
            return SourceOverloaded(detail)
        case ErrorCode.NONE:
            return TransportError(
                "the source closed the connection" + (f": {detail}" if detail else "")
            )
        case _:
            return TransportError(f"source closed with unknown code 0x{code:x}: {detail}")
