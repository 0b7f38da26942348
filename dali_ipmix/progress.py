"""The progress line of the commands' longer work (``fractals``, ``synth``, ``verify``, ``shard``,
``preview``, ``eval``): tqdm's, one line on stderr rewritten in place (``verify 1200/5000  24%
450.1/s  ETA 00:08``), silent when stderr is no terminal, so logs, pipes and CI output stay clean,
silent for work that ends within ``DELAY`` seconds, and erased when done (the command prints its
own summary next).  train.py's per-step lines are log lines, not a progress line
(``training.metrics.StepWindow``)."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

DELAY = 1.0          # seconds before the line first appears
INTERVAL = 0.5       # seconds between redraws
_COUNTED = "{desc} {n_fmt}/{total_fmt}  {percentage:3.0f}%  {rate_noinv_fmt}  ETA {remaining}"
_OPEN_ENDED = "{desc} {n_fmt}  {rate_noinv_fmt}"


def Progress(label: str, total: Optional[int] = None, *, stream: Optional[TextIO] = None,
             enabled: Optional[bool] = None, delay: float = DELAY, interval: float = INTERVAL) -> tqdm:
    """A progress line counting to ``total`` (``update(n)``, ``close()``, a context manager).
    ``enabled``: None = only when ``stream`` (stderr by default) is a terminal."""
    stream = stream if stream is not None else sys.stderr
    if enabled is None:
        enabled = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(total=total, desc=label, file=stream, disable=not enabled, delay=delay,
                mininterval=interval, leave=False, dynamic_ncols=True, unit="",
                bar_format=_COUNTED if total else _OPEN_ENDED)


def track(items: Iterable[T], label: str, total: Optional[int] = None, **kw) -> Iterator[T]:
    """``items`` with a progress line (``total`` defaults to ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(label, total, **kw) as bar:
        for item in items:
            yield item
            bar.update()
