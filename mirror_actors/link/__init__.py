"""The mirror's link to one source database: configuration, the ``SourceLink`` actor and
its mailbox, the sans-I/O ``MirrorSession`` that holds the mirror's protocol rules, the
QUIC connection shell around it on the process's loop thread, and stream handles."""

from __future__ import annotations

from mirror_actors.link.actor import (
    Connect,
    Disconnect,
    FailLink,
    GetStatus,
    LinkDialing,
    LinkDown,
    LinkUp,
    OpenStream,
    Promote,
    SetPosition,
    SourceLink,
    StreamOpened,
    link_strategy,
)
from mirror_actors.link.config import (
    LinkConfig,
)
from mirror_actors.link.session import (
    MirrorSession,
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
    "LinkDialing",
    "LinkDown",
    "LinkState",
    "LinkStatus",
    "LinkStream",
    "LinkUp",
    "MirrorSession",
    "OpenStream",
    "Promote",
    "SetPosition",
    "SourceLink",
    "StreamClosed",
    "StreamListener",
    "StreamOpened",
    "link_strategy",
]
