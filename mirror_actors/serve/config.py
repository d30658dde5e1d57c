"""The ``mirror-actors serve`` file: strict TOML, parsed without touching the disk.

```toml
[mirror]
name = "eu-mirror"              # required: bound into every log record and metric
data_dir = "var/mirror"         # required: one SQLite replica per link, <cluster>/<database>.db
http = "127.0.0.1:9464"         # optional: /metrics /status /healthz /readyz; port 0: any free
shard = "0/1"                   # optional: follow only links whose stable hash mod n is i
workers = 1                     # optional: worker processes the links are split over (1..256)

[defaults]                      # every key may be overridden inside a [[source]]
ca_file = "certs/ca.pem"        # required here or in every [[source]]
client_cert_file = "certs/mirror.pem"   # optional, with client_key_file: mutual TLS
client_key_file = "certs/mirror.key"
strategy = "backoff"            # a built-in (backoff, full-jitter, equal-jitter,
strategy_options = {}           #   decorrelated-jitter) or "module:attribute"
handshake_timeout = 5.0         # seconds, > 0
keepalive_interval = 1.0        # seconds, > 0, shorter than idle_timeout
idle_timeout = 5.0              # seconds, > 0
on_divergence = "escalate"      # or "resync"
max_snapshot_bytes = 67108864   # optional: refuse larger snapshots (default: no limit)

[[source]]
cluster = "us-east"             # the cluster id the source must answer with
address = "10.0.0.5:4433"       # host:port; IPv6 as [::1]:4433
databases = ["orders", "users"]
server_name = "us-east"         # optional: the TLS name to check; defaults to the cluster id
```

``parse_config`` is pure: an unknown key, a wrong type, a bad value or a link
named twice is a ``ConfigError`` naming the file, the key (``mirror.http``,
``defaults.idle_timeout``, ``source[1].databases``) and what was expected.
Relative paths are taken relative to the file's folder.  ``check_config``
then looks at the disk for what a daemon is about to use (certificates and
keys are loaded, ``module:attribute`` strategies imported) and raises the same
kind of error; a daemon starts nothing, and a reload changes nothing, until
both passed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from attrs import field, frozen

from mirror_actors.link.config import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
    LinkConfig,
)
from mirror_actors.pki import (
    PemFileError,
    key_matches_certificate,
    load_certificate_file,
    load_private_key_file,
    validate_dns_name,
)
from mirror_actors.topology.spec import (
    BUILTIN_STRATEGIES,
    DEFAULT_ON_DIVERGENCE,
    LINK_TIMEOUTS,
    ON_DIVERGENCE,
    identifier_problem,
    resolve_strategy,
)
from mirror_actors.topology.tables import FileError, Table, show
from supervisors import SupervisorStrategy

__all__ = [
    "DEFAULT_LINK_SETTINGS",
    "DEFAULT_STRATEGY",
    "LINK_KEYS",
    "MIRROR_KEYS",
    "SOURCE_KEYS",
    "ConfigError",
    "LinkSettings",
    "ServeConfig",
    "Shard",
    "check_config",
    "format_address",
    "http_address_of",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_shard",
    "shard_of",
    "split_links",
    "worker_of",
    "worker_shard",
]

DEFAULT_STRATEGY = "backoff"
LINK_KEYS = (
    "ca_file",
    "client_cert_file",
    "client_key_file",
    "strategy",
    "strategy_options",
    *LINK_TIMEOUTS,
    "on_divergence",
    "max_snapshot_bytes",
)
MIRROR_KEYS = ("name", "data_dir", "http", "shard", "workers")
MAX_WORKERS = 256
SOURCE_KEYS = ("cluster", "address", "databases", "server_name", *LINK_KEYS)
TOP_KEYS = ("mirror", "defaults", "source")
PATH_KEYS = ("ca_file", "client_cert_file", "client_key_file")
DEFAULT_LINK_SETTINGS: Mapping[str, Any] = {
    "client_cert_file": None,
    "client_key_file": None,
    "strategy": DEFAULT_STRATEGY,
    "strategy_options": {},
    "handshake_timeout": DEFAULT_HANDSHAKE_TIMEOUT,
    "keepalive_interval": DEFAULT_KEEPALIVE_INTERVAL,
    "idle_timeout": DEFAULT_IDLE_TIMEOUT,
    "on_divergence": DEFAULT_ON_DIVERGENCE,
    "max_snapshot_bytes": None,
}


class ConfigError(FileError):
    """A serve file that cannot be used; the message says the file, the key and what was expected."""


# -- shards --------------------------------------------------------------------------


def shard_of(link_name: str, count: int) -> int:
    """Which of ``count`` shards follows ``link_name``: SHA-256 of the name, mod ``count``.

    Stable across processes, machines and Python versions (unlike ``hash()``),
    so daemons sharing one file agree on the split without talking to each other.
    """
    if count < 1:
        raise ValueError(f"a shard count is >= 1, got {count}")
    digest = hashlib.sha256(link_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@frozen
class Shard:
    """``index/count``: this process follows the links ``shard_of`` puts at ``index``."""

    index: int = 0
    count: int = 1

    def owns(self, link_name: str) -> bool:
        return shard_of(link_name, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def worker_shard(shard: Shard, index: int, workers: int) -> Shard:
    """The links worker ``index`` of ``workers`` follows within ``shard``, as a shard itself.

    ``shard_of(name, n * w) mod n == shard_of(name, n)`` (n divides n * w), so the
    links of shard ``i/n`` are exactly those of the shards ``(i + n*k)/(n*w)`` for
    ``k`` in ``0..w-1``: worker ``k`` follows shard ``(i + n*k)/(n*w)``.  One hash,
    the same as ``shard``'s, and an even split even when ``w == n``.
    """
    if workers < 1 or not 0 <= index < workers:
        raise ValueError(f"expected a worker index 0 <= i < {workers}, got {index}")
    return Shard(shard.index + shard.count * index, shard.count * workers)


def worker_of(link_name: str, shard: Shard, workers: int) -> int:
    """Which of ``workers`` worker processes follows ``link_name`` (a link of ``shard``)."""
    return shard_of(link_name, shard.count * workers) // shard.count


def split_links(
    links: Iterable[LinkSettings], shard: Shard, workers: int
) -> tuple[tuple[LinkSettings, ...], ...]:
    """``links`` (already the shard's) split over ``workers`` processes, file order kept."""
    shares: list[list[LinkSettings]] = [[] for _ in range(workers)]
    for link in links:
        shares[worker_of(link.name, shard, workers)].append(link)
    return tuple(tuple(share) for share in shares)


_SHARD = re.compile(r"([0-9]{1,6})/([0-9]{1,6})")


def parse_shard(text: str) -> Shard:
    """``"i/n"`` with 0 <= i < n; ``ValueError`` saying what was expected."""
    match = _SHARD.fullmatch(text)
    if match is None:
        raise ValueError(
            f"expected i/n (this shard's index and the number of shards), got {text!r}"
        )
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise ValueError(f"expected i/n with 0 <= i < n, got {text!r}")
    return Shard(index, count)


# -- addresses ---------------------------------------------------------------------


def parse_address(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) as ``(host, port)``; ``ValueError`` if not."""
    lowest = 0 if allow_port_zero else 1
    expected = f"host:port with a port {lowest}..65535 (IPv6 as [::1]:4433)"
    if (
        not isinstance(text, str)
        or not text
        or not text.isprintable()
        or any(c.isspace() for c in text)
    ):
        raise ValueError(f"expected {expected}, got {text!r}")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"expected {expected}, got {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"expected an IPv6 address inside the brackets, got {host!r} in {text!r}"
            ) from None
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError(f"expected {expected}, got {text!r}")
        if ":" in host:
            raise ValueError(
                f"expected an IPv6 address in brackets ([{host}]:{port_text}), got {text!r}"
            )
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"expected {expected}, got {text!r}")
    port = int(port_text)
    if not lowest <= port <= 65535:
        raise ValueError(f"expected {expected}, got {text!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    """The inverse of ``parse_address``: ``[v6]:port`` or ``host:port``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- what a file says ----------------------------------------------------------------


@frozen
class LinkSettings:
    """One link a serve file describes, with every default applied and every path absolute."""

    cluster: str
    database: str
    host: str
    port: int
    ca_file: str
    replica_file: str
    client_cert_file: str | None = None
    client_key_file: str | None = None
    server_name: str | None = None
    strategy: str = DEFAULT_STRATEGY
    strategy_options: Mapping[str, Any] = field(factory=dict, hash=False)
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    on_divergence: str = DEFAULT_ON_DIVERGENCE
    max_snapshot_bytes: int | None = None
    key: str = field(default="source", eq=False)
    """Where in the file the link comes from (``source[1]``): not part of its settings."""
    origins: Mapping[str, str] = field(factory=dict, eq=False, hash=False)
    """Which table set each link key (``defaults`` or ``source[1]``), for error messages."""

    @property
    def name(self) -> str:
        """``cluster/database``: the link's name in logs, metrics, /status and the shard hash."""
        return f"{self.cluster}/{self.database}"

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def link_config(self) -> LinkConfig:
        return LinkConfig(
            self.cluster,
            self.database,
            ca_file=self.ca_file,
            host=self.host,
            port=self.port,
            client_cert_file=self.client_cert_file,
            client_key_file=self.client_key_file,
            handshake_timeout=self.handshake_timeout,
            keepalive_interval=self.keepalive_interval,
            idle_timeout=self.idle_timeout,
            server_name=self.server_name,
            max_snapshot_bytes=self.max_snapshot_bytes,
        )

    def build_strategy(self, base_dir: Path | None = None) -> SupervisorStrategy:
        return resolve_strategy(self.strategy, self.strategy_options, base_dir)


@frozen
class ServeConfig:
    file: str
    base_dir: Path
    name: str
    data_dir: Path
    http: tuple[str, int] | None
    shard: Shard
    links: tuple[LinkSettings, ...]
    workers: int = 1
    """Worker processes the links are split over (``[mirror] workers``; 1: this process)."""

    def selected(self, shard: Shard | None = None) -> tuple[LinkSettings, ...]:
        """The links ``shard`` (default: the file's own) follows, in file order."""
        chosen = shard if shard is not None else self.shard
        return tuple(link for link in self.links if chosen.owns(link.name))

    def link(self, name: str) -> LinkSettings:
        return next(link for link in self.links if link.name == name)


# -- parsing ---------------------------------------------------------------------------


class _Table(Table):
    """A table of a serve file: ``ConfigError``, ids and file names."""

    error_type = ConfigError

    def identifier(self, name: str, what: str) -> str:
        value = self.string(name, what)
        problem = _id_problem(value)
        if problem is not None:
            raise self.error(name, f"expected {what}, got {value!r} ({problem})")
        return value

    def path(self, name: str, base_dir: Path) -> str:
        value = self.string(name, "a file name")
        if not value or "\x00" in value:
            raise self.error(name, f"expected a file name, got {value!r}")
        return str(_absolute(value, base_dir))


def _absolute(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))


def _id_problem(value: str) -> str | None:
    """What makes ``value`` unusable as a cluster or database id here; None if nothing.

    Besides the usual id rules, ids become a replica's path (<cluster>/<database>.db)
    and a link's name (cluster/database): no path separators, not ``.`` or ``..``.
    """
    problem = identifier_problem(value)
    if problem is not None:
        return problem
    if "/" in value or "\\" in value:
        return "it holds a path separator"
    if value in (".", ".."):
        return "it is a relative folder name"
    return None


def _link_options(table: _Table, base_dir: Path) -> dict[str, Any]:
    """The link keys a table sets, each checked on its own (cross checks come after merging)."""
    options: dict[str, Any] = {}
    for name in PATH_KEYS:
        if table.has(name):
            options[name] = table.path(name, base_dir)
    if table.has("strategy"):
        options["strategy"] = table.string("strategy", "a strategy name or module:attribute")
    if table.has("strategy_options"):
        options["strategy_options"] = table.get("strategy_options", dict, what="a table of options")
    for name in LINK_TIMEOUTS:
        if table.has(name):
            options[name] = table.seconds(name)
    if table.has("on_divergence"):
        value = table.string("on_divergence", f"one of {', '.join(ON_DIVERGENCE)}")
        if value not in ON_DIVERGENCE:
            raise table.error(
                "on_divergence", f"expected one of {', '.join(ON_DIVERGENCE)}, got {value!r}"
            )
        options["on_divergence"] = value
    if table.has("max_snapshot_bytes"):
        limit = table.get("max_snapshot_bytes", int, what="a number of bytes (an integer)")
        if limit < 1:
            raise table.error(
                "max_snapshot_bytes", f"expected a positive number of bytes, got {limit}"
            )
        options["max_snapshot_bytes"] = limit
    return options


def _merged_link_options(
    source: _Table, defaults: _Table, own: Mapping[str, Any], inherited: Mapping[str, Any]
) -> dict[str, Any]:
    """``inherited`` under ``own``, checked together; an error names the table that set the key."""
    merged = {**DEFAULT_LINK_SETTINGS, **inherited, **own}

    def where(*names: str) -> tuple[_Table, str]:
        for name in names:
            if name in own:
                return source, name
        for name in names:
            if name in inherited:
                return defaults, name
        return source, names[0]

    if "ca_file" not in merged:
        raise source.error(
            "ca_file", "missing; expected the CA file that signed the source's certificate, "
            "here or in [defaults]",
        )  # fmt: skip
    if (merged["client_cert_file"] is None) != (merged["client_key_file"] is None):
        table, name = where("client_cert_file", "client_key_file")
        raise table.error(
            name, "client_cert_file and client_key_file go together: set both or neither"
        )
    if merged["keepalive_interval"] >= merged["idle_timeout"]:
        table, name = where("keepalive_interval", "idle_timeout")
        raise table.error(
            name,
            f"expected keepalive_interval shorter than idle_timeout, got "
            f"{merged['keepalive_interval']:g} s and {merged['idle_timeout']:g} s "
            "(a live source would time out)",
        )
    strategy = merged["strategy"]
    if strategy in BUILTIN_STRATEGIES:
        # A built-in runs no code of the user's: build it now, which checks its options.
        try:
            resolve_strategy(strategy, merged["strategy_options"])
        except Exception as error:
            table, name = where("strategy_options", "strategy")
            raise table.error(
                name, f"cannot build strategy {strategy!r}: {_one_line(error)}"
            ) from None
    elif ":" not in strategy:
        table, _ = where("strategy")
        raise table.error(
            "strategy",
            f"expected a built-in ({', '.join(BUILTIN_STRATEGIES)}) or module:attribute, "
            f"got {strategy!r}",
        )
    return merged


def parse_config(data: Mapping[str, Any], file: str, base_dir: Path) -> ServeConfig:
    """Check a parsed serve file; ``ConfigError`` for the first problem.  Pure: no disk, no imports."""
    top = _Table(file, "", dict(data), TOP_KEYS)
    if not top.has("mirror"):
        raise top.error("mirror", "missing; expected a [mirror] table with name and data_dir")
    mirror = _Table(file, "mirror", top.data["mirror"], MIRROR_KEYS)
    name = mirror.string("name", "the mirror's name")
    if not name or "/" in name or identifier_problem(name) is not None:
        raise mirror.error(
            "name",
            f"expected a non-empty name without '/', whitespace or control characters, got {name!r}",
        )
    data_dir_text = mirror.string("data_dir", "a folder for the replicas")
    if not data_dir_text or "\x00" in data_dir_text:
        raise mirror.error("data_dir", f"expected a folder name, got {data_dir_text!r}")
    data_dir = _absolute(data_dir_text, base_dir)
    http: tuple[str, int] | None = None
    if mirror.has("http"):
        try:
            http = parse_address(mirror.string("http", "host:port"), allow_port_zero=True)
        except ValueError as error:
            raise mirror.error("http", str(error)) from None
    shard = Shard()
    if mirror.has("shard"):
        try:
            shard = parse_shard(mirror.string("shard", "i/n"))
        except ValueError as error:
            raise mirror.error("shard", str(error)) from None

    workers = 1
    if mirror.has("workers"):
        what = f"a number of worker processes, 1..{MAX_WORKERS}"
        workers = mirror.get("workers", int, what=what)
        if not 1 <= workers <= MAX_WORKERS:
            raise mirror.error("workers", f"expected {what}, got {workers}")

    defaults = _Table(file, "defaults", top.data.get("defaults", {}), LINK_KEYS)
    inherited = _link_options(defaults, base_dir)
    sources = top.data.get("source", [])
    if not isinstance(sources, list) or not sources:
        raise top.error(
            "source", "expected at least one [[source]] table (cluster, address, databases)"
        )
    links: list[LinkSettings] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(sources):
        source = _Table(file, f"source[{i}]", raw, SOURCE_KEYS)
        links.extend(_source_links(source, defaults, inherited, base_dir, data_dir, seen))
    return ServeConfig(
        file=file,
        base_dir=base_dir,
        name=name,
        data_dir=data_dir,
        http=http,
        shard=shard,
        links=tuple(links),
        workers=workers,
    )


def _source_links(
    source: _Table,
    defaults: _Table,
    inherited: Mapping[str, Any],
    base_dir: Path,
    data_dir: Path,
    seen: dict[str, str],
) -> Iterable[LinkSettings]:
    cluster = source.identifier(
        "cluster", "a cluster id without whitespace, '/' or control characters"
    )
    try:
        host, port = parse_address(source.string("address", "host:port"))
    except ValueError as error:
        raise source.error("address", str(error)) from None
    server_name: str | None = None
    if source.has("server_name"):
        server_name = source.string("server_name", "a DNS name")
        try:
            validate_dns_name(server_name, what="server name")
        except ValueError as error:
            raise source.error("server_name", str(error)) from None
    else:
        try:
            validate_dns_name(cluster, what="cluster id")
        except ValueError as error:
            raise source.error(
                "cluster",
                f"the cluster id is the TLS name checked on the source's certificate unless "
                f"server_name is set, so expected a DNS name: {error}",
            ) from None
    databases = source.get("databases", list, what="a non-empty list of database ids")
    if not databases:
        raise source.error("databases", "expected a non-empty list of database ids, got []")
    for database in databases:
        if not isinstance(database, str):
            raise source.error(
                "databases", f"expected database ids (strings), got {show(database)}"
            )
        problem = _id_problem(database)
        if problem is not None:
            raise source.error(
                "databases",
                f"expected ids without whitespace, '/' or control characters, got {database!r} ({problem})",
            )
    repeated = sorted({d for d in databases if databases.count(d) > 1})
    if repeated:
        raise source.error("databases", f"each database once; repeated: {', '.join(repeated)}")
    own = _link_options(source, base_dir)
    merged = _merged_link_options(source, defaults, own, inherited)
    for database in databases:
        name = f"{cluster}/{database}"
        if name in seen:
            raise source.error(
                "databases", f"link {name} is already followed by {seen[name]}; name each link once"
            )
        seen[name] = source.key
        yield LinkSettings(
            cluster=cluster,
            database=database,
            host=host,
            port=port,
            replica_file=str(data_dir / cluster / f"{database}.db"),
            server_name=server_name,
            key=source.key,
            origins={
                **{name: defaults.key for name in inherited},
                **{name: source.key for name in own},
            },
            **merged,
        )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read_toml(path: str | Path) -> dict[str, Any]:
    file = str(path)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(file, "(file)", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(file, "(file)", "a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(file, "(syntax)", str(error)) from None
    except UnicodeDecodeError as error:
        raise ConfigError(file, "(file)", f"not UTF-8 text: {error}") from None
    except OSError as error:
        raise ConfigError(file, "(file)", f"cannot read it: {error.strerror or error}") from None


def load_config(path: str | Path) -> ServeConfig:
    """Read and parse a serve file (``check_config`` looks at what it names)."""
    return parse_config(_read_toml(path), str(path), Path(path).resolve().parent)


def http_address_of(path: str | Path) -> tuple[str, int] | None:
    """Only ``[mirror] http`` of a serve file (for ``status``); ``ConfigError`` if it is bad."""
    data = _read_toml(path)
    mirror = data.get("mirror")
    if not isinstance(mirror, dict) or "http" not in mirror:
        return None
    table = _Table(str(path), "mirror", {"http": mirror["http"]}, ("http",))
    try:
        return parse_address(table.string("http", "host:port"), allow_port_zero=True)
    except ValueError as error:
        raise table.error("http", str(error)) from None


# -- the disk ---------------------------------------------------------------------------


def check_config(config: ServeConfig, links: Iterable[LinkSettings] | None = None) -> None:
    """Load every certificate and key ``links`` (default: all) name, build every strategy.

    ``ConfigError`` names the file, the link's table and key, and the problem.
    Imports ``module:attribute`` strategies (from the file's folder first).
    """
    checked: set[tuple[str, str | None, str | None]] = set()
    built: set[tuple[str, str]] = set()
    for link in config.links if links is None else links:

        def error(key: str, problem: str, link: LinkSettings = link) -> ConfigError:
            return ConfigError(config.file, f"{link.origins.get(key, link.key)}.{key}", problem)

        files = (link.ca_file, link.client_cert_file, link.client_key_file)
        if files not in checked:
            checked.add(files)
            try:
                load_certificate_file(link.ca_file)
            except PemFileError as problem:
                raise error("ca_file", str(problem)) from None
            if link.client_cert_file is not None and link.client_key_file is not None:
                try:
                    load_certificate_file(link.client_cert_file)
                except PemFileError as problem:
                    raise error("client_cert_file", str(problem)) from None
                try:
                    load_private_key_file(link.client_key_file)
                    matches = key_matches_certificate(link.client_cert_file, link.client_key_file)
                except PemFileError as problem:
                    raise error("client_key_file", str(problem)) from None
                if not matches:
                    raise error(
                        "client_key_file",
                        f"{link.client_key_file} is not the private key of the certificate in "
                        f"{link.client_cert_file}",
                    )
        strategy = (link.strategy, repr(sorted(link.strategy_options.items())))
        if strategy not in built:
            built.add(strategy)
            try:
                link.build_strategy(config.base_dir)
            except Exception as problem:  # whatever the user's module raises
                raise error(
                    "strategy", f"cannot build strategy {link.strategy!r}: {_one_line(problem)}"
                ) from None
