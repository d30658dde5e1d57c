"""A replication stream handle that any thread may use.

Sending hands bytes to the QUIC loop thread; receiving reads frames that the
loop thread decoded into a queue.  The handle never touches aioquic itself, and
knows its connection only as a ``StreamTransport``: two calls that hand work
to the loop thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from attrs import frozen

from mirror_actors.wire.errors import MirrorError, ObserverRoleViolation, TransportError
from mirror_actors.wire.frames import Ack, Frame, encode_frame, is_voter_class


class StreamTransport(Protocol):
    """What a stream needs of its connection; both calls return at once, on any thread."""

    def submit_send(self, stream_id: int, data: bytes, acked_bytes: int = 0) -> bool:
        """Hand ``data`` to the loop thread; False when that thread is not running."""
        ...

    def submit_close_stream(self, stream_id: int) -> None:
        """Have the loop thread finish the stream and stop reading it."""
        ...


class StreamClosed(MirrorError):
    """This stream was closed by its user; open a new one."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("stream closed" + (f": {detail}" if detail else ""))


@frozen
class Delivery:
    """Frames that arrived together, and their payload bytes as ACK ``bytes`` counts them."""

    frames: tuple[Frame, ...]
    payload_bytes: int


StreamListener = Callable[["LinkStream", "Delivery | MirrorError"], None]
"""Called on the QUIC loop thread with each delivery, or the error that ended the
stream; it must not block (tell an actor). Whoever consumes a delivery acks it
with ``ack(applied_lsn, delivery.payload_bytes)``."""


class LinkStream:
    """One bidirectional stream of a connected link.

    ``send`` refuses voter-class frames (a mirror is an observer); ``recv``
    raises the typed error that ended the stream or the connection; ``ack``
    acknowledges what was received so far, so the source's flow control moves.
    """

    def __init__(
        self,
        transport: StreamTransport,
        stream_id: int,
        on_applied: Callable[[int, int | None], None] | None = None,
        listener: StreamListener | None = None,
    ) -> None:
        self._owner = transport
        self._stream_id = stream_id
        self._on_applied = on_applied
        self._listener = listener
        self._inbox: queue.Queue[tuple[Frame, int] | MirrorError] = queue.Queue()
        self._unacked_bytes = 0
        self._error: MirrorError | None = None
        self._failure: MirrorError | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def stream_id(self) -> int:
        """The QUIC stream id, chosen when the handle was made: reading it never waits."""
        return self._stream_id

    def belongs_to(self, connection: object) -> bool:
        """Whether this stream is one of ``connection``'s (a link tells stale reports apart)."""
        return self._owner is connection

    @property
    def unacked_bytes(self) -> int:
        """Payload bytes of ENTRIES/SNAPSHOT_CHUNK frames received and not yet acknowledged."""
        return self._unacked_bytes

    def send(self, frame: Frame) -> None:
        if is_voter_class(frame):
            raise ObserverRoleViolation(f"refused to send {frame.TYPE.name}")
        self._check_open()
        self._submit(encode_frame(frame))

    def recv(self, timeout: float | None = None) -> Frame:
        """The next frame from the source; ``TimeoutError`` if none came within ``timeout``."""
        if self._error is not None:
            raise self._error
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame within {timeout} s") from None
        if isinstance(item, MirrorError):
            self._error = item
            raise item
        frame, payload_bytes = item
        with self._lock:
            self._unacked_bytes += payload_bytes
        return frame

    def frames(self, timeout: float | None = None) -> Iterator[Frame]:
        """Frames until the stream ends with an error (which is raised)."""
        while True:
            yield self.recv(timeout)

    def ack(
        self,
        applied_lsn: int,
        consumed_bytes: int | None = None,
        *,
        applied_term: int | None = None,
    ) -> None:
        """Send an ACK and record ``applied_lsn`` (and its entry's ``applied_term``).

        ``consumed_bytes`` defaults to everything ``recv`` returned since the last
        ACK; a listener passes the ``payload_bytes`` of the deliveries it consumed.
        The link sends the recorded LSN and term in its next HELLO.
        """
        self._check_open()
        with self._lock:
            if consumed_bytes is None:
                consumed_bytes, self._unacked_bytes = self._unacked_bytes, 0
        self._submit(encode_frame(Ack(applied_lsn, consumed_bytes)), consumed_bytes)
        if self._on_applied is not None:
            self._on_applied(applied_lsn, applied_term)

    def close(self) -> None:
        """Finish this side of the stream and stop reading it."""
        if not self._closed:
            self._closed = True
            self._owner.submit_close_stream(self._stream_id)
            if self._listener is None:
                self._inbox.put(StreamClosed())  # wakes a reader blocked in recv()

    def __enter__(self) -> LinkStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- called by the connection, on the loop thread ------------------------------

    def deliver(self, frames: Sequence[tuple[Frame, int]]) -> None:
        """Frames from the source, each with its payload length: to the listener or ``recv``."""
        if self._listener is None:
            for item in frames:
                self._inbox.put(item)
            return
        delivery = Delivery(tuple(frame for frame, _ in frames), sum(size for _, size in frames))
        self._listener(self, delivery)

    def fail(self, error: MirrorError) -> None:
        """The stream or its connection ended with ``error`` (only the first one counts)."""
        if self._failure is not None:
            return
        self._failure = error
        if self._listener is not None:
            self._listener(self, error)
        else:
            self._inbox.put(error)

    # -- internals -------------------------------------------------------------------

    def _submit(self, data: bytes, acked_bytes: int = 0) -> None:
        if not self._owner.submit_send(self._stream_id, data, acked_bytes):
            self.fail(TransportError("the QUIC loop thread is not running"))

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosed()
        if self._failure is not None:
            raise self._failure

    def __repr__(self) -> str:
        return f"LinkStream(stream_id={self._stream_id}, closed={self._closed})"
