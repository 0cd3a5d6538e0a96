"""Adapters for open_clip image encoders: a registry of kinds (Convpass and its variants), injected by
wrapping the attention / MLP sub-modules of each block."""
from .convpass import CONV_INITS, Convpass, ConvpassConfig, SharedProjections
from .adaptformer import AdaptFormerConfig
from .bottleneck import Bottleneck
from .houlsby import BottleneckAdapterConfig
from .inject import (
    SHARED_NAME,
    adapted_modules,
    adapter_modules,
    adapter_parameters,
    add_adapters,
    count_trainable,
    get_adapter_scale,
    remove_adapters,
    set_adapter_scale,
)
from .registry import (
    ADAPTERS,
    PLACEMENTS,
    AdapterConfig,
    AdapterFactory,
    AdapterKind,
    AdapterTarget,
    get_adapter,
    make_config,
    register_adapter,
)
from .tokens import TokenLayout, encoder_layout
from .wrappers import AdaptedModule, ParallelAdapter, SequentialAdapter

__all__ = [
    "ADAPTERS",
    "PLACEMENTS",
    "CONV_INITS",
    "SHARED_NAME",
    "AdaptFormerConfig",
    "AdaptedModule",
    "AdapterConfig",
    "AdapterFactory",
    "AdapterKind",
    "AdapterTarget",
    "Bottleneck",
    "BottleneckAdapterConfig",
    "Convpass",
    "ConvpassConfig",
    "ParallelAdapter",
    "SequentialAdapter",
    "SharedProjections",
    "TokenLayout",
    "adapted_modules",
    "adapter_modules",
    "adapter_parameters",
    "add_adapters",
    "count_trainable",
    "encoder_layout",
    "get_adapter",
    "get_adapter_scale",
    "make_config",
    "register_adapter",
    "remove_adapters",
    "set_adapter_scale",
]
