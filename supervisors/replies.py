"""Answering an `ask` later than the handler returns, and relaying a child's answer.

pykka answers an ask as soon as `on_receive` returns. An actor that must keep
its mailbox free meanwhile (a link answers `Connect` only once the handshake is
done, yet a `Disconnect` must be able to cancel the dial) calls `defer_reply()`
inside the handler and completes the returned future later, from another
message, with `reply(future, value)` or `reply_error(future, error)`.

Every `SupervisedActor` (so every `Supervisor`) can do this; a plain pykka actor
gets it by mixing in `DeferredReplies`. Both use the one inbox class of
`supervisors._pykka`, which also tells a supervisor whether a failing request
was asked (raise to the asker) or told (log it).
"""

from __future__ import annotations

import time
from typing import Any

from pykka import Future, ThreadingFuture

from supervisors._pykka import InboxActor, answers_asker, take_reply


class DeferringActor(InboxActor):
    """The base every deferring actor shares (`DeferredReplies`, `SupervisedActor`)."""

    def defer_reply(self) -> Future[Any] | None:
        """Take over answering the message being handled; None if it was a `tell`.

        Call it in the actor's own thread, while handling the message (not in
        `on_start`/`on_stop`). After it, whatever the handler returns or raises
        is not sent: the asker waits until the returned future is completed
        with `reply` or `reply_error`, from any thread. An exception the handler
        raises afterwards is then a failure of the actor, as for a told message.
        """
        return take_reply(self)

    def replying_to_asker(self) -> bool:
        """True while handling an ask whose reply was not deferred: raising reaches the asker."""
        return answers_asker(self)


class DeferredReplies(DeferringActor):
    """Mixin for a pykka `ThreadingActor`: `defer_reply()` inside `on_receive`.

    `class Link(DeferredReplies, pykka.ThreadingActor)`, or with
    `SupervisedActor` (which already has `defer_reply`; listing both is harmless).
    """


def _exc_info(error: BaseException) -> tuple[type[BaseException], BaseException, Any]:
    return type(error), error, error.__traceback__


def reply(future: Future[Any] | None, value: Any) -> None:
    """Answer a deferred ask (a no-op for None, i.e. a message that was told)."""
    if future is not None:
        future.set(value)


def reply_error(future: Future[Any] | None, error: BaseException) -> None:
    """Fail a deferred ask with `error`, raised to the asker (a no-op for None)."""
    if future is not None:
        future.set_exception(exc_info=_exc_info(error))


class ReplyRelay:
    """The future an `AskChild` asker waits on, answered later by the child.

    A message asked through the supervisor may wait in the stash before the
    child gets it. `future` is handed to the asker at once; `forward(answer)`
    later hands over the future of the real `ask` to the child, or `fail(error)`
    says it was never delivered. Built from public pykka API only: `future`'s
    get hook waits for the hand-over, then for the child's answer, within the
    asker's one timeout. (pykka runs a get hook under the future's lock, so two
    threads waiting on the same relayed future take turns.)
    """

    def __init__(self) -> None:
        self._handover: ThreadingFuture[Future[Any]] = ThreadingFuture()
        self.future: ThreadingFuture[Any] = ThreadingFuture()
        self.future.set_get_hook(self._wait)

    def forward(self, answer: Future[Any]) -> None:
        """The message was delivered: `answer` is the child's reply future."""
        self._handover.set(answer)

    def fail(self, error: BaseException) -> None:
        """The message will not be delivered: the asker gets `error`."""
        self._handover.set_exception(exc_info=(type(error), error, None))

    def _wait(self, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        answer = self._handover.get(timeout=timeout)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return answer.get(timeout=remaining)
