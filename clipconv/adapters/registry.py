"""Adapter methods by name: `register_adapter` fills `ADAPTERS`, `get_adapter` looks one up."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

__all__ = ["AdapterFactory", "AdapterMethod", "ADAPTERS", "register_adapter", "get_adapter", "PLACEMENTS"]

PLACEMENTS = ("attn+mlp", "attn", "mlp")


@dataclass
class AdapterFactory:
    """Makes the adapters of one encoder: `make()` returns a new adapter for one sub-block;
    `shared` holds modules every adapter uses (registered once on the encoder), or None."""

    make: Callable[[], nn.Module]
    shared: Optional[nn.Module] = None


@dataclass(frozen=True)
class AdapterMethod:
    """A registered adapter method.

    `build(width, dim=, kernel_size=, conv_init=, dropout=) -> AdapterFactory`;
    `placement` is the placement the method implies (e.g. "attn" for convpass_attn), or None.
    """

    name: str
    build: Callable[..., AdapterFactory]
    placement: Optional[str] = None


ADAPTERS: dict[str, AdapterMethod] = {}


def register_adapter(name: str, placement: Optional[str] = None) -> Callable:
    """Decorator registering `build(width, *, dim, kernel_size, conv_init, dropout) -> AdapterFactory`."""
    if placement is not None and placement not in PLACEMENTS:
        raise ValueError(f"placement of adapter '{name}' must be one of {PLACEMENTS} or None, got '{placement}'")

    def decorate(build: Callable[..., AdapterFactory]) -> Callable[..., AdapterFactory]:
        if name in ADAPTERS:
            raise ValueError(f"adapter method '{name}' is already registered")
        ADAPTERS[name] = AdapterMethod(name=name, build=build, placement=placement)
        return build

    return decorate


def get_adapter(name: str) -> AdapterMethod:
    """The registered method called `name`; ValueError listing the known ones otherwise."""
    try:
        return ADAPTERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown adapter method '{name}'; known methods: {sorted(ADAPTERS)}") from None
