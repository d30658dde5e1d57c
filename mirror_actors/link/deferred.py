"""Answering an ``ask`` later than the message handler returns, for pykka actors.

A link answers ``Connect`` only once the handshake is done, yet its mailbox
must stay free meanwhile (a ``Disconnect`` has to cancel the dial).  pykka
answers as soon as ``on_receive`` returns, so the handler takes the reply
future out of the envelope and completes it when the result arrives.
"""

from __future__ import annotations

import queue
from typing import Any

import pykka


class _EnvelopeTrackingInbox(queue.Queue[Any]):
    """pykka's inbox, remembering the envelope being handled."""

    current: Any = None

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        envelope = super().get(block, timeout)
        self.current = envelope
        return envelope


class DeferredReplies:
    """Mixin for a pykka ``ThreadingActor``: ``defer_reply()`` inside ``on_receive``."""

    actor_inbox: Any

    @staticmethod
    def _create_actor_inbox() -> Any:
        return _EnvelopeTrackingInbox()

    def defer_reply(self) -> pykka.Future[Any] | None:
        """Take over answering the message being handled; None if it was a ``tell``.

        After this, whatever ``on_receive`` returns or raises is not sent: the
        caller waits until the returned future is completed.
        """
        envelope = self.actor_inbox.current
        future: pykka.Future[Any] | None = envelope.reply_to
        envelope.reply_to = None
        return future


def reply(future: pykka.Future[Any] | None, value: Any) -> None:
    if future is not None:
        future.set(value)


def reply_error(future: pykka.Future[Any] | None, error: BaseException) -> None:
    if future is not None:
        future.set_exception(exc_info=(type(error), error, error.__traceback__))
