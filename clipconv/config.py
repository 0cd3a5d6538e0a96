"""Option dataclasses with help text: the one config base shared by methods and adapter kinds."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, TypeVar

__all__ = ["Config", "option"]

ConfigT = TypeVar("ConfigT", bound="Config")


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           choices: Optional[Sequence[Any]] = None) -> Any:
    """A config field that carries its help text (and allowed values), as PEFT's `LoraConfig` fields do.

    The help text is what `--help` shows; `choices` are checked by `Config.from_options`.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    """Every option of one component, with its reference default and help text (subclass per component).

    Build from loose options with `from_options`: unknown keys raise with the list of known ones, so a
    misspelled option never passes silently. Subclasses may validate values in `__post_init__`.
    """

    @classmethod
    def from_options(cls: type[ConfigT], options: Optional[Mapping[str, Any]] = None) -> ConfigT:
        options = dict(options or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; known options: {sorted(known)}")
        for name, value in options.items():
            choices = known[name].metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"option '{name}' of {cls.__name__} must be one of {list(choices)}, got {value!r}")
        return cls(**options)

    @classmethod
    def help(cls) -> dict[str, str]:
        """{option name: help text}."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
