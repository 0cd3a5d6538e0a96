"""Fetch an iterator's next item in a background thread while the caller does other work.

The Trainer uses it to load (decode, augment, collate) the next batch while the backward pass of the current
one runs: the forward has drawn its random numbers by then (dropout), and neither the backward nor the
optimizer step draws any, so the global random stream — which the augmentation also uses — is consumed in
exactly the order of a serial loop, and the batches and results are the same. A loop that draws random
numbers between `fetch()` and the next `next()` (e.g. recomputing a forward with checkpointing) must not use it.
"""
from __future__ import annotations

import threading
from typing import Generic, Iterable, Iterator, Optional, TypeVar

__all__ = ["LoadAhead"]

T = TypeVar("T")


class LoadAhead(Generic[T]):
    """Iterate `items`; after `fetch()` the next item is produced in a thread, and `next()` waits for it.
    `close()` (also on exit from a `with` block) waits for a fetch under way and drops its item."""

    def __init__(self, items: Iterable[T]) -> None:
        self._items: Iterator[T] = iter(items)
        self._thread: Optional[threading.Thread] = None
        self._result: tuple[bool, object] = (False, StopIteration())

    def __iter__(self) -> "LoadAhead[T]":
        return self

    def fetch(self) -> None:
        """Start producing the next item in a background thread (no-op while one is under way)."""
        if self._thread is not None:
            return

        def produce() -> None:
            try:
                self._result = (True, next(self._items))
            except BaseException as error:  # re-raised in the caller's thread by __next__
                self._result = (False, error)

        self._thread = threading.Thread(target=produce, name="clipconv-load-ahead", daemon=True)
        self._thread.start()

    def __next__(self) -> T:
        if self._thread is None:
            return next(self._items)
        self._thread.join()
        self._thread = None
        ok, value = self._result
        self._result = (False, StopIteration())
        if ok:
            return value  # type: ignore[return-value]
        raise value  # type: ignore[misc]

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._result = (False, StopIteration())

    def __enter__(self) -> "LoadAhead[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
