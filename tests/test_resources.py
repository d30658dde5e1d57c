"""Resources, shutdown and detection times, on the real clock.

Cycles and restarts must leave threads, file descriptors and memory where they
started; stopping a root supervisor with 100 live links must be quick and
leave nothing behind; and a link must notice a closing source, a silent
partition and a source that is back within the bounds issue 6 states.  Every
wait is on a condition with a timeout, never a fixed sleep; the measured
numbers are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from mirror_actors import Connect, Disconnect, SourceLink
from mirror_actors.faults import UdpProxy
from mirror_actors.link import LinkDown, LinkState, LinkUp
from mirror_actors.link.loop import QuicLoop
from mirror_actors.pki import DevPki
from mirror_actors.source import SourceServer
from mirror_actors.wire import ErrorCode, HelloAck, encode_frame
from supervisors import ChildSpec, ExponentialBackoff, Supervisor
from tests.helpers import (
    CLUSTER,
    MiB,
    child_refs,
    children,
    config_for,
    link_status,
    open_fds,
    resident_bytes,
    source_server,
    thread_names,
    wait_until,
)
from tests.rogue_source import rogue

# asyncio's default executor (getaddrinfo for each dial) keeps a bounded pool of
# idle "asyncio_N" threads while the QUIC loop lives; it is not a per-dial leak.
EXECUTOR_LIMIT = min(32, (os.cpu_count() or 1) + 4)


def executor_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("asyncio_"))


def settled_threads(timeout: float = 1.0) -> list[str]:
    """All thread names once threads that are ending have ended (joined, up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith("asyncio_"):
            thread.join(max(0.0, deadline - time.monotonic()))
    return thread_names()


def rss() -> int:
    """Resident set size in bytes, after a full collection."""
    gc.collect()
    return resident_bytes()


def socket_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass  # closed meanwhile (the listdir fd itself)
    return count


class Events:
    """LinkUp/LinkDown arrivals, timestamped by the watcher actor as they arrive."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, Any]] = []
        self.changed = threading.Condition()

    def add(self, kind: str, at: float, error: Any) -> None:
        with self.changed:
            self.events.append((kind, at, error))
            self.changed.notify_all()


class Watcher(pykka.ThreadingActor):
    def __init__(self, events: Events) -> None:
        super().__init__()
        self.events = events

    def on_receive(self, message: Any) -> Any:
        now = time.monotonic()
        if isinstance(message, LinkUp):
            self.events.add("up", now, None)
        elif isinstance(message, LinkDown):
            self.events.add("down", now, message.error)
        return None


def first_after(watcher: Events, kind: str, since: float, timeout: float) -> tuple[float, Any]:
    """The time (and error) of the first ``kind`` event at or after ``since``."""

    def found() -> tuple[float, Any] | None:
        for event_kind, at, error in watcher.events:
            if event_kind == kind and at >= since:
                return at, error
        return None

    with watcher.changed:
        watcher.changed.wait_for(lambda: found() is not None, timeout)
        result = found()
    assert result is not None, f"no link {kind} within {timeout} s"
    return result


@pytest.fixture
def watcher() -> Iterator[tuple[pykka.ActorRef[Any], Events]]:
    events = Events()
    ref = Watcher.start(events)
    yield ref, events
    ref.stop()


# -- cycles and restarts -------------------------------------------------------------------


def test_a_thousand_connect_disconnect_cycles_leave_nothing_behind(
    pki: DevPki, source: SourceServer
) -> None:
    link = SourceLink.start(config_for(pki, source.port))
    try:
        # Warm-up: caches, lazily created objects, and the allocator's arenas (RSS
        # climbs ~10 MiB over the first few hundred TLS handshakes, then stays flat).
        for _ in range(400):
            link.ask(Connect())
            link.ask(Disconnect())
        wait_until(lambda: not source.connections(), what="the source to drop warm-up connections")
        threads, fds, memory = thread_names(executor_pool=False), open_fds(), rss()
        started = time.monotonic()
        for _ in range(1000):
            link.ask(Connect())
            link.ask(Disconnect())
        elapsed = time.monotonic() - started
        wait_until(lambda: not source.connections(), what="the source to drop closed ones")
        grown = rss() - memory
        print(
            f"\n1000 connect/disconnect cycles in {elapsed:.1f} s: threads "
            f"{len(threads)}->{len(thread_names(executor_pool=False))}, fds {fds}->{open_fds()}, "
            f"RSS {grown / MiB:+.1f} MiB"
        )
        assert thread_names(executor_pool=False) == threads
        assert executor_threads() <= EXECUTOR_LIMIT
        assert open_fds() <= fds
        assert grown < 4 * MiB, f"RSS grew by {grown / MiB:.1f} MiB over 1000 cycles"
    finally:
        link.stop()
    assert QuicLoop.users() == 0


def test_a_thousand_supervised_restarts_leave_nothing_behind(pki: DevPki) -> None:
    fast = ExponentialBackoff(base=0.001, max_delay=0.001, jitter=0, random=random.Random(0))
    # Every HELLO is answered with SOURCE_SHUTDOWN: the link fails and restarts.
    reject = encode_frame(HelloAck.reject(CLUSTER, ErrorCode.SOURCE_SHUTDOWN, "going away again"))
    with rogue(pki, lambda hello: reject) as source:
        config = config_for(pki, source.port)
        supervisor = Supervisor.start(
            strategy=fast,
            children=[ChildSpec("link", lambda parent: SourceLink.start(config, parent=parent))],
        )
        try:

            def restarts() -> int:
                (child,) = children(supervisor)
                count: int = child.restarts
                return count

            wait_until(lambda: restarts() >= 300, timeout=30, what="300 warm-up restarts")
            threads, fds, memory = thread_names(executor_pool=False), open_fds(), rss()
            first = restarts()
            started = time.monotonic()
            wait_until(lambda: restarts() >= first + 1000, timeout=60, what="1000 restarts")
            elapsed = time.monotonic() - started
            grown = rss() - memory
            (link,) = child_refs(supervisor)
            error = link_status(link).last_error
            print(
                f"\n1000 supervised restarts in {elapsed:.1f} s: threads "
                f"{len(threads)}->{len(thread_names(executor_pool=False))}, fds {fds}->{open_fds()}, "
                f"RSS {grown / MiB:+.1f} MiB"
            )
            assert type(error).__name__ == "SourceShutdown"
            assert thread_names(executor_pool=False) == threads
            assert executor_threads() <= EXECUTOR_LIMIT
            # A dial may be in progress at either measurement: one socket of slack.
            assert open_fds() <= fds + 1
            assert grown < 4 * MiB, f"RSS grew by {grown / MiB:.1f} MiB over 1000 restarts"
        finally:
            supervisor.stop()
    assert QuicLoop.users() == 0


# -- shutdown ------------------------------------------------------------------------------


def test_stopping_a_root_supervisor_with_100_live_links(pki: DevPki, source: SourceServer) -> None:
    threads, fds, sockets = settled_threads(), open_fds(), socket_fds()
    config = config_for(pki, source.port, handshake_timeout=10.0)
    supervisor = Supervisor.start(
        strategy=ExponentialBackoff(base=0.05, random=random.Random(0)),
        children=[
            ChildSpec(f"link-{i}", lambda parent: SourceLink.start(config, parent=parent))
            for i in range(100)
        ],
    )
    try:
        links = child_refs(supervisor)
        wait_until(
            lambda: all(link_status(link).state is LinkState.CONNECTED for link in links),
            timeout=30,
            what="100 connected links",
        )
        wait_until(lambda: len(source.connections()) == 100, what="100 connections at the source")
        assert QuicLoop.users() == 100
    finally:
        started = time.monotonic()
        supervisor.stop()
        elapsed = time.monotonic() - started
    print(f"\nroot supervisor with 100 live links stopped in {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0
    assert QuicLoop.users() == 0
    assert thread_names(executor_pool=False) == threads, "a thread outlived the supervisor"
    # The loop's idle executor threads were told to exit when it closed; they are gone at once.
    assert settled_threads(timeout=0.5) == threads
    assert socket_fds() == sockets and open_fds() == fds, "a socket outlived the supervisor"
    wait_until(lambda: not source.connections(), what="the source to see every link close")


# -- detection -----------------------------------------------------------------------------


def test_a_closing_source_is_noticed_in_under_100_ms(
    pki: DevPki, watcher: tuple[Any, Events]
) -> None:
    ref, events = watcher
    server = source_server(pki).start()
    link = SourceLink.start(config_for(pki, server.port), watcher=ref)
    try:
        link.ask(Connect())
        started = time.monotonic()
        server.stop()  # returns once the closes went out and the loop stopped
        down, error = first_after(events, "down", started, timeout=2.0)
    finally:
        link.stop()
        server.stop()
    elapsed = down - started
    print(f"\nclosing source noticed {elapsed * 1000:.1f} ms after stop() began")
    assert type(error).__name__ == "SourceShutdown"
    assert elapsed < 0.1


def test_a_silent_partition_is_noticed_within_idle_timeout_plus_ten_percent(
    pki: DevPki, source: SourceServer, watcher: tuple[Any, Events]
) -> None:
    ref, events = watcher
    idle_timeout = 1.0
    with UdpProxy(source.port, seed=1) as proxy:
        link = SourceLink.start(
            config_for(pki, proxy.port, idle_timeout=idle_timeout, keepalive_interval=0.2),
            watcher=ref,
        )
        try:
            link.ask(Connect())
            started = time.monotonic()
            proxy.block()
            down, error = first_after(events, "down", started, timeout=3 * idle_timeout)
        finally:
            link.stop()
    elapsed = down - started
    print(
        f"\nsilent partition noticed after {elapsed:.3f} s "
        f"(idle_timeout {idle_timeout} s, bound {idle_timeout * 1.1:.2f} s)"
    )
    assert "silent" in str(error)
    # Never early by more than the keepalive interval (the last PING answer
    # may have come up to one interval before the block), never late.
    assert idle_timeout - 0.2 - 0.05 <= elapsed <= idle_timeout * 1.1


def test_a_source_reachable_again_is_back_within_the_backoff_delay_plus_one_handshake(
    pki: DevPki, source: SourceServer, watcher: tuple[Any, Events]
) -> None:
    ref, events = watcher
    with UdpProxy(source.port, seed=2) as proxy:
        config = config_for(
            pki, proxy.port, idle_timeout=0.5, keepalive_interval=0.1, handshake_timeout=0.3
        )
        # One unhindered handshake through the proxy, for scale.
        probe = SourceLink.start(config)
        try:
            before = time.monotonic()
            probe.ask(Connect())
            handshake = time.monotonic() - before
        finally:
            probe.stop()
        strategy = ExponentialBackoff(
            base=0.2, factor=2.0, max_delay=5.0, jitter=0, random=random.Random(0)
        )
        supervisor = Supervisor.start(
            strategy=strategy,
            children=[
                ChildSpec(
                    "link", lambda parent: SourceLink.start(config, parent=parent, watcher=ref)
                )
            ],
        )
        try:
            first_after(events, "up", 0.0, timeout=5.0)
            (link,) = child_refs(supervisor)
            proxy.block()
            # Silence (failure 1), then dials that time out while blocked (2, 3).
            wait_until(
                lambda: (
                    link_status(link).consecutive_failures >= 3
                    and link_status(link).state is LinkState.DISCONNECTED
                ),
                timeout=10,
                what="three failures in a row",
            )
            (child,) = children(supervisor)
            delay = child.next_restart_in
            assert delay is not None, "a restart must be pending"
            nominal = 0.2 * 2 ** (child.consecutive_failures - 1)
            proxy.unblock()
            reachable = time.monotonic()
            back, _ = first_after(events, "up", reachable, timeout=10.0)
        finally:
            supervisor.stop()
    elapsed = back - reachable
    print(
        f"\nback {elapsed * 1000:.0f} ms after the source became reachable "
        f"(pending backoff {delay * 1000:.0f} ms of nominal {nominal * 1000:.0f} ms, "
        f"first handshake took {handshake * 1000:.0f} ms)"
    )
    one_handshake = 0.15  # a loopback QUIC+TLS handshake plus HELLO, with CI slack
    assert elapsed <= delay + one_handshake
