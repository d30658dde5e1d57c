"""Topology files (parsed and checked, pure), running them with scripted faults and
verification, and the live status view."""

from __future__ import annotations

from mirror_actors.topology.runner import (
    RunSummary,
    TopologyRun,
)
from mirror_actors.topology.spec import (
    Topology,
    TopologyError,
    load_topology,
    parse_topology,
)
from mirror_actors.topology.view import (
    status_table,
)

__all__ = [
    "RunSummary",
    "Topology",
    "TopologyError",
    "TopologyRun",
    "load_topology",
    "parse_topology",
    "status_table",
]
