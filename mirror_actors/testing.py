"""Fault injection for loopback tests: a UDP proxy between mirrors and a source.

Point a link at ``proxy.port`` instead of the source's port; then drop a
fraction of datagrams, delay or reorder them, cut one direction, or black-hole
everything (a partition).  Random choices come from a seeded generator, so a
fault schedule replays the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
from types import TracebackType
from typing import Any, Literal

from attrs import define

Direction = Literal["both", "to_source", "to_mirror"]
START_TIMEOUT_SECONDS = 5.0


@define
class ProxyStats:
    forwarded_to_source: int = 0
    forwarded_to_mirror: int = 0
    dropped: int = 0


@define
class FaultSettings:
    """What the proxy does to traffic now; change it with the proxy's methods."""

    drop_rate: float = 0.0
    delay: float = 0.0
    delay_jitter: float = 0.0
    blocked: frozenset[str] = frozenset()


class _Upstream(asyncio.DatagramProtocol):
    """One mirror's own socket towards the source, so the source sees distinct peers."""

    def __init__(self, proxy: UdpProxy, client: tuple[str, int]) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._forward(data, "to_mirror", self.proxy._send_to_mirror, self.client)


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, proxy: UdpProxy) -> None:
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.proxy._listener = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.proxy._from_mirror(data, addr)


class UdpProxy:
    """A seeded, fault-injecting UDP forwarder on its own loop thread."""

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self._requested_port = port
        self.port = 0
        self.faults = FaultSettings()
        self.stats = ProxyStats()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: asyncio.DatagramTransport | None = None
        self._upstreams: dict[tuple[str, int], _Upstream] = {}

    # -- faults (any thread) --------------------------------------------------------

    def set_drop_rate(self, rate: float) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"drop rate is a fraction in [0, 1], got {rate}")
        with self._lock:
            self.faults.drop_rate = rate

    def set_delay(self, delay: float, jitter: float = 0.0) -> None:
        """Delay every datagram by ``delay`` plus up to ``jitter`` seconds (jitter reorders)."""
        with self._lock:
            self.faults.delay = delay
            self.faults.delay_jitter = jitter

    def block(self, direction: Direction = "both") -> None:
        """Drop everything in ``direction``: both is a partition, one side a one-way cut."""
        with self._lock:
            if direction == "both":
                self.faults.blocked = frozenset({"to_source", "to_mirror"})
            else:
                self.faults.blocked = self.faults.blocked | {direction}

    def unblock(self) -> None:
        with self._lock:
            self.faults.blocked = frozenset()

    def heal(self) -> None:
        """Back to a perfect network."""
        with self._lock:
            self.faults = FaultSettings()

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> UdpProxy:
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="udp-proxy", daemon=True
        )
        self._thread.start()
        self.port = started.result(START_TIMEOUT_SECONDS)
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_SECONDS)
        self._thread = None

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

    def _run(self, started: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                transport, _ = loop.run_until_complete(
                    loop.create_datagram_endpoint(
                        lambda: _Listener(self), local_addr=(self.host, self._requested_port)
                    )
                )
            except BaseException as error:
                started.set_exception(error)
                return
            started.set_result(transport.get_extra_info("sockname")[1])
            loop.run_forever()
        finally:
            if self._listener is not None:
                self._listener.close()
            for upstream in self._upstreams.values():
                if upstream.transport is not None:
                    upstream.transport.close()
            self._upstreams.clear()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def _from_mirror(self, data: bytes, client: tuple[str, int]) -> None:
        upstream = self._upstreams.get(client)
        if upstream is None:
            upstream = self._upstreams[client] = _Upstream(self, client)
            assert self._loop is not None
            self._loop.create_task(self._open_upstream(upstream, data))
            return
        self._forward(data, "to_source", self._send_to_source, upstream)

    async def _open_upstream(self, upstream: _Upstream, first: bytes) -> None:
        assert self._loop is not None
        await self._loop.create_datagram_endpoint(lambda: upstream, remote_addr=self.upstream)
        self._forward(first, "to_source", self._send_to_source, upstream)

    def _forward(self, data: bytes, direction: str, send: Any, target: Any) -> None:
        with self._lock:
            faults = self.faults
            dropped = direction in faults.blocked or (
                faults.drop_rate > 0 and self._random.random() < faults.drop_rate
            )
            delay = faults.delay + (
                self._random.random() * faults.delay_jitter if faults.delay_jitter else 0.0
            )
        if dropped:
            self.stats.dropped += 1
            return
        if direction == "to_source":
            self.stats.forwarded_to_source += 1
        else:
            self.stats.forwarded_to_mirror += 1
        if delay > 0 and self._loop is not None:
            self._loop.call_later(delay, send, data, target)
        else:
            send(data, target)

    def _send_to_source(self, data: bytes, upstream: _Upstream) -> None:
        if upstream.transport is not None and not upstream.transport.is_closing():
            upstream.transport.sendto(data)

    def _send_to_mirror(self, data: bytes, client: tuple[str, int]) -> None:
        if self._listener is not None and not self._listener.is_closing():
            self._listener.sendto(data, client)
