"""What a strategy tells the supervisor to do with a failed child."""

from __future__ import annotations

import attrs


@attrs.frozen
class Resume:
    """Keep the child as it is.

    A child that is still alive keeps running untouched. A dead child cannot be
    resumed, so it is replaced at once (as `Restart(0)` would).
    """


@attrs.frozen
class Restart:
    """Restart the child after `delay` seconds.

    A live child that reported its failure is restarted in place (`on_restart()`);
    a dead child is replaced from its spec.
    """

    delay: float = attrs.field(default=0.0)

    @delay.validator
    def _check_delay(self, _attribute: attrs.Attribute[float], value: float) -> None:
        if value < 0:
            raise ValueError(f"Restart delay must be >= 0 seconds, got {value}")


@attrs.frozen
class Stop:
    """Stop the child for good; it stays listed as stopped until restarted by hand."""


@attrs.frozen
class Escalate:
    """Stop the child and hand the failure to the parent supervisor."""


Directive = Resume | Restart | Stop | Escalate
