"""The one asyncio loop thread that does all of a process's mirror-side QUIC I/O.

Started by the first user, stopped when the last one lets go.  Actors hand it
work with ``call_soon``/``submit`` and never wait on it; it hands results back
to actors as messages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from loguru import logger

T = TypeVar("T")

STOP_TIMEOUT_SECONDS = 5.0
# Handshakes cost the loop thread several milliseconds of CPU each. Admitting a
# bounded number at once keeps a thousand links that dial together from timing
# out behind each other and retrying in waves.
MAX_CONCURRENT_DIALS = 32


class QuicLoop:
    """A reference-counted asyncio loop on a daemon thread."""

    _lock = threading.Lock()
    _instance: QuicLoop | None = None
    _users = 0

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.dial_slots = asyncio.Semaphore(MAX_CONCURRENT_DIALS)
        self._thread = threading.Thread(target=self._run, name="mirror-quic-loop", daemon=True)
        self._running = threading.Event()
        self._thread.start()
        self._running.wait()

    @classmethod
    def acquire(cls) -> QuicLoop:
        """The process's loop, started if nobody uses it yet; pair with ``release()``."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = QuicLoop()
                logger.debug("QUIC loop thread started")
            cls._users += 1
            return cls._instance

    @classmethod
    def release(cls) -> None:
        """Let go of the loop; the last user stops it and waits for its thread."""
        with cls._lock:
            cls._users -= 1
            if cls._users > 0 or cls._instance is None:
                return
            instance, cls._instance = cls._instance, None
        instance._shutdown()

    @classmethod
    def users(cls) -> int:
        with cls._lock:
            return cls._users

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        """Run ``callback(*args)`` on the loop thread; dropped if the loop has stopped."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            logger.debug("QUIC loop already closed; dropped {}", callback)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._running.set)
        try:
            self.loop.run_forever()
        finally:
            # One more turn lets transports closed by the last callbacks release their sockets.
            self.loop.run_until_complete(asyncio.sleep(0))
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def _shutdown(self) -> None:
        if self.on_loop_thread():
            raise RuntimeError("the QUIC loop cannot be released from its own thread")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(STOP_TIMEOUT_SECONDS)
        logger.debug("QUIC loop thread stopped")
