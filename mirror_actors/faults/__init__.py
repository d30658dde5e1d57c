"""Fault injection on loopback: ``UdpProxy`` drops, delays, reorders and partitions the
UDP traffic of QUIC links, for tests and for the topology runner's scripted faults."""

from __future__ import annotations

from mirror_actors.faults.proxy import (
    FaultSettings,
    ProxyStats,
    UdpProxy,
)

__all__ = [
    "FaultSettings",
    "ProxyStats",
    "UdpProxy",
]
