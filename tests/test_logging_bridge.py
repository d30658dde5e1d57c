"""The stdlib-logging -> loguru bridge: levels, logger names, tracebacks, pykka, no loops."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from typing import Any

import pykka
import pytest
from loguru import logger

from mirror_actors.logging_bridge import (
    InterceptHandler,
    install_logging_bridge,
    uninstall_logging_bridge,
)
from tests.helpers import wait_until


class Sink:
    """A loguru sink that keeps every message (and its record) in a list."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def __call__(self, message: Any) -> None:
        self.messages.append(message)

    def records(self, logger_name: str) -> list[dict[str, Any]]:
        return [
            m.record for m in self.messages if m.record["extra"].get("logger_name") == logger_name
        ]

    def texts(self, logger_name: str) -> list[str]:
        return [
            m.record["message"]
            for m in self.messages
            if m.record["extra"].get("logger_name") == logger_name
        ]


@pytest.fixture
def sink() -> Iterator[Sink]:
    keep = Sink()
    sink_id = logger.add(keep, level="TRACE", format="{message}")
    try:
        yield keep
    finally:
        logger.remove(sink_id)
        uninstall_logging_bridge()


@pytest.fixture
def stdlib() -> Iterator[logging.Logger]:
    """A stdlib logger of its own that lets everything through to the root's handlers."""
    log = logging.getLogger("tests.bridge")
    log.setLevel(logging.DEBUG)
    try:
        yield log
    finally:
        log.setLevel(logging.NOTSET)


def bridges() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, InterceptHandler)]


def test_a_stdlib_warning_reaches_loguru_with_level_name_and_caller(
    sink: Sink, stdlib: logging.Logger
) -> None:
    install_logging_bridge()
    stdlib.warning("disk %s is %d%% full", "sda", 93)
    line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
    (record,) = sink.records("tests.bridge")
    assert record["message"] == "disk sda is 93% full"
    assert record["level"].name == "WARNING"
    assert record["file"].path == __file__
    assert record["function"] == "test_a_stdlib_warning_reaches_loguru_with_level_name_and_caller"
    assert record["line"] == line
    assert record["exception"] is None


def test_an_exception_keeps_its_traceback(sink: Sink, stdlib: logging.Logger) -> None:
    install_logging_bridge()
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        stdlib.exception("division went wrong")
    (record,) = sink.records("tests.bridge")
    assert record["level"].name == "ERROR"
    assert record["exception"].type is ZeroDivisionError
    assert record["exception"].traceback is not None
    (text,) = [str(m) for m in sink.messages if m.record is record]
    assert "Traceback (most recent call last)" in text
    assert "ZeroDivisionError" in text and "1 / 0" in text


class Failing(pykka.ThreadingActor):
    def on_receive(self, message: Any) -> Any:
        raise RuntimeError(f"cannot handle {message!r}")


def test_a_pykka_actor_failure_shows_up_in_loguru_with_its_traceback(sink: Sink) -> None:
    install_logging_bridge()
    ref = Failing.start()
    try:
        ref.tell("boom")
        wait_until(lambda: bool(sink.records("pykka")), what="pykka's error through loguru")
    finally:
        ref.stop()
    (record,) = [r for r in sink.records("pykka") if r["level"].name == "ERROR"]
    assert record["message"].startswith("Unhandled exception in Failing")
    assert record["exception"].type is RuntimeError
    assert "cannot handle 'boom'" in str(record["exception"].value)
    (text,) = [str(m) for m in sink.messages if m.record is record]
    assert "Traceback" in text and "on_receive" in text


def test_records_below_the_bridge_level_are_dropped(sink: Sink, stdlib: logging.Logger) -> None:
    install_logging_bridge("WARNING")
    stdlib.debug("debug")
    stdlib.info("info")
    stdlib.warning("warning")
    stdlib.error("error")
    assert sink.texts("tests.bridge") == ["warning", "error"]


def test_a_lower_bridge_level_lowers_the_root_until_uninstalled(sink: Sink) -> None:
    root = logging.getLogger()
    before = root.level
    deferring = logging.getLogger("tests.bridge.deferring")  # level NOTSET: asks the root
    install_logging_bridge(logging.DEBUG)
    assert root.level == logging.DEBUG
    deferring.debug("now visible")
    install_logging_bridge("ERROR")  # reinstalling moves the one bridge up
    assert root.level == before
    deferring.warning("now hidden")
    uninstall_logging_bridge()
    assert root.level == before and bridges() == []
    deferring.critical("no bridge")
    assert sink.texts("tests.bridge.deferring") == ["now visible"]


def test_install_is_idempotent_and_uninstall_removes_it(sink: Sink, stdlib: logging.Logger) -> None:
    install_logging_bridge()
    install_logging_bridge()
    install_logging_bridge("WARNING")
    assert len(bridges()) == 1
    stdlib.warning("once")
    assert sink.texts("tests.bridge") == ["once"]
    uninstall_logging_bridge()
    uninstall_logging_bridge()
    assert bridges() == []
    stdlib.warning("not bridged")
    assert sink.texts("tests.bridge") == ["once"]


def test_unknown_levels_are_refused() -> None:
    with pytest.raises(ValueError):
        install_logging_bridge("LOUD")
    with pytest.raises(ValueError):
        install_logging_bridge(-1)
    assert bridges() == []


class Propagate(logging.Handler):
    """loguru's recipe for sending loguru records on to stdlib logging."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


class Relog(logging.Handler):
    """A stdlib handler that logs again while handling: a loop within one thread."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("tests.bridge.relog").warning("relogged %s", record.getMessage())


@pytest.mark.parametrize("enqueue", [False, True])
def test_loguru_writing_to_stdlib_does_not_loop(
    sink: Sink, stdlib: logging.Logger, enqueue: bool
) -> None:
    install_logging_bridge()
    propagate = logger.add(Propagate(), level="WARNING", format="{message}", enqueue=enqueue)
    try:
        stdlib.warning("from stdlib")
        logger.warning("from loguru")
        logger.complete()
    finally:
        logger.remove(propagate)
    assert sink.texts("tests.bridge") == ["from stdlib"]
    assert [m.record["message"] for m in sink.messages].count("from loguru") == 1


def test_a_record_logged_while_bridging_is_dropped_not_recursed(
    sink: Sink, stdlib: logging.Logger
) -> None:
    install_logging_bridge()
    relog = logger.add(Relog(), level="WARNING", format="{message}")
    try:
        stdlib.warning("first")
    finally:
        logger.remove(relog)
    assert sink.texts("tests.bridge") == ["first"]
    assert sink.texts("tests.bridge.relog") == []
