"""The fault-injecting UDP proxy: forwards, drops (seeded), delays, reorders, blocks, heals, stops."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mirror_actors import Connect, Entries, SourceLink, Subscribe
from mirror_actors.faults import UdpProxy
from mirror_actors.pki import DevPki
from mirror_actors.source import SourceServer
from tests.helpers import WAIT, config_for, open_fds, open_stream, wait_until


class EchoServer:
    """A plain UDP upstream that records every datagram and echoes it back."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.02)
        self.port = self.socket.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, address = self.socket.recvfrom(65536)
            except TimeoutError:
                continue
            self.received.append(data)
            self.socket.sendto(data, address)

    def __enter__(self) -> EchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self.socket.close()


class Client:
    def __init__(self, port: int) -> None:
        self.port = port
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))

    def send(self, data: bytes) -> None:
        self.socket.sendto(data, ("127.0.0.1", self.port))

    def recv(self, timeout: float = WAIT) -> bytes | None:
        self.socket.settimeout(timeout)
        try:
            return self.socket.recv(65536)
        except TimeoutError:
            return None

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


@pytest.fixture
def client() -> Iterator[Any]:
    clients: list[Client] = []

    def make(port: int) -> Client:
        clients.append(Client(port))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def numbered(count: int) -> list[bytes]:
    return [b"%05d" % i for i in range(count)]


def push(proxy: UdpProxy, client: Client, datagrams: list[bytes], batch: int = 16) -> None:
    """Send datagrams in small batches (no socket buffer overflows), each seen by the proxy."""
    seen = proxy.stats.forwarded_to_source + proxy.stats.dropped_to_source
    for start in range(0, len(datagrams), batch):
        chunk = datagrams[start : start + batch]
        for data in chunk:
            client.send(data)
        seen += len(chunk)
        wait_until(
            lambda n=seen: proxy.stats.forwarded_to_source + proxy.stats.dropped_to_source >= n,
            what="the proxy to see every datagram",
        )


def test_forwards_both_ways_and_keeps_peers_apart(echo: EchoServer, client: Any) -> None:
    with UdpProxy(echo.port) as proxy:
        first, second = client(proxy.port), client(proxy.port)
        first.send(b"one")
        second.send(b"two")
        assert first.recv() == b"one"
        assert second.recv() == b"two"
        assert proxy.stats.peers == 2
        assert (proxy.stats.forwarded_to_source, proxy.stats.forwarded_to_mirror) == (2, 2)
        assert proxy.stats.dropped == 0


def drops_with(echo: EchoServer, client: Any, seed: int, rate: float) -> list[bytes]:
    echo.received.clear()
    datagrams = numbered(400)
    with UdpProxy(echo.port, seed=seed) as proxy:
        proxy.set_drop_rate(rate, "to_source")
        sender = client(proxy.port)
        push(proxy, sender, datagrams)
        wait_until(lambda: len(echo.received) >= proxy.stats.forwarded_to_source)
        assert proxy.stats.dropped_to_source == len(datagrams) - len(echo.received)
    return [d for d in datagrams if d not in set(echo.received)]


def test_drops_a_seeded_fraction_and_the_same_seed_drops_the_same(
    echo: EchoServer, client: Any
) -> None:
    first = drops_with(echo, client, seed=11, rate=0.3)
    again = drops_with(echo, client, seed=11, rate=0.3)
    other = drops_with(echo, client, seed=12, rate=0.3)
    assert first == again, "the same seed must drop the same datagrams"
    assert first != other
    assert 0.2 * 400 <= len(first) <= 0.4 * 400


def test_a_drop_rate_for_one_direction_spares_the_other(echo: EchoServer, client: Any) -> None:
    with UdpProxy(echo.port) as proxy:
        proxy.set_drop_rate(1.0, "to_mirror")
        sender = client(proxy.port)
        push(proxy, sender, numbered(20))
        wait_until(lambda: len(echo.received) == 20, what="all datagrams upstream")
        wait_until(lambda: proxy.stats.dropped_to_mirror == 20, what="all echoes dropped")
        assert sender.recv(timeout=0.2) is None
        proxy.set_drop_rate(0.0, "to_mirror")
        sender.send(b"back")
        assert sender.recv() == b"back"


def test_delay_holds_datagrams_back(echo: EchoServer, client: Any) -> None:
    with UdpProxy(echo.port) as proxy:
        sender = client(proxy.port)
        sender.send(b"warm-up")  # opens the upstream socket
        assert sender.recv() == b"warm-up"
        proxy.set_delay(0.15)
        started = time.monotonic()
        sender.send(b"slow")
        assert sender.recv() == b"slow"
        assert time.monotonic() - started >= 0.3, "delayed on the way there and back"
        assert proxy.stats.delayed == 2


def test_jitter_reorders(echo: EchoServer, client: Any) -> None:
    with UdpProxy(echo.port, seed=3) as proxy:
        sender = client(proxy.port)
        sender.send(b"warm-up")
        assert sender.recv() == b"warm-up"
        echo.received.clear()
        proxy.set_delay(0.0, jitter=0.1)
        datagrams = numbered(50)
        push(proxy, sender, datagrams)
        wait_until(lambda: len(echo.received) == 50, what="every datagram upstream")
    assert sorted(echo.received) == datagrams, "nothing lost"
    assert echo.received != datagrams, "but not in order"


def test_block_both_directions_is_a_partition_and_unblock_ends_it(
    echo: EchoServer, client: Any
) -> None:
    with UdpProxy(echo.port) as proxy:
        sender = client(proxy.port)
        proxy.block()
        assert proxy.blocked == {"to_source", "to_mirror"}
        push(proxy, sender, numbered(5))
        assert echo.received == [] and proxy.stats.blocked == 5
        proxy.unblock()
        sender.send(b"after")
        assert sender.recv() == b"after"


def test_block_one_direction_cuts_only_that_way(echo: EchoServer, client: Any) -> None:
    with UdpProxy(echo.port) as proxy:
        sender = client(proxy.port)
        proxy.block("to_mirror")
        sender.send(b"there")
        wait_until(lambda: echo.received == [b"there"], what="the datagram upstream")
        wait_until(lambda: proxy.stats.dropped_to_mirror == 1, what="its echo dropped")
        proxy.unblock("to_mirror")
        proxy.block("to_source")
        push(proxy, sender, [b"lost"])
        assert echo.received == [b"there"]
        assert proxy.stats.dropped_to_source == 1
        proxy.unblock()
        sender.send(b"fine")
        assert sender.recv() == b"fine"


def test_a_timed_partition_heals_itself(echo: EchoServer, client: Any) -> None:
    with UdpProxy(echo.port) as proxy:
        sender = client(proxy.port)
        started = time.monotonic()
        proxy.partition(0.2)
        assert proxy.blocked
        wait_until(lambda: not proxy.blocked, what="the partition to heal")
        assert time.monotonic() - started >= 0.19
        sender.send(b"healed")
        assert sender.recv() == b"healed"


def test_heal_clears_every_fault(echo: EchoServer, client: Any) -> None:
    with UdpProxy(echo.port) as proxy:
        proxy.set_drop_rate(1.0)
        proxy.set_delay(5.0, 1.0)
        proxy.block("to_source")
        proxy.heal()
        sender = client(proxy.port)
        sender.send(b"ok")
        assert sender.recv(timeout=1.0) == b"ok"


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("set_drop_rate", (1.5,)),
        ("set_drop_rate", (-0.1,)),
        ("set_drop_rate", (0.5, "sideways")),
        ("set_delay", (-1.0,)),
        ("block", ("sideways",)),
    ],
)
def test_bad_settings_are_refused(call: str, args: tuple[Any, ...]) -> None:
    proxy = UdpProxy(9)
    with pytest.raises(ValueError):
        getattr(proxy, call)(*args)


def test_stop_releases_thread_sockets_and_port(echo: EchoServer, client: Any) -> None:
    fds = open_fds()
    threads = threading.active_count()
    proxy = UdpProxy(echo.port).start()
    port = proxy.port
    sender = client(port)
    proxy.set_delay(1.0)  # a datagram still waiting at stop() is simply lost
    sender.send(b"in flight")
    wait_until(lambda: proxy.stats.delayed == 1)
    proxy.stop()
    proxy.stop()  # idempotent
    assert threading.active_count() == threads
    assert open_fds() == fds + 1  # the test's own client socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", port))  # the proxy let go of its port


def test_a_link_replicates_through_a_lossy_reordering_proxy(
    pki: DevPki, source: SourceServer
) -> None:
    with UdpProxy(source.port, seed=5) as proxy:
        proxy.set_drop_rate(0.05)
        proxy.set_delay(0.001, jitter=0.004)
        link = SourceLink.start(config_for(pki, proxy.port, handshake_timeout=5.0))
        try:
            link.ask(Connect())
            for i in range(200):
                source.append("orders", b"e%d" % i)
            with open_stream(link) as stream:
                stream.send(Subscribe(1))
                got: list[bytes] = []
                while len(got) < 200:
                    frame = stream.recv(timeout=WAIT)
                    assert isinstance(frame, Entries)
                    got.extend(e.data for e in frame.entries)
                    stream.ack(frame.last_lsn)
        finally:
            link.stop()
    assert got == [b"e%d" % i for i in range(200)]
    assert proxy.stats.dropped > 0


IDLE = 0.2  # a short upstream idle timeout, so reaping shows within a test


def test_idle_upstream_sockets_are_reaped_and_fds_drop_back(echo: EchoServer) -> None:
    with UdpProxy(echo.port, upstream_idle_timeout=IDLE) as proxy:
        assert proxy.upstream_count == 0
        fds = open_fds()
        peak = 0
        addresses = set()
        for i in range(150):
            short_lived = Client(proxy.port)
            try:
                addresses.add(short_lived.socket.getsockname())
                short_lived.send(b"hello %d" % i)
                assert short_lived.recv() == b"hello %d" % i
                peak = max(peak, proxy.upstream_count)
            finally:
                short_lived.close()
        # The kernel may hand a closed client's port to a later one: the same
        # address to the proxy, so it shares the not-yet-reaped upstream socket.
        assert proxy.stats.peers >= len(addresses) > 100
        assert peak > 1, "upstream sockets pile up until they are reaped"
        wait_until(lambda: proxy.upstream_count == 0, what="every idle upstream reaped")
        assert proxy.stats.reaped == proxy.stats.peers
        wait_until(lambda: open_fds() <= fds, what="the reaped sockets' fds released")


def test_a_live_client_keeps_its_socket_across_reap_cycles(echo: EchoServer, client: Any) -> None:
    with UdpProxy(echo.port, upstream_idle_timeout=IDLE) as proxy:
        live, quiet = client(proxy.port), client(proxy.port)
        quiet.send(b"once")
        assert quiet.recv() == b"once"
        reaped = proxy.stats.reaped
        n = 0
        # Keep talking until the quiet one has been reaped and one more reap cycle ran.
        deadline = time.monotonic() + WAIT
        while proxy.stats.reaped == reaped or n < 2 * IDLE / 0.02:
            assert time.monotonic() < deadline, "the quiet client was never reaped"
            live.send(b"ping %d" % n)
            assert live.recv() == b"ping %d" % n
            n += 1
            time.sleep(0.02)  # pacing, not synchronisation
        assert proxy.stats.reaped == reaped + 1
        assert proxy.upstream_count == 1
        assert proxy.stats.peers == 2, "the live client's upstream socket was never replaced"
        live.send(b"still here")
        assert live.recv() == b"still here"


def test_a_client_knocking_on_a_partition_is_not_reaped(echo: EchoServer, client: Any) -> None:
    with UdpProxy(echo.port, upstream_idle_timeout=IDLE) as proxy:
        knocking, quiet = client(proxy.port), client(proxy.port)
        for sender in (knocking, quiet):
            sender.send(b"hi")
            assert sender.recv() == b"hi"
        proxy.block()
        deadline = time.monotonic() + WAIT
        while proxy.stats.reaped == 0:  # every datagram dropped, but heard
            assert time.monotonic() < deadline, "the quiet client was never reaped"
            knocking.send(b"anyone?")
            time.sleep(0.02)  # pacing, not synchronisation
        assert proxy.stats.blocked > 0
        assert proxy.upstream_count == 1
        proxy.unblock()
        knocking.send(b"back")
        assert knocking.recv() == b"back"
        assert proxy.stats.peers == 2, "the knocking client kept its upstream socket"


def test_a_reaped_client_that_returns_gets_a_fresh_socket(echo: EchoServer, client: Any) -> None:
    with UdpProxy(echo.port, upstream_idle_timeout=IDLE) as proxy:
        sender = client(proxy.port)
        sender.send(b"first")
        assert sender.recv() == b"first"
        wait_until(lambda: proxy.stats.reaped == 1, what="the idle upstream reaped")
        assert proxy.upstream_count == 0
        sender.send(b"again")
        assert sender.recv() == b"again"
        assert (proxy.upstream_count, proxy.stats.peers) == (1, 2)


def test_the_idle_timeout_is_positive_or_none_for_never(echo: EchoServer, client: Any) -> None:
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            UdpProxy(echo.port, upstream_idle_timeout=bad)
    with UdpProxy(echo.port, upstream_idle_timeout=None) as proxy:
        sender = client(proxy.port)
        sender.send(b"kept")
        assert sender.recv() == b"kept"
        assert proxy.upstream_count == 1
    assert proxy.upstream_count == 0  # stop() releases it
