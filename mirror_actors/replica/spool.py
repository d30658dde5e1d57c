"""Where a snapshot's bytes wait while they arrive: on disk, so memory stays flat.

A snapshot is only checked (CRC-32C, content) once all of it has come, and only
installed after that, in one transaction; until then its chunks are appended
to a spool.  ``FileSpool`` keeps them in a file (next to an SQLite replica, or
a temporary one); ``MemorySpool`` keeps them in memory, for pure tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from mirror_actors.wire.errors import MirrorError

READ_PIECE = 1 << 20


class StoreFailure(MirrorError):
    """The replica's store (or its snapshot spool) failed; retried from the last commit.

    A locked database, an I/O error or a full disk may go away: transient.
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"replica store failed: {detail}")


class StoreUnusable(MirrorError):
    """The replica's store cannot be used for this link at all: a configuration to fix."""

    hard = True

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"replica store unusable: {detail}")


class SnapshotSpool(Protocol):
    def begin(self, total_bytes: int) -> None:
        """A new transfer of ``total_bytes``: drop what was spooled, check there is room."""

    def write(self, data: bytes) -> None: ...

    def pieces(self) -> Iterator[bytes]:
        """The spooled bytes, in order, in pieces of bounded size."""

    def discard(self) -> None:
        """Drop what was spooled (after an install, or when the transfer is abandoned)."""


class MemorySpool:
    """Spools in memory: for pure tests and tiny snapshots."""

    def __init__(self) -> None:
        self._data = bytearray()

    def begin(self, total_bytes: int) -> None:
        self._data = bytearray()

    def write(self, data: bytes) -> None:
        self._data += data

    def pieces(self) -> Iterator[bytes]:
        for start in range(0, len(self._data), READ_PIECE):
            yield bytes(self._data[start : start + READ_PIECE])

    def discard(self) -> None:
        self._data = bytearray()


class FileSpool:
    """Spools to ``path`` (a temporary file when None); checks free disk up front."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._given = Path(path) if path is not None else None
        self._path: Path | None = None
        self._file: BinaryIO | None = None

    @property
    def path(self) -> Path | None:
        return self._path

    def begin(self, total_bytes: int) -> None:
        self.discard()
        if self._given is not None:
            self._path = self._given
        else:
            handle, name = tempfile.mkstemp(prefix="mirror-snapshot-", suffix=".spool")
            os.close(handle)
            self._path = Path(name)
        directory = self._path.parent
        try:
            free = shutil.disk_usage(directory).free
        except OSError as error:
            raise StoreFailure(f"cannot check free space in {directory}: {error}") from None
        if free < total_bytes:
            raise StoreFailure(
                f"the source's snapshot is {total_bytes} bytes but {directory} has only "
                f"{free} bytes free; free disk space there or set max_snapshot_bytes"
            )
        try:
            self._file = open(self._path, "wb")
        except OSError as error:
            raise StoreFailure(f"cannot create the snapshot spool {self._path}: {error}") from None

    def write(self, data: bytes) -> None:
        file = self._file
        if file is None:
            raise StoreFailure("snapshot spool written before begin()")
        try:
            file.write(data)
        except OSError as error:
            raise StoreFailure(f"cannot write the snapshot spool {self._path}: {error}") from None

    def pieces(self) -> Iterator[bytes]:
        if self._file is not None:
            self._file.flush()
        if self._path is None:
            return
        try:
            with open(self._path, "rb") as reader:
                while piece := reader.read(READ_PIECE):
                    yield piece
        except OSError as error:
            raise StoreFailure(f"cannot read the snapshot spool {self._path}: {error}") from None

    def discard(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()
        path, self._path = self._path, None
        if path is not None:
            path.unlink(missing_ok=True)
