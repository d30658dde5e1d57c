"""Figure 3: GetStatus asks to a connected link versus asks to a bare pykka actor.

Sequential asks from one thread (ask, wait, ask again): the round trip through
the mailbox and the status object's construction.
"""

from __future__ import annotations

import time
from typing import Any

import pykka

from mirror_actors.link.actor import Connect, Disconnect, GetStatus, SourceLink
from mirror_actors.link.config import LinkConfig

from ..baselines import BareStatusActor
from ..common import CLUSTER, Env, Row, Sizes, Stat, Target

DATABASE = "orders"


def _rate(ref: pykka.ActorRef[Any], message: object, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        ref.ask(message)
    return count / (time.perf_counter() - started)


def run(env: Env, sizes: Sizes) -> list[Row]:
    ours: list[float] = []
    bare: list[float] = []
    with env.source([DATABASE]) as server:
        link = SourceLink.start(
            LinkConfig(CLUSTER, DATABASE, ca_file=env.ca_file, port=server.port)
        )
        plain = BareStatusActor.start()
        try:
            link.ask(Connect(last_applied_lsn=0), timeout=30.0)
            message = GetStatus()
            _rate(link, message, sizes.mailbox_asks // 5)
            _rate(plain, message, sizes.mailbox_asks // 5)
            for rep in range(sizes.mailbox_reps):
                if rep % 2:
                    bare.append(_rate(plain, message, sizes.mailbox_asks))
                ours.append(_rate(link, message, sizes.mailbox_asks))
                if not rep % 2:
                    bare.append(_rate(plain, message, sizes.mailbox_asks))
            link.ask(Disconnect(), timeout=10.0)
        finally:
            link.stop()
            plain.stop()
    return [
        Row(
            "3 mailbox",
            "GetStatus asks/s",
            "asks/s",
            Stat.of(ours),
            Stat.of(bare),
            Target("ratio_ge", 0.9),
            note=f"{sizes.mailbox_asks} sequential asks per repetition",
        )
    ]
