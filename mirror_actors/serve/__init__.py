"""The mirror daemon: ``mirror-actors serve FILE`` follows real sources from a config file,
observable over HTTP (Prometheus metrics, status, health), reloadable on SIGHUP and
shardable across machines; ``mirror-actors status`` watches one."""

from __future__ import annotations

from mirror_actors.serve.config import (
    ConfigError,
    LinkSettings,
    ServeConfig,
    Shard,
    check_config,
    load_config,
    parse_address,
    parse_config,
    parse_shard,
    shard_of,
)
from mirror_actors.serve.daemon import MirrorDaemon, ReloadReport, run_serve
from mirror_actors.serve.snapshot import LinkSnapshot, StatusSnapshot

__all__ = [
    "ConfigError",
    "LinkSettings",
    "LinkSnapshot",
    "MirrorDaemon",
    "ReloadReport",
    "ServeConfig",
    "Shard",
    "StatusSnapshot",
    "check_config",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_shard",
    "run_serve",
    "shard_of",
]
