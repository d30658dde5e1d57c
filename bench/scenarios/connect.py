"""Figure 1: SourceLink Connect -> accepted HELLO_ACK versus bare aioquic connect() + HELLO."""

from __future__ import annotations

import time

from mirror_actors.link.actor import Connect, Disconnect, SourceLink
from mirror_actors.link.config import LinkConfig
from mirror_actors.link.loop import QuicLoop
from mirror_actors.source.server import SourceServer

from ..baselines import BareLoop, bare_connect_once
from ..common import CLUSTER, Env, Row, Sizes, Stat, Target

DATABASE = "orders"
QUIET_TIMEOUT = 1.0


def wait_quiet(server: SourceServer, timeout: float = QUIET_TIMEOUT) -> None:
    """Until the source holds no connection: every connect starts on the same quiet source.

    Without it the order of the two kinds biases the ratio.  The bare baseline
    waits out its closing period (3 PTO) before it returns and the source ends
    its side of that connection just then, so whatever comes next starts after
    ~90 ms of idle machine (slower wake-ups) and beside that clean-up; ``Disconnect``
    returns at once, so whatever follows ours starts warm.  Strict ours, bare,
    ours, bare... then measures ours cold and bare warm: 1.23-1.29x where both
    started alike measure 1.06-1.14x (bench/README.md, figure 1b).
    """
    deadline = time.monotonic() + timeout
    while server.connections() and time.monotonic() < deadline:
        time.sleep(0.002)


def _ours_once(config: LinkConfig) -> tuple[float, float]:
    """(Connect ask alone, actor start plus Connect), in seconds."""
    started = time.perf_counter()
    link = SourceLink.start(config)
    try:
        asked = time.perf_counter()
        link.ask(Connect(last_applied_lsn=0), timeout=30.0)
        done = time.perf_counter()
        link.ask(Disconnect(), timeout=10.0)
    finally:
        link.stop()
    return done - asked, done - started


def run(env: Env, sizes: Sizes) -> list[Row]:
    ours: list[float] = []
    with_start: list[float] = []
    bare: list[float] = []
    # Hold the QUIC loop for the whole figure: one loop thread per process is the
    # design, so its start-up is not part of any one connect.
    QuicLoop.acquire()
    try:
        with env.source([DATABASE]) as server, BareLoop() as loop:
            config = LinkConfig(CLUSTER, DATABASE, ca_file=env.ca_file, port=server.port)
            # Warm-up: imports, first TLS contexts, the default executor's threads.
            _ours_once(config)
            loop.run(bare_connect_once(server.port, env.ca_file, DATABASE))
            for rep in range(sizes.connect_reps):
                # Alternate who goes first so drift in machine load hits both alike,
                # and start each on a quiet source so neither inherits the other's end.
                if rep % 2:
                    wait_quiet(server)
                    bare.append(loop.run(bare_connect_once(server.port, env.ca_file, DATABASE)))
                wait_quiet(server)
                a, b = _ours_once(config)
                ours.append(a)
                with_start.append(b)
                if not rep % 2:
                    wait_quiet(server)
                    bare.append(loop.run(bare_connect_once(server.port, env.ca_file, DATABASE)))
    finally:
        QuicLoop.release()
    ms = 1000.0
    return [
        Row(
            "1 connect",
            "Connect -> accepted ack",
            "ms",
            Stat.of([x * ms for x in ours]),
            Stat.of([x * ms for x in bare]),
            Target("ratio_le", 1.10),
        ),
        Row(
            "1 connect",
            "actor start + Connect",
            "ms",
            Stat.of([x * ms for x in with_start]),
            Stat.of([x * ms for x in bare]),
            note="info: includes SourceLink.start",
        ),
    ]
