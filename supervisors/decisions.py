"""What a supervisor does with one failure: pure functions, no actor, no clock, no threads.

The actor counts the failure (`ChildRecord.record_failure`), calls `decide`,
and carries out the `Verdict`: schedule a restart, stop the child, or escalate.
"""

from __future__ import annotations

import attrs

from supervisors.child import RestartType
from supervisors.delays import check_delay
from supervisors.directives import Directive, Escalate, Restart, Resume, Stop
from supervisors.errors import BrokenStrategy, RestartIntensityExceeded
from supervisors.failure import Failure
from supervisors.intensity import admit_restart
from supervisors.strategy import Policy, SupervisorStrategy


def ask_strategy(strategy: SupervisorStrategy, failure: Failure) -> Directive | BrokenStrategy:
    """The strategy's directive; anything but a valid directive is a BrokenStrategy.

    Pure as far as the strategy's `decide` is (it may draw from a random source).
    """
    try:
        directive: object = strategy.decide(failure)
    except Exception as raised:
        broken = BrokenStrategy(strategy, failure.child_id, failure.error, f"raised {raised!r}")
        broken.__cause__ = raised
        return broken
    if not isinstance(directive, Resume | Restart | Stop | Escalate):
        return BrokenStrategy(
            strategy,
            failure.child_id,
            failure.error,
            f"returned {directive!r} ({type(directive).__name__}), which is not a directive",
        )
    if isinstance(directive, Restart):
        # Restart checks its delay when built; this catches one that got
        # past it (a subclass, object.__setattr__) before it reaches a timer.
        try:
            check_delay(directive.delay, "Restart delay")
        except (TypeError, ValueError) as bad:
            broken = BrokenStrategy(
                strategy, failure.child_id, failure.error, f"returned {directive!r}: {bad}"
            )
            broken.__cause__ = bad
            return broken
    return directive


def settle(directive: Directive, *, alive: bool, restart_type: RestartType) -> Directive:
    """Rewrite a directive for the child it applies to.

    A dead child cannot be resumed: it is replaced at once (`Restart(0)`). A
    temporary child is never restarted: `Restart` becomes `Stop`.
    """
    if isinstance(directive, Resume) and not alive:
        directive = Restart(0.0)
    if isinstance(directive, Restart) and restart_type is RestartType.TEMPORARY:
        directive = Stop()
    return directive


@attrs.frozen
class Verdict:
    """What to do with one failure, and the restart window after it."""

    directive: Directive
    """Resume, Restart(delay), Stop or Escalate, after `settle`."""
    failure: Failure
    """The failure as decided; on escalation, its error is what escalates (the child's
    error, a BrokenStrategy or a RestartIntensityExceeded)."""
    restart_times: tuple[float, ...]
    """The supervisor's restart window (for `Policy.max_restarts`) after this verdict."""
    whole_supervisor: bool = False
    """Escalate by stopping every child: the restart intensity was exceeded."""
    broken: BrokenStrategy | None = None
    """Set when the strategy did not return a usable directive."""
    resumed_dead: bool = False
    """The strategy said Resume for a dead child, which is replaced at once instead."""


def decide(
    strategy: SupervisorStrategy,
    policy: Policy,
    failure: Failure,
    *,
    alive: bool,
    restart_type: RestartType,
    restart_times: tuple[float, ...],
) -> Verdict:
    """Ask the strategy, settle its directive and check the restart intensity.

    `restart_times` are the clock times of the supervisor's restarts in the
    intensity window; `failure.at` is now.
    """
    asked = ask_strategy(strategy, failure)
    if isinstance(asked, BrokenStrategy):
        return Verdict(Escalate(), attrs.evolve(failure, error=asked), restart_times, broken=asked)
    directive = settle(asked, alive=alive, restart_type=restart_type)
    resumed_dead = isinstance(asked, Resume) and not isinstance(directive, Resume)
    if isinstance(directive, Restart):
        admitted = admit_restart(restart_times, failure.at, policy.max_restarts, policy.within)
        if admitted is None:
            assert policy.max_restarts is not None
            exceeded = RestartIntensityExceeded(
                failure.child_id, policy.max_restarts, policy.within
            )
            return Verdict(
                Escalate(),
                attrs.evolve(failure, error=exceeded),
                restart_times,
                whole_supervisor=True,
            )
        restart_times = admitted
    return Verdict(directive, failure, restart_times, resumed_dead=resumed_dead)
