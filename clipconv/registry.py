"""One name → entry registry for methods, adapter kinds and dataset families.

Entries are added once (`add(name, entry)`, or the class decorator `register(name)`, which also sets
`cls.name`); each package's `__init__` imports its modules, so importing the package registers them all.
A registry may also resolve parametrized names: `resolver(prefix, resolve, suffixes)` makes
`prefix + suffix` an entry for every suffix `suffixes()` lists (e.g. "adapter:<kind>" for every registered
adapter kind), built by `resolve(suffix)` on first use and kept; such names are listed and looked up like
registered ones.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable, Iterator, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")
C = TypeVar("C", bound=type)


class Registry(Mapping[str, T]):
    """A read-only mapping {name: entry} (registration order, then the resolvable names) filled by `add`,
    `register` and `resolver`; a name registered twice is an error, `lookup` names the known ones."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        self._resolvers: dict[str, tuple[Callable[[str], T], Callable[[], Iterable[str]]]] = {}
        self._resolved: dict[str, T] = {}

    # ----- filling ------------------------------------------------------------------------------
    def add(self, name: str, entry: T) -> T:
        """Register `entry` as `name`; ValueError when the name is taken (or resolved by a prefix)."""
        if name in self:
            raise ValueError(f"{self.what} '{name}' is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: register the class as `name` and set its `name` attribute."""

        def decorate(cls: C) -> C:
            if name in self:
                raise ValueError(f"{self.what} '{name}' is already registered")
            cls.name = name
            return self.add(name, cls)

        return decorate

    def remove(self, name: str) -> None:
        """Unregister `name` (tests that register a temporary entry)."""
        del self._entries[name]

    __delitem__ = remove

    def resolver(self, prefix: str, resolve: Callable[[str], T], suffixes: Callable[[], Iterable[str]]) -> None:
        """Make `prefix + s` an entry, `resolve(s)`, for every `s` in `suffixes()` (read at each lookup)."""
        if prefix in self._resolvers:
            raise ValueError(f"{self.what} prefix '{prefix}' is already registered")
        self._resolvers[prefix] = (resolve, suffixes)

    # ----- reading ------------------------------------------------------------------------------
    def _resolve(self, name: str) -> T:
        for prefix, (resolve, suffixes) in self._resolvers.items():
            suffix = name[len(prefix):]
            if name.startswith(prefix) and suffix in set(suffixes()):
                if name not in self._resolved:
                    self._resolved[name] = resolve(suffix)
                return self._resolved[name]
        raise KeyError(name)

    def __getitem__(self, name: str) -> T:
        if not isinstance(name, str):
            raise KeyError(name)
        if name in self._entries:
            return self._entries[name]
        return self._resolve(name)

    def __iter__(self) -> Iterator[str]:
        yield from list(self._entries)
        for prefix, (_, suffixes) in list(self._resolvers.items()):
            yield from [prefix + suffix for suffix in suffixes()]

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def registered(self) -> list[str]:
        """The names added with `add`/`register` (not the resolvable ones), in registration order."""
        return list(self._entries)

    def lookup(self, name: str) -> T:
        """The entry registered (or resolved) as `name`; ValueError listing the known names otherwise."""
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} '{name}'; choose one of {sorted(self)}") from None
