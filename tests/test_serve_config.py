"""The serve file, the shard hash and addresses: pure functions, many inputs."""

from __future__ import annotations

import hashlib
import string
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mirror_actors.link.config import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT
from mirror_actors.pki import DevPki
from mirror_actors.serve.config import (
    LINK_KEYS,
    ConfigError,
    Shard,
    check_config,
    format_address,
    http_address_of,
    load_config,
    parse_address,
    parse_config,
    parse_shard,
    shard_of,
)

BASE = Path("/etc/mirror")
FILE = "mirror.toml"


def minimal(**mirror: Any) -> dict[str, Any]:
    return {
        "mirror": {"name": "m", "data_dir": "var", **mirror},
        "defaults": {"ca_file": "certs/ca.pem"},
        "source": [{"cluster": "us-east", "address": "10.0.0.5:4433", "databases": ["orders"]}],
    }


def parse(data: dict[str, Any]) -> Any:
    return parse_config(data, FILE, BASE)


def error_of(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        parse(data)
    return raised.value


# --- the example in the issue --------------------------------------------------------------

ISSUE_EXAMPLE = """
[mirror]
name = "eu-mirror"
data_dir = "var/mirror"
http = "127.0.0.1:9464"
shard = "0/1"

[defaults]
ca_file = "certs/ca.pem"
client_cert_file = "certs/mirror.pem"
client_key_file = "certs/mirror.key"
strategy = "backoff"
strategy_options = {}
handshake_timeout = 5.0
keepalive_interval = 1.0
idle_timeout = 5.0
on_divergence = "escalate"

[[source]]
cluster = "us-east"
address = "10.0.0.5:4433"
databases = ["orders", "users"]
server_name = "us-east"

[[source]]
cluster = "eu-west"
address = "[::1]:4434"
databases = ["orders"]
idle_timeout = 9.0
on_divergence = "resync"
"""


def test_the_issue_example_parses_with_paths_relative_to_the_file() -> None:
    config = parse(tomllib.loads(ISSUE_EXAMPLE))
    assert config.name == "eu-mirror" and config.http == ("127.0.0.1", 9464)
    assert config.shard == Shard(0, 1) and config.data_dir == BASE / "var/mirror"
    assert [link.name for link in config.links] == [
        "us-east/orders",
        "us-east/users",
        "eu-west/orders",
    ]
    orders, _, west = config.links
    assert (orders.host, orders.port, orders.server_name) == ("10.0.0.5", 4433, "us-east")
    assert orders.ca_file == str(BASE / "certs/ca.pem")
    assert orders.client_key_file == str(BASE / "certs/mirror.key")
    assert orders.replica_file == str(BASE / "var/mirror/us-east/orders.db")
    assert (orders.idle_timeout, orders.on_divergence) == (5.0, "escalate")
    assert (west.host, west.port, west.idle_timeout, west.on_divergence) == (
        "::1",
        4434,
        9.0,
        "resync",
    )
    assert west.address == "[::1]:4434" and west.origins["idle_timeout"] == "source[1]"
    assert west.origins["ca_file"] == "defaults"
    config_of_link = west.link_config()
    assert config_of_link.host == "::1" and config_of_link.tls_server_name == "eu-west"


def test_defaults_apply_when_nothing_is_set() -> None:
    (link,) = parse(minimal()).links
    assert link.handshake_timeout == DEFAULT_HANDSHAKE_TIMEOUT
    assert link.idle_timeout == DEFAULT_IDLE_TIMEOUT
    assert (link.strategy, link.strategy_options, link.max_snapshot_bytes) == ("backoff", {}, None)
    assert link.client_cert_file is None and link.server_name is None
    config = parse(minimal())
    assert config.http is None and config.shard == Shard(0, 1)


def test_absolute_paths_stay_and_home_expands() -> None:
    data = minimal(data_dir="/srv/replicas")
    data["defaults"]["ca_file"] = "~/ca.pem"
    (link,) = parse(data).links
    assert link.replica_file == "/srv/replicas/us-east/orders.db"
    assert link.ca_file == str(Path("~/ca.pem").expanduser())


# --- errors: the file, the key, what was expected -------------------------------------------


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (lambda d: d.pop("mirror"), "mirror", "missing"),
        (lambda d: d["mirror"].pop("name"), "mirror.name", "missing"),
        (lambda d: d["mirror"].pop("data_dir"), "mirror.data_dir", "missing"),
        (lambda d: d["mirror"].update(name="a/b"), "mirror.name", "'/'"),
        (lambda d: d["mirror"].update(name=3), "mirror.name", "got 3"),
        (lambda d: d["mirror"].update(colour="blue"), "mirror.colour", "unknown key"),
        (lambda d: d["mirror"].update(http="localhost"), "mirror.http", "host:port"),
        (lambda d: d["mirror"].update(http="[::1]"), "mirror.http", "host:port"),
        (lambda d: d["mirror"].update(http="::1:9464"), "mirror.http", "in brackets"),
        (lambda d: d["mirror"].update(http="h:70000"), "mirror.http", "0..65535"),
        (lambda d: d["mirror"].update(shard="2/2"), "mirror.shard", "0 <= i < n"),
        (lambda d: d["mirror"].update(shard="1"), "mirror.shard", "i/n"),
        (lambda d: d["mirror"].update(shard="0/0"), "mirror.shard", "0 <= i < n"),
        (lambda d: d.update(extra={}), "extra", "unknown key"),
        (lambda d: d["defaults"].update(idle_timeout=0), "defaults.idle_timeout", "> 0"),
        (lambda d: d["defaults"].update(idle_timeout=True), "defaults.idle_timeout", "boolean"),
        (lambda d: d["defaults"].update(idle_timeout=float("nan")), "defaults.idle_timeout", "> 0"),
        (lambda d: d["defaults"].update(keepalive_interval=6.0), "defaults.keepalive_interval", "shorter than idle_timeout"),
        (lambda d: d["defaults"].update(on_divergence="ignore"), "defaults.on_divergence", "escalate, resync"),
        (lambda d: d["defaults"].update(max_snapshot_bytes=0), "defaults.max_snapshot_bytes", "positive"),
        (lambda d: d["defaults"].update(strategy="fastest"), "defaults.strategy", "module:attribute"),
        (lambda d: d["defaults"].update(strategy_options={"bogus": 1}), "defaults.strategy_options", "bogus"),
        (lambda d: d["defaults"].update(client_cert_file="c.pem"), "defaults.client_cert_file", "go together"),
        (lambda d: d["defaults"].update(server_name="x"), "defaults.server_name", "unknown key"),
        (lambda d: d["defaults"].pop("ca_file"), "source[0].ca_file", "here or in [defaults]"),
        (lambda d: d.update(source=[]), "source", "at least one"),
        (lambda d: d["source"][0].pop("address"), "source[0].address", "missing"),
        (lambda d: d["source"][0].update(address="10.0.0.5"), "source[0].address", "host:port"),
        (lambda d: d["source"][0].update(address="h:0"), "source[0].address", "1..65535"),
        (lambda d: d["source"][0].update(databases=[]), "source[0].databases", "non-empty"),
        (lambda d: d["source"][0].update(databases="orders"), "source[0].databases", "list"),
        (lambda d: d["source"][0].update(databases=["a", "a"]), "source[0].databases", "repeated: a"),
        (lambda d: d["source"][0].update(databases=["../x"]), "source[0].databases", "path separator"),
        (lambda d: d["source"][0].update(databases=[".."]), "source[0].databases", "relative folder"),
        (lambda d: d["source"][0].update(databases=["a b"]), "source[0].databases", "whitespace"),
        (lambda d: d["source"][0].update(cluster="us_east"), "source[0].cluster", "DNS name"),
        (lambda d: d["source"][0].update(cluster="a/b", server_name="a"), "source[0].cluster", "'/'"),
        (lambda d: d["source"][0].update(server_name="not a name"), "source[0].server_name", "invalid server name"),
        (lambda d: d["source"][0].update(idle_timeout=-1), "source[0].idle_timeout", "> 0"),
        (lambda d: d["source"][0].update(keepalive_interval=5), "source[0].keepalive_interval", "shorter than idle_timeout"),
        (lambda d: d["source"][0].update(rate=5), "source[0].rate", "unknown key"),
        (lambda d: d["source"].append(dict(d["source"][0])), "source[1].databases", "already followed by source[0]"),
    ],
)  # fmt: skip
def test_a_mistake_names_the_file_the_key_and_what_was_expected(
    change: Any, key: str, words: str
) -> None:
    data = minimal()
    change(data)
    error = error_of(data)
    assert (error.file, error.key) == (FILE, key), str(error)
    assert words in error.problem, str(error)
    assert str(error).startswith(f"{FILE}: {key}: ")


def test_an_override_problem_is_blamed_on_the_table_that_set_it() -> None:
    data = minimal()
    data["defaults"]["keepalive_interval"] = 2.0
    data["source"][0]["idle_timeout"] = 2.0
    assert error_of(data).key == "source[0].idle_timeout"
    data = minimal()
    data["defaults"]["strategy"] = "full-jitter"
    data["source"][0]["strategy_options"] = {"nope": 1}
    assert error_of(data).key == "source[0].strategy_options"


def test_a_cluster_that_is_no_dns_name_is_fine_with_a_server_name() -> None:
    data = minimal()
    data["source"][0].update(cluster="us_east", server_name="us-east")
    (link,) = parse(data).links
    assert link.name == "us_east/orders" and link.link_config().tls_server_name == "us-east"


def test_a_file_that_cannot_be_read_or_parsed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: \(file\): no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[mirror\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: \(syntax\): "):
        load_config(bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"\(file\)|\(syntax\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match="a directory"):
        load_config(tmp_path)


def test_check_config_loads_what_the_file_names(tmp_path: Path, pki: DevPki) -> None:
    def config(**defaults: Any) -> Any:
        data = minimal()
        data["defaults"] = {"ca_file": str(pki.ca.cert), **defaults}
        return parse_config(data, FILE, tmp_path)

    check_config(config())
    check_config(config(client_cert_file=str(pki.mirror.cert), client_key_file=str(pki.mirror.key)))
    cases = [
        ({"ca_file": str(tmp_path / "none.pem")}, "defaults.ca_file", "no such file"),
        ({"ca_file": str(pki.ca.key)}, "defaults.ca_file", "not a PEM certificate"),
        ({"client_cert_file": str(pki.mirror.cert), "client_key_file": str(pki.ca.key)},
         "defaults.client_key_file", "not the private key"),
        ({"client_cert_file": str(pki.mirror.key), "client_key_file": str(pki.mirror.key)},
         "defaults.client_cert_file", "not a PEM certificate"),
        ({"strategy": "no_such_module_here:Strategy"}, "defaults.strategy", "no_such_module_here"),
    ]  # fmt: skip
    for defaults, key, words in cases:
        with pytest.raises(ConfigError) as raised:
            check_config(config(**defaults))
        assert raised.value.key == key and words in raised.value.problem, str(raised.value)


def test_a_module_strategy_next_to_the_file_is_imported_by_check_config(
    tmp_path: Path, pki: DevPki
) -> None:
    (tmp_path / "my_breaker_for_serve.py").write_text(
        "from supervisors import Restart\ndef decide(failure):\n    return Restart(0.1)\n"
    )
    data = minimal()
    data["defaults"] = {"ca_file": str(pki.ca.cert), "strategy": "my_breaker_for_serve:decide"}
    config = parse_config(data, FILE, tmp_path)
    check_config(config)
    assert config.links[0].build_strategy(tmp_path) is not None


def test_http_address_of_reads_only_the_http_key(tmp_path: Path) -> None:
    path = tmp_path / "mirror.toml"
    path.write_text('[mirror]\nhttp = "[::1]:9500"\n')
    assert http_address_of(path) == ("::1", 9500)
    path.write_text("[mirror]\nname = 'x'\n")
    assert http_address_of(path) is None
    path.write_text('[mirror]\nhttp = "nope"\n')
    with pytest.raises(ConfigError, match=r"mirror\.http"):
        http_address_of(path)


# --- property tests: any valid file parses to exactly its links ------------------------------

label = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True)
database_id = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True).filter(
    lambda d: d not in (".", "..")
)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.lists(label, min_size=1, max_size=3).map(".".join),
)
ports = st.integers(1, 65535)
seconds = st.floats(0.01, 1000.0, allow_nan=False, allow_infinity=False)


@st.composite
def configs(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[str, str, str, int]]]:
    clusters = draw(st.lists(label, min_size=1, max_size=4, unique=True))
    sources = []
    expected = []
    for cluster in clusters:
        databases = draw(st.lists(database_id, min_size=1, max_size=3, unique=True))
        host, port = draw(hosts), draw(ports)
        source: dict[str, Any] = {
            "cluster": cluster,
            "address": format_address(host, port),
            "databases": databases,
        }
        if draw(st.booleans()):
            keepalive = draw(seconds)
            source["keepalive_interval"] = keepalive
            source["idle_timeout"] = keepalive * 2
        sources.append(source)
        expected += [(cluster, database, host, port) for database in databases]
    data = {
        "mirror": {"name": draw(label), "data_dir": draw(label)},
        "defaults": {"ca_file": "ca.pem", "handshake_timeout": draw(seconds)},
        "source": sources,
    }
    return data, expected


@given(configs())
def test_any_valid_file_yields_exactly_its_links(
    case: tuple[dict[str, Any], list[tuple[str, str, str, int]]],
) -> None:
    data, expected = case
    config = parse(data)
    assert [(k.cluster, k.database, k.host, k.port) for k in config.links] == expected
    for link, source in zip(config.links, _source_of_each_link(data), strict=True):
        assert link.handshake_timeout == data["defaults"]["handshake_timeout"]
        assert link.idle_timeout == source.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)
        assert link.replica_file == str(
            BASE / data["mirror"]["data_dir"] / link.cluster / f"{link.database}.db"
        )
    assert parse(data) == config  # pure: the same file, the same config


def _source_of_each_link(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [source for source in data["source"] for _ in source["databases"]]


tables = st.sampled_from(["mirror", "defaults", "source"])


@given(configs(), tables, st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))
def test_an_unknown_key_anywhere_is_named(
    case: tuple[dict[str, Any], Any], table: str, key: str
) -> None:
    data, _ = case
    allowed = {"mirror": ("name", "data_dir", "http", "shard"), "defaults": LINK_KEYS,
               "source": ("cluster", "address", "databases", "server_name", *LINK_KEYS)}[table]  # fmt: skip
    assume(key not in allowed)
    target = data["source"][0] if table == "source" else data[table]
    target[key] = 1
    error = error_of(data)
    where = "source[0]" if table == "source" else table
    assert error.key == f"{where}.{key}" and "unknown key" in error.problem


wrong_values: st.SearchStrategy[object] = st.one_of(st.booleans(), st.just([]), st.just({}), st.just(-5), st.just("x y"))


@given(configs(), st.sampled_from((*LINK_KEYS, "address", "databases", "cluster")), wrong_values)
def test_a_wrong_value_for_any_source_key_is_named(
    case: tuple[dict[str, Any], Any], key: str, value: Any
) -> None:
    data, _ = case
    assume(not (key == "strategy_options" and isinstance(value, dict)))  # {}: no options
    assume(not (key.endswith("_file") and isinstance(value, str)))  # "x y" is a file name
    data["source"][0][key] = value
    error = error_of(data)
    assert error.key.startswith("source[0]."), str(error)
    assert error.key in (f"source[0].{key}", "source[0].idle_timeout", "source[0].keepalive_interval",
                         "source[0].client_cert_file", "source[0].client_key_file"), str(error)  # fmt: skip


# --- the shard hash ------------------------------------------------------------------------


def test_the_shard_hash_is_sha256_of_the_name_and_never_changes() -> None:
    digest = hashlib.sha256(b"us-east/orders").digest()
    assert shard_of("us-east/orders", 1000) == int.from_bytes(digest[:8], "big") % 1000
    # Pinned: a change here would move links between the machines of a fleet.
    assert [
        shard_of(name, 7) for name in ("us-east/orders", "us-east/users", "eu-west/events")
    ] == [
        int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") % 7
        for n in ("us-east/orders", "us-east/users", "eu-west/events")
    ]
    assert shard_of("us-east/orders", 2) == 0 and shard_of("eu-west/events", 2) == 1


@given(st.text(min_size=1, max_size=40), st.integers(1, 64))
def test_every_link_belongs_to_exactly_one_shard(name: str, count: int) -> None:
    owners = [index for index in range(count) if Shard(index, count).owns(name)]
    assert owners == [shard_of(name, count)]


def test_shards_split_links_evenly() -> None:
    names = [f"cluster-{i % 37}/db-{i}" for i in range(4000)]
    counts = [sum(1 for n in names if Shard(i, 4).owns(n)) for i in range(4)]
    assert sum(counts) == 4000 and all(850 <= c <= 1150 for c in counts), counts


@pytest.mark.parametrize("text", ["0/1", "0/2", "1/2", "41/42"])
def test_parse_shard(text: str) -> None:
    shard = parse_shard(text)
    assert str(shard) == text


@pytest.mark.parametrize("text", ["", "1", "1/1", "-1/2", "a/b", "1/0", " 0/1", "0/1/2", "3/2"])
def test_parse_shard_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="i/n"):
        parse_shard(text)


def test_shard_of_rejects_no_shards() -> None:
    with pytest.raises(ValueError):
        shard_of("x", 0)


# --- addresses -----------------------------------------------------------------------------


@given(hosts, st.integers(0, 65535))
def test_addresses_round_trip(host: str, port: int) -> None:
    assert parse_address(format_address(host, port), allow_port_zero=True) == (host, port)


@pytest.mark.parametrize(
    "text",
    ["", "host", "host:", ":80", "host:http", "host:-1", "host:65536", "[::1]", "[::1]80",
     "[nope]:80", "::1:80", "a b:80", "host:0", "host:+80", "host:٣"],
)  # fmt: skip
def test_bad_addresses_say_what_was_expected(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_address(text)


def test_port_zero_only_where_allowed() -> None:
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        parse_address("127.0.0.1:0")


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("serve*.toml")))
def test_the_example_serve_files_parse(name: str) -> None:
    config = load_config(EXAMPLES / name)
    assert config.links and all(link.ca_file.endswith(".pem") for link in config.links)
    if name == "serve.toml":
        assert config.data_dir == EXAMPLES.resolve().parent / "var" / "mirror"
        assert [link.name for link in config.links] == [
            "us-east/orders", "us-east/users", "eu-west/events",
        ]  # fmt: skip
