"""Transfer progress: a tqdm bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Protocol

from tplr.units import format_size

log = logging.getLogger("tplr.comms.progress")
LOG_INTERVAL_S = 10.0


class Progress(Protocol):
    def start(self, description: str, total_bytes: int, done_bytes: int) -> None: ...

    def advance(self, num_bytes: int) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def start(self, description: str, total_bytes: int, done_bytes: int) -> None:
        return None

    def advance(self, num_bytes: int) -> None:
        return None

    def close(self) -> None:
        return None


class BarProgress:
    """A tqdm bar: bytes, rate, ETA."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr
        self._bar = None

    def start(self, description: str, total_bytes: int, done_bytes: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_bytes,
            initial=done_bytes,
            desc=description,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=self._stream,
            dynamic_ncols=True,
            leave=False,
        )

    def advance(self, num_bytes: int) -> None:
        if self._bar is not None:
            self._bar.update(num_bytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LogProgress:
    """One INFO line every ``interval_s``: done, total, rate since start, ETA."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._description = ""
        self._total = 0
        self._done = 0
        self._fetched = 0
        self._started = self._last = time.monotonic()

    def start(self, description: str, total_bytes: int, done_bytes: int) -> None:
        self._description, self._total, self._done = description, total_bytes, done_bytes
        self._started = self._last = time.monotonic()

    def advance(self, num_bytes: int) -> None:
        self._done += num_bytes
        self._fetched += num_bytes
        now = time.monotonic()
        if now - self._last >= self._interval_s:
            self._last = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = self._fetched / elapsed
        left = self._total - self._done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        percent = 100.0 * self._done / self._total if self._total else 100.0
        return (
            f"{self._description}: {format_size(self._done)} of {format_size(self._total)}"
            f" ({percent:.0f}%), {rate / 1e6:.1f} MB/s, ETA {eta}"
        )

    def close(self) -> None:
        return None


def make_progress(progress: Progress | bool | None, stream: IO[str] | None = None) -> Progress:
    """``None``: a bar if ``stream`` (stderr) is a terminal, else log lines; ``False``: none;
    ``True``: a bar; anything else is used as given."""
    if progress is None:
        stream = stream or sys.stderr
        return BarProgress(stream) if stream.isatty() else LogProgress()
    if progress is True:
        return BarProgress(stream)
    if progress is False:
        return NoProgress()
    return progress
