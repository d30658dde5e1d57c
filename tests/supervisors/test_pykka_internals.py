"""The pykka internals `supervisors/_pykka.py` relies on: fail loudly if one moves.

Each test names the private piece, checks it exists with the expected shape,
then checks the behaviour the door depends on. If pykka changes one, the fix
goes into `supervisors/_pykka.py` alone.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import threading
from pathlib import Path
from typing import Any

import pykka
import pytest

import supervisors
from supervisors import _pykka
from supervisors._pykka import (
    PRIVATE_NAMES,
    InboxActor,
    LifecycleActor,
    TrackingInbox,
    answers_asker,
    start_instance,
    take_reply,
)
from tests.helpers import WAIT

PACKAGE = Path(supervisors.__file__).parent

# Every pykka private name the door uses (and a few it must not need elsewhere).
PRIVATE_PATTERN = re.compile(
    r"pykka\._|\b(_envelope|Envelope|reply_to|_create_actor_inbox|_handle_failure"
    r"|_stop|_create_future|_start_actor_loop|_actor_loop\w*|_handle_receive|_ActorStop"
    r"|_actor_ref|get_attr_directly)\b"
)


def test_pykka_is_the_major_version_the_door_was_written_for() -> None:
    major = int(importlib.metadata.version("pykka").split(".")[0])
    assert major == 4, "supervisors/_pykka.py was written against pykka 4; review every wrapper"


def test_the_door_is_the_only_module_using_pykka_internals() -> None:
    offenders = {
        f"{path.name}:{number}: {line.strip()}"
        for path in PACKAGE.glob("*.py")
        if path.name != "_pykka.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_PATTERN.search(line)
    }
    assert offenders == set()
    assert PRIVATE_PATTERN.search(Path(_pykka.__file__).read_text())


def test_every_listed_private_name_exists() -> None:
    from pykka import _envelope

    owners = {"Envelope": _envelope.Envelope, "Actor": pykka.Actor}
    for dotted in PRIVATE_NAMES:
        owner, name = dotted.split(".")
        holder = owners[owner]
        present = name in getattr(holder, "__slots__", ()) or hasattr(holder, name)
        assert present, f"pykka {pykka.__name__} no longer has {dotted}"


def test_envelope_carries_the_message_and_the_askers_future() -> None:
    from pykka._envelope import Envelope

    params = list(inspect.signature(Envelope).parameters)
    assert params == ["message", "reply_to"]
    assert set(Envelope.__slots__) == {"message", "reply_to"}
    future: pykka.Future[Any] = pykka.ThreadingFuture()
    envelope = Envelope("m", reply_to=future)
    assert (envelope.message, envelope.reply_to) == ("m", future)
    assert Envelope("m").reply_to is None


def test_the_inbox_factory_is_a_static_method_called_by_actor_init() -> None:
    raw = inspect.getattr_static(pykka.ThreadingActor, "_create_actor_inbox")
    assert isinstance(raw, staticmethod)
    assert list(inspect.signature(pykka.Actor._create_actor_inbox).parameters) == []
    assert "_create_actor_inbox()" in inspect.getsource(pykka.Actor.__init__)
    assert isinstance(InboxActor().actor_inbox, TrackingInbox)


def test_the_actor_loop_takes_envelopes_with_get_and_replies_through_reply_to() -> None:
    seen: dict[str, Any] = {}

    class Spy(InboxActor):
        def on_receive(self, message: Any) -> Any:
            envelope = self.actor_inbox.current  # type: ignore[attr-defined]
            seen[message] = (type(envelope).__name__, envelope.message, answers_asker(self))
            if message == "deferred":
                future = take_reply(self)
                assert future is not None and not answers_asker(self)
                future.set("later")
                return "ignored"
            return message

    ref = Spy.start()
    try:
        ref.tell("told")
        assert ref.ask("asked", timeout=WAIT) == "asked"
        assert ref.ask("deferred", timeout=WAIT) == "later"
    finally:
        ref.stop()
    assert seen == {
        "told": ("Envelope", "told", False),
        "asked": ("Envelope", "asked", True),
        "deferred": ("Envelope", "deferred", True),
    }


def test_handle_failure_has_the_exc_info_signature_and_sees_every_crash() -> None:
    params = list(inspect.signature(pykka.Actor._handle_failure).parameters)
    assert params == ["self", "exception_type", "exception_value", "traceback"]
    crashes: list[tuple[str, BaseException]] = []
    done = threading.Event()

    class Crashy(LifecycleActor):
        def __init__(self, where: str) -> None:
            super().__init__()
            self.where = where

        def on_start(self) -> None:
            if self.where == "on_start":
                raise KeyError("start")

        def on_receive(self, message: Any) -> Any:
            if message == "crash":
                raise ValueError("receive")
            if message == "stop":
                self.stop()
            return None

        def on_stop(self) -> None:
            if self.where == "on_stop":
                raise OSError("stop")

        def _supervisors_crashed(self, error: BaseException, finish: Any) -> None:
            finish()  # pykka's own handling: unregisters and marks it stopped
            crashes.append((self.where, error))
            done.set()

    for where, message, kind in [
        ("on_start", None, KeyError),
        ("on_receive", "crash", ValueError),
        ("on_stop", "stop", OSError),
    ]:
        done.clear()
        ref = Crashy.start(where)
        if message is not None:
            ref.tell(message)
        assert done.wait(WAIT), where
        assert isinstance(crashes[-1][1], kind)
        ref.actor_stopped.wait(WAIT)
        assert not ref.is_alive()
        assert pykka.ActorRegistry.get_by_urn(ref.actor_urn) is None


def test_stop_is_what_a_normal_stop_runs() -> None:
    assert list(inspect.signature(pykka.Actor._stop).parameters) == ["self"]
    stopped = threading.Event()

    class Quiet(LifecycleActor):
        def _supervisors_stopped(self) -> None:
            stopped.set()

    Quiet.start().stop()
    assert stopped.wait(WAIT)


def test_start_is_register_then_start_actor_loop() -> None:
    assert list(inspect.signature(pykka.Actor._start_actor_loop).parameters) == ["self"]
    source = inspect.getsource(pykka.Actor.start)
    assert "ActorRegistry.register(obj.actor_ref)" in source
    assert "obj._start_actor_loop()" in source

    class Echo(pykka.ThreadingActor):
        def on_receive(self, message: Any) -> Any:
            return message

    built = Echo()
    assert pykka.ActorRegistry.get_by_urn(built.actor_urn) is None
    ref = start_instance(built)
    try:
        assert pykka.ActorRegistry.get_by_urn(built.actor_urn) is ref
        assert ref.ask("hi", timeout=WAIT) == "hi"
    finally:
        ref.stop()


def test_public_future_api_the_relay_uses() -> None:
    # Not private, but the relay of AskChild answers depends on these semantics.
    future: pykka.ThreadingFuture[int] = pykka.ThreadingFuture()
    calls: list[float | None] = []

    def hook(timeout: float | None) -> int:
        calls.append(timeout)
        return 7

    future.set_get_hook(hook)
    assert future.get(timeout=1.0) == 7 and future.get() == 7
    assert calls == [1.0]  # a successful hook result is kept
    with pytest.raises(Exception):  # noqa: B017 - queue.Full: no result once a hook is set
        future.set(1)
