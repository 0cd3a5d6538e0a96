"""Adapters for open_clip image encoders: a registry of kinds (Convpass and its variants, LoRA, BitFit,
VPT-deep), injected by wrapping the attention / MLP sub-modules of each block, or by the kind's own injection."""
from clipconv.adapters.adaptformer import AdaptFormerConfig
from clipconv.adapters.bitfit import BitFitBiases, BitFitConfig, encoder_biases
from clipconv.adapters.bottleneck import Bottleneck
from clipconv.adapters.convpass import CONV_INITS, Convpass, ConvpassConfig, SharedProjections
from clipconv.adapters.dora import DORA, DoRAConfig, DoRAVariant
from clipconv.adapters.houlsby import BottleneckAdapterConfig
from clipconv.adapters.inject import (
    SHARED_NAME, adapted_modules, adapter_kinds, adapter_modules, adapter_parameters, add_adapters, count_trainable,
    get_adapter_scale, prompt_tokens, remove_adapters, set_adapter_scale, transformer_blocks, unwrap_all
)
from clipconv.adapters.lora import (
    LORA_TARGETS, LoRA, LoRAAttention, LoRAConfig, LoRALinear, add_lora, lora_attention, lora_wrappers
)
from clipconv.adapters.pooled import PooledLastBlock, pool_last_block, unpool_last_block
from clipconv.adapters.registry import (
    ADAPTERS, PLACEMENTS, AdapterConfig, AdapterFactory, AdapterKind, AdapterTarget, get_adapter, make_config,
    mergeable_kinds, register_adapter
)
from clipconv.adapters.tokens import TokenLayout, encoder_layout
from clipconv.adapters.vpt import DeepPrompts, PromptedBlock, VPTConfig, vpt_init_bound
from clipconv.adapters.wrappers import AdaptedModule, AdapterRecord, ParallelAdapter, ParameterView, SequentialAdapter

__all__ = [
    "ADAPTERS",
    "PLACEMENTS",
    "CONV_INITS",
    "SHARED_NAME",
    "AdaptFormerConfig",
    "AdaptedModule",
    "AdapterRecord",
    "DeepPrompts",
    "PromptedBlock",
    "VPTConfig",
    "vpt_init_bound",
    "BitFitBiases",
    "BitFitConfig",
    "encoder_biases",
    "LORA_TARGETS",
    "LoRA",
    "LoRAAttention",
    "LoRAConfig",
    "LoRALinear",
    "DORA",
    "DoRAConfig",
    "DoRAVariant",
    "ParameterView",
    "add_lora",
    "lora_attention",
    "adapter_kinds",
    "lora_wrappers",
    "prompt_tokens",
    "transformer_blocks",
    "unwrap_all",
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
    "PooledLastBlock",
    "pool_last_block",
    "unpool_last_block",
    "adapted_modules",
    "adapter_modules",
    "adapter_parameters",
    "add_adapters",
    "count_trainable",
    "encoder_layout",
    "get_adapter",
    "get_adapter_scale",
    "make_config",
    "mergeable_kinds",
    "register_adapter",
    "remove_adapters",
    "set_adapter_scale",
]
