"""Topology files: sources, mirrors and a fault script, described in TOML.

Parsing is pure and strict: an unknown key, a wrong type or a reference to a
source that is not declared is a ``TopologyError`` naming the file, the key and
what was expected, and nothing starts.

Parsing runs no code of the user's: a built-in ``strategy`` is built to check
its ``strategy_options``, a ``module:attribute`` one is checked for its form
and kept as a string.  ``mirror_actors.topology.strategies.resolve_strategies``
imports those modules (from the topology file's folder first) and reports what
it cannot build as a ``TopologyError`` for the same ``mirror[i].strategy`` key.

```toml
[run]
duration = 20                      # seconds

[link_defaults]                    # for every link; a link's own keys win
handshake_timeout = 5.0            # seconds, > 0
keepalive_interval = 1.0           # seconds, > 0, shorter than idle_timeout
idle_timeout = 5.0                 # seconds, > 0
max_snapshot_bytes = 67108864      # optional: refuse larger snapshots (default: no limit)

[[source]]
cluster = "us-east"                # a DNS name: the dev certificate is made for it
databases = ["orders"]
rate = 20                          # demo entries per second, per database
compact_every = 200                # optional: compact the log every N entries
preload = 0                        # entries appended before anything starts

[[mirror]]
name = "mirror-a"
strategy = "backoff"               # built-in name, or "module:attribute"
strategy_options = { base = 0.5 }
store = "memory"                   # or "sqlite"
on_divergence = "escalate"         # or "resync": start the replica over from the source
links = [{ source = "us-east", database = "orders" }]

[[fault]]
at = 5.0
action = "restart_source"          # stop_source, start_source, restart_source,
source = "us-east"                 # cut_link, partition_source, watch
duration = 2.0

[expect]
escalations = []                   # links ("mirror/cluster/database") expected to escalate
```

Ids (clusters, databases, mirror names, a link's ``cluster_id``) are
non-empty and hold no whitespace or control characters; mirror names hold no
``/`` either. A link table takes the ``[link_defaults]`` keys too, for that
link alone.

``mirror-actors run FILE`` exits 0 when every mirror equals its source and
exactly the links listed in ``[expect] escalations`` escalated; 1 when the run
was not verified (a mirror differs, an expected escalation did not happen) or
was interrupted; 3 when a link escalated that ``[expect] escalations`` does not
list (the summary names the link and its error); 2 when the file itself is
wrong. An expected escalation (as in ``examples/wrong_cluster_id.toml``) is part
of the plan, so it leaves the verification's exit code as it is.
"""

from __future__ import annotations

import math
import tomllib
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attrs import field, frozen

from mirror_actors.link.config import DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEPALIVE_INTERVAL
from mirror_actors.pki import validate_dns_name
from mirror_actors.topology.tables import FileError, Table
from supervisors import JitterKind, SupervisorStrategy

FAULT_ACTIONS = (
    "stop_source",
    "start_source",
    "restart_source",
    "cut_link",
    "partition_source",
    "watch",
)
STORES = ("memory", "sqlite")
TREES = ("flat", "per-mirror")
BUILTIN_STRATEGIES: Mapping[str, JitterKind] = {
    "backoff": JitterKind.UNIFORM,
    "full-jitter": JitterKind.FULL,
    "equal-jitter": JitterKind.EQUAL,
    "decorrelated-jitter": JitterKind.DECORRELATED,
}
LINK_TIMEOUTS = ("handshake_timeout", "keepalive_interval", "idle_timeout")
LINK_OPTIONS = (*LINK_TIMEOUTS, "max_snapshot_bytes")
ON_DIVERGENCE = ("escalate", "resync")
DEFAULT_ON_DIVERGENCE = "escalate"


def identifier_problem(value: str) -> str | None:
    """What makes ``value`` unusable as a cluster, database or mirror id; None if nothing.

    Ids travel in HELLO frames, log lines and link names: they must be non-empty
    and hold no whitespace or control (or other invisible formatting) characters.
    """
    if not value:
        return "it is empty"
    for char in value:
        if char.isspace():
            return f"it holds whitespace ({char!r})"
        if unicodedata.category(char).startswith("C"):
            return f"it holds a control character ({char!r})"
    return None


class TopologyError(FileError):
    """A topology file that cannot be run; the message says where and what was expected."""


@frozen
class StrategyReference:
    """A mirror's ``strategy`` as written: a built-in name, or ``module:attribute``.

    A value only: nothing is imported.  ``module`` is None for a built-in.
    """

    text: str
    module: str | None = None
    attribute: str = ""

    @classmethod
    def parse(cls, text: str) -> StrategyReference:
        """``ValueError`` (saying what was expected) for anything but the two forms."""
        if text in BUILTIN_STRATEGIES:
            return cls(text)
        expected = f"expected a built-in ({', '.join(BUILTIN_STRATEGIES)}) or module:attribute"
        if ":" not in text:
            raise ValueError(expected)
        module, _, attribute = text.partition(":")
        for what, value in (("module", module), ("attribute", attribute)):
            if not all(part.isidentifier() for part in value.split(".")):
                raise ValueError(
                    f"{expected}, with dotted Python names on both sides; the {what} "
                    f"{value!r} is not one"
                )
        return cls(text, module, attribute)


@frozen
class SourceSpec:
    cluster: str
    databases: tuple[str, ...]
    rate: float = 0.0
    compact_every: int | None = None
    preload: int = 0


@frozen
class LinkSpec:
    source: str
    database: str
    cluster_id: str
    """The cluster id the link is configured with (normally the source's own)."""
    options: Mapping[str, Any] = field(factory=dict)
    """LinkConfig overrides: timeouts, and ``server_name`` for certificates shared between clusters."""


@frozen
class MirrorSpec:
    name: str
    links: tuple[LinkSpec, ...]
    strategy: str = "backoff"
    strategy_options: Mapping[str, Any] = field(factory=dict)
    store: str = "memory"
    on_divergence: str = DEFAULT_ON_DIVERGENCE
    """What a replica does when the source's history is not its own: escalate, or resync."""

    def link_name(self, link: LinkSpec) -> str:
        return f"{self.name}/{link.cluster_id}/{link.database}"

    @property
    def strategy_reference(self) -> StrategyReference:
        """``strategy`` parsed (parsing the topology checked it)."""
        return StrategyReference.parse(self.strategy)


@frozen
class FaultSpec:
    at: float
    action: str
    source: str | None = None
    link: str | None = None
    duration: float = 0.0
    note: str = ""


@frozen
class Topology:
    file: str
    description: str
    duration: float
    sources: tuple[SourceSpec, ...]
    mirrors: tuple[MirrorSpec, ...]
    faults: tuple[FaultSpec, ...]
    expected_escalations: frozenset[str]
    tree: str
    link_defaults: Mapping[str, float | int]
    """LinkConfig keyword arguments for every link: timeouts, ``max_snapshot_bytes``."""
    base_dir: Path

    def source(self, cluster: str) -> SourceSpec:
        return next(s for s in self.sources if s.cluster == cluster)

    def link_names(self) -> list[str]:
        return [m.link_name(link) for m in self.mirrors for link in m.links]


class _Table(Table):
    """A table of a topology file: ``TopologyError``, numbers, choices, link options."""

    error_type = TopologyError

    def number(self, name: str, default: Any = ..., minimum: float = 0.0) -> Any:
        value = self.get(name, (int, float), default, what="a number")
        if (
            value is not None
            and value is not default
            and not (math.isfinite(value) and value >= minimum)
        ):
            raise self.error(name, f"expected a number >= {minimum:g}, got {value!r}")
        return float(value) if isinstance(value, int | float) else value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(name, str, default)
        if value not in choices:
            raise self.error(name, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.get(name, list, what="a list of strings")
        if not value or not all(isinstance(v, str) and v for v in value):
            raise self.error(name, f"expected a non-empty list of strings, got {value!r}")
        return tuple(value)

    def identifier(self, name: str, default: Any = ...) -> Any:
        value = self.get(name, str, default)
        if value is default and default is not ...:
            return value
        problem = identifier_problem(value)
        if problem is not None:
            raise self.error(
                name,
                f"expected an id without whitespace or control characters, got {value!r} ({problem})",
            )
        return value

    def link_options(self) -> dict[str, float | int]:
        """The LinkConfig keys of this table: timeouts (numbers > 0), ``max_snapshot_bytes``."""
        options: dict[str, float | int] = {}
        for name in LINK_TIMEOUTS:
            if name in self.data:
                options[name] = self.seconds(name)
        if "max_snapshot_bytes" in self.data:
            limit = self.get("max_snapshot_bytes", int, what="an integer (bytes)")
            if limit < 1:
                raise self.error(
                    "max_snapshot_bytes", f"expected a positive integer (bytes), got {limit}"
                )
            options["max_snapshot_bytes"] = limit
        return options

    def tables(self, name: str) -> list[Any]:
        value = self.get(name, list, [], what="an array of tables")
        return list(value)


def load_topology(path: str | Path) -> Topology:
    """Read and check a topology file; ``TopologyError`` says what is wrong and where."""
    file = str(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise TopologyError(file, "(file)", "no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise TopologyError(file, "(syntax)", str(error)) from None
    except UnicodeDecodeError as error:
        raise TopologyError(file, "(file)", f"not UTF-8 text: {error}") from None
    except OSError as error:
        raise TopologyError(file, "(file)", f"cannot read it: {error.strerror or error}") from None
    return parse_topology(data, file, Path(path).resolve().parent)


def parse_topology(data: Mapping[str, Any], file: str, base_dir: Path) -> Topology:
    top = _Table(
        file, "(top)", dict(data), ("run", "source", "mirror", "fault", "expect", "link_defaults")
    )
    run = _Table(file, "run", top.get("run", dict, {}), ("duration", "description", "tree"))
    duration = run.number("duration", 20.0, minimum=0.1)
    sources = tuple(
        _source(
            _Table(
                file,
                f"source[{i}]",
                raw,
                ("cluster", "databases", "rate", "compact_every", "preload"),
            )
        )
        for i, raw in enumerate(top.tables("source"))
    )
    if not sources:
        raise TopologyError(file, "source", "expected at least one [[source]]")
    clusters = [s.cluster for s in sources]
    if len(set(clusters)) != len(clusters):
        raise TopologyError(file, "source", f"cluster ids must be unique, got {clusters}")
    defaults_table = _Table(file, "link_defaults", top.get("link_defaults", dict, {}), LINK_OPTIONS)
    link_defaults = defaults_table.link_options()
    _check_keepalive(defaults_table, {}, link_defaults)
    mirrors = tuple(
        _mirror(
            _Table(
                file,
                f"mirror[{i}]",
                raw,
                ("name", "links", "strategy", "strategy_options", "store", "on_divergence"),
            ),
            {s.cluster: s for s in sources},
            link_defaults,
        )
        for i, raw in enumerate(top.tables("mirror"))
    )
    if not mirrors:
        raise TopologyError(file, "mirror", "expected at least one [[mirror]]")
    names = [m.name for m in mirrors]
    if len(set(names)) != len(names):
        raise TopologyError(file, "mirror", f"mirror names must be unique, got {names}")
    all_links = [m.link_name(link) for m in mirrors for link in m.links]
    duplicates = sorted({name for name in all_links if all_links.count(name) > 1})
    if duplicates:
        raise TopologyError(
            file, "mirror", f"a link may appear once per mirror; repeated: {duplicates}"
        )
    link_names = set(all_links)
    faults = tuple(
        _fault(
            _Table(
                file, f"fault[{i}]", raw, ("at", "action", "source", "link", "duration", "note")
            ),
            clusters,
            link_names,
        )
        for i, raw in enumerate(top.tables("fault"))
    )
    expect = _Table(file, "expect", top.get("expect", dict, {}), ("escalations",))
    escalations = expect.get("escalations", list, [], what="a list of link names")
    for name in escalations:
        if not isinstance(name, str):
            raise expect.error("escalations", f"expected link names (strings), got {name!r}")
        if name not in link_names:
            raise expect.error(
                "escalations", f"{name!r} is not a link; links are {sorted(link_names)}"
            )
    return Topology(
        file=file,
        description=run.get("description", str, ""),
        duration=duration,
        sources=sources,
        mirrors=mirrors,
        faults=tuple(sorted(faults, key=lambda f: f.at)),
        expected_escalations=frozenset(escalations),
        tree=run.choice("tree", TREES, "flat"),
        link_defaults=link_defaults,
        base_dir=base_dir,
    )


def _source(table: _Table) -> SourceSpec:
    cluster = table.identifier("cluster")
    try:
        validate_dns_name(cluster, what="cluster id")
    except ValueError as error:
        raise table.error(
            "cluster", f"expected a DNS name (the dev certificate's name): {error}"
        ) from None
    databases = table.strings("databases")
    for database in databases:
        problem = identifier_problem(database)
        if problem is not None:
            raise table.error(
                "databases",
                f"expected ids without whitespace or control characters, got {database!r} ({problem})",
            )
    if len(set(databases)) != len(databases):
        raise table.error("databases", f"database ids must be unique, got {list(databases)}")
    compact_every = table.get("compact_every", int, None)
    if compact_every is not None and compact_every < 1:
        raise table.error("compact_every", f"expected a positive integer, got {compact_every}")
    preload = table.get("preload", int, 0)
    if preload < 0:
        raise table.error("preload", f"expected an integer >= 0, got {preload}")
    return SourceSpec(
        cluster=cluster,
        databases=databases,
        rate=table.number("rate", 0.0),
        compact_every=compact_every,
        preload=preload,
    )


def _mirror(
    table: _Table,
    sources: Mapping[str, SourceSpec],
    link_defaults: Mapping[str, float | int],
) -> MirrorSpec:
    links: list[LinkSpec] = []
    raw_links = table.get("links", list, what="a list of {source, database} tables")
    if not raw_links:
        raise table.error("links", "expected at least one link")
    for j, raw in enumerate(raw_links):
        link = _Table(
            table.file,
            f"{table.key}.links[{j}]",
            raw,
            ("source", "database", "cluster_id", "server_name", *LINK_OPTIONS),
        )
        source = link.get("source", str)
        if source not in sources:
            raise link.error(
                "source", f"no [[source]] with cluster {source!r}; declared: {sorted(sources)}"
            )
        database = link.identifier("database")
        cluster_id = link.identifier("cluster_id", source)
        if any((seen.cluster_id, seen.database) == (cluster_id, database) for seen in links):
            raise TopologyError(
                table.file,
                link.key,
                f"link {table.data.get('name')}/{cluster_id}/{database} appears twice in this mirror",
            )
        if database not in sources[source].databases:
            raise link.error(
                "database",
                f"source {source!r} holds {list(sources[source].databases)}, not {database!r}",
            )
        own_options = link.link_options()
        _check_keepalive(link, link_defaults, own_options)
        links.append(
            LinkSpec(
                source=source,
                database=database,
                cluster_id=cluster_id,
                options={
                    **own_options,
                    **(
                        {"server_name": link.get("server_name", str)}
                        if "server_name" in link.data
                        else {}
                    ),
                },
            )
        )
    strategy = table.get("strategy", str, "backoff")
    options = table.get("strategy_options", dict, {})
    try:
        if StrategyReference.parse(strategy).module is None:
            # Building a built-in runs none of the user's code: check its options now.
            builtin_strategy(strategy, options)
    except Exception as error:
        raise table.error("strategy", f"cannot build strategy {strategy!r}: {error}") from None
    name = table.get("name", str)
    if not name or "/" in name or identifier_problem(name) is not None:
        raise table.error(
            "name",
            f"expected a non-empty name without '/', whitespace or control characters, got {name!r}",
        )
    return MirrorSpec(
        name=name,
        links=tuple(links),
        strategy=strategy,
        strategy_options=options,
        store=table.choice("store", STORES, "memory"),
        on_divergence=table.choice("on_divergence", ON_DIVERGENCE, DEFAULT_ON_DIVERGENCE),
    )


def _check_keepalive(
    table: _Table, defaults: Mapping[str, float | int], own: Mapping[str, float | int]
) -> None:
    """keepalive_interval < idle_timeout, with what this table sets over what it inherits."""
    if not any(k in own for k in ("keepalive_interval", "idle_timeout")):
        return
    merged = {**defaults, **own}
    keepalive = merged.get("keepalive_interval", DEFAULT_KEEPALIVE_INTERVAL)
    idle = merged.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)
    if keepalive >= idle:
        key = "keepalive_interval" if "keepalive_interval" in own else "idle_timeout"
        raise table.error(
            key,
            f"expected keepalive_interval shorter than idle_timeout, got {keepalive:g} s and "
            f"{idle:g} s (a live source would time out)",
        )


def _fault(table: _Table, clusters: list[str], link_names: set[str]) -> FaultSpec:
    action = table.choice("action", FAULT_ACTIONS, "watch")
    source = table.get("source", str, None)
    link = table.get("link", str, None)
    if action.endswith("source") and source not in clusters:
        raise table.error("source", f"{action} needs a source, one of {clusters}; got {source!r}")
    if action == "cut_link" and link not in link_names:
        raise table.error(
            "link", f"cut_link needs a link, one of {sorted(link_names)}; got {link!r}"
        )
    duration = table.number("duration", 0.0)
    if action in ("restart_source", "cut_link", "partition_source") and duration <= 0:
        raise table.error("duration", f"{action} needs a duration > 0")
    return FaultSpec(
        at=table.number("at"),
        action=action,
        source=source,
        link=link,
        duration=duration,
        note=table.get("note", str, ""),
    )


def builtin_strategy(name: str, options: Mapping[str, Any]) -> SupervisorStrategy:
    """The built-in strategy ``name`` (a ``BUILTIN_STRATEGIES`` key) built with ``options``."""
    from mirror_actors.link.actor import link_strategy

    return link_strategy(jitter_kind=BUILTIN_STRATEGIES[name], **options)


def resolve_strategy(
    spec: str, options: Mapping[str, Any], base_dir: Path | None = None
) -> SupervisorStrategy:
    """Kept for old imports: ``mirror_actors.topology.strategies.resolve_strategy``.

    Importing user code is no part of parsing; the import here is deferred so
    that importing this module never loads ``strategies``.
    """
    from mirror_actors.topology import strategies

    return strategies.resolve_strategy(spec, options, base_dir)
