"""What a link needs to know to reach one source database."""

from __future__ import annotations

from attrs import field, frozen, validators

from mirror_actors.wire.frames import PROTOCOL_VERSION

DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_KEEPALIVE_INTERVAL = 1.0
DEFAULT_IDLE_TIMEOUT = 5.0
# The source's default cap (64 MiB) plus the one frame (1 MiB at most) it may send
# past the cap before it pauses.
DEFAULT_MAX_UNACKED_BYTES = (64 + 1) * 1024 * 1024

_positive = validators.gt(0.0)


@frozen
class LinkConfig:
    """One source link: which cluster and database, where, and how to trust it.

    Defaults: ``handshake_timeout`` 5 s (dial plus HELLO/HELLO_ACK), QUIC PINGs
    every ``keepalive_interval`` 1 s, and a source silent for ``idle_timeout``
    5 s counts as lost.  ``server_name`` defaults to the cluster id (PROTOCOL.md
    section 1); set it only to test name checks.
    """

    source_cluster_id: str = field(validator=validators.min_len(1))
    source_database_id: str = field(validator=validators.min_len(1))
    ca_file: str = field(converter=str)
    host: str = "127.0.0.1"
    port: int = field(
        default=4433, validator=validators.and_(validators.ge(0), validators.le(65535))
    )
    client_cert_file: str | None = None
    client_key_file: str | None = None
    handshake_timeout: float = field(default=DEFAULT_HANDSHAKE_TIMEOUT, validator=_positive)
    keepalive_interval: float = field(default=DEFAULT_KEEPALIVE_INTERVAL, validator=_positive)
    idle_timeout: float = field(default=DEFAULT_IDLE_TIMEOUT, validator=_positive)
    server_name: str | None = None
    max_unacked_bytes: int = field(default=DEFAULT_MAX_UNACKED_BYTES, validator=validators.gt(0))
    """Received but unacknowledged payload bytes past which the source is taken to ignore
    flow control; raise it for sources configured with a larger cap."""
    protocol_version: int = PROTOCOL_VERSION
    max_snapshot_bytes: int | None = field(
        default=None, validator=validators.optional(validators.gt(0))
    )
    """The largest snapshot this mirror accepts (None: as much as the disk holds); a larger
    announcement is a hard ``SnapshotTooLarge`` at its first chunk."""

    def __attrs_post_init__(self) -> None:
        if self.keepalive_interval >= self.idle_timeout:
            raise ValueError(
                f"keepalive_interval ({self.keepalive_interval} s) must be shorter than "
                f"idle_timeout ({self.idle_timeout} s), or a live source would time out"
            )
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError(
                "client_cert_file and client_key_file go together: set both or neither"
            )

    @property
    def name(self) -> str:
        """``cluster/database``: how logs and statuses name this link."""
        return f"{self.source_cluster_id}/{self.source_database_id}"

    @property
    def tls_server_name(self) -> str:
        return self.server_name if self.server_name is not None else self.source_cluster_id

    @property
    def target(self) -> str:
        return f"{self.source_cluster_id} at {self.host}:{self.port}"
