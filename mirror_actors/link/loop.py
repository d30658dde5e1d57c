"""The one asyncio loop thread that does all of a process's mirror-side QUIC I/O.

Started by the first user, stopped when the last one lets go.  Actors hand it
work with ``call_soon``/``submit`` and never wait on it; it hands results back
to actors as messages.
"""

from __future__ import annotations

import asyncio
import threading

from loguru import logger

from mirror_actors.loop_thread import LoopThread

# Handshakes cost the loop thread several milliseconds of CPU each. Admitting a
# bounded number at once keeps a thousand links that dial together from timing
# out behind each other and retrying in waves.
MAX_CONCURRENT_DIALS = 32


async def _nothing() -> None:
    return None


class QuicLoop(LoopThread):
    """A reference-counted ``LoopThread`` shared by every link of the process."""

    _lock = threading.Lock()
    _instance: QuicLoop | None = None
    _users = 0

    def __init__(self) -> None:
        super().__init__("mirror-quic-loop")
        self.dial_slots = asyncio.Semaphore(MAX_CONCURRENT_DIALS)
        self.start(_nothing)

    @classmethod
    def acquire(cls) -> QuicLoop:
        """The process's loop, started if nobody uses it yet; pair with ``release()``."""
        with cls._lock:
            if cls._instance is None or not cls._instance.running:
                # A loop thread that died is replaced; its users move over as
                # they re-acquire (the count is of the process loop's users).
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
        instance.stop()
        logger.debug("QUIC loop thread stopped")

    @classmethod
    def users(cls) -> int:
        with cls._lock:
            return cls._users
