"""Building the supervisor strategies a topology names: the one place a topology imports code.

``topology.spec`` parses a mirror's ``strategy`` and checks it without running
anything the user wrote: a built-in name is built there (its options checked),
a ``module:attribute`` is checked for its form only.  This module turns the
reference into a ``SupervisorStrategy``, importing the user's module:

* ``resolve_strategies(topology)`` builds every mirror's strategy, by mirror
  name; what cannot be built is a one-line ``TopologyError`` naming the file,
  the key (``mirror[i].strategy``) and what was expected, like a parse error.
* ``resolve_strategy(reference, options, base_dir)`` builds one, raising
  ``StrategyError`` (a ``ValueError``) with what was expected.

A module is looked for first in ``base_dir`` (the topology file's folder, so a
strategy written next to the file imports like a script's sibling), then
wherever Python finds installed modules.  ``base_dir`` is on ``sys.path`` only
while the module is being imported: imports the module makes then see its
folder; ``sys.path`` is as it was once ``resolve_strategy`` returns or raises.
A module already imported (``sys.modules``) is reused, as ``import`` would.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from mirror_actors.topology.spec import (
    StrategyReference,
    Topology,
    TopologyError,
    builtin_strategy,
)
from supervisors import SupervisorStrategy, as_strategy

__all__ = [
    "StrategyError",
    "import_strategy_module",
    "resolve_strategies",
    "resolve_strategy",
]


class StrategyError(ValueError):
    """A strategy reference that cannot be built; the message says what was expected."""


def resolve_strategies(topology: Topology) -> dict[str, SupervisorStrategy]:
    """Every mirror's strategy, by mirror name; ``TopologyError`` for the first that fails."""
    strategies: dict[str, SupervisorStrategy] = {}
    for i, mirror in enumerate(topology.mirrors):
        try:
            strategies[mirror.name] = resolve_strategy(
                mirror.strategy, mirror.strategy_options, topology.base_dir
            )
        except Exception as error:  # whatever the user's module raises, report it here
            raise TopologyError(
                topology.file,
                f"mirror[{i}].strategy",
                f"cannot build strategy {mirror.strategy!r}: {_one_line(error)}",
            ) from error
    return strategies


def resolve_strategy(
    reference: str, options: Mapping[str, Any], base_dir: Path | None = None
) -> SupervisorStrategy:
    """A built-in strategy by name, or ``module:attribute`` (a strategy, class or factory).

    ``module:attribute`` names a ``SupervisorStrategy`` instance (no options
    then), a class or factory called with ``options``, or a plain function
    taking a ``Failure`` and answering a directive.  ``StrategyError`` says
    what is wrong, chained to the error that caused it.
    """
    try:
        parsed = StrategyReference.parse(reference)
    except ValueError as error:
        raise StrategyError(str(error)) from None
    if parsed.module is None:
        try:
            return builtin_strategy(reference, options)
        except Exception as error:
            raise StrategyError(
                f"the built-in strategy {reference!r} does not take these strategy_options "
                f"({type(error).__name__}: {_one_line(error)})"
            ) from error
    module = import_strategy_module(parsed.module, base_dir)
    target: Any = module
    for part in parsed.attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise StrategyError(
                f"{_describe(module)} has no attribute {parsed.attribute!r}; expected it to "
                "name a SupervisorStrategy, a class or factory of one, or a function "
                "taking a Failure"
            ) from None
    if isinstance(target, SupervisorStrategy):
        if options:
            raise StrategyError(
                f"{parsed.attribute!r} is a strategy instance, which takes no strategy_options; "
                "expected none, or name a class or factory"
            )
        return target
    if isinstance(target, type) or options:
        # A class, or a factory given options: build the strategy.
        try:
            built = target(**options)
        except Exception as error:
            raise StrategyError(
                f"{parsed.attribute}(**strategy_options) raised "
                f"{type(error).__name__}: {_one_line(error)}"
            ) from error
    else:
        # A plain function taking a Failure and answering a directive.
        built = target
    try:
        return as_strategy(built)
    except TypeError as error:
        raise StrategyError(
            f"{parsed.attribute!r} of {_describe(module)} is no strategy: {_one_line(error)}"
        ) from None


def import_strategy_module(name: str, base_dir: Path | None = None) -> ModuleType:
    """Import ``name``, looking in ``base_dir`` first; ``sys.path`` is left as it was.

    ``StrategyError`` if there is no such module, or if importing it raised.
    """
    folder = str(base_dir) if base_dir is not None else None
    added = folder is not None and folder not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and (name == error.name or name.startswith(error.name + ".")):
            where = f"in {folder} (the topology file's folder) or " if folder else ""
            raise StrategyError(
                f"no module {name!r} {where}among the installed modules; expected "
                f"module:attribute with a Python file {name.split('.')[0]}.py there "
                "or an importable module"
            ) from None
        raise StrategyError(_raised_while_importing(name, error)) from error
    except Exception as error:  # the user's module may raise anything while it loads
        raise StrategyError(_raised_while_importing(name, error)) from error
    finally:
        if added:
            try:
                sys.path.remove(str(folder))
            except ValueError:  # the module took it off itself
                pass


def _raised_while_importing(name: str, error: Exception) -> str:
    return f"importing module {name!r} raised {type(error).__name__}: {_one_line(error)}"


def _describe(module: ModuleType) -> str:
    file = getattr(module, "__file__", None)
    return f"module {module.__name__!r}" + (f" ({file})" if file else "")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
