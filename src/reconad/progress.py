"""Progress for long work: a tqdm bar on a terminal, plain log lines at an interval otherwise.

When stderr is not a terminal (a log file, CI, a study worker), carriage-return bars would pile up on one huge
line; there the same calls write ``desc: 120/2000 (6%), 1.2 it/s, ETA 26 min`` through ``logging`` every
``RECONAD_PROGRESS_SECONDS`` seconds (default 30). ``RECONAD_PROGRESS=off`` silences both.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["format_duration", "progress"]

T = TypeVar("T")
log = logging.getLogger("reconad.progress")


def format_duration(seconds: float) -> str:
    """``3 min 02 s``, ``1 h 05 min``, ``12 s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


class _LogBar:
    """The subset of tqdm's interface reconad uses, writing log lines instead of redrawing a bar."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, initial: int, interval: float):
        self.iterable, self.desc, self.n, self.interval = iterable, desc, initial, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.start, self.start_n, self.last = time.monotonic(), initial, time.monotonic()
        self.postfix = ""

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _emit(self) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts.append(f"{rate:.2f} it/s")
        if self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        log.info(", ".join(parts))

    def close(self) -> None:
        if self.n != self.start_n:
            self._emit()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", initial: int = 0,
             disable: bool = False, leave: bool = True) -> Any:
    """A progress bar over ``iterable`` (or a manual one with ``total`` and ``update``)."""
    if disable or os.environ.get("RECONAD_PROGRESS", "").lower() in ("off", "0", "false"):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, disable=True)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave, dynamic_ncols=True)
    interval = float(os.environ.get("RECONAD_PROGRESS_SECONDS", "30"))
    return _LogBar(iterable, total, desc, initial, interval)
