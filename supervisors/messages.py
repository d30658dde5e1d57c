"""Messages a supervisor understands. Requests are meant to be `ask`ed."""

from __future__ import annotations

from typing import Any

import attrs

from supervisors.child import ChildSpec


@attrs.frozen
class WhichChildren:
    """Answers a list of ChildStatus, in start order."""


@attrs.frozen
class CountChildren:
    """Answers a ChildCounts."""


@attrs.frozen
class GetChild:
    """Answers the child's current ref, or None while it has no live actor.

    Raises ChildNotFound for an unknown id.
    """

    child_id: str


@attrs.frozen
class StartChild:
    """Add and start a child; answers its ref. Raises DuplicateChild if the id is taken."""

    spec: ChildSpec


@attrs.frozen
class StopChild:
    """Stop a child for good (its spec stays unless `delete`). Raises ChildNotFound."""

    child_id: str
    delete: bool = False


@attrs.frozen
class RestartChild:
    """Restart a child now, whatever its state; answers its ref (None if the start failed)."""

    child_id: str


@attrs.frozen
class ResetBackoff:
    """Forget a child's failures in a row: its next failure waits the base delay."""

    child_id: str


@attrs.frozen
class SendToChild:
    """Tell `message` to a child; stashed while the child restarts.

    Asked, it answers None once delivered or stashed, or raises StashOverflow,
    ChildUnavailable or ChildNotFound.
    """

    child_id: str
    message: Any


@attrs.frozen
class AskChild:
    """Ask `message` of a child; stashed while the child restarts.

    Answers a pykka Future for the child's reply (see `ask_child`, which also
    waits on it). The future fails with StashOverflow, ChildUnavailable or
    SupervisorStopped if the message cannot be delivered.
    """

    child_id: str
    message: Any


@attrs.frozen
class ChildFailed:
    """Sent by a SupervisedActor: it failed (alive=True: it reported and stays up)."""

    child_urn: str
    error: BaseException
    alive: bool


@attrs.frozen
class ChildExited:
    """Sent by a SupervisedActor that stopped without failing."""

    child_urn: str


@attrs.frozen
class RestartDue:
    """Sent by a clock timer: restart these children (id, generation)."""

    children: tuple[tuple[str, int], ...]
    timer_key: int = 0
