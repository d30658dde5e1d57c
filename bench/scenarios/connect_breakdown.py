"""Figure 1b: where a ``Connect`` spends the time bare aioquic + HELLO does not.

One connect is timestamped (``time.perf_counter_ns``, one monotonic clock for
every thread) at each hop from the caller's ``ask(Connect())`` to its return,
and a bare aioquic connect + HELLO to the same ``SourceServer`` is timestamped at
the same protocol steps.  Plain, uninstrumented connects of both kinds run in
the same rotation (who goes first rotates), so figure 1's ratio is measured
beside the breakdown; each connect starts on a quiet source (``wait_quiet``).

The instrumentation lives here only: a ``SourceLink`` subclass (its mailbox and
inbox), a ``LinkConnection`` subclass (TLS done, HELLO sent, HELLO_ACK in), a
``QuicLoop`` of the bench's own (its submit, its dial slots, and its event
loop's ``getaddrinfo``, ``run_in_executor``, ``create_datagram_endpoint`` and
selector wrapped on that loop object only), and the link module's ``_tell`` and
``reply`` swapped while the figure runs.  The product's shared loop and the
plain links are untouched.

    python -m bench.run --only 1b                       # as part of the suite
    python -m bench.scenarios.connect_breakdown -n 200  # the full table on its own
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykka
from aioquic.asyncio.client import connect
from aioquic.quic import events

from mirror_actors.link import actor as link_actor
from mirror_actors.link.actor import Connect, Disconnect, SourceLink, _DialFinished
from mirror_actors.link.config import LinkConfig
from mirror_actors.link.connection import LinkConnection
from mirror_actors.link.loop import MAX_CONCURRENT_DIALS, QuicLoop
from mirror_actors.wire.frames import HANDSHAKE_STREAM_ID, Hello
from supervisors._pykka import TrackingInbox

from ..baselines import BareLoop, BareMirror, bare_configuration, bare_connect_once
from ..common import CLUSTER, Env, Row, Sizes, Stat, Target, quiet_logs
from .connect import wait_quiet

DATABASE = "orders"

# -- the recorder -------------------------------------------------------------------

Event = tuple[str, int, str]  # (mark, perf_counter_ns, thread name)


class Timeline:
    """The marks of one connect, from any thread (list.append is atomic under the GIL)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def mark(self, name: str) -> None:
        self.events.append((name, time.perf_counter_ns(), threading.current_thread().name))

    def first(self, name: str, after: int = 0) -> int | None:
        for mark, at, _ in self.events:
            if mark == name and at >= after:
                return at
        return None

    def thread_of(self, name: str) -> str | None:
        for mark, _, thread in self.events:
            if mark == name:
                return thread
        return None


_current: Timeline | None = None


def _mark(name: str) -> None:
    timeline = _current
    if timeline is not None:
        timeline.mark(name)


@contextmanager
def _recording() -> Iterator[Timeline]:
    global _current
    timeline = Timeline()
    _current = timeline
    try:
        yield timeline
    finally:
        _current = None


# -- the instrumented product pieces --------------------------------------------------


class _TimedInbox(TrackingInbox):
    """Marks when the link's thread goes back to wait on its mailbox (it lets go of the GIL)."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        _mark("actor_waits")
        return super().get(block, timeout)


class _TimedLink(SourceLink):
    @staticmethod
    def _create_actor_inbox() -> TrackingInbox:
        return _TimedInbox()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Connect):
            _mark("mailbox_connect")
        elif isinstance(message, _DialFinished):
            _mark("mailbox_finished")
        return super().on_receive(message)


class _TimedConnection(LinkConnection):
    async def open(self, last_applied_lsn: int, last_applied_term: int = 0) -> Any:
        ack = await super().open(last_applied_lsn, last_applied_term)
        _mark("open_returned")
        return ack

    def _send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        super()._send(stream_id, data, end_stream)
        if stream_id == HANDSHAKE_STREAM_ID:
            _mark("hello_sent")

    def _on_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            _mark("tls_done")
        elif isinstance(event, events.StreamDataReceived) and event.stream_id == 0:
            _mark("ack_received")
        super()._on_event(event)


class _TimedSlots(asyncio.Semaphore):
    async def __aenter__(self) -> None:
        await super().__aenter__()
        _mark("slot_admitted")


def _instrument_event_loop(loop: asyncio.AbstractEventLoop, prefix: str = "") -> None:
    """Wrap this one loop object's address lookup, executor, endpoint and selector."""
    getaddrinfo = loop.getaddrinfo
    run_in_executor = loop.run_in_executor
    create_datagram_endpoint = loop.create_datagram_endpoint

    async def timed_getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        _mark(prefix + "gai_start")
        infos = await getaddrinfo(*args, **kwargs)
        _mark(prefix + "gai_done")
        return infos

    def timed_run_in_executor(executor: Any, func: Callable[..., Any], *args: Any) -> Any:
        def timed(*inner: Any) -> Any:
            _mark(prefix + "gai_thread_start")
            try:
                return func(*inner)
            finally:
                _mark(prefix + "gai_thread_end")

        return run_in_executor(executor, timed, *args)

    async def timed_endpoint(*args: Any, **kwargs: Any) -> Any:
        _mark(prefix + "endpoint_start")
        result = await create_datagram_endpoint(*args, **kwargs)
        _mark(prefix + "endpoint_done")
        return result

    # On this loop object only (instance attributes shadow the methods).
    setattr(loop, "getaddrinfo", timed_getaddrinfo)  # noqa: B010
    setattr(loop, "run_in_executor", timed_run_in_executor)  # noqa: B010
    setattr(loop, "create_datagram_endpoint", timed_endpoint)  # noqa: B010
    selector = getattr(loop, "_selector", None)
    if selector is not None:
        select = selector.select

        def timed_select(timeout: float | None = None) -> Any:
            # The loop thread lets go of the GIL in here, and has it back on return.
            _mark(prefix + "select_enter")
            try:
                return select(timeout)
            finally:
                _mark(prefix + "select_return")

        selector.select = timed_select


class _TimedLoop(QuicLoop):
    """A QUIC loop thread of the bench's own, its submit, slots and event loop wrapped."""

    def __init__(self) -> None:
        super().__init__()
        self.dial_slots = _TimedSlots(MAX_CONCURRENT_DIALS)
        done = threading.Event()

        def install() -> None:
            _instrument_event_loop(asyncio.get_running_loop())
            done.set()

        self.call_soon(install)
        done.wait(10.0)

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        _mark("submit")

        async def timed() -> Any:
            _mark("coro_start")
            return await coroutine

        future = super().submit(timed())
        _mark("submitted")
        return future


_SWAPPED = ("LinkConnection", "_tell", "reply")


@contextmanager
def _patched_link_module() -> Iterator[None]:
    """The link module's LinkConnection, _tell and reply, timed, while the figure runs."""
    saved = {name: getattr(link_actor, name) for name in _SWAPPED}
    tell, answer = saved["_tell"], saved["reply"]

    def timed_tell(ref: pykka.ActorRef[Any], message: object) -> None:
        if isinstance(message, _DialFinished):
            _mark("told")
            tell(ref, message)
            _mark("told_end")
        else:
            tell(ref, message)

    def timed_reply(future: Any, value: Any) -> None:
        _mark("reply_set")
        answer(future, value)
        _mark("reply_set_end")

    timed = {"LinkConnection": _TimedConnection, "_tell": timed_tell, "reply": timed_reply}
    for name, value in timed.items():
        setattr(link_actor, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(link_actor, name, value)


# -- one connect of each kind ---------------------------------------------------------


def _ours_plain(config: LinkConfig) -> float:
    link = SourceLink.start(config)
    try:
        asked = time.perf_counter_ns()
        link.ask(Connect(last_applied_lsn=0), timeout=30.0)
        done = time.perf_counter_ns()
        link.ask(Disconnect(), timeout=10.0)
    finally:
        link.stop()
    return (done - asked) / 1000.0


def _ours_timed(config: LinkConfig, loop: _TimedLoop) -> Timeline:
    link = _TimedLink.start(config, quic_loop=loop)
    try:
        with _recording() as timeline:
            timeline.mark("ask")
            link.ask(Connect(last_applied_lsn=0), timeout=30.0)
            timeline.mark("returned")
            # Let the link's thread and the loop thread finish what follows the reply.
            time.sleep(0.002)
        link.ask(Disconnect(), timeout=10.0)
    finally:
        link.stop()
    return timeline


class _TimedBareMirror(BareMirror):
    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            _mark("b:tls_done")
        elif isinstance(event, events.StreamDataReceived) and event.stream_id == 0:
            _mark("b:ack_received")
        super().quic_event_received(event)


async def _bare_timed(port: int, ca_file: str) -> None:
    """``bench.baselines.bare_connect`` with marks (same steps, same order)."""
    _mark("b:start")
    configuration = bare_configuration(ca_file)
    manager = connect(
        "127.0.0.1", port, configuration=configuration, create_protocol=_TimedBareMirror
    )
    client = await manager.__aenter__()
    _mark("b:connected")
    assert isinstance(client, BareMirror)
    client.send_frame(HANDSHAKE_STREAM_ID, Hello(CLUSTER, DATABASE, 0), end_stream=True)
    _mark("b:hello_sent")
    ack = await client.hello_ack
    _mark("b:end")
    await manager.__aexit__(None, None, None)
    if not ack.accepted:
        raise RuntimeError(f"bare handshake rejected: {ack.error_detail}")


# -- the segments ---------------------------------------------------------------------

Span = tuple[str, str]


@dataclass(frozen=True)
class Segment:
    """A stretch of one connect: ours from mark to mark (less ``minus``), and bare's match."""

    name: str
    ours: Span
    hops: int  # thread hand-offs inside the stretch
    bare: Span | None = None
    minus: Span | None = None  # taken out of both sides' stretch (it has a row of its own)
    optional: bool = False  # a stretch that may not happen at all counts 0 then
    what: str = ""


GAI: Span = ("gai_start", "gai_done")
BARE_GAI: Span = ("b:gai_start", "b:gai_done")

OURS: tuple[Segment, ...] = (
    Segment(
        "caller -> link mailbox",
        ("ask", "mailbox_connect"),
        1,
        what="ask(): queue.put, caller blocks, link thread wakes and takes the GIL",
    ),
    Segment(
        "link handles Connect",
        ("mailbox_connect", "submit"),
        0,
        what="defer_reply, LinkConnection + MirrorSession, dialing log, LinkDialing status",
    ),
    Segment(
        "link -> loop (submit)",
        ("submit", "coro_start"),
        1,
        what="run_coroutine_threadsafe: self-pipe wake, Task created, its first step",
    ),
    Segment(
        "dial slot + timeout",
        ("coro_start", "slot_admitted"),
        0,
        what="semaphore (free) and asyncio.timeout",
    ),
    Segment(
        "getaddrinfo (executor)",
        GAI,
        2,
        BARE_GAI,
        optional=True,
        what="loop -> default executor thread -> loop, one more loop turn",
    ),
    Segment(
        "config, CA, QuicConnection",
        ("slot_admitted", "endpoint_start"),
        0,
        ("b:start", "b:endpoint_start"),
        minus=GAI,
        what="ours: QuicConfiguration, CA read + PEM parse, QuicConnection; bare: "
        "QuicConfiguration, CA path, QuicConnection, dual-stack socket",
    ),
    Segment(
        "datagram endpoint",
        ("endpoint_start", "endpoint_done"),
        0,
        ("b:endpoint_start", "b:endpoint_done"),
        what="create_datagram_endpoint",
    ),
    Segment(
        "QUIC + TLS handshake",
        ("endpoint_done", "tls_done"),
        0,
        ("b:endpoint_done", "b:tls_done"),
        what="first flight to HandshakeCompleted (the server works on its own thread)",
    ),
    Segment(
        "TLS done -> HELLO sent",
        ("tls_done", "hello_sent"),
        0,
        ("b:tls_done", "b:hello_sent"),
        what="future wakes the dial task, HELLO encoded + sent",
    ),
    Segment(
        "HELLO -> HELLO_ACK in",
        ("hello_sent", "ack_received"),
        0,
        ("b:hello_sent", "b:ack_received"),
        what="the source answers",
    ),
    Segment(
        "ack judged -> open returns",
        ("ack_received", "open_returned"),
        0,
        ("b:ack_received", "b:end"),
        what="session checks the ack, future wakes the task; ours: keepalive task",
    ),
    Segment("open -> _DialFinished told", ("open_returned", "told"), 0),
    Segment(
        "loop -> link mailbox",
        ("told", "mailbox_finished"),
        1,
        what="queue.put from the loop thread; the link thread wakes and takes the GIL",
    ),
    Segment(
        "link handles _DialFinished",
        ("mailbox_finished", "reply_set"),
        0,
        what="lifecycle, connected log",
    ),
    Segment(
        "link -> caller (reply)",
        ("reply_set", "returned"),
        1,
        what="future.set, caller wakes and takes the GIL",
    ),
)

# Per connect, these partition ours (ask -> returned) and bare (start -> end) exactly.
GROUPS: tuple[tuple[str, tuple[Span, ...], tuple[Span, ...]], ...] = (
    (
        "thread hand-offs + link handlers",
        (("ask", "coro_start"), ("open_returned", "returned")),
        (),
    ),
    (
        "dial setup (lookup, config, CA, socket)",
        (("coro_start", "endpoint_done"),),
        (("b:start", "b:endpoint_done"),),
    ),
    (
        "wire: QUIC+TLS, HELLO, HELLO_ACK in",
        (("endpoint_done", "ack_received"),),
        (("b:endpoint_done", "b:ack_received"),),
    ),
    (
        "ack judged -> dial returns",
        (("ack_received", "open_returned"),),
        (("b:ack_received", "b:end"),),
    ),
)

# Where a thread lets go of the GIL after handing work on (for the hand-off line).
GIL_RELEASES: tuple[tuple[str, str, str], ...] = (
    ("link thread: submit -> waits on its mailbox", "submitted", "actor_waits"),
    ("loop thread: told -> next select", "told_end", "select_enter"),
    ("loop thread: woken for submit -> select returned", "submit", "select_return"),
    ("link thread: reply -> waits on its mailbox", "reply_set_end", "actor_waits"),
)

MAIN_PATH = (
    "ask",
    "mailbox_connect",
    "submit",
    "coro_start",
    "gai_start",
    "gai_thread_start",
    "gai_thread_end",
    "gai_done",
    "endpoint_start",
    "endpoint_done",
    "tls_done",
    "hello_sent",
    "ack_received",
    "open_returned",
    "told",
    "mailbox_finished",
    "reply_set",
    "returned",
)
BARE_PATH = (
    "b:start",
    "b:gai_start",
    "b:gai_thread_start",
    "b:gai_thread_end",
    "b:gai_done",
    "b:endpoint_start",
    "b:endpoint_done",
    "b:tls_done",
    "b:hello_sent",
    "b:ack_received",
    "b:end",
)


def _segment_us(timeline: Timeline, start: str, end: str) -> float | None:
    begin = timeline.first(start)
    if begin is None:
        return None
    finish = timeline.first(end, after=begin)
    if finish is None:
        return None
    return (finish - begin) / 1000.0


def _spans(timeline: Timeline, spans: Sequence[Span]) -> float | None:
    total = 0.0
    for span in spans:
        value = _segment_us(timeline, *span)
        if value is None:
            return None
        total += value
    return total


def _value(timeline: Timeline, span: Span, minus: Span | None, optional: bool) -> float | None:
    value = _segment_us(timeline, *span)
    if value is None:
        return 0.0 if optional else None
    if minus is not None:
        value -= _segment_us(timeline, *minus) or 0.0
    return value


def _thread_changes(timeline: Timeline, path: Sequence[str]) -> int:
    """Thread changes along the marks of ``path`` that happened (one connect's main path)."""
    threads = [thread for mark in path if (thread := timeline.thread_of(mark)) is not None]
    return sum(1 for a, b in itertools.pairwise(threads) if a != b)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Breakdown:
    ours_plain: list[float]
    bare_plain: list[float]
    ours_timed: list[Timeline]
    bare_timed: list[Timeline]

    def ours_total(self) -> list[float]:
        return [x for t in self.ours_timed if (x := _segment_us(t, "ask", "returned")) is not None]

    def bare_total(self) -> list[float]:
        return [x for t in self.bare_timed if (x := _segment_us(t, "b:start", "b:end")) is not None]

    def gap(self) -> float:
        return statistics.median(self.ours_total()) - statistics.median(self.bare_total())

    def table(self) -> list[dict[str, Any]]:
        gap = self.gap()
        rows = []
        for seg in OURS:
            ours = [
                x
                for t in self.ours_timed
                if (x := _value(t, seg.ours, seg.minus, seg.optional)) is not None
            ]
            bare: list[float] = []
            if seg.bare is not None:
                bare_minus = BARE_GAI if seg.minus is not None else None
                bare = [
                    x
                    for t in self.bare_timed
                    if (x := _value(t, seg.bare, bare_minus, seg.optional)) is not None
                ]
            med = statistics.median(ours)
            bmed = statistics.median(bare) if bare else 0.0
            rows.append(
                {
                    "hop": seg.name,
                    "hops": seg.hops,
                    "median_us": med,
                    "p90_us": Stat.of(ours).quantile(0.9),
                    "mean_us": statistics.fmean(ours),
                    "bare_median_us": bmed if seg.bare else None,
                    "bare_mean_us": statistics.fmean(bare) if bare else None,
                    "extra_us": med - bmed,
                    "share_of_gap": (med - bmed) / gap if gap else None,
                    "what": seg.what,
                }
            )
        return rows

    def groups(self) -> list[dict[str, Any]]:
        gap = self.gap()
        rows = []
        for name, ours_spans, bare_spans in GROUPS:
            ours = [x for t in self.ours_timed if (x := _spans(t, ours_spans)) is not None]
            bare = [x for t in self.bare_timed if (x := _spans(t, bare_spans)) is not None]
            med = statistics.median(ours)
            bmed = statistics.median(bare) if bare_spans and bare else 0.0
            rows.append(
                {
                    "group": name,
                    "median_us": med,
                    "p90_us": Stat.of(ours).quantile(0.9),
                    "bare_median_us": bmed if bare_spans else None,
                    "extra_us": med - bmed,
                    "share_of_gap": (med - bmed) / gap if gap else None,
                }
            )
        return rows

    def gai_split(self) -> dict[str, float | None]:
        def med(timelines: list[Timeline], a: str, b: str) -> float | None:
            return _median([x for t in timelines if (x := _segment_us(t, a, b)) is not None])

        ours, bare = self.ours_timed, self.bare_timed
        return {
            "ours: loop -> executor thread": med(ours, "gai_start", "gai_thread_start"),
            "ours: getaddrinfo() itself": med(ours, "gai_thread_start", "gai_thread_end"),
            "ours: executor -> loop task": med(ours, "gai_thread_end", "gai_done"),
            "bare: loop -> executor thread": med(bare, "b:gai_start", "b:gai_thread_start"),
            "bare: getaddrinfo() itself": med(bare, "b:gai_thread_start", "b:gai_thread_end"),
            "bare: executor -> loop task": med(bare, "b:gai_thread_end", "b:gai_done"),
        }

    def gil(self) -> dict[str, float | None]:
        return {
            name: _median(
                [x for t in self.ours_timed if (x := _segment_us(t, start, end)) is not None]
            )
            for name, start, end in GIL_RELEASES
        }

    def thread_changes(self) -> float:
        return statistics.median(_thread_changes(t, MAIN_PATH) for t in self.ours_timed)

    def bare_thread_changes(self) -> float:
        return statistics.median(_thread_changes(t, BARE_PATH) for t in self.bare_timed)


def measure(env: Env, connects: int, log: Callable[[str], None] | None = None) -> Breakdown:
    result = Breakdown([], [], [], [])
    QuicLoop.acquire()
    timed_loop = _TimedLoop()
    try:
        with (
            env.source([DATABASE]) as server,
            BareLoop() as bare_loop,
            BareLoop("bench-bare-timed") as timed_bare_loop,
            _patched_link_module(),
        ):
            done = threading.Event()

            def install() -> None:
                _instrument_event_loop(asyncio.get_running_loop(), "b:")
                done.set()

            timed_bare_loop.loop.call_soon_threadsafe(install)
            done.wait(10.0)
            config = LinkConfig(CLUSTER, DATABASE, ca_file=env.ca_file, port=server.port)

            def bare_timed() -> Timeline:
                with _recording() as timeline:
                    timed_bare_loop.run(_bare_timed(server.port, env.ca_file))
                return timeline

            def bare_plain() -> float:
                seconds = bare_loop.run(bare_connect_once(server.port, env.ca_file, DATABASE))
                return 1e6 * seconds

            def run_all(into: Breakdown, shift: int) -> None:
                kinds: list[Callable[[], None]] = [
                    lambda: into.ours_plain.append(_ours_plain(config)),
                    lambda: into.bare_plain.append(bare_plain()),
                    lambda: into.ours_timed.append(_ours_timed(config, timed_loop)),
                    lambda: into.bare_timed.append(bare_timed()),
                ]
                shift %= len(kinds)
                for kind in kinds[shift:] + kinds[:shift]:
                    wait_quiet(server)
                    kind()

            # Warm-up: imports, TLS contexts, executors' threads.
            run_all(Breakdown([], [], [], []), 0)
            for rep in range(connects):
                # Rotate who goes first, so drift in load hits every kind alike.
                run_all(result, rep)
                if log is not None and (rep + 1) % 50 == 0:
                    log(f"[bench]   connect breakdown {rep + 1}/{connects}")
    finally:
        timed_loop.stop()
        QuicLoop.release()
    return result


def _us(value: float | None, missing: str = "-") -> str:
    return missing if value is None or math.isnan(value) else f"{value:.0f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def format_breakdown(result: Breakdown) -> str:
    ours_total, bare_total = result.ours_total(), result.bare_total()
    ours_med, bare_med = statistics.median(ours_total), statistics.median(bare_total)
    plain_ours, plain_bare = (
        statistics.median(result.ours_plain),
        statistics.median(result.bare_plain),
    )
    lines = [
        f"instrumented: ours {ours_med:.0f} us, bare {bare_med:.0f} us, gap "
        f"{ours_med - bare_med:.0f} us (ratio {ours_med / bare_med:.3f}); plain: ours "
        f"{plain_ours:.0f} us, bare {plain_bare:.0f} us (ratio {plain_ours / plain_bare:.3f}); "
        f"n = {len(ours_total)}",
        "",
        f"{'per connect':<40} {'median':>8} {'p90':>8} {'bare med':>9} {'extra':>8} {'share':>7}",
    ]
    for group in result.groups():
        lines.append(
            f"{group['group']:<40} {group['median_us']:>8.0f} {group['p90_us']:>8.0f} "
            f"{_us(group['bare_median_us']):>9} {group['extra_us']:>8.0f} "
            f"{_share(group['share_of_gap']):>7}"
        )
    lines += [
        "",
        f"{'hop':<30} {'thr':>3} {'median':>8} {'p90':>8} {'mean':>8} {'bare med':>9} "
        f"{'extra':>8} {'share':>7}",
    ]
    total_extra = 0.0
    for row in result.table():
        total_extra += row["extra_us"]
        lines.append(
            f"{row['hop']:<30} {row['hops']:>3} {row['median_us']:>8.0f} {row['p90_us']:>8.0f} "
            f"{row['mean_us']:>8.0f} {_us(row['bare_median_us']):>9} {row['extra_us']:>8.0f} "
            f"{_share(row['share_of_gap']):>7}"
        )
    gap = result.gap()
    lines.append(
        f"{'sum of medians':<30} {'':>3} {'':>8} {'':>8} {'':>8} {'':>9} "
        f"{total_extra:>8.0f} {_share(total_extra / gap if gap else None):>7}"
    )
    lines.append("")
    lines.append(
        f"thread changes along one connect: ours {result.thread_changes():.0f}, "
        f"bare {result.bare_thread_changes():.0f} (timed inside its coroutine)"
    )
    lines.append(
        "getaddrinfo split (median us): "
        + ", ".join(f"{k} {_us(v, 'skipped (IP literal)')}" for k, v in result.gai_split().items())
    )
    lines.append(
        "GIL let go after a hand-off (median us): "
        + ", ".join(f"{k} {_us(v)}" for k, v in result.gil().items())
    )
    return "\n".join(lines)


def run(env: Env, sizes: Sizes) -> list[Row]:
    result = measure(env, sizes.connect_breakdown_reps)
    table = result.table()
    extra = {
        "segments": table,
        "groups": result.groups(),
        "gai_split_us": result.gai_split(),
        "gil_release_us": result.gil(),
        "thread_changes": {"ours": result.thread_changes(), "bare": result.bare_thread_changes()},
        "breakdown": format_breakdown(result),
    }
    only_ours = sum(r["hops"] for r in table if r["hops"] and r["bare_median_us"] is None)
    note = (
        "info: gap to bare per connect, "
        + ", ".join(f"{g['group']} {g['extra_us']:+.0f} us" for g in result.groups())
        + f"; thread changes ours {result.thread_changes():.0f} "
        f"({only_ours} only ours has), bare {result.bare_thread_changes():.0f}"
    )
    ms = 1 / 1000.0
    return [
        Row(
            "1b connect breakdown",
            "Connect -> ack, plain (beside the breakdown)",
            "ms",
            Stat.of([x * ms for x in result.ours_plain]),
            Stat.of([x * ms for x in result.bare_plain]),
            Target("ratio_le", 1.10),
        ),
        Row(
            "1b connect breakdown",
            "Connect -> ack, instrumented",
            "ms",
            Stat.of([x * ms for x in result.ours_total()]),
            Stat.of([x * ms for x in result.bare_total()]),
            note=note,
            extra=extra,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios.connect_breakdown")
    parser.add_argument("-n", "--connects", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as workdir, quiet_logs():
        env = Env.create(Path(workdir))
        result = measure(env, args.connects, log=print)
    print(format_breakdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
