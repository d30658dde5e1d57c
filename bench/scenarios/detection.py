"""Figure 6: how soon a link notices a source that closes, and one that goes silent.

Closing: the source stops (SOURCE_SHUTDOWN close) and the link's GetStatus
leaves CONNECTED; the baseline is a bare aioquic client's ConnectionTerminated.
Silent: a UDP proxy between link and source starts black-holing; the link must
notice within its idle timeout (keepalive PINGs every quarter of it).
"""

from __future__ import annotations

import time
from typing import Any, cast

import pykka

from mirror_actors.faults.proxy import UdpProxy
from mirror_actors.link.actor import Connect, GetStatus, SourceLink
from mirror_actors.link.config import LinkConfig
from mirror_actors.link.state import LinkStatus

from ..baselines import BareLoop, bare_connect
from ..common import CLUSTER, INFO, Env, Row, Sizes, Stat, Target

DATABASE = "orders"
POLL = 0.001
GIVE_UP = 30.0


def _until_disconnected(link: pykka.ActorRef[Any], started: float) -> float:
    while True:
        status = cast(LinkStatus, link.ask(GetStatus(), timeout=10.0))
        if not status.connected:
            return time.monotonic() - started
        if time.monotonic() - started > GIVE_UP:
            raise TimeoutError("the link never noticed")
        time.sleep(POLL)


def _ours_closing(env: Env) -> float:
    server = env.source([DATABASE]).start()
    link = SourceLink.start(LinkConfig(CLUSTER, DATABASE, ca_file=env.ca_file, port=server.port))
    try:
        link.ask(Connect(last_applied_lsn=0), timeout=30.0)
        started = time.monotonic()
        server.stop()
        return _until_disconnected(link, started)
    finally:
        link.stop()
        server.stop()


def _bare_closing(env: Env, loop: BareLoop) -> float:
    server = env.source([DATABASE]).start()
    try:
        _, client, manager = loop.run(bare_connect(server.port, env.ca_file, DATABASE))
        started = time.monotonic()
        server.stop()

        async def terminated() -> float:
            return await client.terminated

        try:
            return loop.run(terminated(), timeout=GIVE_UP) - started
        finally:
            loop.run(manager.__aexit__(None, None, None))
    finally:
        server.stop()


def _ours_silent(env: Env, idle_timeout: float) -> float:
    with env.source([DATABASE]) as server, UdpProxy(server.port) as proxy:
        config = LinkConfig(
            CLUSTER,
            DATABASE,
            ca_file=env.ca_file,
            port=proxy.port,
            idle_timeout=idle_timeout,
            keepalive_interval=idle_timeout / 4,
        )
        link = SourceLink.start(config)
        try:
            link.ask(Connect(last_applied_lsn=0), timeout=30.0)
            time.sleep(idle_timeout / 2)  # let a few PINGs go round
            started = time.monotonic()
            proxy.block()
            return _until_disconnected(link, started)
        finally:
            link.stop()


def run(env: Env, sizes: Sizes) -> list[Row]:
    ours: list[float] = []
    bare: list[float] = []
    with BareLoop() as loop:
        for rep in range(sizes.detection_reps):
            if rep % 2:
                bare.append(_bare_closing(env, loop))
            ours.append(_ours_closing(env))
            if not rep % 2:
                bare.append(_bare_closing(env, loop))
    idle = sizes.silent_idle_timeout
    silent = [_ours_silent(env, idle) for _ in range(sizes.detection_reps)]
    ms = 1000.0
    return [
        Row(
            "6 detection",
            "closing source noticed",
            "ms",
            Stat.of([x * ms for x in ours]),
            Stat.of([x * ms for x in bare]),
            INFO,
            note="from SourceServer.stop() to GetStatus not connected; bare: ConnectionTerminated",
        ),
        Row(
            "6 detection",
            f"silent source noticed (idle_timeout {idle:g} s)",
            "ms",
            Stat.of([x * ms for x in silent]),
            target=Target("abs_le", idle * ms + 100.0),
            note="from proxy.block() to GetStatus not connected; target idle_timeout + 100 ms",
        ),
    ]
