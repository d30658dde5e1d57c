"""The mirror's link to one source database: configuration, the ``SourceLink`` actor and
its mailbox, the QUIC connection shell on the process's loop thread, and stream handles."""

from __future__ import annotations

from mirror_actors.link.actor import (
    Connect,
    Disconnect,
    FailLink,
    GetStatus,
    LinkDown,
    LinkUp,
    OpenStream,
    Promote,
    SetPosition,
    SourceLink,
    link_strategy,
)
from mirror_actors.link.config import (
    LinkConfig,
)
from mirror_actors.link.state import (
    LinkState,
    LinkStatus,
)
from mirror_actors.link.stream import (
    Delivery,
    LinkStream,
    StreamClosed,
    StreamListener,
)

__all__ = [
    "Connect",
    "Delivery",
    "Disconnect",
    "FailLink",
    "GetStatus",
    "LinkConfig",
    "LinkDown",
    "LinkState",
    "LinkStatus",
    "LinkStream",
    "LinkUp",
    "OpenStream",
    "Promote",
    "SetPosition",
    "SourceLink",
    "StreamClosed",
    "StreamListener",
    "link_strategy",
]
