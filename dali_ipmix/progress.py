"""A progress line for the commands' longer work (``fractals``, ``synth``, ``verify``, ``preview``,
``eval``), in the spirit of train.py's progress lines: one line on stderr, rewritten in place
(``verify 1200/5000  24%  450.1/s  ETA 0:00:08``), silent when stderr is no terminal, so logs,
pipes and CI output stay clean, and silent for work that ends within ``DELAY`` seconds."""
from __future__ import annotations

import datetime
import sys
import time
from typing import Iterable, Iterator, Optional, TextIO, TypeVar

T = TypeVar("T")

DELAY = 1.0          # seconds before the line first appears
INTERVAL = 0.5       # seconds between redraws


class Progress:
    def __init__(self, label: str, total: Optional[int] = None, *, stream: Optional[TextIO] = None,
                 enabled: Optional[bool] = None, delay: float = DELAY):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled, self.delay = enabled, delay
        self.start = self.last = time.monotonic()
        self.shown = False

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        if not self.total:
            return f"{self.label} {self.done}  {rate:.1f}/s"
        eta = (self.total - self.done) / rate if rate else 0.0
        return (f"{self.label} {self.done}/{self.total}  {100 * self.done / self.total:3.0f}%  "
                f"{rate:.1f}/s  ETA {datetime.timedelta(seconds=int(eta))}")

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start >= self.delay and (now - self.last >= INTERVAL or not self.shown):
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
            self.last, self.shown = now, True

    def close(self) -> None:
        """Erase the line: the command prints its own summary next."""
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], label: str, total: Optional[int] = None, **kw) -> Iterator[T]:
    """``items`` with a progress line (``total`` defaults to ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(label, total, **kw) as bar:
        for item in items:
            yield item
            bar.update()
