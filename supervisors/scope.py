"""Which children a failure affects, as in OTP's restart strategies."""

from __future__ import annotations

import enum
from collections.abc import Sequence


class Scope(enum.Enum):
    ONE_FOR_ONE = "one_for_one"
    """Only the failed child is restarted."""
    ONE_FOR_ALL = "one_for_all"
    """Every child is restarted with the failed one."""
    REST_FOR_ONE = "rest_for_one"
    """The failed child and every child started after it are restarted."""


def plan_scope(scope: Scope, failed_id: str, start_order: Sequence[str]) -> tuple[str, ...]:
    """The ids to restart for a failure of `failed_id`, in start order."""
    if failed_id not in start_order:
        return (failed_id,)
    if scope is Scope.ONE_FOR_ONE:
        return (failed_id,)
    if scope is Scope.ONE_FOR_ALL:
        return tuple(start_order)
    index = start_order.index(failed_id)
    return tuple(start_order[index:])
