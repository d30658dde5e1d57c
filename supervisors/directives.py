"""What a strategy tells the supervisor to do with a failed child."""

from __future__ import annotations

import attrs

from supervisors.delays import check_delay


@attrs.frozen
class Resume:
    """Keep the child as it is.

    A child that is still alive keeps running untouched. A dead child cannot be
    resumed, so it is replaced at once (as `Restart(0)` would).
    """


def _restart_delay(value: float) -> float:
    return check_delay(value, "Restart delay")


@attrs.frozen
class Restart:
    """Restart the child after `delay` seconds.

    A live child that reported its failure is restarted in place (`on_restart()`);
    a dead child is replaced from its spec. `delay` must be a finite number in
    [0, MAX_DELAY_SECONDS] (one day): `Restart(math.inf)`, `Restart(nan)`,
    `Restart(-1)` or `Restart("5")` raise at once (ValueError, or TypeError for
    a non-number), so a strategy that builds one is a broken strategy.
    """

    delay: float = attrs.field(default=0.0, converter=_restart_delay)


@attrs.frozen
class Stop:
    """Stop the child for good; it stays listed as stopped until restarted by hand."""


@attrs.frozen
class Escalate:
    """Stop the child and hand the failure to the parent supervisor."""


Directive = Resume | Restart | Stop | Escalate
