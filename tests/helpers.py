"""What the tests share: the cluster they mirror, waits, servers, configs, recorders, probes.

Plain values and functions only; the fixtures built on them are in ``conftest.py``.
Test modules import from here (and from ``rawclient``/``rogue_source``), never from
each other.
"""

from __future__ import annotations

import gc
import os
import struct
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from loguru import logger
from pykka import ActorRef

from mirror_actors.link import (
    Connect,
    GetStatus,
    LinkConfig,
    LinkStatus,
    LinkStream,
    OpenStream,
    link_strategy,
)
from mirror_actors.pki import DevPki
from mirror_actors.replica import GetReplicaStatus, ReplicaStatus
from mirror_actors.source import SourceServer, SourceSession
from mirror_actors.source.session import (
    AbortStream,
    Action,
    CloseConnection,
    ResetStream,
    SendData,
)
from mirror_actors.wire import (
    MAX_PAYLOAD,
    Entries,
    Entry,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    HelloAck,
    encode_frame,
)
from mirror_actors.wire.frames import HEADER
from supervisors import (
    ChildSpec,
    ChildState,
    ChildStatus,
    EscalationEvent,
    ExponentialBackoff,
    GetChild,
    SupervisedActor,
    WhichChildren,
)

# -- the cluster every test mirrors ----------------------------------------------------------

CLUSTER = "us-east"
DATABASE = "orders"
LINK = f"{CLUSTER}/{DATABASE}"
"""A replica's name for the link to ``CLUSTER``'s ``DATABASE`` (what its store records)."""

WAIT = 5.0
"""How long one step may take: a reply, a frame, a thread's end."""
SLOW_WAIT = 20.0
"""How long a condition may take to come true (``wait_until``'s bound): a replica catching
up through files, snapshots, processes and restarts."""

MiB = 1 << 20
U64_MAX = 2**64 - 1


def wait_until(
    predicate: Callable[..., object],  # ``...``: a lambda may bind loop values as defaults
    timeout: float = SLOW_WAIT,
    what: str = "condition",
    *,
    interval: float = 0.005,
) -> None:
    """Poll a condition until it holds; fail naming ``what`` after ``timeout``.

    The default bound is generous: a condition that holds returns at once, and a
    test that needs a tighter bound asserts the elapsed time itself.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


# -- sources, links, replicas ----------------------------------------------------------------


def source_server(
    pki: DevPki, databases: tuple[str, ...] = (DATABASE,), **options: Any
) -> SourceServer:
    """A ``SourceServer`` for ``CLUSTER`` with its dev certificate, not yet started."""
    pair = pki.source(CLUSTER)
    return SourceServer(
        CLUSTER, databases, certfile=str(pair.cert), keyfile=str(pair.key), **options
    )


def config_for(pki: DevPki, port: int, **options: Any) -> LinkConfig:
    """A link to ``CLUSTER``/``DATABASE`` on loopback ``port``; ``cluster``, ``database`` and
    any ``LinkConfig`` setting may be overridden."""
    settings: dict[str, Any] = {"ca_file": str(pki.ca.cert), "port": port, "handshake_timeout": 2.0}
    settings.update(options)
    cluster = settings.pop("cluster", CLUSTER)
    database = settings.pop("database", DATABASE)
    return LinkConfig(cluster, database, **settings)


def connect(link: ActorRef[Any], timeout: float | None = None) -> HelloAck:
    """``Connect`` a link; the source's accepting ack (a failed dial raises its typed error)."""
    return cast(HelloAck, link.ask(Connect(), timeout=timeout))


def open_stream(link: ActorRef[Any]) -> LinkStream:
    return cast(LinkStream, link.ask(OpenStream()))


def link_status(link: ActorRef[Any], timeout: float | None = None) -> LinkStatus:
    return cast(LinkStatus, link.ask(GetStatus(), timeout=timeout))


def replica_status(replica: ActorRef[Any], timeout: float | None = None) -> ReplicaStatus:
    return cast(ReplicaStatus, replica.ask(GetReplicaStatus(), timeout=timeout))


def fast_strategy() -> ExponentialBackoff:
    """The link strategy with backoff short enough for a test (50 ms, at most 200 ms)."""
    return link_strategy(base=0.05, max_delay=0.2)


def entry(lsn: int, term: int = 1, tag: str = "") -> Entry:
    """The entry at ``lsn`` whose data names it (and ``tag``)."""
    return Entry(lsn, term, f"entry-{lsn}{tag}".encode())


def entries(first: int, count: int) -> Entries:
    """``count`` entries of term 1 from LSN ``first``, each saying which it is."""
    return Entries([Entry(first + i, 1, b"r%d" % (first + i)) for i in range(count)])


def amplifying_entries() -> bytes:
    """One legal-sized ENTRIES frame whose array claims a million empty maps."""
    count = MAX_PAYLOAD - 20
    payload = (b"\x81\xa7entries\xdd" + struct.pack(">I", count) + b"\x80" * count)[:MAX_PAYLOAD]
    return HEADER.pack(FrameType.ENTRIES, len(payload)) + payload


def encode_frames(*items: Frame | bytes) -> bytes:
    """Frames encoded back to back; ``bytes`` items go in as they are."""
    return b"".join(i if isinstance(i, bytes) else encode_frame(i) for i in items)


class Escalations:
    """An ``on_escalation`` callback that keeps every event and signals the first."""

    def __init__(self) -> None:
        self.events: list[EscalationEvent] = []
        self.arrived = threading.Event()

    def __call__(self, event: EscalationEvent) -> None:
        self.events.append(event)
        self.arrived.set()

    def wait(self, timeout: float = SLOW_WAIT) -> BaseException:
        """The first escalation's root cause, once it came."""
        assert self.arrived.wait(timeout), "no escalation"
        return self.events[0].root_cause


# -- the source session, sans I/O ----------------------------------------------------------


class SessionMirror:
    """The mirror's view of one session: frames per stream, what was closed, what ended."""

    def __init__(self, session: SourceSession) -> None:
        self.session = session
        self.decoders: dict[int, FrameDecoder] = defaultdict(FrameDecoder)
        self.frames: dict[int, list[Frame]] = defaultdict(list)
        self.payload_bytes: dict[int, int] = defaultdict(int)
        self.ended: set[int] = set()
        self.aborted: dict[int, int] = {}
        self.reset: dict[int, int] = {}
        self.close: CloseConnection | None = None
        self.actions: list[Action] = []

    def absorb(self, actions: Iterable[Action]) -> list[tuple[int, Frame]]:
        new: list[tuple[int, Frame]] = []
        for action in actions:
            self.actions.append(action)
            assert self.close is None, f"action {action!r} after the connection was closed"
            if isinstance(action, SendData):
                assert action.stream_id not in self.ended, (
                    f"data on stream {action.stream_id} after its end"
                )
                for frame in self.decoders[action.stream_id].feed(action.data):
                    new.append((action.stream_id, frame))
                    self.frames[action.stream_id].append(frame)
                if action.end_stream:
                    self.decoders[action.stream_id].eof()
                    self.ended.add(action.stream_id)
            elif isinstance(action, AbortStream):
                self.aborted[action.stream_id] = action.code
            elif isinstance(action, ResetStream):
                self.reset[action.stream_id] = action.code
            else:
                assert isinstance(action, CloseConnection)
                self.close = action
        return new

    def send(self, stream_id: int, *frames: Frame, end: bool = False) -> list[tuple[int, Frame]]:
        data = b"".join(encode_frame(f) for f in frames)
        return self.absorb(self.session.stream_data(stream_id, data, end))

    def raw(self, stream_id: int, data: bytes, end: bool = False) -> list[tuple[int, Frame]]:
        return self.absorb(self.session.stream_data(stream_id, data, end))

    def pump(self) -> list[tuple[int, Frame]]:
        return self.absorb(self.session.pump())

    def hello(self, **fields: Any) -> HelloAck:
        hello = Hello(
            fields.pop("source_cluster", CLUSTER),
            fields.pop("source_database_id", DATABASE),
            fields.pop("last_applied_lsn", 0),
            fields.pop("protocol_version", 1),
            fields.pop("last_applied_term", 0),
        )
        assert not fields, f"unknown HELLO fields {fields}"
        new = self.send(0, hello, end=True)
        assert len(new) == 1
        stream_id, ack = new[0]
        assert stream_id == 0 and isinstance(ack, HelloAck)
        assert 0 in self.ended
        return ack


# -- the process's resources -----------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def resident_bytes() -> int:
    """Resident memory now (VmRSS), in bytes."""
    return _proc_status_bytes("VmRSS")


def peak_resident_bytes() -> int | None:
    """The resident high-water mark (VmHWM), in bytes; None where the kernel has none."""
    try:
        return _proc_status_bytes("VmHWM")
    except AssertionError:
        return None


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def traced_memory(action: Callable[[], object]) -> tuple[int, int]:
    """The peak and the retained Python memory (bytes) of running ``action``, collected."""
    gc.collect()
    tracemalloc.start()
    try:
        action()
        gc.collect()
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, retained


def thread_names(*, executor_pool: bool = True) -> list[str]:
    """Every live thread's name, sorted.

    Without ``executor_pool`` it leaves out asyncio's default executor ("asyncio_N",
    getaddrinfo for each dial): a bounded pool of idle threads while a loop lives, not a leak.
    """
    return sorted(
        t.name for t in threading.enumerate() if executor_pool or not t.name.startswith("asyncio_")
    )


@contextmanager
def logged(level: str, format: str | None = None) -> Iterator[list[str]]:
    """Every loguru message at ``level`` or above while the block runs."""
    lines: list[str] = []
    options: dict[str, Any] = {} if format is None else {"format": format}
    sink = logger.add(lambda message: lines.append(str(message)), level=level, **options)
    try:
        yield lines
    finally:
        logger.remove(sink)


# -- supervisor tests: errors, a probe, workers ----------------------------------------------


class HardError(Exception):
    hard = True


class TransientError(Exception):
    hard = False


class Probe:
    """Thread-safe event log that tests wait on (never with fixed sleeps)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self.events: list[tuple[Any, ...]] = []

    def record(self, *event: Any) -> None:
        with self._condition:
            self.events.append(event)
            self._condition.notify_all()

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        with self._condition:
            return [e for e in self.events if e[0] == kind]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        with self._condition:
            if not self._condition.wait_for(predicate, timeout):
                raise AssertionError(f"condition not met within {timeout} s; events: {self.events}")

    def wait_count(self, kind: str, count: int, timeout: float = WAIT) -> None:
        self.wait_for(lambda: len([e for e in self.events if e[0] == kind]) >= count, timeout)


class Worker(SupervisedActor):
    """Records its life in a probe; messages make it crash, report, stop or echo."""

    def __init__(self, name: str, probe: Probe, parent: ActorRef[Any] | None = None) -> None:
        super().__init__(parent=parent)
        self.name = name
        self.probe = probe

    def on_start(self) -> None:
        self.probe.record("start", self.name, self.actor_urn)

    def on_stop(self) -> None:
        self.probe.record("stop", self.name, self.actor_urn)

    def on_restart(self) -> None:
        self.probe.record("restart", self.name, threading.current_thread().name)

    def on_receive(self, message: Any) -> Any:
        match message:
            case ("crash", error):
                raise error
            case ("report", error):
                self.report_failure(error)
                return None
            case "stop":
                self.stop()
                return None
            case ("echo", value):
                self.probe.record("echo", self.name, value)
                return (self.name, value)
            case "thread":
                return threading.current_thread().name
        return super().on_receive(message)


class FailsOnStart(SupervisedActor):
    def __init__(
        self, name: str, probe: Probe, error: BaseException, parent: ActorRef[Any] | None = None
    ) -> None:
        super().__init__(parent=parent)
        self.name = name
        self.probe = probe
        self.error = error

    def on_start(self) -> None:
        self.probe.record("start", self.name, self.actor_urn)
        # The same instance is raised on every start; drop the old traceback
        # so it does not grow with each failure.
        raise self.error.with_traceback(None)


def worker(name: str, probe: Probe, restart: str = "permanent") -> ChildSpec:
    return ChildSpec(name, lambda parent: Worker.start(name, probe, parent=parent), restart)


def fails_on_start(name: str, probe: Probe, error: BaseException) -> ChildSpec:
    return ChildSpec(name, lambda parent: FailsOnStart.start(name, probe, error, parent=parent))


def wait_state(
    supervisor: ActorRef[Any], child_id: str, state: ChildState, timeout: float = WAIT
) -> ChildStatus:
    """Poll WhichChildren until the child reaches `state` (failure notices travel async)."""
    deadline = time.monotonic() + timeout
    while True:
        row = statuses(supervisor)[child_id]
        if row.state is state:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"{child_id} still {row.state} after {timeout} s: {row}")


def child_ref(
    supervisor: ActorRef[Any], child_id: str, timeout: float | None = WAIT
) -> ActorRef[Any]:
    """The child's live actor (``GetChild``)."""
    ref = cast("ActorRef[Any] | None", supervisor.ask(GetChild(child_id), timeout=timeout))
    assert ref is not None, f"{child_id} has no live actor"
    return ref


def children(supervisor: ActorRef[Any], timeout: float | None = WAIT) -> list[ChildStatus]:
    """``WhichChildren``: every child's status, in start order."""
    return cast(list[ChildStatus], supervisor.ask(WhichChildren(), timeout=timeout))


def child_refs(supervisor: ActorRef[Any]) -> list[ActorRef[Any]]:
    """Every child's live actor, in start order."""
    refs = [row.ref for row in children(supervisor)]
    assert None not in refs, f"a child has no live actor: {refs}"
    return [ref for ref in refs if ref is not None]


def statuses(supervisor: ActorRef[Any]) -> dict[str, ChildStatus]:
    """Also a barrier: answered only after every message told before it."""
    return {row.id: row for row in children(supervisor)}


def http_get(url: str, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url + path`` over real HTTP: (status code, body), error statuses included."""
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
