"""Every example does what its name promises, run headless with its outcome asserted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mirror_actors.topology import RunSummary, TopologyRun, load_topology, parse_topology

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> RunSummary:
    topology = load_topology(EXAMPLES / f"{name}.toml")
    run = TopologyRun(topology)
    try:
        run.start()
        while run.elapsed() < topology.duration:
            run.play_due_faults()
            run.rows()
        return run.finish(verify_timeout=30.0)
    finally:
        run.stop()


def by_name(summary: RunSummary) -> dict[str, object]:
    return {link.name: link for link in summary.links}


def test_single_link() -> None:
    summary = run_example("single_link")
    assert summary.verified
    (link,) = summary.links
    assert link.identical and link.applied_lsn > 50 and link.restarts == 0


def test_fan_in_follows_three_clusters_through_a_restart_and_a_cut() -> None:
    summary = run_example("fan_in")
    assert summary.verified, summary
    links = by_name(summary)
    assert {name.split("/")[1] for name in links} == {"us-east", "eu-west", "ap-south"}
    assert links["mirror/eu-west/orders"].restarts >= 1  # type: ignore[attr-defined]
    assert links["mirror/us-east/orders"].restarts == 0  # type: ignore[attr-defined]
    assert links["mirror/us-east/users"].restarts >= 1  # type: ignore[attr-defined]


def test_fan_out_three_mirrors_of_one_source() -> None:
    summary = run_example("fan_out")
    assert summary.verified, summary
    assert len(summary.links) == 3
    assert by_name(summary)["mirror-c/us-east/orders"].restarts >= 1  # type: ignore[attr-defined]


def test_flapping_source_loses_nothing() -> None:
    summary = run_example("flapping_source")
    assert summary.verified, summary
    (link,) = summary.links
    assert link.identical
    assert link.restarts >= 3, "one reconnect per source restart at least"


def test_wrong_cluster_id_escalates_once_and_the_others_carry_on() -> None:
    summary = run_example("wrong_cluster_id")
    assert summary.verified, summary
    links = by_name(summary)
    wrong = links["mirror/eu-west/orders"]
    assert wrong.escalated and wrong.attempts == 1 and wrong.restarts == 0  # type: ignore[attr-defined]
    assert "cluster id mismatch" in wrong.error  # type: ignore[attr-defined]
    assert summary.escalations == ("mirror/eu-west/orders",)
    assert all(link.identical for name, link in links.items() if name != "mirror/eu-west/orders")  # type: ignore[attr-defined]


def test_custom_strategy_gives_up_when_it_should() -> None:
    summary = run_example("custom_strategy")
    assert summary.verified, summary
    breaker = by_name(summary)["breaker/flaky/orders"]
    # max_failures = 3: three failures, two restarts, then the breaker opens.
    assert breaker.escalated and breaker.restarts == 2  # type: ignore[attr-defined]
    assert by_name(summary)["steady/steady/orders"].identical  # type: ignore[attr-defined]


def test_late_joiner_bootstraps_from_the_snapshot() -> None:
    summary = run_example("late_joiner")
    assert summary.verified, summary
    (link,) = summary.links
    assert link.snapshots_installed >= 1 and link.applied_lsn > 2000


def test_the_api_tour_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "api_tour.py")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "hard error (never retried): cluster id mismatch" in done.stdout
    assert done.stdout.strip().endswith("tour done")


def test_the_run_command_prints_a_verified_json_summary() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mirror_actors.cli", "run", str(EXAMPLES / "single_link.toml"),
         "--duration", "2", "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["verified"] and summary["links"][0]["identical"]


def test_the_run_command_without_a_terminal_prints_plain_lines() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mirror_actors.cli", "run", str(EXAMPLES / "single_link.toml"),
         "--duration", "1.5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The first row may come before the replica hears of the first dial (it
    # reports what it knows, it does not ask its link); the summary counts it.
    assert "mirror/us-east/orders" in done.stdout and "attempts=" in done.stdout
    assert "1 dials" in done.stdout
    assert "verified: every mirror equals its source" in done.stdout


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[source]]\ncluster = 'a'\ndatabases = []\n", "source[0].databases"),
        ("[[source]]\ncluster = 'a'\ndatabases = ['x']\nrate = 'fast'\n", "source[0].rate"),
        ("[run]\nduration = 5\nspeed = 2\n", "run.speed"),
    ],
)
def test_a_bad_topology_file_names_the_file_and_the_key_and_starts_nothing(
    tmp_path: Path, text: str, words: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "mirror_actors.cli", "run", str(bad)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert str(bad) in done.stderr and words in done.stderr


def test_ctrl_c_on_run_still_prints_the_summary_and_leaves_nothing_running() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "mirror_actors.cli", "run", str(EXAMPLES / "single_link.toml"),
         "--plain", "--duration", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert "mirror/us-east/orders" in process.stdout.readline()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, err
    assert "(interrupted)" in out and "mirror/us-east/orders" in out
    assert "threads still running" not in err


MISCONFIGURED = """
[run]
description = "one link claims the wrong cluster id and nothing expects it"
duration = 1

[[source]]
cluster = "us-east"
databases = ["orders"]
rate = 20

[[mirror]]
name = "m"
links = [
  { source = "us-east", database = "orders" },
  { source = "us-east", database = "orders", cluster_id = "other", server_name = "us-east" },
]
"""


def test_the_run_command_exits_3_when_a_link_escalates_that_the_file_does_not_expect(
    tmp_path: Path,
) -> None:
    path = tmp_path / "misconfigured.toml"
    path.write_text(MISCONFIGURED)
    done = subprocess.run(
        [sys.executable, "-m", "mirror_actors.cli", "run", str(path), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    summary = json.loads(done.stdout)
    assert summary["unexpected_escalations"] == ["m/other/orders"]
    assert not summary["verified"]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("mirror-actors run:")]
    assert "m/other/orders escalated" in line and "cluster id mismatch" in line
    assert "Traceback" not in done.stderr


def test_the_run_command_names_an_unexpected_escalation_in_the_plain_summary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "misconfigured.toml"
    path.write_text(MISCONFIGURED)
    done = subprocess.run(
        [sys.executable, "-m", "mirror_actors.cli", "run", str(path), "--plain"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "ESCALATED (not in [expect] escalations): m/other/orders: cluster id mismatch" in (
        done.stdout
    )
    assert "NOT VERIFIED" in done.stdout


def test_an_expected_escalation_keeps_the_verification_exit_code() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mirror_actors.cli", "run", str(EXAMPLES / "wrong_cluster_id.toml"),
         "--duration", "1.5", "--plain"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mirror/eu-west/orders" in done.stdout and "escalated (expected)" in done.stdout
    assert "exactly the expected links escalated" in done.stdout


def test_the_run_help_documents_the_exit_codes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mirror_actors.cli", "run", "--help"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "3 a link escalated that [expect] escalations does not list" in text
    assert "an expected escalation" in text and "keeps the verification's exit code" in text


def test_on_divergence_and_max_snapshot_bytes_reach_the_replicas(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """
        [link_defaults]
        max_snapshot_bytes = 4096
        idle_timeout = 2
        [[source]]
        cluster = "us-east"
        databases = ["orders", "users"]
        [[mirror]]
        name = "a"
        on_divergence = "resync"
        links = [{ source = "us-east", database = "orders", max_snapshot_bytes = 1024 }]
        [[mirror]]
        name = "b"
        links = [{ source = "us-east", database = "users" }]
        """
    )
    topology = parse_topology(tomllib.loads(text), "inline.toml", tmp_path)
    run = TopologyRun(topology, workdir=tmp_path / "work")
    try:
        run.start()
        seen: dict[str, tuple[Any, Any]] = {}
        deadline = time.monotonic() + 10
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"replicas not up: {seen}"
            for name in ("a/us-east/orders", "b/us-east/users"):
                ref = run.replica(name)
                if ref is not None and name not in seen:
                    proxy = ref.proxy()
                    seen[name] = (proxy.config.get(timeout=5), proxy.on_divergence.get(timeout=5))
            time.sleep(0.05)
    finally:
        run.stop()
    config_a, divergence_a = seen["a/us-east/orders"]
    config_b, divergence_b = seen["b/us-east/users"]
    assert (divergence_a, divergence_b) == ("resync", "escalate")
    assert (config_a.max_snapshot_bytes, config_b.max_snapshot_bytes) == (1024, 4096)
    assert config_a.idle_timeout == config_b.idle_timeout == 2.0


def test_snapshot_limit_refuses_a_snapshot_too_large_and_the_other_mirror_bootstraps() -> None:
    summary = run_example("snapshot_limit")
    assert summary.verified, summary
    links = by_name(summary)
    small, roomy = links["small/us-east/orders"], links["roomy/us-east/orders"]
    assert small.escalated and small.restarts == 0  # type: ignore[attr-defined]
    assert "max_snapshot_bytes" in small.error  # type: ignore[attr-defined]
    assert roomy.identical and roomy.snapshots_installed >= 1  # type: ignore[attr-defined]
    assert summary.unexpected_escalations == ()
