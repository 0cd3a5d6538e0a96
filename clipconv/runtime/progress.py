"""Progress display: a tqdm bar on a terminal, a few plain lines in a log, nothing when quiet.

tqdm redraws its bar with carriage returns, which fill a log file (stderr not a terminal) with
thousands of frames. `progress()` shows the bar only when stderr is a terminal; otherwise it prints one
plain line each time another tenth of the work is done (at most one line per `MIN_SECONDS`, and at least
one every `MAX_SECONDS`), plus a closing line for loops that took `MIN_SECONDS` or more. `set_quiet(True)`
(the CLIs' --quiet) turns all of it off. While a bar is on screen, warnings are written above it on their
own line instead of being glued to the bar.
"""
from __future__ import annotations

import contextlib
import sys
import time
import warnings
from typing import Iterable, Iterator, Optional, Protocol, TextIO, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "set_quiet", "is_quiet", "MIN_SECONDS", "MAX_SECONDS"]

MIN_SECONDS = 5.0  # no two plain lines closer than this (short loops print nothing)
MAX_SECONDS = 30.0  # a plain line at least this often, whatever the fraction done
_quiet = False

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Progress(Protocol[T_co]):
    """What `progress()` returns: the items of the iterable, plus tqdm's `set_postfix(**values)`."""

    def __iter__(self) -> Iterator[T_co]: ...

    def set_postfix(self, **values: object) -> None: ...


def set_quiet(quiet: bool = True) -> None:
    """Turn all progress output off (True) or back on (False), process-wide."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def progress(iterable: Iterable[T], desc: str = "", total: Optional[int] = None, unit: str = "it",
             leave: bool = False, file: Optional[TextIO] = None) -> Progress[T]:
    """Iterate over `iterable` showing progress; the result also has tqdm's `set_postfix(**values)`."""
    stream = file if file is not None else sys.stderr
    if total is None:
        with contextlib.suppress(TypeError):
            total = len(iterable)  # type: ignore[arg-type]
    if _quiet:
        return _Lines(iterable, desc, total, unit, stream, silent=True)
    if _is_terminal(stream):
        return _Bar(iterable, desc, total, unit, leave, stream)
    return _Lines(iterable, desc, total, unit, stream, silent=False)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Lines:
    """Plain progress lines (no carriage returns) for logs and pipes."""

    def __init__(self, iterable: Iterable, desc: str, total: Optional[int], unit: str, stream: TextIO,
                 silent: bool) -> None:
        self.iterable, self.desc, self.total, self.unit = iterable, desc or "progress", total, unit
        self.stream, self.silent, self.postfix = stream, silent, ""

    def set_postfix(self, **values: object) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self) -> Iterator:
        if self.silent:
            yield from self.iterable
            return
        started = last = time.monotonic()
        next_tenth, count, printed = 1, 0, False
        for item in self.iterable:
            yield item
            count += 1
            now = time.monotonic()
            crossed = bool(self.total) and count * 10 >= next_tenth * self.total
            if (crossed and now - last >= MIN_SECONDS) or now - last >= MAX_SECONDS:
                self._line(count, now - started)
                last, printed = now, True
            if crossed:
                next_tenth = count * 10 // self.total + 1
        elapsed = time.monotonic() - started
        if printed or elapsed >= MIN_SECONDS:
            self._line(count, elapsed, done=True)

    def _line(self, count: int, elapsed: float, done: bool = False) -> None:
        amount = f"{count}/{self.total}" if self.total else str(count)
        share = f" ({100 * count // self.total}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        state = "done, " if done else ""
        self.stream.write(f"{self.desc}: {state}{amount} {self.unit}{share} in {elapsed:.0f} s{extra}\n")
        self.stream.flush()


class _Bar:
    """A tqdm bar; warnings raised meanwhile go through tqdm.write, so they start on their own line."""

    def __init__(self, iterable: Iterable, desc: str, total: Optional[int], unit: str, leave: bool,
                 stream: TextIO) -> None:

        self.bar = tqdm(iterable, desc=desc or None, total=total, unit=unit, leave=leave, file=stream)

    def set_postfix(self, **values: object) -> None:
        self.bar.set_postfix(**values)

    def __iter__(self) -> Iterator:

        shown = warnings.showwarning

        def above_the_bar(message, category, filename, lineno, file=None, line=None):
            text = warnings.formatwarning(message, category, filename, lineno, line)
            tqdm.write(text.rstrip("\n"), file=self.bar.fp)

        warnings.showwarning = above_the_bar
        try:
            yield from self.bar
        finally:
            warnings.showwarning = shown
            self.bar.close()
