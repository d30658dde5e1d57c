"""Suite-wide fixtures: every test must leave no actor, thread or event loop behind."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator

import pykka
import pytest
from hypothesis import HealthCheck, settings

from mirror_actors.pki import DevPki, generate_dev_pki
from mirror_actors.source import SourceServer, SourceSettings, SourceStore
from tests.helpers import DATABASE, logged, source_server

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

LEAK_GRACE_SECONDS = 5.0


def _live_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves actors or threads running after it returns.

    Threads get a grace period to finish (they may be joining); the wait is on
    their own termination, not a fixed sleep.
    """
    before = _live_threads()
    yield
    leaked_actors = pykka.ActorRegistry.get_all()
    if leaked_actors:
        pykka.ActorRegistry.stop_all()
        pytest.fail(f"test left live actors behind: {leaked_actors}")
    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    extra = _live_threads() - before
    for thread in extra:
        thread.join(max(0.0, deadline - time.monotonic()))
    still = {t for t in _live_threads() - before if t.is_alive()}
    gc.collect()
    if still:
        pytest.fail(f"test left threads behind: {sorted(t.name for t in still)}")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """Dev certificates for the clusters the tests use, made once per run."""
    return generate_dev_pki(tmp_path_factory.mktemp("pki"), ["us-east", "eu-west"])


@pytest.fixture
def source_store() -> SourceStore:
    """The log the ``source`` fixture serves: ``DATABASE``, empty."""
    return SourceStore([DATABASE])


@pytest.fixture
def source_settings() -> SourceSettings | None:
    """The settings the ``source`` fixture runs with; a module overrides this to pin some."""
    return None


@pytest.fixture
def source(
    pki: DevPki, source_store: SourceStore, source_settings: SourceSettings | None
) -> Iterator[SourceServer]:
    """A running ``SourceServer`` for ``CLUSTER``/``DATABASE`` on ``source_store``, stopped after."""
    with source_server(pki, store=source_store, settings=source_settings) as server:
        yield server


@pytest.fixture
def warning_logs() -> Iterator[list[str]]:
    """Every loguru message at WARNING or above while the test runs."""
    with logged("WARNING") as lines:
        yield lines


@pytest.fixture
def error_logs() -> Iterator[list[str]]:
    """The text of every loguru message at ERROR or above while the test runs."""
    with logged("ERROR", format="{message}") as lines:
        yield lines
