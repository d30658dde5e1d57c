"""Bounded holding area for messages sent to a child while it restarts."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import attrs

from supervisors.errors import StashOverflow
from supervisors.replies import ReplyRelay


@attrs.frozen
class Stashed:
    message: Any
    reply: ReplyRelay | None = None
    """Set for asks: relays the child's answer to the original asker."""


class Stash:
    def __init__(self, child_id: str, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"stash limit must be >= 0, got {limit}")
        self.child_id = child_id
        self.limit = limit
        self._items: deque[Stashed] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: Stashed) -> None:
        """Keep a message for later; raises StashOverflow when the stash is full."""
        if len(self._items) >= self.limit:
            raise StashOverflow(self.child_id, self.limit)
        self._items.append(item)

    def drain(self) -> Iterator[Stashed]:
        """Hand out the kept messages oldest first, emptying the stash."""
        while self._items:
            yield self._items.popleft()
