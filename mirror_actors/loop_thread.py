"""An asyncio event loop on a thread of its own, for synchronous callers.

The source server, the mirror side's QUIC loop and the fault proxy each run
one; this is the one place that starts, stops and cleans up such a loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from loguru import logger

T = TypeVar("T")

START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0


class LoopThread:
    """Owns one event loop and the daemon thread that runs it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._teardown: Callable[[], None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"loop thread {self.name!r} is not running")
        return self._loop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def start(
        self,
        setup: Callable[[], Coroutine[Any, Any, T]],
        timeout: float = START_TIMEOUT_SECONDS,
    ) -> T:
        """Start the thread, run ``setup()`` on its loop and return what it returns.

        If ``setup`` fails, its error is raised here and the thread is gone.
        """
        started: concurrent.futures.Future[T] = concurrent.futures.Future()
        thread = threading.Thread(
            target=self._run, args=(setup, started), name=self.name, daemon=True
        )
        self._thread = thread
        thread.start()
        try:
            return started.result(timeout)
        except BaseException:
            thread.join(timeout)
            self._thread = None
            raise

    def stop(
        self, teardown: Callable[[], None] | None = None, timeout: float = STOP_TIMEOUT_SECONDS
    ) -> None:
        """Stop the loop; ``teardown`` runs on the loop thread before pending tasks are cancelled."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if self.on_thread():
            raise RuntimeError(f"loop thread {self.name!r} cannot stop itself")
        self._teardown = teardown
        if loop is not None:
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass  # it already closed
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("loop thread {} did not stop within {} s", self.name, timeout)
        self._thread = None

    def call_soon(self, callback: Callable[..., object], *args: object) -> bool:
        """Run ``callback(*args)`` on the loop thread; False (and dropped) if it is not running.

        True only means the loop took it: a loop stopping at that moment may
        still drop it, so callers must not count on it running.
        """
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            logger.debug("loop thread {} is not running; dropped {}", self.name, callback)
            return False
        return True

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def _run(
        self,
        setup: Callable[[], Coroutine[Any, Any, T]],
        started: concurrent.futures.Future[T],
    ) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            try:
                result = loop.run_until_complete(setup())
            except BaseException as error:
                started.set_exception(error)
                return
            started.set_result(result)
            loop.run_forever()
        finally:
            try:
                if self._teardown is not None:
                    self._teardown()
            finally:
                self._close(loop)

    def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        # One more turn lets transports closed by the teardown release their sockets.
        loop.run_until_complete(asyncio.sleep(0))
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
        self._loop = None
        self._teardown = None
