"""Fault injection for loopback tests: a UDP proxy between mirrors and a source.

Point a link at ``proxy.port`` instead of the source's port; then drop a
fraction of datagrams (in both directions or one), delay them, reorder them
(delay jitter: a datagram delayed longer is overtaken by the ones after it),
cut one direction, or black-hole everything for a while (a partition).

Random choices come from generators seeded by ``seed``: one per direction for
drops and one per direction for delays, so the n-th datagram in a direction is
dropped or not regardless of what the other direction or the delay settings
did.  The same seed and the same sequence of datagrams give the same faults, so
a failing fault schedule can be replayed.

    with UdpProxy(source.port, seed=7) as proxy:
        link = SourceLink.start(LinkConfig(..., port=proxy.port))
        proxy.set_drop_rate(0.05)          # lossy, both directions
        proxy.block()                      # partition
        proxy.unblock()
        proxy.block("to_mirror")           # the source's replies vanish
        proxy.partition(0.5)               # black hole for 0.5 s, then heal itself
        proxy.heal()                       # a perfect network again

The proxy opens one upstream socket per mirror address.  One whose mirror
address has been silent in both directions (nothing from the mirror, nothing
from the source for it) for ``upstream_idle_timeout`` seconds is closed and
forgotten, so a long run with many short-lived connections does not pile up
sockets; ``upstream_count`` is how many are open.  A datagram from the mirror
counts as activity even when a fault drops it, so a partition never reaps a
mirror that is still trying to get through.  Keep the timeout well above the
QUIC idle timeouts in use.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Literal

from attrs import define, field

from mirror_actors.loop_thread import LoopThread

Direction = Literal["both", "to_source", "to_mirror"]
DIRECTIONS: tuple[str, str] = ("to_source", "to_mirror")
# Datagrams a mirror sends while its upstream socket is still being opened.
MAX_EARLY_DATAGRAMS = 64
# An upstream socket silent for this long in both directions is closed.  Well
# above the QUIC idle timeouts tests use (about 5 s), so a live but quiet link,
# or one waiting out a cut, keeps its socket.
DEFAULT_UPSTREAM_IDLE_TIMEOUT = 30.0


def _directions(direction: Direction) -> tuple[str, ...]:
    if direction == "both":
        return DIRECTIONS
    if direction not in DIRECTIONS:
        raise ValueError(f"direction is 'both', 'to_source' or 'to_mirror', got {direction!r}")
    return (direction,)


def _fraction(rate: float) -> float:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop rate is a fraction in [0, 1], got {rate}")
    return rate


@define
class ProxyStats:
    """Datagram counts since start (or ``reset_stats``); ``dropped`` counts every cause."""

    forwarded_to_source: int = 0
    forwarded_to_mirror: int = 0
    dropped: int = 0
    dropped_to_source: int = 0
    dropped_to_mirror: int = 0
    blocked: int = 0  # dropped because the direction was blocked (part of ``dropped``)
    delayed: int = 0  # forwarded later than received
    peers: int = 0  # upstream sockets opened: one per mirror address, again after a reap
    reaped: int = 0  # upstream sockets closed because their mirror address went idle

    def count(self, direction: str, *, dropped: bool) -> None:
        if dropped:
            self.dropped += 1
            if direction == "to_source":
                self.dropped_to_source += 1
            else:
                self.dropped_to_mirror += 1
        elif direction == "to_source":
            self.forwarded_to_source += 1
        else:
            self.forwarded_to_mirror += 1


@define
class FaultSettings:
    """What the proxy does to traffic now; change it with the proxy's methods.

    ``drop_rate`` applies to both directions; ``drop_rates`` holds per-direction
    rates that override it.
    """

    drop_rate: float = 0.0
    delay: float = 0.0
    delay_jitter: float = 0.0
    blocked: frozenset[str] = frozenset()
    drop_rates: dict[str, float] = field(factory=dict)

    def rate(self, direction: str) -> float:
        return self.drop_rates.get(direction, self.drop_rate)


class _Upstream(asyncio.DatagramProtocol):
    """One mirror's own socket towards the source, so the source sees distinct peers."""

    def __init__(self, proxy: UdpProxy, client: tuple[str, int]) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.early: list[bytes] = []  # sent by the mirror before the socket was open
        self.last_active = 0.0  # loop time of the last datagram either way
        self.closed = False  # reaped or released: forgotten by the proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.last_active = self.proxy._loop_thread.loop.time()
        self.proxy._forward(data, "to_mirror", self.proxy._send_to_mirror, self.client)

    def close(self) -> None:
        self.closed = True
        self.early.clear()
        if self.transport is not None:
            self.transport.close()


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, proxy: UdpProxy) -> None:
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.proxy._listener = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._from_mirror(data, addr)


class UdpProxy:
    """A seeded, fault-injecting UDP forwarder on its own loop thread.

    Every method may be called from any thread.  ``start()`` returns once the
    proxy listens (``port`` is then its port); ``stop()`` closes every socket and
    joins the thread.  Datagrams still waiting out a delay at ``stop()`` are lost,
    as they would be on a real network.

    ``upstream_idle_timeout`` (seconds, > 0) is how long a mirror address may be
    silent in both directions before its upstream socket is closed; ``None``
    keeps every upstream socket until ``stop()``.
    """

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        upstream_idle_timeout: float | None = DEFAULT_UPSTREAM_IDLE_TIMEOUT,
    ) -> None:
        if upstream_idle_timeout is not None and not upstream_idle_timeout > 0:
            raise ValueError(
                f"upstream_idle_timeout is seconds > 0 or None, got {upstream_idle_timeout}"
            )
        self.upstream = (upstream_host, upstream_port)
        self.upstream_idle_timeout = upstream_idle_timeout
        self.host = host
        self.seed = seed
        self._requested_port = port
        self.port = 0
        self.faults = FaultSettings()
        self.stats = ProxyStats()
        self._drop_random = {d: random.Random(f"{seed}/drop/{d}") for d in DIRECTIONS}
        self._delay_random = {d: random.Random(f"{seed}/delay/{d}") for d in DIRECTIONS}
        self._lock = threading.Lock()
        self._loop_thread = LoopThread("udp-proxy")
        self._listener: asyncio.DatagramTransport | None = None
        self._upstreams: dict[tuple[str, int], _Upstream] = {}
        self._heal_timer: asyncio.TimerHandle | None = None
        self._reap_timer: asyncio.TimerHandle | None = None

    # -- faults (any thread) --------------------------------------------------------

    def set_drop_rate(self, rate: float, direction: Direction = "both") -> None:
        """Drop each datagram in ``direction`` with probability ``rate`` (seeded)."""
        rate = _fraction(rate)
        with self._lock:
            if direction == "both":
                self.faults.drop_rate = rate
                self.faults.drop_rates = {}
            else:
                (one,) = _directions(direction)
                self.faults.drop_rates = {**self.faults.drop_rates, one: rate}

    def set_delay(self, delay: float, jitter: float = 0.0) -> None:
        """Delay every datagram by ``delay`` plus up to ``jitter`` seconds (jitter reorders)."""
        if delay < 0 or jitter < 0:
            raise ValueError(f"delay and jitter are seconds >= 0, got {delay} and {jitter}")
        with self._lock:
            self.faults.delay = delay
            self.faults.delay_jitter = jitter

    def block(self, direction: Direction = "both") -> None:
        """Drop everything in ``direction``: both is a partition, one side a one-way cut."""
        blocked = _directions(direction)
        with self._lock:
            self.faults.blocked = self.faults.blocked | set(blocked)

    def unblock(self, direction: Direction = "both") -> None:
        """Let ``direction`` through again (both by default); drop rates and delays stay."""
        unblocked = _directions(direction)
        with self._lock:
            self.faults.blocked = self.faults.blocked - set(unblocked)
            self._cancel_heal_timer()

    def partition(self, seconds: float, direction: Direction = "both") -> None:
        """Block ``direction`` now and unblock it after ``seconds`` (timed on the proxy's loop)."""
        if not self._loop_thread.running:
            raise RuntimeError("start the proxy before scheduling a partition")
        loop = self._loop_thread.loop
        self.block(direction)

        def schedule() -> None:
            with self._lock:
                self._cancel_heal_timer()
                self._heal_timer = loop.call_later(seconds, self.unblock, direction)

        loop.call_soon_threadsafe(schedule)

    def heal(self) -> None:
        """Back to a perfect network: no drops, no delay, nothing blocked."""
        with self._lock:
            self.faults = FaultSettings()
            self._cancel_heal_timer()

    @property
    def blocked(self) -> frozenset[str]:
        with self._lock:
            return self.faults.blocked

    @property
    def upstream_count(self) -> int:
        """Upstream sockets open (or opening) now: one per mirror address not yet reaped."""
        return len(self._upstreams)

    def reset_stats(self) -> ProxyStats:
        """Start counting afresh; returns the counts so far."""
        with self._lock:
            old, self.stats = self.stats, ProxyStats(peers=self.stats.peers)
        return old

    def _cancel_heal_timer(self) -> None:
        # Called with the lock held.
        if self._heal_timer is not None:
            self._heal_timer.cancel()
            self._heal_timer = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> UdpProxy:
        if self._loop_thread.running:
            return self
        self._loop_thread = LoopThread("udp-proxy")
        self.port = self._loop_thread.start(self._listen)
        return self

    def stop(self) -> None:
        """Close every socket and join the loop thread (idempotent)."""
        self._loop_thread.stop(teardown=self._release)

    def __enter__(self) -> UdpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- loop thread ----------------------------------------------------------------

    async def _listen(self) -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Listener(self), local_addr=(self.host, self._requested_port)
        )
        port: int = transport.get_extra_info("sockname")[1]
        self._schedule_reap(loop)
        return port

    def _release(self) -> None:
        with self._lock:
            self._cancel_heal_timer()
        if self._reap_timer is not None:
            self._reap_timer.cancel()
            self._reap_timer = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for upstream in self._upstreams.values():
            upstream.close()
        self._upstreams.clear()

    def _schedule_reap(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.upstream_idle_timeout is not None:
            # Checking twice per timeout reaps within 1.5 timeouts of the last datagram.
            self._reap_timer = loop.call_later(self.upstream_idle_timeout / 2, self._reap)

    def _reap(self) -> None:
        """Close the upstream sockets of mirror addresses silent for the idle timeout."""
        assert self.upstream_idle_timeout is not None
        loop = self._loop_thread.loop
        idle_since = loop.time() - self.upstream_idle_timeout
        idle = [c for c, u in self._upstreams.items() if u.last_active < idle_since]
        for client in idle:
            self._upstreams.pop(client).close()
        if idle:
            with self._lock:
                self.stats.reaped += len(idle)
        self._schedule_reap(loop)

    def _from_mirror(self, data: bytes, client: tuple[str, int]) -> None:
        loop = self._loop_thread.loop
        upstream = self._upstreams.get(client)
        if upstream is None:
            upstream = self._upstreams[client] = _Upstream(self, client)
            with self._lock:
                self.stats.peers += 1
            loop.create_task(self._open_upstream(upstream))
        # Heard from the mirror, even if a fault drops the datagram: a mirror
        # knocking on a partition is alive and must keep its socket.
        upstream.last_active = loop.time()
        self._forward(data, "to_source", self._send_to_source, upstream)

    async def _open_upstream(self, upstream: _Upstream) -> None:
        try:
            await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: upstream, remote_addr=self.upstream
            )
        except OSError:
            upstream.early.clear()  # unreachable upstream: as good as dropped
            return
        if upstream.closed:  # reaped or released while it was opening
            upstream.close()
            return
        early, upstream.early = upstream.early, []
        for data in early:
            self._send_to_source(data, upstream)

    def _forward(
        self,
        data: bytes,
        direction: str,
        send: Callable[[bytes, object], None],
        target: object,
    ) -> None:
        with self._lock:
            faults = self.faults
            blocked = direction in faults.blocked
            rate = faults.rate(direction)
            # Draw for every datagram, blocked or not, so the n-th datagram's fate
            # does not depend on when a partition happened to start.
            draw = self._drop_random[direction].random()
            dropped = blocked or (rate > 0 and draw < rate)
            delay = faults.delay
            if faults.delay_jitter:
                delay += self._delay_random[direction].random() * faults.delay_jitter
            stats = self.stats
            stats.count(direction, dropped=dropped)
            if blocked:
                stats.blocked += 1
            elif delay > 0:
                stats.delayed += 1
        if dropped:
            return
        if delay > 0:
            self._loop_thread.loop.call_later(delay, send, data, target)
        else:
            send(data, target)

    def _send_to_source(self, data: bytes, upstream: object) -> None:
        assert isinstance(upstream, _Upstream)
        transport = upstream.transport
        if upstream.closed:
            return  # reaped while this datagram waited out a delay
        if transport is None:
            if len(upstream.early) < MAX_EARLY_DATAGRAMS:
                upstream.early.append(data)
        elif not transport.is_closing():
            transport.sendto(data)

    def _send_to_mirror(self, data: bytes, client: object) -> None:
        assert isinstance(client, tuple)
        if self._listener is not None and not self._listener.is_closing():
            self._listener.sendto(data, client)
