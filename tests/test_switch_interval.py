"""serve, mirror and run set a short GIL switch interval by default (issue 13, bench figure 5)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from mirror_actors import cli

CLI = [sys.executable, "-m", "mirror_actors.cli"]


@pytest.fixture
def restore_switch_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


@pytest.mark.parametrize("command", ["serve", "run"])
def test_daemon_commands_default_to_the_short_interval(command: str) -> None:
    args = cli._parse([command, "file.toml"])
    assert args.switch_interval == cli.DEFAULT_SWITCH_INTERVAL == 0.0005


def test_the_interval_is_configurable_and_zero_keeps_cpythons(
    restore_switch_interval: None,
) -> None:
    args = cli._parse(["serve", "file.toml", "--switch-interval", "0.002"])
    cli.apply_switch_interval(args.switch_interval)
    assert sys.getswitchinterval() == pytest.approx(0.002)
    cli.apply_switch_interval(cli._parse(["run", "x.toml", "--switch-interval", "0"]).switch_interval)
    assert sys.getswitchinterval() == pytest.approx(0.002)  # left as it was


@pytest.mark.parametrize("value", ["-1", "nan", "2", "fast"])
def test_a_bad_interval_is_one_line_and_exit_2(value: str) -> None:
    done = subprocess.run(
        [*CLI, "serve", "file.toml", "--switch-interval", value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--switch-interval" in lines[0], done.stderr
