"""Supervising any pykka actor, unchanged: `ChildSpec.for_actor(id, Plain, args=...)`.

Akka supervises any behaviour by wrapping it (`Behaviors.supervise(b)`); the
behaviour itself does not change. Here the supervisor builds the actor object
(`Plain(*args, **kwargs)`, or a factory's), mixes the reporting of
`SupervisedActor` into it before it starts (its class becomes a subclass of its
own class, with the same name), and starts it. The actor then reports its crash
(with the real exception, from `on_start`, a told message or `on_stop`) and its
normal stop the moment they happen, exactly as a `SupervisedActor` does. What
it cannot do is report a failure it caught itself and stay alive
(`report_failure`), so it is always replaced from its spec, never restarted in
place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import pykka
from pykka import ActorRef, ActorRegistry

from supervisors._pykka import start_instance
from supervisors.supervised import Reporter, SupervisedActor

ActorFactory = Callable[..., pykka.Actor]
"""A pykka actor class, or a callable returning a new, not yet started actor object."""


class _Watched(Reporter):
    """Mixed into a plain actor's class; reports to the supervisor that started it."""

    _supervisors_parent: ActorRef[Any] | None = None

    def _supervisors_report_to(self) -> ActorRef[Any] | None:
        return self._supervisors_parent


_watched_classes: dict[type[pykka.Actor], type[pykka.Actor]] = {}
_watched_lock = threading.Lock()


def watched_class(actor_class: type[pykka.Actor]) -> type[pykka.Actor]:
    """`actor_class` with the reporting mixed in (one subclass per class, same name)."""
    with _watched_lock:
        watched = _watched_classes.get(actor_class)
        if watched is None:
            watched = type(
                actor_class.__name__,
                (_Watched, actor_class),
                {"__module__": actor_class.__module__, "__qualname__": actor_class.__qualname__},
            )
            _watched_classes[actor_class] = watched
        return watched


def adopt(actor: pykka.Actor, parent: ActorRef[Any]) -> None:
    """Make a built but not yet started actor report to `parent`."""
    if isinstance(actor, SupervisedActor):
        actor.parent = parent
        return
    if not isinstance(actor, _Watched):
        # Same memory layout (the subclass adds no slots), so the object can
        # change class; its ActorRef keeps naming the original class.
        actor.__class__ = watched_class(type(actor))
    assert isinstance(actor, _Watched)
    actor._supervisors_parent = parent


def _describe(target: object) -> str:
    return getattr(target, "__qualname__", None) or repr(target)


@attrs.frozen(eq=False)
class StartActor:
    """A `ChildSpec.start` that builds, adopts and starts any pykka actor."""

    actor: ActorFactory
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)

    def __call__(self, parent: ActorRef[Any]) -> ActorRef[Any]:
        built = self.actor(*self.args, **self.kwargs)
        what = _describe(self.actor)
        if isinstance(built, ActorRef):
            raise TypeError(
                f"{what} returned {built!r}, an already started actor: a factory for "
                "ChildSpec.for_actor must return the actor object, not its ref "
                "(`lambda: Plain(x)`, not `lambda: Plain.start(x)`), or pass the class"
            )
        if not isinstance(built, pykka.ThreadingActor):
            raise TypeError(f"{what} must build a pykka.ThreadingActor, got {built!r}")
        if built.actor_stopped.is_set() or ActorRegistry.get_by_urn(built.actor_urn) is not None:
            raise TypeError(f"{what} returned {built}, which was already started")
        adopt(built, parent)
        return start_instance(built)

    def __repr__(self) -> str:
        return f"StartActor({_describe(self.actor)})"


def for_actor(
    actor: ActorFactory,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> StartActor:
    if not callable(actor):
        raise TypeError(f"expected a pykka actor class or a factory, got {actor!r}")
    if isinstance(actor, type) and not issubclass(actor, pykka.ThreadingActor):
        raise TypeError(f"{actor.__qualname__} is not a pykka.ThreadingActor subclass")
    return StartActor(actor, tuple(args), dict(kwargs or {}))
