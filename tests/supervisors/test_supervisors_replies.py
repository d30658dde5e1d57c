"""Deferred replies for any actor and for a Supervisor, through the one inbox class."""

from __future__ import annotations

import time
from typing import Any

import pykka
import pytest

from supervisors import (
    ChildNotFound,
    DeferredReplies,
    StopChild,
    SupervisedActor,
    Supervisor,
    reply,
    reply_error,
)
from supervisors._pykka import TrackingInbox
from supervisors.replies import ReplyRelay
from supervisors.testing import ManualClock
from tests.helpers import WAIT, Probe, statuses, worker


class Waiter(DeferredReplies, pykka.ThreadingActor):
    """Answers ("wait", key) only when told ("done", key, value) or ("fail", key, error)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[str, pykka.Future[Any] | None] = {}

    def on_receive(self, message: Any) -> Any:
        match message:
            case ("wait", key):
                self.waiting[key] = self.defer_reply()
                return "not sent"
            case ("done", key, value):
                reply(self.waiting.pop(key), value)
            case ("fail", key, error):
                reply_error(self.waiting.pop(key), error)
            case "pending":
                return sorted(self.waiting)
        return None


def test_a_plain_actor_answers_an_ask_later_from_another_message() -> None:
    ref = Waiter.start()
    try:
        first = ref.ask(("wait", "a"), block=False)
        second = ref.ask(("wait", "b"), block=False)
        assert ref.ask("pending", timeout=WAIT) == ["a", "b"]  # the mailbox stayed free
        with pytest.raises(pykka.Timeout):
            first.get(timeout=0.01)
        ref.tell(("done", "b", 2))
        ref.tell(("fail", "a", KeyError("gone")))
        assert second.get(timeout=WAIT) == 2
        with pytest.raises(KeyError, match="gone"):
            first.get(timeout=WAIT)
    finally:
        ref.stop()


def test_defer_reply_of_a_told_message_is_none_and_reply_ignores_none() -> None:
    ref = Waiter.start()
    try:
        ref.tell(("wait", "t"))
        assert ref.ask("pending", timeout=WAIT) == ["t"]
        ref.tell(("done", "t", 1))  # reply(None, 1): nothing to answer
        assert ref.ask("pending", timeout=WAIT) == []
    finally:
        ref.stop()


class LinkLike(DeferredReplies, SupervisedActor):
    """The shape of mirror_actors' SourceLink: both bases listed."""

    def on_receive(self, message: Any) -> Any:
        if message == "defer":
            future = self.defer_reply()
            reply(future, "deferred")
            return "not sent"
        return None


def test_deferred_replies_and_supervised_actor_combine() -> None:
    assert isinstance(LinkLike().actor_inbox, TrackingInbox)
    ref = LinkLike.start()
    try:
        assert ref.ask("defer", timeout=WAIT) == "deferred"
    finally:
        ref.stop()


class DeferringSupervisor(Supervisor):
    """A Supervisor subclass with a request it answers later."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.held: pykka.Future[Any] | None = None

    def on_receive(self, message: Any) -> Any:
        if message == "hold":
            self.held = self.defer_reply()
            return None
        if message == "release":
            reply(self.held, [row.id for row in self.child_statuses()])
            return None
        if message == "hold then fail":
            self.held = self.defer_reply()
            # A failing request after the reply was taken: raising could not
            # reach the asker, so the supervisor logs it as it would a tell.
            return super().on_receive(StopChild("missing"))
        return super().on_receive(message)


def test_a_supervisor_can_defer_replies_and_still_tells_asks_from_tells() -> None:
    probe = Probe()
    supervisor = DeferringSupervisor.start(children=[worker("w", probe)], clock=ManualClock())
    try:
        held = supervisor.ask("hold", block=False)
        supervisor.tell(StopChild("nope"))  # told and failing: logged, not fatal
        with pytest.raises(ChildNotFound):  # asked and failing: raised to the asker
            supervisor.ask(StopChild("nope"), timeout=WAIT)
        supervisor.tell("release")
        assert held.get(timeout=WAIT) == ["w"]
        failed = supervisor.ask("hold then fail", block=False)
        assert supervisor.is_alive() and list(statuses(supervisor)) == ["w"]
        supervisor.tell("release")
        assert failed.get(timeout=WAIT) == ["w"]
    finally:
        supervisor.stop()


def test_relay_forwards_the_childs_answer_within_one_timeout() -> None:
    relay = ReplyRelay()
    with pytest.raises(pykka.Timeout):
        relay.future.get(timeout=0.01)  # nothing handed over yet
    answer: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
    relay.forward(answer)
    started = time.monotonic()
    with pytest.raises(pykka.Timeout):
        relay.future.get(timeout=0.05)
    assert time.monotonic() - started < 1.0
    answer.set("hello")
    assert relay.future.get(timeout=WAIT) == "hello"
    assert relay.future.get() == "hello"


def test_relay_fail_raises_to_the_asker() -> None:
    relay = ReplyRelay()
    relay.fail(ChildNotFound("c", "sup"))
    with pytest.raises(ChildNotFound):
        relay.future.get(timeout=WAIT)
