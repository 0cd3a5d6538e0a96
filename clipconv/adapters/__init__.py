"""Adapters for open_clip image encoders: Convpass and its variants, injected by wrapping blocks."""
from .convpass import CONV_INITS, Convpass, SharedProjections, grid_from_tokens
from .inject import (
    ConvpassBlock,
    adapter_modules,
    adapter_parameters,
    adapter_state_dict,
    add_adapters,
    count_trainable,
    get_adapter_scale,
    remove_adapters,
    set_adapter_scale,
)
from .registry import ADAPTERS, PLACEMENTS, AdapterFactory, AdapterMethod, get_adapter, register_adapter

__all__ = [
    "ADAPTERS",
    "PLACEMENTS",
    "CONV_INITS",
    "AdapterFactory",
    "AdapterMethod",
    "Convpass",
    "ConvpassBlock",
    "SharedProjections",
    "adapter_modules",
    "adapter_parameters",
    "adapter_state_dict",
    "add_adapters",
    "count_trainable",
    "get_adapter",
    "get_adapter_scale",
    "grid_from_tokens",
    "register_adapter",
    "remove_adapters",
    "set_adapter_scale",
]
