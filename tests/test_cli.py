"""The mirror-actors command, as a user runs it: real subprocesses, real exit codes.

Bad input of every kind is one line on stderr naming the argument or file and
exit code 2, before any network work; a mirror whose link escalates exits 3
naming the link and the cause; Ctrl-C and SIGTERM stop cleanly with 0.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from loguru import logger

from mirror_actors import cli as cli_module
from mirror_actors.cli import main
from mirror_actors.pki import DevPki, generate_dev_pki
from mirror_actors.replica import actor as replica_module
from mirror_actors.replica.stores import SqliteReplicaStore, read_replica_file
from mirror_actors.source.log import SourceStore
from mirror_actors.wire.errors import SnapshotTooLarge
from mirror_actors.wire.frames import Entries, Hello, HelloAck, Subscribe
from tests.rawclient import raw_mirror

CLI = [sys.executable, "-m", "mirror_actors.cli"]
BAD_INPUT_TIMEOUT = 30.0
PARALLEL = max(2, (os.cpu_count() or 1) * 2)
WAIT_SECONDS = 15.0


def read_line(process: subprocess.Popen[str], timeout: float = WAIT_SECONDS) -> str:
    """The next stdout line of ``process``, waiting at most ``timeout`` seconds."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return process.stdout.readline()


def wait_until(condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def processes() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start CLI subprocesses; every one is killed and reaped at the end, whatever happened."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        process = subprocess.Popen([*CLI, *args], text=True, **kwargs)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.communicate()


def source_args(pki: DevPki, *extra: str) -> list[str]:
    pair = pki.source("us-east")
    return [
        "--log-level", "WARNING", "source", "--cluster-id", "us-east", "--database", "orders",
        "--port", "0", "--cert", str(pair.cert), "--key", str(pair.key), *extra,
    ]  # fmt: skip


@pytest.fixture
def source_port(pki: DevPki, processes: Callable[..., subprocess.Popen[str]]) -> int:
    """A real source subprocess serving us-east/orders with demo traffic; its port."""
    process = processes(*source_args(pki, "--rate", "50"), stderr=subprocess.DEVNULL)
    banner = read_line(process)
    assert banner.startswith("source us-east serving orders on "), banner
    return int(banner.rsplit(":", 1)[1])


def mirror_args(pki: DevPki, port: int, store: Path, *extra: str) -> list[str]:
    return [
        "mirror", "--cluster-id", "us-east", "--database", "orders", "--port", str(port),
        "--ca", str(pki.ca.cert), "--store", str(store), "--handshake-timeout", "2", *extra,
    ]  # fmt: skip


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """For main() called in this process: leave loguru's sinks and stdlib logging alone."""
    monkeypatch.setattr("mirror_actors.cli.configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr("mirror_actors.cli.install_logging_bridge", lambda: None)
    monkeypatch.delenv("MIRROR_ACTORS_LOG", raising=False)


# --- certs ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("in_process")
def test_certs_writes_a_ca_source_and_mirror_certificates(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--cluster", "us-east", "--cluster", "eu-west"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["ca.pem", "ca.key", "mirror.pem", "mirror.key"]
        + [f"source-{c}.{ext}" for c in ("us-east", "eu-west") for ext in ("pem", "key")]
    )
    for key in out.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.usefixtures("in_process")
def test_certs_never_overwrites_an_existing_ca_and_adds_clusters_signed_by_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--cluster", "us-east"]) == 0
    capsys.readouterr()
    ca = (out / "ca.pem").read_bytes()
    source = (out / "source-us-east.pem").read_bytes()
    assert main(["certs", "--out", str(out), "--cluster", "us-east", "--cluster", "eu-west"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (out / "ca.pem").read_bytes() == ca and (
        out / "source-us-east.pem"
    ).read_bytes() == source
    assert (
        lines[0]
        == f"CA:      {out / 'ca.pem'} (key {out / 'ca.key'}): kept (it signs what follows)"
    )
    assert (
        lines[1].startswith(f"source us-east: {out / 'source-us-east.pem'}") and "kept" in lines[1]
    )
    assert lines[2].startswith(f"source eu-west: {out / 'source-eu-west.pem'}") and lines[
        2
    ].endswith("created")
    authority = x509.load_pem_x509_certificate(ca)
    for name in ("source-us-east.pem", "source-eu-west.pem", "mirror.pem"):
        x509.load_pem_x509_certificate((out / name).read_bytes()).verify_directly_issued_by(
            authority
        )
    # --san reissues that source's certificate, still signed by the same CA.
    assert main(["certs", "--out", str(out), "--cluster", "us-east", "--san", "10.0.0.5"]) == 0
    assert "reissued (it lacked the names 10.0.0.5)" in capsys.readouterr().out
    assert (out / "ca.pem").read_bytes() == ca
    reissued = x509.load_pem_x509_certificate((out / "source-us-east.pem").read_bytes())
    reissued.verify_directly_issued_by(authority)
    san = reissued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    # --force: a new CA, and a warning for what it no longer vouches for.
    assert main(["certs", "--out", str(out), "--cluster", "us-east", "--force"]) == 0
    captured = capsys.readouterr()
    assert (out / "ca.pem").read_bytes() != ca and "CA:      " in captured.out
    assert "replaced" in captured.out.splitlines()[0]
    assert "source-eu-west.pem was signed by the CA just replaced" in captured.err


def test_certs_refuses_to_replace_a_ca_in_a_real_process(
    tmp_path: Path, processes: Callable[..., subprocess.Popen[str]]
) -> None:
    out = tmp_path / "certs"
    first = processes("certs", "--out", str(out), "--cluster", "us-east")
    assert first.wait(timeout=30) == 0
    ca = (out / "ca.pem").read_bytes()
    (out / "ca.key").unlink()
    second = processes("certs", "--out", str(out), "--cluster", "us-east", "--cluster", "eu-west")
    _, err = second.communicate(timeout=30)
    assert second.returncode == 2
    assert "ca.pem but not ca.key" in err and "--force" in err and len(err.splitlines()) == 1
    assert (out / "ca.pem").read_bytes() == ca and not (out / "source-eu-west.pem").exists()


@pytest.mark.usefixtures("in_process")
def test_certs_rejects_a_cluster_id_that_is_not_a_dns_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", "--out", str(tmp_path), "--cluster", "not_a_name"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "argument --cluster" in line and "'not_a_name'" in line


# --- bad input: one line, exit 2, nothing started ---------------------------------------------

# Cases also run as real subprocesses: those the issue names, and one of each kind of file.
IN_SUBPROCESS = {
    "log-level", "log-level-env", "source-port-high", "rate-nan", "empty-cluster-id",
    "mirror-port-zero", "cert-missing", "cert-garbage", "key-of-another-cert", "ca-is-a-key",
    "source-store-not-sqlite", "mirror-store-no-folder", "mirror-store-not-sqlite",
    "mirror-store-of-another-link", "keepalive-not-below-idle", "run-bad-toml",
    "strategy-options-unknown", "certs-half-a-ca", "serve-bad-key", "serve-shard",
}  # fmt: skip


def _bad_input_cases() -> list[tuple[str, list[str], dict[str, str], list[str]]]:
    """(id, arguments, extra environment, words stderr must hold); {name} is a file below."""
    source = ["source", "--cluster-id", "us-east", "--database", "orders", "--port", "0",
              "--cert", "{cert}", "--key", "{key}"]  # fmt: skip
    mirror = ["mirror", "--cluster-id", "us-east", "--database", "orders", "--port", "9",
              "--ca", "{ca}", "--store", "{store}"]  # fmt: skip
    run = ["run", "{example}"]
    return [
        # the log level, on the command line and from the environment
        ("log-level", ["--log-level", "NOPE", *source], {}, ["--log-level", "'NOPE'", "WARNING"]),
        ("log-level-env", source, {"MIRROR_ACTORS_LOG": "loud"}, ["MIRROR_ACTORS_LOG", "'loud'"]),
        # ports, rates, ids, host
        ("source-port-high", [*source, "--port", "99999"], {}, ["--port", "'99999'", "0..65535"]),
        ("source-port-negative", [*source, "--port", "-1"], {}, ["--port", "'-1'"]),
        ("source-port-word", [*source, "--port", "http"], {}, ["--port", "'http'"]),
        ("mirror-port-zero", [*mirror, "--port", "0"], {}, ["--port", "'0'", "1..65535"]),
        ("mirror-port-high", [*mirror, "--port", "65536"], {}, ["--port", "'65536'"]),
        ("rate-nan", [*source, "--rate", "nan"], {}, ["--rate", "'nan'", ">= 0"]),
        ("rate-inf", [*source, "--rate", "inf"], {}, ["--rate", "'inf'"]),
        ("rate-negative", [*source, "--rate", "-2"], {}, ["--rate", "'-2'"]),
        ("empty-cluster-id", [*source, "--cluster-id", ""], {}, ["--cluster-id", "empty"]),
        ("spaced-cluster-id", [*mirror, "--cluster-id", "us east"], {}, ["--cluster-id", "'us east'", "whitespace"]),
        ("control-database", [*source, "--database", "ord\x01ers"], {}, ["--database", "control"]),
        ("empty-database", [*mirror, "--database", ""], {}, ["--database", "empty"]),
        ("repeated-database", [*source, "--database", "orders"], {}, ["--database", "repeated: orders"]),
        ("empty-host", [*source, "--host", ""], {}, ["--host", "''"]),
        # certificate and key files
        ("cert-missing", [*source, "--cert", "{missing}"], {}, ["--cert", "{missing}", "no such file"]),
        ("cert-garbage", [*source, "--cert", "{garbage}"], {}, ["--cert", "{garbage}", "PEM certificate"]),
        ("cert-is-a-folder", [*source, "--cert", "{folder}"], {}, ["--cert", "{folder}", "directory"]),
        ("key-is-a-certificate", [*source, "--key", "{cert}"], {}, ["--key", "{cert}", "private key"]),
        ("key-of-another-cert", [*source, "--key", "{other_key}"], {}, ["--key", "{other_key}", "not the private key", "{cert}"]),
        ("client-ca-garbage", [*source, "--client-ca", "{garbage}"], {}, ["--client-ca", "{garbage}"]),
        ("ca-is-a-key", [*mirror, "--ca", "{key}"], {}, ["--ca", "{key}", "PEM certificate"]),
        ("ca-missing", [*mirror, "--ca", "{missing}"], {}, ["--ca", "{missing}", "no such file"]),
        ("mirror-cert-without-key", [*mirror, "--cert", "{mirror_cert}"], {}, ["--key", "go together"]),
        ("mirror-key-mismatch", [*mirror, "--cert", "{mirror_cert}", "--key", "{key}"], {}, ["--key", "{key}", "{mirror_cert}"]),
        # store files
        ("source-store-no-folder", [*source, "--store", "{no_folder}"], {}, ["--store", "does not exist"]),
        ("source-store-not-sqlite", [*source, "--store", "{garbage}"], {}, ["--store", "{garbage}", "SQLite"]),
        ("mirror-store-no-folder", [*mirror, "--store", "{no_folder}"], {}, ["--store", "does not exist"]),
        ("mirror-store-not-sqlite", [*mirror, "--store", "{garbage}"], {}, ["--store", "{garbage}", "not a database"]),
        ("mirror-store-of-another-link", [*mirror, "--store", "{other_link}"], {}, ["--store", "{other_link}", "eu-west/users", "us-east/orders"]),
        ("mirror-store-is-a-folder", [*mirror, "--store", "{folder}"], {}, ["--store", "{folder}", "directory"]),
        # link options
        ("handshake-zero", [*mirror, "--handshake-timeout", "0"], {}, ["--handshake-timeout", "'0'", "> 0"]),
        ("idle-nan", [*mirror, "--idle-timeout", "nan"], {}, ["--idle-timeout", "'nan'"]),
        ("keepalive-not-below-idle", [*mirror, "--keepalive-interval", "3", "--idle-timeout", "3"], {}, ["--keepalive-interval", "shorter than --idle-timeout"]),
        ("keepalive-above-default-idle", [*mirror, "--keepalive-interval", "9"], {}, ["--keepalive-interval", "(5 s)"]),
        ("max-snapshot-zero", [*mirror, "--max-snapshot-bytes", "0"], {}, ["--max-snapshot-bytes", "'0'"]),
        ("on-divergence-unknown", [*mirror, "--on-divergence", "ignore"], {}, ["--on-divergence", "'ignore'", "resync"]),
        ("strategy-unknown", [*mirror, "--strategy", "fastest"], {}, ["--strategy", "'fastest'", "module:attribute"]),
        ("strategy-options-not-json", [*mirror, "--strategy-options", "{{"], {}, ["--strategy-options", "JSON"]),
        ("strategy-options-not-an-object", [*mirror, "--strategy-options", "[1]"], {}, ["--strategy-options", "JSON object"]),
        ("strategy-options-unknown", [*mirror, "--strategy-options", '{{"nope": 1}}'], {}, ["--strategy", "'backoff'", "nope"]),
        ("strategy-module-missing", [*mirror, "--strategy", "no_such_module_x:S"], {}, ["--strategy", "no_such_module_x"]),
        ("server-name-bad", [*mirror, "--server-name", "a b"], {}, ["--server-name", "'a b'"]),
        ("log-format-unknown", ["--log-format", "xml", *source], {}, ["--log-format", "'xml'"]),
        # run
        ("run-missing-file", ["run", "{missing}"], {}, ["{missing}", "no such file"]),
        ("run-bad-toml", ["run", "{garbage}"], {}, ["{garbage}", "(syntax)"]),
        ("run-duration-nan", [*run, "--duration", "nan"], {}, ["--duration", "'nan'"]),
        ("run-verify-timeout-negative", [*run, "--verify-timeout", "-1"], {}, ["--verify-timeout", "'-1'"]),
        # certs
        ("certs-out-is-a-file", ["certs", "--out", "{garbage}", "--cluster", "a"], {}, ["--out", "{garbage}", "not a directory"]),
        ("certs-mirror-name", ["certs", "--out", "{folder}", "--cluster", "a", "--mirror-name", "a b"], {}, ["--mirror-name", "'a b'"]),
        ("certs-san", ["certs", "--out", "{folder}", "--cluster", "a", "--san", "a b"], {}, ["--san", "'a b'", "IP address"]),
        ("certs-half-a-ca", ["certs", "--out", "{half_ca}", "--cluster", "a"], {}, ["--out", "ca.pem but not ca.key", "--force"]),
        # serve and status
        ("serve-missing-file", ["serve", "{missing}"], {}, ["{missing}", "no such file"]),
        ("serve-bad-toml", ["serve", "{garbage}"], {}, ["{garbage}", "(syntax)"]),
        ("serve-bad-key", ["serve", "{bad_serve}"], {}, ["{bad_serve}", "mirror.http", "host:port"]),
        ("serve-shard", ["serve", "{garbage}", "--shard", "2/2"], {}, ["--shard", "'2/2'", "0 <= i < n"]),
        ("status-url", ["status", "ftp://x"], {}, ["URL", "http://host:port"]),
        ("status-interval", ["status", "--interval", "0"], {}, ["--interval", "'0'"]),
        ("no-command", [], {}, ["required"]),
    ]  # fmt: skip


BAD_INPUT_CASES = _bad_input_cases()
Paths = dict[str, str]


@pytest.fixture(scope="module")
def bad_input_files(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Paths:
    files = tmp_path_factory.mktemp("bad-input")
    other = generate_dev_pki(files / "other-pki", ["us-east"])
    (files / "garbage.txt").write_text("not a certificate, not a database\n[[[")
    (files / "folder").mkdir()
    SqliteReplicaStore(files / "other-link.db", "eu-west/users").close()
    (files / "half-ca").mkdir()
    (files / "half-ca" / "ca.pem").write_bytes(pki.ca.cert.read_bytes())
    (files / "bad-serve.toml").write_text(
        '[mirror]\nname = "m"\ndata_dir = "d"\nhttp = "nowhere"\n'
        '[[source]]\ncluster = "a"\naddress = "h:1"\ndatabases = ["x"]\nca_file = "ca.pem"\n'
    )
    return {
        "cert": str(pki.source("us-east").cert),
        "key": str(pki.source("us-east").key),
        "ca": str(pki.ca.cert),
        "mirror_cert": str(pki.mirror.cert),
        "other_key": str(other.source("us-east").key),
        "store": str(files / "mirror.db"),
        "missing": str(files / "missing.pem"),
        "garbage": str(files / "garbage.txt"),
        "folder": str(files / "folder"),
        "no_folder": str(files / "no-such-folder" / "store.db"),
        "other_link": str(files / "other-link.db"),
        "half_ca": str(files / "half-ca"),
        "bad_serve": str(files / "bad-serve.toml"),
        "example": str(Path(__file__).resolve().parent.parent / "examples" / "single_link.toml"),
    }


def assert_one_line_naming(stderr: str, words: list[str], paths: Paths) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    (line,) = lines
    assert line.startswith("mirror-actors") and "error:" in line, line
    for word in words:
        assert word.format(**paths) in line, f"{word.format(**paths)!r} not in {line!r}"


@pytest.fixture(scope="module")
def bad_input_runs(bad_input_files: Paths) -> dict[str, subprocess.CompletedProcess[str]]:
    """The IN_SUBPROCESS cases, each a real process, several at a time (each must exit at once)."""
    env = {k: v for k, v in os.environ.items() if k != "MIRROR_ACTORS_LOG"}
    cases = [case for case in BAD_INPUT_CASES if case[0] in IN_SUBPROCESS]
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    while cases:
        batch, cases = cases[:PARALLEL], cases[PARALLEL:]
        running = []
        for case_id, args, extra_env, _ in batch:
            argv = [*CLI, *(arg.format(**bad_input_files) for arg in args)]
            process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**env, **extra_env},
            )
            running.append((case_id, argv, process))
        for case_id, argv, process in running:
            try:
                out, err = process.communicate(timeout=BAD_INPUT_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
                err += f"\n(still running after {BAD_INPUT_TIMEOUT} s: killed)"
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
            results[case_id] = subprocess.CompletedProcess(argv, process.returncode, out, err)
    return results


@pytest.mark.parametrize(
    ("case_id", "words"),
    [(case[0], case[3]) for case in BAD_INPUT_CASES if case[0] in IN_SUBPROCESS],
    ids=[case[0] for case in BAD_INPUT_CASES if case[0] in IN_SUBPROCESS],
)
def test_bad_input_in_a_real_process_is_one_line_and_exit_code_2(
    bad_input_runs: dict[str, subprocess.CompletedProcess[str]],
    bad_input_files: Paths,
    case_id: str,
    words: list[str],
) -> None:
    done = bad_input_runs[case_id]
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert_one_line_naming(done.stderr, words, bad_input_files)
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [case[1:] for case in BAD_INPUT_CASES],
    ids=[case[0] for case in BAD_INPUT_CASES],
)
@pytest.mark.usefixtures("in_process")
def test_bad_input_is_one_line_and_exit_code_2(
    bad_input_files: Paths,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    env: dict[str, str],
    words: list[str],
) -> None:
    """Every case through main() in this process: quick, and nothing may start."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main([arg.format(**bad_input_files) for arg in args]) == 2
    out, err = capsys.readouterr()
    assert_one_line_naming(err, words, bad_input_files)
    assert out == ""


# --- source -----------------------------------------------------------------------------------


async def _first_entries(port: int, ca: Path) -> Entries:
    async with raw_mirror(port, "us-east", str(ca)) as client:
        client.send(0, Hello("us-east", "orders"), end=True)
        ack = await client.recv(0)
        assert isinstance(ack, HelloAck) and ack.accepted
        stream = client.open_stream()
        client.send(stream, Subscribe(1))
        frame = await client.recv(stream)
        assert isinstance(frame, Entries)
        return frame


def test_source_serves_demo_entries_until_interrupted(
    pki: DevPki, processes: Callable[..., subprocess.Popen[str]]
) -> None:
    process = processes(*source_args(pki, "--rate", "50"))
    port = int(read_line(process).rsplit(":", 1)[1])
    frame = asyncio.run(_first_entries(port, pki.ca.cert))
    assert frame.entries[0].data == b"demo entry 1"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=10) == 0


def test_source_store_keeps_the_log_in_sqlite(
    pki: DevPki, tmp_path: Path, processes: Callable[..., subprocess.Popen[str]]
) -> None:
    path = tmp_path / "source.db"
    process = processes(*source_args(pki, "--rate", "100", "--store", str(path)))
    port = int(read_line(process).rsplit(":", 1)[1])
    asyncio.run(_first_entries(port, pki.ca.cert))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    with SourceStore(path=path) as store:
        assert store.database_ids == ["orders"]
        kept = store["orders"].entries()
    assert kept and kept[0].data == b"demo entry 1"
    # Started again over the same file, it serves what it kept and goes on numbering.
    process = processes(*source_args(pki, "--store", str(path)))
    port = int(read_line(process).rsplit(":", 1)[1])
    frame = asyncio.run(_first_entries(port, pki.ca.cert))
    assert frame.entries[0].data == b"demo entry 1"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0


def test_source_on_a_port_in_use_is_one_line(
    pki: DevPki, source_port: int, processes: Callable[..., subprocess.Popen[str]]
) -> None:
    args = source_args(pki)
    args[args.index("--port") + 1] = str(source_port)
    process = processes(*args)
    _, err = process.communicate(timeout=BAD_INPUT_TIMEOUT)
    assert process.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"127.0.0.1:{source_port}" in err and "--port" in err


# --- mirror -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_mirror_follows_its_source_and_stops_cleanly(
    pki: DevPki,
    tmp_path: Path,
    source_port: int,
    processes: Callable[..., subprocess.Popen[str]],
    stop_signal: signal.Signals,
) -> None:
    store = tmp_path / "orders.db"
    process = processes(*mirror_args(pki, source_port, store))
    assert read_line(process).startswith("mirror of us-east/orders from 127.0.0.1:")
    wait_until(lambda: read_replica_file(store)[0] >= 5)
    process.send_signal(stop_signal)
    _, err = process.communicate(timeout=15)
    assert process.returncode == 0, err
    assert "escalated" not in err and "Traceback" not in err


def _escalated_mirror(
    processes: Callable[..., subprocess.Popen[str]], args: list[str]
) -> tuple[int, str]:
    process = processes(*args)
    _, err = process.communicate(timeout=WAIT_SECONDS)
    return process.returncode, err


def test_mirror_of_an_unknown_database_exits_3_naming_the_link_and_the_cause(
    pki: DevPki, tmp_path: Path, source_port: int, processes: Callable[..., subprocess.Popen[str]]
) -> None:
    args = mirror_args(pki, source_port, tmp_path / "ledger.db")
    args[args.index("--database") + 1] = "ledger"
    code, err = _escalated_mirror(processes, args)
    assert code == 3, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mirror-actors mirror: us-east/ledger escalated"), last
    assert "unknown database" in last and "'ledger'" in last and "--database" in last


def test_mirror_trusting_another_ca_exits_3(
    pki: DevPki, tmp_path: Path, source_port: int, processes: Callable[..., subprocess.Popen[str]]
) -> None:
    other = generate_dev_pki(tmp_path / "other", ["us-east"])
    args = mirror_args(pki, source_port, tmp_path / "orders.db")
    args[args.index("--ca") + 1] = str(other.ca.cert)
    code, err = _escalated_mirror(processes, args)
    assert code == 3, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mirror-actors mirror: us-east/orders escalated"), last
    assert "TLS verification failed" in last and "--ca" in last


@pytest.mark.usefixtures("in_process")
def test_mirror_options_reach_the_replica_and_an_escalation_ends_the_wait(
    pki: DevPki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In process, with a stand-in replica that escalates at once: what `mirror` passes on."""
    seen: dict[str, Any] = {}

    class EscalatingReplica:
        @staticmethod
        def start(config: Any, store: Any, **kwargs: Any) -> Any:
            seen.update(config=config, store=store, **kwargs)
            kwargs["on_escalation"](SimpleNamespace(root_cause=SnapshotTooLarge(10, 1)))
            return SimpleNamespace(stop=store.close)

    monkeypatch.setattr(replica_module, "MirrorDatabase", EscalatingReplica)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    args = mirror_args(pki, 4433, tmp_path / "orders.db")
    args += ["--on-divergence", "resync", "--max-snapshot-bytes", "1", "--keepalive-interval",
             "0.25", "--idle-timeout", "2", "--cert", str(pki.mirror.cert), "--key",
             str(pki.mirror.key)]  # fmt: skip
    assert main(["--log-level", "critical", *args]) == 3
    config = seen["config"]
    assert seen["on_divergence"] == "resync"
    assert (config.max_snapshot_bytes, config.handshake_timeout) == (1, 2.0)
    assert (config.keepalive_interval, config.idle_timeout) == (0.25, 2.0)
    assert config.client_cert_file == str(pki.mirror.cert)
    (line,) = capsys.readouterr().err.splitlines()
    assert "us-east/orders escalated" in line and "--max-snapshot-bytes" in line


@pytest.mark.usefixtures("in_process")
def test_mirror_strategy_and_server_name_reach_the_replica(
    pki: DevPki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    class StoppedReplica:
        @staticmethod
        def start(config: Any, store: Any, **kwargs: Any) -> Any:
            seen.update(config=config, **kwargs)
            kwargs["on_escalation"](SimpleNamespace(root_cause=SnapshotTooLarge(10, 1)))
            return SimpleNamespace(stop=store.close)

    monkeypatch.setattr(replica_module, "MirrorDatabase", StoppedReplica)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    args = mirror_args(pki, 4433, tmp_path / "orders.db")
    args += ["--strategy", "full-jitter", "--strategy-options", '{"base": 1.5, "max_delay": 9}',
             "--server-name", "us-east.example"]  # fmt: skip
    assert main(["--log-level", "critical", *args]) == 3
    strategy = seen["strategy"]
    assert (strategy.base, strategy.max_delay, strategy.jitter_kind.name) == (1.5, 9, "FULL")
    assert seen["config"].tls_server_name == "us-east.example"


def test_run_treats_sigterm_like_ctrl_c(processes: Callable[..., subprocess.Popen[str]]) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "single_link.toml"
    process = processes("run", str(example), "--plain", "--duration", "120")
    assert "mirror/us-east/orders" in read_line(process, 30)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 1, err  # interrupted, as after Ctrl-C: not 143
    assert "(interrupted)" in out and "mirror/us-east/orders" in out
    assert "threads still running" not in err


# --- log formats ---------------------------------------------------------------------------


def _records(sink_format: Any = None) -> tuple[list[Any], int]:
    records: list[Any] = []
    handler = logger.add(lambda message: records.append(message.record), format="{message}")
    return records, handler


def test_the_json_log_format_is_one_object_a_line() -> None:
    records, handler = _records()
    try:
        logger.bind(mirror="eu-mirror", cluster="us-east", database="orders").info("hello {}", 1)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.bind(mirror="eu-mirror", supervisor="us-east/users").exception("failed")
        logger.info("plain")
    finally:
        logger.remove(handler)
    lines = [cli_module.json_log_line(record) for record in records]
    assert all("\n" not in line for line in lines)
    first, second, third = (json.loads(line) for line in lines)
    assert first["message"] == "hello 1" and first["level"] == "INFO"
    assert (first["mirror"], first["cluster"], first["database"]) == (
        "eu-mirror",
        "us-east",
        "orders",
    )
    assert first["exception"] is None and first["time"].endswith("+00:00")
    assert (second["cluster"], second["database"]) == ("us-east", "users")
    assert "RuntimeError: boom" in second["exception"] and "Traceback" in second["exception"]
    assert (third["mirror"], third["cluster"], third["database"]) == (None, None, None)


def test_the_text_log_format_names_the_mirror() -> None:
    stream = io.StringIO()
    handler = logger.add(stream, format=cli_module._format, colorize=False)
    try:
        logger.bind(mirror="eu-mirror", cluster="us-east", database="orders").warning("lost")
        logger.bind(cluster="us-east", database="orders").warning("no mirror")
    finally:
        logger.remove(handler)
    with_mirror, without = stream.getvalue().splitlines()
    assert with_mirror.endswith("WARNING eu-mirror us-east/orders lost"), with_mirror
    assert without.endswith("WARNING us-east/orders no mirror"), without


# --- a source restarted with another history (issue: spliced histories) ----------------------


def _restartable_source(
    pki: DevPki, processes: Callable[..., subprocess.Popen[str]], port: int = 0
) -> tuple[subprocess.Popen[str], int]:
    args = source_args(pki, "--rate", "200")
    args[args.index("--port") + 1] = str(port)
    process = processes(*args, stderr=subprocess.DEVNULL)
    return process, int(read_line(process).rsplit(":", 1)[1])


@pytest.mark.parametrize("mode", ["escalate", "resync"])
def test_a_source_restarted_with_an_empty_memory_log_is_never_spliced(
    pki: DevPki, tmp_path: Path, processes: Callable[..., subprocess.Popen[str]], mode: str
) -> None:
    first, port = _restartable_source(pki, processes)
    store = tmp_path / "orders.db"
    mirror = processes(*mirror_args(pki, port, store, "--on-divergence", mode))
    wait_until(lambda: read_replica_file(store)[0] >= 50)
    first.kill()
    first.wait()
    old_terms = {entry.term for entry in read_replica_file(store)[1]}
    second, _ = _restartable_source(pki, processes, port)
    if mode == "escalate":
        _, err = mirror.communicate(timeout=WAIT_SECONDS)
        assert mirror.returncode == 3, err
        last = err.strip().splitlines()[-1]
        assert "us-east/orders escalated" in last and "history diverged" in last, last
        applied, entries = read_replica_file(store)
        assert {entry.term for entry in entries} == old_terms, "nothing of the new history"
        assert [entry.lsn for entry in entries] == list(range(1, applied + 1))
    else:

        def only_new_history() -> bool:
            applied, entries = read_replica_file(store)
            terms = {entry.term for entry in entries}
            return applied >= 20 and len(terms) == 1 and not terms & old_terms

        wait_until(only_new_history)
        mirror.send_signal(signal.SIGTERM)
        _, err = mirror.communicate(timeout=WAIT_SECONDS)
        assert mirror.returncode == 0, err
        applied, entries = read_replica_file(store)
        assert [entry.lsn for entry in entries] == list(range(1, applied + 1))
        assert entries[0].data == b"demo entry 1"
    second.kill()
