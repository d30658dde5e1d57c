"""The fastest source there can be, in its own process: plain aioquic, frames pre-encoded.

It answers HELLO with an accepting HELLO_ACK and SUBSCRIBE from LSN 1 by queueing
ENTRIES frames of about 1 MiB that were encoded once, before the run: the source
does no per-entry work while the mirror is measured.  It speaks PROTOCOL.md by
hand (msgpack and ``struct``, nothing of ``mirror_actors``), so what the
other engineer changes in the product's wire code cannot change this source.

Valid for a strict mirror: entries contiguous from ``from_lsn`` (a SUBSCRIBE
from any other LSN than 1 is encoded on the spot, the slow way), every term 1,
the stream kept open after the last entry (tailing), and section 5.3's flow
control: it stops at ``cap`` payload bytes in flight and resumes at 75 % of it.

``ChildSource`` is the parent side, shared with ``source_process.serve_filled``
(our ``SourceServer`` over a pre-filled store): the child sends its port, then
answers ``"connections"`` and ``"stop"`` on a pipe.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import struct
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import msgpack

START_TIMEOUT = 60.0
ALPN = "mirror/1"
HEADER = struct.Struct(">BI")
HELLO, HELLO_ACK, SUBSCRIBE, ENTRIES, ACK = 0x01, 0x02, 0x10, 0x11, 0x13
MAX_PAYLOAD = 1 << 20
NO_SNAPSHOT = 2**64 - 1
DEFAULT_CAP = 64 << 20  # PROTOCOL.md 5.3's default, as SourceServer's
TERM = 1


def entry_payload(entry_bytes: int) -> bytes:
    """The data of every entry of the bench's logs (the same bytes for both sources)."""
    return (bytes(range(256)) * (entry_bytes // 256 + 1))[:entry_bytes]


def encode_entries(first_lsn: int, count: int, data: bytes) -> list[tuple[bytes, int]]:
    """ENTRIES frames for LSNs ``first_lsn``..``first_lsn + count - 1``: (wire bytes, payload length).

    As many entries per frame as keep the payload under the protocol's 1 MiB.
    """
    per_frame = max(1, (MAX_PAYLOAD - 64) // (len(data) + 40))
    frames: list[tuple[bytes, int]] = []
    lsn, last = first_lsn, first_lsn + count - 1
    while lsn <= last:
        take = min(per_frame, last - lsn + 1)
        while True:
            payload = msgpack.packb(
                {
                    "entries": [
                        {"lsn": n, "term": TERM, "data": data} for n in range(lsn, lsn + take)
                    ]
                },
                use_bin_type=True,
            )
            if len(payload) <= MAX_PAYLOAD:
                break
            take = max(1, take * 9 // 10)
        frames.append((HEADER.pack(ENTRIES, len(payload)) + payload, len(payload)))
        lsn += take
    return frames


def _frames_in(buffer: bytearray) -> list[tuple[int, Any]]:
    """Whole frames at the start of ``buffer`` (removed from it), decoded."""
    out: list[tuple[int, Any]] = []
    position = 0
    while len(buffer) - position >= HEADER.size:
        kind, length = HEADER.unpack_from(buffer, position)
        end = position + HEADER.size + length
        if len(buffer) < end:
            break
        out.append((kind, msgpack.unpackb(bytes(buffer[position + HEADER.size : end]))))
        position = end
    del buffer[:position]
    return out


def _serve_raw(
    pipe: Connection,
    cluster: str,
    certfile: str,
    keyfile: str,
    database: str,
    count: int,
    entry_bytes: int,
    cap: int,
) -> None:
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.asyncio.server import serve
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration

    logging.getLogger("quic").setLevel(logging.ERROR)
    data = entry_payload(entry_bytes)
    prepared = encode_entries(1, count, data)  # once, before anything is measured
    live: set[Any] = set()

    class RawSource(QuicConnectionProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._buffers: dict[int, bytearray] = {}
            self._queue: list[tuple[bytes, int]] = []
            self._next = 0
            self._stream = -1
            self._in_flight = 0
            self._paused = False
            live.add(self)

        def quic_event_received(self, event: events.QuicEvent) -> None:
            if isinstance(event, events.StreamDataReceived):
                buffer = self._buffers.setdefault(event.stream_id, bytearray())
                buffer += event.data
                for kind, payload in _frames_in(buffer):
                    self._frame(event.stream_id, kind, payload)
                self._pump()
            elif isinstance(event, events.ConnectionTerminated):
                live.discard(self)

        def connection_lost(self, exc: Exception | None) -> None:
            live.discard(self)
            super().connection_lost(exc)

        def _frame(self, stream_id: int, kind: int, payload: Any) -> None:
            if stream_id == 0 and kind == HELLO:
                applied = int(payload.get("last_applied_lsn", 0))
                ok = payload.get("source_database_id") == database and applied <= count
                ack = {
                    "accepted": ok,
                    "error_code": 0 if ok else 0x07,
                    "error_detail": "" if ok else "diverged",
                    "source_cluster_id": cluster,
                    "snapshot_lsn": NO_SNAPSHOT,
                    "snapshot_bytes_total": 0,
                }
                body = msgpack.packb(ack, use_bin_type=True)
                self._quic.send_stream_data(0, HEADER.pack(HELLO_ACK, len(body)) + body, True)
                if not ok:
                    self._quic.close(error_code=0x07, reason_phrase="diverged")
            elif kind == SUBSCRIBE:
                start = max(1, int(payload["from_lsn"]))
                self._stream = stream_id
                if start == 1:
                    self._queue = prepared
                elif start <= count:  # a resubscription: encoded now, the slow way
                    self._queue = encode_entries(start, count - start + 1, data)
                else:
                    self._queue = []
                self._next = 0
            elif kind == ACK:
                self._in_flight = max(0, self._in_flight - int(payload["bytes"]))

        def _pump(self) -> None:
            if self._paused and self._in_flight <= cap * 3 // 4:
                self._paused = False
            queue, send = self._queue, self._quic.send_stream_data
            while not self._paused and self._next < len(queue):
                frame, size = queue[self._next]
                send(self._stream, frame, False)
                self._next += 1
                self._in_flight += size
                if self._in_flight >= cap:
                    self._paused = True
            self.transmit()

    configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], idle_timeout=30.0)
    configuration.load_cert_chain(certfile, keyfile)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        serve("127.0.0.1", 0, configuration=configuration, create_protocol=RawSource)
    )
    transport = server._transport
    assert transport is not None
    port = int(transport.get_extra_info("sockname")[1])
    stopped = loop.create_future()

    def on_command() -> None:
        try:
            command = pipe.recv()
        except (EOFError, OSError):
            command = "stop"
        if command == "connections":
            pipe.send(len(live))
        elif not stopped.done():
            stopped.set_result(None)

    loop.add_reader(pipe.fileno(), on_command)
    pipe.send(port)
    loop.run_until_complete(stopped)
    loop.remove_reader(pipe.fileno())
    for protocol in list(live):
        protocol.close()
    server.close()
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()
    try:
        pipe.send("stopped")
    except OSError:
        pass


class ChildSource:
    """A source in a child process (spawn): ``start()`` gives ``port``; ``connections()``; ``stop()``."""

    def __init__(self, target: Callable[..., None], args: Sequence[Any], name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=target, args=(child, *args), name=name, daemon=True)
        self.port = 0

    def start(self) -> ChildSource:
        self._process.start()
        try:
            if not self._pipe.poll(START_TIMEOUT):
                raise TimeoutError("the source process did not start")
            self.port = int(self._pipe.recv())
        except BaseException:
            self._process.kill()
            self._process.join(10.0)
            self._pipe.close()
            raise
        return self

    def connections(self) -> int:
        self._pipe.send("connections")
        if not self._pipe.poll(10.0):
            raise TimeoutError("the source process did not answer")
        return int(self._pipe.recv())

    def wait_quiet(self, timeout: float = 5.0) -> bool:
        """Wait until the source has no connection left (True) or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while self.connections():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self) -> None:
        try:
            if self._process.is_alive():
                self._pipe.send("stop")
                if self._pipe.poll(20.0):
                    self._pipe.recv()
        except (OSError, EOFError):
            pass
        finally:
            self._process.join(10.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(10.0)
            self._pipe.close()

    def __enter__(self) -> ChildSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def raw_source(
    cluster: str,
    certfile: str,
    keyfile: str,
    database: str,
    count: int,
    entry_bytes: int,
    cap: int = DEFAULT_CAP,
) -> ChildSource:
    """The pre-encoded aioquic source over ``count`` entries of ``entry_bytes`` (not started)."""
    return ChildSource(
        _serve_raw,
        (cluster, certfile, keyfile, database, count, entry_bytes, cap),
        "bench-raw-source",
    )
