"""Figure 2: entries/s and MB/s from a SourceServer into a consumer, versus bare aioquic.

Every variant subscribes from LSN 1 to the same pre-filled log on the same
server, decodes every ENTRIES frame, applies it and ACKs it; the bare side does
the same work on a plain aioquic connection.  The source's flow-control window
is small enough that ACK round trips matter, so latency shows, not only decoding.

Variants:
- ``stream``: a standalone ``SourceLink`` and a ``LinkStream`` read by this
  thread, applying into a list (timed from ``OpenStream``; the bare side from
  its SUBSCRIBE);
- ``replica`` variants (``replica_variants``): ``MirrorDatabase`` with its
  memory or SQLite store, timed from the actor's start (it dials by itself);
  the bare side is timed from its dial and commits into the same store kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from mirror_actors.link.actor import Connect, Disconnect, OpenStream, SourceLink
from mirror_actors.link.config import LinkConfig
from mirror_actors.link.loop import QuicLoop
from mirror_actors.link.stream import LinkStream
from mirror_actors.source.log import SourceStore
from mirror_actors.wire.frames import Entries, Frame, Subscribe

from ..baselines import BareLoop, bare_replicate
from ..common import CLUSTER, INFO, Env, Row, Sizes, Stat, Target

DATABASE = "orders"
FLOW_CONTROL_CAP = 1 << 20


@dataclass(frozen=True)
class Setup:
    """What a variant needs to know about the run."""

    env: Env
    config: LinkConfig
    port: int
    last_lsn: int


@dataclass(frozen=True)
class Variant:
    """One way of consuming the stream, with its bare counterpart.

    ``ours(setup)`` and ``bare(setup, loop)`` each replicate the whole log once
    and answer the seconds it took.
    """

    name: str
    ours: Callable[[Setup], float]
    bare: Callable[[Setup, BareLoop], float]
    target: Target


# -- the stream variant ---------------------------------------------------------------


def _drain(stream: LinkStream, last_lsn: int, applied: list[object]) -> None:
    while True:
        frame = stream.recv(timeout=60.0)
        if isinstance(frame, Entries):
            applied.extend(frame.entries)
            stream.ack(frame.last_lsn)
            if frame.last_lsn >= last_lsn:
                return


def _stream_ours(setup: Setup) -> float:
    link = SourceLink.start(setup.config)
    try:
        link.ask(Connect(last_applied_lsn=0), timeout=30.0)
        started = time.perf_counter()
        stream = cast(LinkStream, link.ask(OpenStream(), timeout=10.0))
        stream.send(Subscribe(1))
        _drain(stream, setup.last_lsn, [])
        elapsed = time.perf_counter() - started
        stream.close()
        link.ask(Disconnect(), timeout=10.0)
    finally:
        link.stop()
    return elapsed


def _stream_bare(setup: Setup, loop: BareLoop) -> float:
    applied: list[object] = []

    def apply(frame: Frame) -> int | None:
        if not isinstance(frame, Entries):
            return None
        applied.extend(frame.entries)
        return frame.last_lsn

    _, from_subscribe = loop.run(
        bare_replicate(setup.port, setup.env.ca_file, DATABASE, setup.last_lsn, apply)
    )
    return from_subscribe


STREAM = Variant("stream, in-memory list", _stream_ours, _stream_bare, Target("ratio_ge", 0.8))


def variants() -> list[Variant]:
    found = [STREAM]
    try:
        from . import replica_variants
    except ImportError:  # no mirror_actors.replica.actor in this tree
        return found
    return found + replica_variants.variants()


# -- the figure -----------------------------------------------------------------------


def _measure(
    variant: Variant, setup: Setup, loop: BareLoop, reps: int
) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    bare: list[float] = []
    variant.ours(setup)  # warm-up
    variant.bare(setup, loop)
    for rep in range(reps):
        # Alternate who goes first so drift in machine load hits both alike.
        if rep % 2:
            bare.append(variant.bare(setup, loop))
        ours.append(variant.ours(setup))
        if not rep % 2:
            bare.append(variant.bare(setup, loop))
    return ours, bare


def run(env: Env, sizes: Sizes) -> list[Row]:
    count = sizes.replication_entries
    payload = (bytes(range(256)) * (sizes.replication_entry_bytes // 256 + 1))[
        : sizes.replication_entry_bytes
    ]
    store = SourceStore([DATABASE])
    for _ in range(count):
        store[DATABASE].append(payload)
    megabytes = count * len(payload) / 1e6
    note = (
        f"{count} entries x {len(payload)} B, flow-control cap {FLOW_CONTROL_CAP >> 10} KiB, "
        "ACK per applied frame/batch"
    )
    rows: list[Row] = []
    QuicLoop.acquire()  # one loop thread for the whole figure, as in a mirror process
    try:
        with (
            env.source([DATABASE], store=store, flow_control_cap=FLOW_CONTROL_CAP) as server,
            BareLoop() as loop,
        ):
            config = LinkConfig(CLUSTER, DATABASE, ca_file=env.ca_file, port=server.port)
            setup = Setup(env, config, server.port, count)
            for variant in variants():
                try:
                    ours, bare = _measure(variant, setup, loop, sizes.replication_reps)
                except Exception as error:
                    rows.append(
                        Row(
                            "2 replication",
                            f"entries/s ({variant.name})",
                            "entries/s",
                            None,
                            note=f"failed: {type(error).__name__}: {error}"[:300],
                        )
                    )
                    continue
                rows.append(
                    Row(
                        "2 replication",
                        f"entries/s ({variant.name})",
                        "entries/s",
                        Stat.of([count / t for t in ours]),
                        Stat.of([count / t for t in bare]),
                        variant.target,
                        note=note,
                    )
                )
                rows.append(
                    Row(
                        "2 replication",
                        f"MB/s ({variant.name})",
                        "MB/s",
                        Stat.of([megabytes / t for t in ours]),
                        Stat.of([megabytes / t for t in bare]),
                        INFO,
                        note="entry data bytes only",
                    )
                )
    finally:
        QuicLoop.release()
    return rows
