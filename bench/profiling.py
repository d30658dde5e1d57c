"""Where the time goes at scale, without a sampler that must walk a thousand stacks.

- ``ThreadCpu``: CPU seconds per thread group (``SourceLink-*``, ``mirror-quic-loop``,
  ...) between two snapshots of ``/proc/self/task/*/stat``.
- ``LoopProfile``: cProfile inside the QUIC loop thread (cProfile only sees the
  thread that enables it), summarised as the top functions by own time.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import re
import threading
from pathlib import Path

from mirror_actors.link.loop import QuicLoop

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_DIGITS = re.compile(r"\d+")


def _thread_times() -> dict[int, float]:
    times: dict[int, float] = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return times
    for tid in tasks:
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields[11], fields[12]: utime, stime (stat fields 14 and 15).
        times[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICKS
    return times


def _group(name: str) -> str:
    return _DIGITS.sub("N", name)


class ThreadCpu:
    """CPU seconds by thread group since construction (threads that ended are lost)."""

    def __init__(self) -> None:
        self._start = _thread_times()

    def since(self) -> dict[str, float]:
        now = _thread_times()
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        groups: dict[str, float] = {}
        for tid, seconds in now.items():
            used = seconds - self._start.get(tid, 0.0)
            if used <= 0:
                continue
            group = _group(names.get(tid, "other (non-Python or ended)"))
            groups[group] = groups.get(group, 0.0) + used
        return dict(sorted(groups.items(), key=lambda item: -item[1]))


def describe_cpu(groups: dict[str, float], top: int = 5) -> str:
    total = sum(groups.values()) or 1.0
    return ", ".join(
        f"{name} {secs:.1f} s ({secs / total:.0%})" for name, secs in list(groups.items())[:top]
    )


class LoopProfile:
    """cProfile of the process's QUIC loop thread while the context is open."""

    def __init__(self) -> None:
        self.profile = cProfile.Profile()
        self._loop: QuicLoop | None = None

    def __enter__(self) -> LoopProfile:
        self._loop = QuicLoop.acquire()
        done = threading.Event()

        def enable() -> None:
            self.profile.enable()
            done.set()

        self._loop.call_soon(enable)
        done.wait(10.0)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        done = threading.Event()

        def disable() -> None:
            self.profile.disable()
            done.set()

        self._loop.call_soon(disable)
        done.wait(30.0)
        self._loop = None
        QuicLoop.release()

    def top(self, count: int = 25, sort: str = "tottime") -> str:
        out = io.StringIO()
        stats = pstats.Stats(self.profile, stream=out)
        stats.sort_stats(sort).print_stats(count)
        return out.getvalue()
