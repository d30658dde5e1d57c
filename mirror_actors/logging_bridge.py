"""Route the standard library's ``logging`` into loguru.

aioquic, pykka and asyncio log through ``logging``; this project logs through
loguru.  ``install_logging_bridge()`` puts one handler on the ``logging`` root
that hands every record at or above its level to loguru, with the record's
level name, the stdlib logger's name bound as ``logger_name``, its exception
(so pykka's "Unhandled exception in actor" tracebacks show up in loguru's
sinks), and the caller's location (file, function, line) as if the caller had
used loguru itself.

    install_logging_bridge("INFO")
    logger.add(sys.stderr, format="{level} {extra[logger_name]} {message}")

A loguru sink that writes back into ``logging`` (``logger.add(SomeHandler())``)
does not loop: records loguru made are recognised and left alone, and a record
logged while the bridge is already handing one to loguru on the same thread is
dropped.
"""

from __future__ import annotations

import inspect
import logging
import threading
from types import FrameType

from loguru import logger

__all__ = ["InterceptHandler", "install_logging_bridge", "uninstall_logging_bridge"]


class InterceptHandler(logging.Handler):
    """A ``logging`` handler that re-logs every record it gets through loguru."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._busy = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if _made_by_loguru(record) or getattr(self._busy, "active", False):
            return  # loguru writing to logging, or a sink logging while we log: no loop
        self._busy.active = True
        try:
            level: str | int
            try:
                level = logger.level(record.levelname).name
            except ValueError:  # a level loguru does not know by that name
                level = record.levelno
            message = record.getMessage()
            if record.stack_info:
                message = f"{message}\n{record.stack_info}"
            exc_info = record.exc_info
            exception = exc_info if exc_info and exc_info[0] is not None else None
            logger.bind(logger_name=record.name).opt(
                depth=_caller_depth(inspect.currentframe()), exception=exception
            ).log(level, message)
        except Exception:
            self.handleError(record)
        finally:
            self._busy.active = False


def _caller_depth(frame: FrameType | None) -> int:
    """How many frames above ``emit`` the code that called ``logging`` is."""
    depth = 0
    while frame is not None:
        filename = frame.f_code.co_filename
        is_logging = filename == logging.__file__
        is_frozen = "importlib" in filename and "_bootstrap" in filename
        if depth > 0 and not (is_logging or is_frozen):
            break
        frame = frame.f_back
        depth += 1
    return depth


def _made_by_loguru(record: logging.LogRecord) -> bool:
    # loguru's sink for a logging.Handler passes its ``extra`` dict as ``record.extra``.
    return isinstance(getattr(record, "extra", None), dict)


def _level_number(level: int | str) -> int:
    if isinstance(level, int):
        if level < 0:
            raise ValueError(f"a logging level is >= 0, got {level}")
        return level
    name = level.upper()
    known = logging.getLevelNamesMapping()
    if name in known:
        return known[name]
    try:
        return logger.level(name).no  # loguru's own, such as TRACE or SUCCESS
    except ValueError:
        raise ValueError(f"unknown logging level {level!r}") from None


_lock = threading.Lock()
_handler: InterceptHandler | None = None
_root_level_before: int | None = None  # the root's level before install lowered it


def install_logging_bridge(level: int | str = "WARNING") -> None:
    """Send ``logging`` records at ``level`` and above to loguru (idempotent).

    Installing again keeps the one handler and moves it to the new level.  The
    root logger's level is lowered to ``level`` if it was higher, so records
    from loggers that defer to it (level NOTSET) get through; other handlers on
    the root stay as they are.
    """
    global _handler, _root_level_before
    number = _level_number(level)
    root = logging.getLogger()
    with _lock:
        if _handler is None:
            _handler = InterceptHandler()
            root.addHandler(_handler)
        _handler.setLevel(number)
        before = root.level if _root_level_before is None else _root_level_before
        if before > number:
            _root_level_before = before
            root.setLevel(number)
        elif _root_level_before is not None:  # a reinstall at a higher level
            root.setLevel(_root_level_before)
            _root_level_before = None


def uninstall_logging_bridge() -> None:
    """Take the bridge off the root logger and restore the root's level (idempotent)."""
    global _handler, _root_level_before
    root = logging.getLogger()
    with _lock:
        if _handler is not None:
            root.removeHandler(_handler)
            _handler.close()
            _handler = None
        if _root_level_before is not None:
            root.setLevel(_root_level_before)
            _root_level_before = None
