"""Topology files: every example parses, and every mistake is a TopologyError saying where.

Each error test writes a small TOML file under ``tmp_path`` and checks that the
message names the file, the key path and what was expected.  Parsing imports
nothing of the user's; ``topology.strategies`` does, and leaves ``sys.path`` as
it found it.
"""

from __future__ import annotations

import re
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror_actors.link import link_strategy
from mirror_actors.topology import Topology, TopologyError, load_topology, parse_topology, spec
from mirror_actors.topology.spec import (
    BUILTIN_STRATEGIES,
    FAULT_ACTIONS,
    ON_DIVERGENCE,
    StrategyReference,
    identifier_problem,
)
from mirror_actors.topology.strategies import (
    StrategyError,
    import_strategy_module,
    resolve_strategies,
    resolve_strategy,
)
from supervisors import (
    Escalate,
    ExponentialBackoff,
    Failure,
    JitterKind,
    Restart,
    SupervisorStrategy,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_FILES = sorted(p for p in EXAMPLES.glob("*.toml") if not p.name.startswith("serve"))

SOURCE = """
[[source]]
cluster = "us-east"
databases = ["orders", "users"]
"""
MIRROR = """
[[mirror]]
name = "m"
links = [{ source = "us-east", database = "orders" }]
"""
BASE = SOURCE + MIRROR


@pytest.fixture(autouse=True)
def clean_imports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Forget the strategy modules a test imported (and restore sys.path, should one leak)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        origin = getattr(sys.modules[name], "__file__", None) or ""
        if origin.startswith((str(tmp_path), str(EXAMPLES))):
            del sys.modules[name]


def write(tmp_path: Path, text: str, name: str = "topology.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, resolve: bool = False) -> TopologyError:
    with pytest.raises(TopologyError) as raised:
        topology = load_topology(path)
        if resolve:
            resolve_strategies(topology)
    return raised.value


def assert_error(path: Path, key: str, *words: str, resolve: bool = False) -> TopologyError:
    """The one-line TopologyError of loading ``path`` (and, with ``resolve``, its strategies)."""
    error = error_of(path, resolve)
    if resolve:
        load_topology(path)  # the file itself parses: only resolving fails
    message = str(error)
    assert message.startswith(f"{path}: {key}: "), message
    assert error.file == str(path) and error.key == key
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return error


def with_mirror(**lines: str) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in lines.items())
    return SOURCE + MIRROR + extra


# --- the examples -----------------------------------------------------------------------


def test_there_are_examples() -> None:
    assert len(EXAMPLE_FILES) >= 7


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_parses_and_its_strategies_resolve(path: Path) -> None:
    topology = load_topology(path)
    assert isinstance(topology, Topology)
    strategies = resolve_strategies(topology)
    assert topology.file == str(path)
    assert topology.base_dir == EXAMPLES
    assert topology.description and topology.duration > 0
    assert topology.sources and topology.mirrors
    names = topology.link_names()
    assert len(names) == len(set(names))
    assert topology.expected_escalations <= set(names)
    assert [f.at for f in topology.faults] == sorted(f.at for f in topology.faults)
    assert list(strategies) == [m.name for m in topology.mirrors]
    for mirror in topology.mirrors:
        for link in mirror.links:
            assert link.database in topology.source(link.source).databases
        assert isinstance(strategies[mirror.name], SupervisorStrategy)


def test_example_details() -> None:
    fan_in = load_topology(EXAMPLES / "fan_in.toml")
    assert [s.cluster for s in fan_in.sources] == ["us-east", "eu-west", "ap-south"]
    assert fan_in.source("ap-south").compact_every == 40
    assert dict(fan_in.link_defaults) == {
        "handshake_timeout": 1.0,
        "idle_timeout": 3.0,
        "keepalive_interval": 0.5,
    }
    (mirror,) = fan_in.mirrors
    assert mirror.store == "sqlite" and len(mirror.links) == 4
    assert [f.action for f in fan_in.faults] == ["restart_source", "cut_link"]
    assert fan_in.faults[1].link == "mirror/us-east/users"

    wrong = load_topology(EXAMPLES / "wrong_cluster_id.toml")
    misconfigured = wrong.mirrors[0].links[2]
    assert misconfigured.source == "us-east" and misconfigured.cluster_id == "eu-west"
    assert dict(misconfigured.options) == {"server_name": "us-east"}
    assert wrong.expected_escalations == {"mirror/eu-west/orders"}

    custom = load_topology(EXAMPLES / "custom_strategy.toml")
    assert custom.mirrors[0].strategy_reference == StrategyReference(
        "custom_strategy:CircuitBreaker", "custom_strategy", "CircuitBreaker"
    )
    breaker = resolve_strategies(custom)["breaker"]
    assert type(breaker).__name__ == "CircuitBreaker"
    assert (breaker.max_failures, breaker.window, breaker.delay) == (3, 10.0, 0.25)  # type: ignore[attr-defined]

    late = load_topology(EXAMPLES / "late_joiner.toml")
    assert late.sources[0].preload == 2000 and late.faults == ()


def test_a_minimal_file_gets_the_defaults(tmp_path: Path) -> None:
    topology = load_topology(write(tmp_path, BASE))
    assert topology.duration == 20.0 and topology.tree == "flat" and topology.description == ""
    (source,) = topology.sources
    assert source.databases == ("orders", "users")
    assert (source.rate, source.compact_every, source.preload) == (0.0, None, 0)
    (mirror,) = topology.mirrors
    assert (mirror.strategy, dict(mirror.strategy_options), mirror.store) == (
        "backoff",
        {},
        "memory",
    )
    assert mirror.links[0].cluster_id == "us-east" and dict(mirror.links[0].options) == {}
    assert topology.faults == () and topology.expected_escalations == frozenset()
    assert topology.base_dir == tmp_path.resolve()


def test_parse_topology_takes_a_mapping(tmp_path: Path) -> None:
    data = {
        "source": [{"cluster": "c", "databases": ["d"]}],
        "mirror": [{"name": "m", "links": [{"source": "c", "database": "d"}]}],
    }
    topology = parse_topology(data, "inline.toml", tmp_path)
    assert topology.link_names() == ["m/c/d"]
    data["mirror"][0]["links"][0]["database"] = "x"  # type: ignore[index]
    with pytest.raises(TopologyError, match=r"^inline.toml: mirror\[0\].links\[0\].database: "):
        parse_topology(data, "inline.toml", tmp_path)


# --- error paths ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    assert_error(path, "(file)", "no such file")


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "\n[[source]\ncluster = 1\n")
    assert_error(path, "(syntax)", "line")


@pytest.mark.parametrize("what", ["not-utf8", "a-folder"])
def test_unreadable_file_is_a_topology_error(tmp_path: Path, what: str) -> None:
    if what == "not-utf8":
        path = tmp_path / "latin1.toml"
        path.write_bytes("# caf\u00e9\n".encode("latin-1") + BASE.encode())
    else:
        path = tmp_path / "folder.toml"
        path.mkdir()
    error_of(path)


UNKNOWN_KEYS = [
    ("bogus = 1\n" + BASE, "(top).bogus", "run, source, mirror"),
    ("[run]\ndurations = 3\n" + BASE, "run.durations", "duration"),
    (
        SOURCE.replace('cluster = "us-east"', 'cluster = "us-east"\ncolour = "red"') + MIRROR,
        "source[0].colour",
        "cluster, databases",
    ),
    (with_mirror(colour='"red"'), "mirror[0].colour", "name, links"),
    (
        BASE.replace('database = "orders" }', 'database = "orders", port = 1 }'),
        "mirror[0].links[0].port",
        "source, database, cluster_id",
    ),
    (BASE + "[[fault]]\nat = 1\nwhen = 2\n", "fault[0].when", "at, action"),
    (BASE + "[expect]\nescalation = []\n", "expect.escalation", "escalations"),
    ("[link_defaults]\ntimeout = 1\n" + BASE, "link_defaults.timeout", "handshake_timeout"),
]


@pytest.mark.parametrize(
    ("text", "key", "expected"), UNKNOWN_KEYS, ids=[c[1] for c in UNKNOWN_KEYS]
)
def test_unknown_key(tmp_path: Path, text: str, key: str, expected: str) -> None:
    assert_error(write(tmp_path, text), key, "unknown key", expected)


WRONG_TYPES = [
    ('[run]\nduration = "20"\n' + BASE, "run.duration", "expected a number, got '20'"),
    ("[run]\nduration = true\n" + BASE, "run.duration", "expected a number, got a boolean"),
    ("[run]\ndescription = 5\n" + BASE, "run.description", "expected a string, got 5"),
    (
        SOURCE.replace('"users"]', '"users"]\nrate = "fast"') + MIRROR,
        "source[0].rate",
        "expected a number, got 'fast'",
    ),
    (
        SOURCE.replace('"users"]', '"users"]\nrate = false') + MIRROR,
        "source[0].rate",
        "got a boolean",
    ),
    (
        SOURCE.replace('"users"]', '"users"]\npreload = true') + MIRROR,
        "source[0].preload",
        "expected an integer, got a boolean",
    ),
    (
        SOURCE.replace('"users"]', '"users"]\ncompact_every = 1.5') + MIRROR,
        "source[0].compact_every",
        "expected an integer, got 1.5",
    ),
    (
        SOURCE.replace('"users"]', '"users"]\npreload = "10"') + MIRROR,
        "source[0].preload",
        "expected an integer",
    ),
    (
        SOURCE.replace('cluster = "us-east"', "cluster = 7") + MIRROR,
        "source[0].cluster",
        "expected a string, got 7",
    ),
    (
        SOURCE.replace('["orders", "users"]', '"orders"') + MIRROR,
        "source[0].databases",
        "expected a list of strings",
    ),
    (
        SOURCE.replace('["orders", "users"]', '["orders", 5]') + MIRROR,
        "source[0].databases",
        "non-empty list of strings",
    ),
    (
        SOURCE.replace('["orders", "users"]', '["orders", ""]') + MIRROR,
        "source[0].databases",
        "non-empty list of strings",
    ),
    (BASE.replace('name = "m"', "name = 1"), "mirror[0].name", "expected a string"),
    (with_mirror(strategy="3"), "mirror[0].strategy", "expected a string, got 3"),
    (with_mirror(strategy_options="5"), "mirror[0].strategy_options", "expected a table"),
    (with_mirror(store="true"), "mirror[0].store", "got a boolean"),
    (
        BASE.replace('links = [{ source = "us-east", database = "orders" }]', 'links = "orders"'),
        "mirror[0].links",
        "expected a list of {source, database} tables",
    ),
    (
        BASE.replace('[{ source = "us-east", database = "orders" }]', '["us-east"]'),
        "mirror[0].links[0]",
        "expected a table, got 'us-east'",
    ),
    (
        BASE.replace('database = "orders" }', 'database = "orders", idle_timeout = "2" }'),
        "mirror[0].links[0].idle_timeout",
        "expected a number",
    ),
    (
        BASE.replace('database = "orders" }', 'database = "orders", cluster_id = 1 }'),
        "mirror[0].links[0].cluster_id",
        "expected a string",
    ),
    (BASE + '[[fault]]\nat = "1"\n', "fault[0].at", "expected a number, got '1'"),
    (BASE + "[[fault]]\nat = true\n", "fault[0].at", "got a boolean"),
    (
        BASE
        + '[[fault]]\nat = 1\naction = "restart_source"\nsource = "us-east"\nduration = true\n',
        "fault[0].duration",
        "got a boolean",
    ),
    (BASE + '[expect]\nescalations = "m/us-east/orders"\n', "expect.escalations", "a list"),
    ("[link_defaults]\nidle_timeout = true\n" + BASE, "link_defaults.idle_timeout", "boolean"),
    ("run = 5\n" + BASE, "(top).run", "expected a table"),
    ("source = 5\n" + MIRROR, "(top).source", "expected an array of tables"),
    ('[source]\ncluster = "x"\n' + MIRROR, "(top).source", "expected an array of tables"),
]


@pytest.mark.parametrize(
    ("text", "key", "expected"), WRONG_TYPES, ids=[f"{i}-{c[1]}" for i, c in enumerate(WRONG_TYPES)]
)
def test_wrong_type(tmp_path: Path, text: str, key: str, expected: str) -> None:
    assert_error(write(tmp_path, text), key, expected)


OUT_OF_RANGE = [
    ("[run]\nduration = 0\n" + BASE, "run.duration", "expected a number >= 0.1, got 0"),
    ("[run]\nduration = -5\n" + BASE, "run.duration", ">= 0.1"),
    (
        SOURCE.replace('"users"]', '"users"]\nrate = -1') + MIRROR,
        "source[0].rate",
        "expected a number >= 0, got -1",
    ),
    (
        SOURCE.replace('"users"]', '"users"]\npreload = -1') + MIRROR,
        "source[0].preload",
        "expected an integer >= 0, got -1",
    ),
    (
        SOURCE.replace('"users"]', '"users"]\ncompact_every = 0') + MIRROR,
        "source[0].compact_every",
        "expected a positive integer, got 0",
    ),
    (
        SOURCE.replace('"users"]', '"users"]\ncompact_every = -3') + MIRROR,
        "source[0].compact_every",
        "positive integer",
    ),
    (BASE + "[[fault]]\nat = -1\n", "fault[0].at", ">= 0"),
    (BASE + "[[fault]]\nat = 1\nduration = -2.5\n", "fault[0].duration", ">= 0, got -2.5"),
    ("[link_defaults]\nidle_timeout = -1\n" + BASE, "link_defaults.idle_timeout", "> 0, got -1"),
    ("[link_defaults]\nidle_timeout = 0\n" + BASE, "link_defaults.idle_timeout", "> 0, got 0"),
    (
        BASE.replace('database = "orders" }', 'database = "orders", handshake_timeout = -0.5 }'),
        "mirror[0].links[0].handshake_timeout",
        "> 0, got -0.5",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    OUT_OF_RANGE,
    ids=[f"{i}-{c[1]}" for i, c in enumerate(OUT_OF_RANGE)],
)
def test_negative_or_too_small_number(tmp_path: Path, text: str, key: str, expected: str) -> None:
    assert_error(write(tmp_path, text), key, expected)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[run]\nduration = nan\n" + BASE, "run.duration"),
        (SOURCE.replace('"users"]', '"users"]\nrate = nan') + MIRROR, "source[0].rate"),
        ("[link_defaults]\nidle_timeout = nan\n" + BASE, "link_defaults.idle_timeout"),
    ],
)
def test_nan_is_not_a_number_here(tmp_path: Path, text: str, key: str) -> None:
    assert_error(write(tmp_path, text), key)


def test_empty_databases_list(tmp_path: Path) -> None:
    text = SOURCE.replace('["orders", "users"]', "[]") + MIRROR
    assert_error(write(tmp_path, text), "source[0].databases", "non-empty list", "got []")


def test_missing_required_keys(tmp_path: Path) -> None:
    assert_error(write(tmp_path, MIRROR), "source", "at least one [[source]]")
    assert_error(write(tmp_path, SOURCE), "mirror", "at least one [[mirror]]")
    no_cluster = SOURCE.replace('cluster = "us-east"\n', "") + MIRROR
    assert_error(write(tmp_path, no_cluster), "source[0].cluster", "missing; expected a string")
    no_dbs = SOURCE.replace('databases = ["orders", "users"]\n', "") + MIRROR
    assert_error(write(tmp_path, no_dbs), "source[0].databases", "missing", "list of strings")
    no_name = BASE.replace('name = "m"\n', "")
    assert_error(write(tmp_path, no_name), "mirror[0].name", "missing; expected a string")
    no_links = BASE.replace('links = [{ source = "us-east", database = "orders" }]\n', "")
    assert_error(write(tmp_path, no_links), "mirror[0].links", "missing")
    empty_links = BASE.replace('[{ source = "us-east", database = "orders" }]', "[]")
    assert_error(write(tmp_path, empty_links), "mirror[0].links", "at least one link")
    no_db = BASE.replace(', database = "orders"', "")
    assert_error(write(tmp_path, no_db), "mirror[0].links[0].database", "missing")
    no_at = BASE + '[[fault]]\naction = "watch"\n'
    assert_error(write(tmp_path, no_at), "fault[0].at", "missing; expected a number")


def test_duplicate_cluster_ids(tmp_path: Path) -> None:
    text = SOURCE + SOURCE.replace('["orders", "users"]', '["ledger"]') + MIRROR
    assert_error(write(tmp_path, text), "source", "cluster ids must be unique", "us-east")


def test_duplicate_mirror_names(tmp_path: Path) -> None:
    assert_error(write(tmp_path, SOURCE + MIRROR + MIRROR), "mirror", "names must be unique", "'m'")


def test_duplicate_link_in_one_mirror(tmp_path: Path) -> None:
    text = BASE.replace(
        '[{ source = "us-east", database = "orders" }]',
        '[{ source = "us-east", database = "orders" }, { source = "us-east", database = "orders" }]',
    )
    assert_error(write(tmp_path, text), "mirror[0].links[1]", "m/us-east/orders")


def test_link_to_an_undeclared_source(tmp_path: Path) -> None:
    text = BASE.replace('source = "us-east", database', 'source = "nowhere", database')
    assert_error(
        write(tmp_path, text),
        "mirror[0].links[0].source",
        "no [[source]] with cluster 'nowhere'",
        "declared: ['us-east']",
    )


def test_link_to_a_database_the_source_does_not_hold(tmp_path: Path) -> None:
    text = BASE.replace(
        '[{ source = "us-east", database = "orders" }]',
        '[{ source = "us-east", database = "orders" }, { source = "us-east", database = "ledger" }]',
    )
    assert_error(
        write(tmp_path, text),
        "mirror[0].links[1].database",
        "source 'us-east' holds ['orders', 'users'], not 'ledger'",
    )


def test_errors_in_a_later_mirror_name_its_index(tmp_path: Path) -> None:
    second = MIRROR.replace('name = "m"', 'name = "n"').replace('"orders" }', '"nope" }')
    assert_error(write(tmp_path, BASE + second), "mirror[1].links[0].database", "'nope'")


def test_unknown_store_and_tree(tmp_path: Path) -> None:
    assert_error(
        write(tmp_path, with_mirror(store='"postgres"')),
        "mirror[0].store",
        "expected one of memory, sqlite, got 'postgres'",
    )
    assert_error(
        write(tmp_path, '[run]\ntree = "deep"\n' + BASE),
        "run.tree",
        "expected one of flat, per-mirror, got 'deep'",
    )


def fault(**lines: str) -> str:
    return BASE + "[[fault]]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())


def test_fault_action_unknown(tmp_path: Path) -> None:
    assert_error(
        write(tmp_path, fault(at="1", action='"explode"')),
        "fault[0].action",
        f"expected one of {', '.join(FAULT_ACTIONS)}, got 'explode'",
    )


@pytest.mark.parametrize(
    "action", ["stop_source", "start_source", "restart_source", "partition_source"]
)
def test_fault_needing_a_source(tmp_path: Path, action: str) -> None:
    missing = fault(at="1", action=f'"{action}"', duration="1")
    assert_error(write(tmp_path, missing), "fault[0].source", f"{action} needs a source", "None")
    unknown = fault(at="1", action=f'"{action}"', source='"eu-west"', duration="1")
    assert_error(write(tmp_path, unknown), "fault[0].source", "['us-east']", "'eu-west'")


def test_fault_needing_a_link(tmp_path: Path) -> None:
    missing = fault(at="1", action='"cut_link"', duration="1")
    assert_error(
        write(tmp_path, missing), "fault[0].link", "cut_link needs a link", "m/us-east/orders"
    )
    unknown = fault(at="1", action='"cut_link"', link='"m/us-east/users"', duration="1")
    assert_error(write(tmp_path, unknown), "fault[0].link", "got 'm/us-east/users'")


@pytest.mark.parametrize(
    ("action", "target"),
    [
        ("restart_source", 'source = "us-east"'),
        ("partition_source", 'source = "us-east"'),
        ("cut_link", 'link = "m/us-east/orders"'),
    ],
)
def test_fault_needing_a_duration(tmp_path: Path, action: str, target: str) -> None:
    text = BASE + f'[[fault]]\nat = 1\naction = "{action}"\n{target}\n'
    assert_error(write(tmp_path, text), "fault[0].duration", f"{action} needs a duration > 0")
    assert_error(write(tmp_path, text + "duration = 0\n"), "fault[0].duration", "> 0")
    assert load_topology(write(tmp_path, text + "duration = 0.5\n")).faults[0].duration == 0.5


def test_faults_are_sorted_by_time(tmp_path: Path) -> None:
    text = (
        BASE
        + '[[fault]]\nat = 5\naction = "watch"\nnote = "later"\n'
        + '[[fault]]\nat = 1\naction = "stop_source"\nsource = "us-east"\n'
    )
    topology = load_topology(write(tmp_path, text))
    assert [(f.at, f.action) for f in topology.faults] == [(1.0, "stop_source"), (5.0, "watch")]
    assert topology.faults[1].note == "later"


def test_expect_escalations_naming_a_non_link(tmp_path: Path) -> None:
    text = BASE + '[expect]\nescalations = ["m/us-east/users"]\n'
    assert_error(
        write(tmp_path, text),
        "expect.escalations",
        "'m/us-east/users' is not a link",
        "['m/us-east/orders']",
    )
    ok = BASE + '[expect]\nescalations = ["m/us-east/orders"]\n'
    assert load_topology(write(tmp_path, ok)).expected_escalations == {"m/us-east/orders"}


@pytest.mark.parametrize("item", ["{}", "[1]"])
def test_expect_escalations_with_a_non_string_item(tmp_path: Path, item: str) -> None:
    text = BASE + f"[expect]\nescalations = [{item}]\n"
    assert_error(write(tmp_path, text), "expect.escalations")


CUSTOM_MODULE = EXAMPLES / "custom_strategy.py"


@pytest.mark.parametrize(
    ("strategy", "words"),
    [
        ('"nope"', ["cannot build strategy 'nope'", "backoff", "module:attribute"]),
        ('":X"', ["':X'", "module:attribute", "the module '' is not one"]),
        ('"custom_strategy:"', ["module:attribute", "the attribute '' is not one"]),
        ('"my-strategies:X"', ["dotted Python names", "'my-strategies'"]),
        ('"custom_strategy:Circuit Breaker"', ["'Circuit Breaker' is not one"]),
    ],
)
def test_a_strategy_of_the_wrong_form_is_a_parse_error(
    tmp_path: Path, strategy: str, words: list[str]
) -> None:
    assert_error(write(tmp_path, with_mirror(strategy=strategy)), "mirror[0].strategy", *words)


@pytest.mark.parametrize(
    ("strategy", "words"),
    [
        (
            '"no_such_module:X"',
            ["cannot build strategy 'no_such_module:X'", "no module 'no_such_module'", "expected"],
        ),
        (
            '"custom_strategy:Missing"',
            ["'custom_strategy:Missing'", "has no attribute 'Missing'", "expected"],
        ),
    ],
)
def test_a_strategy_that_cannot_be_resolved_is_an_error_when_resolving(
    tmp_path: Path, strategy: str, words: list[str]
) -> None:
    shutil.copy(CUSTOM_MODULE, tmp_path / "custom_strategy.py")
    path = write(tmp_path, with_mirror(strategy=strategy))
    error = assert_error(path, "mirror[0].strategy", *words, resolve=True)
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("strategy", "options", "words", "resolve"),
    [
        ('"backoff"', "{ bogus = 1 }", ["'bogus'"], False),
        ('"full-jitter"', "{ base = -1.0 }", ["base must be", "-1.0"], False),
        ('"backoff"', '{ jitter_kind = "full" }', ["jitter_kind"], False),
        ('"custom_strategy:CircuitBreaker"', "{ retries = 3 }", ["'retries'"], True),
    ],
)
def test_strategy_options_the_strategy_does_not_take(
    tmp_path: Path, strategy: str, options: str, words: list[str], resolve: bool
) -> None:
    shutil.copy(CUSTOM_MODULE, tmp_path / "custom_strategy.py")
    text = with_mirror(strategy=strategy, strategy_options=options)
    path = write(tmp_path, text)
    assert_error(path, "mirror[0].strategy", "cannot build strategy", *words, resolve=resolve)


def test_custom_strategy_next_to_the_file(tmp_path: Path) -> None:
    shutil.copy(CUSTOM_MODULE, tmp_path / "custom_strategy.py")
    text = with_mirror(
        strategy='"custom_strategy:CircuitBreaker"', strategy_options="{ max_failures = 5 }"
    )
    topology = load_topology(write(tmp_path, text))
    (mirror,) = topology.mirrors
    assert mirror.strategy == "custom_strategy:CircuitBreaker"
    assert dict(mirror.strategy_options) == {"max_failures": 5}


# --- resolve_strategy -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("backoff", JitterKind.UNIFORM),
        ("full-jitter", JitterKind.FULL),
        ("equal-jitter", JitterKind.EQUAL),
        ("decorrelated-jitter", JitterKind.DECORRELATED),
    ],
)
def test_builtin_strategies(name: str, kind: JitterKind) -> None:
    assert BUILTIN_STRATEGIES[name] is kind
    strategy = resolve_strategy(name, {})
    assert isinstance(strategy, ExponentialBackoff)
    assert strategy.jitter_kind is kind
    default = link_strategy()
    assert (strategy.base, strategy.factor, strategy.max_delay, strategy.jitter) == (
        default.base,
        default.factor,
        default.max_delay,
        default.jitter,
    )
    tuned = resolve_strategy(name, {"base": 0.25, "max_delay": 2.0, "max_restarts": 4})
    assert isinstance(tuned, ExponentialBackoff) and tuned.jitter_kind is kind
    assert (tuned.base, tuned.max_delay, tuned.max_restarts) == (0.25, 2.0, 4)


def test_builtin_strategy_with_unknown_option_is_a_strategy_error() -> None:
    with pytest.raises(StrategyError, match="does not take these strategy_options") as raised:
        resolve_strategy("backoff", {"bogus": 1})
    assert isinstance(raised.value.__cause__, TypeError)


def test_unknown_name_without_a_colon() -> None:
    with pytest.raises(StrategyError, match="built-in"):
        resolve_strategy("nope", {})
    assert issubclass(StrategyError, ValueError)


MODULE = """
from supervisors import Escalate, ExponentialBackoff, Restart, SupervisorStrategy

class Always(SupervisorStrategy):
    def __init__(self, delay=1.0):
        self.delay = delay

    def decide(self, failure):
        return Restart(self.delay)

INSTANCE = Always(0.5)

SEEN = []

def decider(failure):
    SEEN.append(failure)
    return Escalate()

def make(delay):
    return Always(delay)

class Holder:
    NESTED = Always(2.0)

NOT_A_STRATEGY = 5
"""


@pytest.fixture
def strategies_module(tmp_path: Path) -> str:
    name = f"topo_strategies_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    return name


def failure() -> Failure:
    return Failure("link", RuntimeError("boom"), 1, 0.0)


def test_module_class_with_options(tmp_path: Path, strategies_module: str) -> None:
    strategy = resolve_strategy(f"{strategies_module}:Always", {"delay": 3.0}, tmp_path)
    assert type(strategy).__name__ == "Always"
    assert strategy.decide(failure()) == Restart(3.0)
    default = resolve_strategy(f"{strategies_module}:Always", {}, tmp_path)
    assert default.decide(failure()) == Restart(1.0)


def test_module_instance(tmp_path: Path, strategies_module: str) -> None:
    strategy = resolve_strategy(f"{strategies_module}:INSTANCE", {}, tmp_path)
    module = sys.modules[strategies_module]
    assert strategy is module.INSTANCE
    nested = resolve_strategy(f"{strategies_module}:Holder.NESTED", {}, tmp_path)
    assert nested is module.Holder.NESTED
    with pytest.raises(StrategyError, match="strategy instance, which takes no strategy_options"):
        resolve_strategy(f"{strategies_module}:INSTANCE", {"delay": 1.0}, tmp_path)


def test_module_function_is_a_decider(tmp_path: Path, strategies_module: str) -> None:
    strategy = resolve_strategy(f"{strategies_module}:decider", {}, tmp_path)
    assert isinstance(strategy, SupervisorStrategy)
    seen = failure()
    assert strategy.decide(seen) == Escalate()
    assert sys.modules[strategies_module].SEEN == [seen]


def test_module_factory_with_options(tmp_path: Path, strategies_module: str) -> None:
    strategy = resolve_strategy(f"{strategies_module}:make", {"delay": 0.75}, tmp_path)
    assert strategy.decide(failure()) == Restart(0.75)


def test_module_attribute_that_is_no_strategy(tmp_path: Path, strategies_module: str) -> None:
    with pytest.raises(StrategyError, match=r"'NOT_A_STRATEGY' of module .* is no strategy"):
        resolve_strategy(f"{strategies_module}:NOT_A_STRATEGY", {}, tmp_path)
    with pytest.raises(StrategyError, match=r"has no attribute 'Holder\.MISSING'"):
        resolve_strategy(f"{strategies_module}:Holder.MISSING", {}, tmp_path)
    with pytest.raises(StrategyError, match="no module 'no_such_module_anywhere' in "):
        resolve_strategy("no_such_module_anywhere:X", {}, tmp_path)
    with pytest.raises(StrategyError, match=r"make\(\*\*strategy_options\) raised TypeError"):
        resolve_strategy(f"{strategies_module}:make", {"speed": 1}, tmp_path)


def test_module_strategies_in_a_topology(tmp_path: Path, strategies_module: str) -> None:
    text = SOURCE + "".join(
        MIRROR.replace('name = "m"', f'name = "m{i}"')
        + f'strategy = "{strategies_module}:{attr}"\n'
        for i, attr in enumerate(["Always", "INSTANCE", "decider"])
    )
    topology = load_topology(write(tmp_path, text))
    assert [m.strategy.split(":")[1] for m in topology.mirrors] == ["Always", "INSTANCE", "decider"]
    assert list(resolve_strategies(topology)) == ["m0", "m1", "m2"]
    bad = SOURCE + MIRROR + f'strategy = "{strategies_module}:NOT_A_STRATEGY"\n'
    assert_error(write(tmp_path, bad), "mirror[0].strategy", "NOT_A_STRATEGY", resolve=True)


# --- parsing imports nothing; resolving leaves sys.path as it was ----------------------------


def test_parsing_imports_no_strategy_module_and_leaves_sys_path_alone(tmp_path: Path) -> None:
    (tmp_path / "loud_strategy.py").write_text("raise SystemExit('imported while parsing')\n")
    path_before, modules_before = list(sys.path), set(sys.modules)
    topology = load_topology(write(tmp_path, with_mirror(strategy='"loud_strategy:Anything"')))
    assert topology.mirrors[0].strategy == "loud_strategy:Anything"
    assert sys.path == path_before
    assert set(sys.modules) - modules_before == set()
    assert not hasattr(spec, "sys") and not hasattr(spec, "importlib")


def test_every_example_parses_without_touching_sys_path() -> None:
    # Another test may have resolved the custom strategy already; parsing must not.
    sys.modules.pop("custom_strategy", None)
    before = list(sys.path)
    for path in EXAMPLE_FILES:
        load_topology(path)
    assert sys.path == before
    assert "custom_strategy" not in sys.modules


def test_resolving_leaves_sys_path_as_it_was() -> None:
    before = list(sys.path)
    custom = load_topology(EXAMPLES / "custom_strategy.toml")
    strategies = resolve_strategies(custom)
    assert type(strategies["breaker"]).__name__ == "CircuitBreaker"
    assert sys.path == before
    assert str(EXAMPLES) not in sys.path
    # Once imported, the module is reused (as import would), still without the folder.
    again = resolve_strategy("custom_strategy:CircuitBreaker", {}, EXAMPLES)
    assert type(again) is type(strategies["breaker"])
    assert sys.path == before


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("raise RuntimeError('broken\\nstrategy')\n", ["raised RuntimeError: broken strategy"]),
        ("import not_installed_anywhere\n", ["No module named 'not_installed_anywhere'"]),
        ("def broken(:\n", ["raised SyntaxError"]),
    ],
)
def test_a_module_that_fails_to_import_leaves_sys_path_as_it_was(
    tmp_path: Path, body: str, words: list[str]
) -> None:
    name = f"failing_{abs(hash((tmp_path, body))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(body)
    before = list(sys.path)
    path = write(tmp_path, with_mirror(strategy=f'"{name}:X"'))
    error = assert_error(
        path, "mirror[0].strategy", f"importing module {name!r}", *words, resolve=True
    )
    assert "\n" not in str(error)
    assert sys.path == before
    assert name not in sys.modules


def test_a_missing_module_leaves_sys_path_as_it_was(tmp_path: Path) -> None:
    before = list(sys.path)
    with pytest.raises(StrategyError, match=re.escape(f"no module 'absent' in {tmp_path}")):
        resolve_strategy("absent:X", {}, tmp_path)
    assert sys.path == before


def test_a_folder_already_on_sys_path_stays_there(tmp_path: Path, strategies_module: str) -> None:
    sys.path.append(str(tmp_path))
    before = list(sys.path)
    resolve_strategy(f"{strategies_module}:Always", {}, tmp_path)
    assert sys.path == before


def test_a_strategy_module_may_import_its_neighbours_while_it_loads(tmp_path: Path) -> None:
    suffix = abs(hash(tmp_path)) % 10**8
    (tmp_path / f"helpers_{suffix}.py").write_text("DELAY = 4.0\n")
    (tmp_path / f"uses_helpers_{suffix}.py").write_text(
        f"from helpers_{suffix} import DELAY\n" + MODULE
    )
    module = import_strategy_module(f"uses_helpers_{suffix}", tmp_path)
    assert module.DELAY == 4.0
    assert str(tmp_path) not in sys.path


def test_a_package_next_to_the_file(tmp_path: Path) -> None:
    package = tmp_path / f"pkg_{abs(hash(tmp_path)) % 10**8}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text(MODULE)
    strategy = resolve_strategy(f"{package.name}.rules:Always", {"delay": 2.5}, tmp_path)
    assert strategy.decide(failure()) == Restart(2.5)
    assert str(tmp_path) not in sys.path


def test_the_old_import_from_spec_still_resolves(tmp_path: Path, strategies_module: str) -> None:
    before = list(sys.path)
    strategy = spec.resolve_strategy(f"{strategies_module}:Always", {"delay": 3.0}, tmp_path)
    assert strategy.decide(failure()) == Restart(3.0)
    assert isinstance(spec.resolve_strategy("backoff", {}), ExponentialBackoff)
    assert sys.path == before


def test_strategy_reference_is_a_value() -> None:
    assert StrategyReference.parse("backoff") == StrategyReference("backoff")
    assert StrategyReference.parse("a.b:C.d") == StrategyReference("a.b:C.d", "a.b", "C.d")
    with pytest.raises(ValueError, match="module:attribute"):
        StrategyReference.parse("a.b")


# --- link options, on_divergence and ids --------------------------------------------------


def with_link(extra: str) -> str:
    return BASE.replace('database = "orders" }', f'database = "orders", {extra} }}')


def test_on_divergence_defaults_to_escalate_and_takes_resync(tmp_path: Path) -> None:
    assert load_topology(write(tmp_path, BASE)).mirrors[0].on_divergence == "escalate"
    resync = load_topology(write(tmp_path, with_mirror(on_divergence='"resync"')))
    assert resync.mirrors[0].on_divergence == "resync"
    assert ON_DIVERGENCE == ("escalate", "resync")


@pytest.mark.parametrize(
    ("value", "words"),
    [('"ignore"', ["expected one of escalate, resync, got 'ignore'"]), ("true", ["boolean"])],
)
def test_on_divergence_must_be_escalate_or_resync(
    tmp_path: Path, value: str, words: list[str]
) -> None:
    assert_error(
        write(tmp_path, with_mirror(on_divergence=value)), "mirror[0].on_divergence", *words
    )


def test_max_snapshot_bytes_in_link_defaults_and_links(tmp_path: Path) -> None:
    text = "[link_defaults]\nmax_snapshot_bytes = 1048576\n" + with_link("max_snapshot_bytes = 10")
    topology = load_topology(write(tmp_path, text))
    assert dict(topology.link_defaults) == {"max_snapshot_bytes": 1048576}
    assert isinstance(topology.link_defaults["max_snapshot_bytes"], int)
    assert dict(topology.mirrors[0].links[0].options) == {"max_snapshot_bytes": 10}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "expected a positive integer (bytes), got 0"),
        ("-5", "positive integer"),
        ("1.5", "expected an integer (bytes), got 1.5"),
        ('"1MiB"', "expected an integer (bytes)"),
        ("true", "boolean"),
    ],
)
def test_max_snapshot_bytes_must_be_a_positive_integer(
    tmp_path: Path, value: str, expected: str
) -> None:
    text = f"[link_defaults]\nmax_snapshot_bytes = {value}\n" + BASE
    assert_error(write(tmp_path, text), "link_defaults.max_snapshot_bytes", expected)
    assert_error(
        write(tmp_path, with_link(f"max_snapshot_bytes = {value}")),
        "mirror[0].links[0].max_snapshot_bytes",
        expected,
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            "[link_defaults]\nkeepalive_interval = 5\nidle_timeout = 5\n" + BASE,
            "link_defaults.keepalive_interval",
        ),
        ("[link_defaults]\nidle_timeout = 0.5\n" + BASE, "link_defaults.idle_timeout"),
        (
            "[link_defaults]\nidle_timeout = 2\n" + with_link("keepalive_interval = 3"),
            "mirror[0].links[0].keepalive_interval",
        ),
        (
            "[link_defaults]\nkeepalive_interval = 2\n" + with_link("idle_timeout = 1.5"),
            "mirror[0].links[0].idle_timeout",
        ),
        ("[link_defaults]\nidle_timeout = inf\n" + BASE, "link_defaults.idle_timeout"),
    ],
)
def test_keepalive_must_be_shorter_than_the_idle_timeout(
    tmp_path: Path, text: str, key: str
) -> None:
    error = assert_error(write(tmp_path, text), key)
    assert "idle_timeout" in error.problem or "> 0" in error.problem


def test_link_options_merge_over_the_defaults(tmp_path: Path) -> None:
    text = "[link_defaults]\nidle_timeout = 2\nkeepalive_interval = 0.5\n" + with_link(
        "keepalive_interval = 1.5"
    )
    topology = load_topology(write(tmp_path, text))
    assert dict(topology.link_defaults) == {"idle_timeout": 2.0, "keepalive_interval": 0.5}
    assert dict(topology.mirrors[0].links[0].options) == {"keepalive_interval": 1.5}


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (SOURCE.replace('"us-east"', '"us east"') + MIRROR.replace('"us-east"', '"us east"'),
         "source[0].cluster", ["whitespace", "'us east'"]),
        (SOURCE.replace('"us-east"', '"us_east"') + MIRROR.replace('"us-east"', '"us_east"'),
         "source[0].cluster", ["DNS name", "'us_east'"]),
        (SOURCE.replace('"users"', '"us\\u0000ers"') + MIRROR, "source[0].databases", ["control"]),
        (SOURCE.replace('"users"', '""') + MIRROR, "source[0].databases", ["non-empty"]),
        (with_link('cluster_id = ""'), "mirror[0].links[0].cluster_id", ["empty"]),
        (with_link('cluster_id = "eu\\twest"'), "mirror[0].links[0].cluster_id", ["whitespace"]),
        (BASE.replace('name = "m"', 'name = "m 1"'), "mirror[0].name", ["whitespace", "'m 1'"]),
    ],
)  # fmt: skip
def test_ids_hold_no_whitespace_or_control_characters(
    tmp_path: Path, text: str, key: str, words: list[str]
) -> None:
    assert_error(write(tmp_path, text), key, *words)


def test_identifier_problem() -> None:
    assert identifier_problem("us-east.1") is None
    assert identifier_problem("") == "it is empty"
    assert "whitespace" in (identifier_problem("a\u00a0b") or "")
    assert "control" in (identifier_problem("a\u200bb") or "")  # zero-width space: invisible
    assert "control" in (identifier_problem("a\x7fb") or "")


def test_the_module_docstring_documents_the_run_exit_codes() -> None:
    import mirror_actors.topology.spec as topology_module

    doc = topology_module.__doc__ or ""
    assert "on_divergence" in doc and "max_snapshot_bytes" in doc
    assert "exits 0" in doc and "3 when a link escalated" in doc
