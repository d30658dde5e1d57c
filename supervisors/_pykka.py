"""The one door to pykka's private API: every use of it in `supervisors` is here.

pykka 4 offers no public way to do four things a supervision library needs:

1. tell, while handling a message, whether raising would reach an asker
   (a failed request that was only told must be logged, not kill the actor);
2. take over the reply of the message being handled, to answer it later;
3. hear that an actor died, with the exception that killed it, wherever it
   was raised (`on_start`, a told message, `on_stop`; pykka calls the public
   `on_failure` only for the second), or that it stopped normally;
4. start an actor object that was built outside `Actor.start` (a factory's).

Each is wrapped below with a short note on why and on what it relies on.
`tests/supervisors/test_pykka_internals.py` checks every private name used
here against the installed pykka and fails loudly if one moves; setup.cfg caps
pykka below its next major version. Everything else in the package uses
pykka's public API only (`ThreadingFuture`, `Future.set_get_hook`, `ActorRef`,
`ActorRegistry`, `pykka.messages.ProxyCall`).
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pykka
from pykka import ActorRef, ActorRegistry, Future

PRIVATE_NAMES = (
    "Envelope.reply_to",
    "Actor._create_actor_inbox",
    "Actor._handle_failure",
    "Actor._stop",
    "Actor._start_actor_loop",
)
"""The pykka internals this module relies on (checked by its test)."""


class TrackingInbox(queue.Queue[Any]):
    """pykka's own inbox type, a `queue.Queue` of envelopes, that remembers the
    envelope the actor is handling.

    The actor loop takes one envelope at a time with `get()` and handles it
    before taking the next, so the last envelope taken is the one being
    handled. Only the actor's own thread reads `current`.
    """

    current: Any = None
    """The envelope being handled (a private `pykka._envelope.Envelope`), or None."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        envelope = super().get(block, timeout)
        self.current = envelope
        return envelope


class InboxActor(pykka.ThreadingActor):
    """A `ThreadingActor` whose inbox is a `TrackingInbox`.

    `_create_actor_inbox` is the factory pykka's `Actor.__init__` calls for the
    inbox ("internal method for implementors of new actor types"); overriding it
    is the only way to see envelopes, which carry the asker's future.
    """

    @staticmethod
    def _create_actor_inbox() -> TrackingInbox:
        return TrackingInbox()


def _current_envelope(actor: pykka.Actor) -> Any:
    inbox = actor.actor_inbox
    return inbox.current if isinstance(inbox, TrackingInbox) else None


def answers_asker(actor: pykka.Actor) -> bool:
    """True while handling an asked message whose reply was not taken over.

    Then whatever the handler raises goes back to the asker. False for a told
    message, after `take_reply`, outside a handler, and for an actor that is not
    an `InboxActor`. Call it from the actor's own thread only.
    """
    envelope = _current_envelope(actor)
    # Envelope.reply_to: the future ActorRef.ask waits on (None for a tell).
    return envelope is not None and envelope.reply_to is not None


def take_reply(actor: pykka.Actor) -> Future[Any] | None:
    """Take the asker's future out of the envelope being handled.

    pykka answers an ask with whatever the handler returns, as soon as it
    returns, unless `reply_to` is None; clearing it leaves the answer to whoever
    holds the future. None for a tell, or if it was taken already.
    """
    envelope = _current_envelope(actor)
    if envelope is None:
        return None
    future: Future[Any] | None = envelope.reply_to
    envelope.reply_to = None
    return future


CrashFinish = Callable[[], None]


class LifecycleActor(pykka.ThreadingActor):
    """Turns pykka's private `_handle_failure` and `_stop` into two hooks.

    pykka calls `_handle_failure(exc_info)` whenever the actor dies from an
    exception: in `on_start` (where `on_failure` is never called), while
    handling a told message, and in `on_stop`. It is the one place that sees
    every crash with its exception. `_stop()` is what ends the actor on a normal
    stop (it runs `on_stop`). Both are called in the actor's own thread.
    """

    def _supervisors_crashed(self, error: BaseException, finish: CrashFinish) -> None:
        """Hook: the actor is dying from `error`; `finish()` runs pykka's own handling
        (logging, unregistering, marking the actor stopped) and must be called once."""
        finish()

    def _supervisors_stopped(self) -> None:
        """Hook: the actor stopped (after `on_stop`, whether or not it raised)."""

    def _handle_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        error = exception_value
        if error is None:
            error = RuntimeError(f"{self} died from {exception_type!r}")

        def finish() -> None:
            super(LifecycleActor, self)._handle_failure(exception_type, exception_value, traceback)

        self._supervisors_crashed(error, finish)

    def _stop(self) -> None:
        super()._stop()
        self._supervisors_stopped()


def start_instance(actor: pykka.Actor) -> ActorRef[Any]:
    """Start an actor object built by someone else, as `Actor.start` would.

    `Actor.start(*args)` is `cls(*args)`, `ActorRegistry.register(ref)`,
    `obj._start_actor_loop()`; there is no public way to do the last two for an
    object a factory built.
    """
    ref: ActorRef[Any] = actor.actor_ref
    ActorRegistry.register(ref)
    actor._start_actor_loop()
    return ref
