"""A name → class registry filled by a class decorator (methods, dataset families)."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T", bound=type)


class Registry(dict, Generic[T]):
    """{name: class}; `register(name)` decorates a class (setting `cls.name`), twice is an error."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(cls: T) -> T:
            if name in self:
                raise ValueError(f"{self.what} '{name}' registered twice")
            cls.name = name
            self[name] = cls
            return cls

        return decorate

    def lookup(self, name: str) -> T:
        """The class registered as `name`; unknown names list the known ones."""
        if name not in self:
            raise ValueError(f"unknown {self.what} '{name}'; choose one of {sorted(self)}")
        return self[name]
