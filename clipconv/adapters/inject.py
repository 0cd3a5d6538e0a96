"""Put adapters into an open_clip image encoder by wrapping the sub-modules of its blocks (PEFT-style).

In every transformer block, `block.attn` and/or `block.mlp` is replaced by a `ParallelAdapter` (or a
`SequentialAdapter`) that delegates to the original module and adds the adapter term; the block itself,
its forward and its LayerNorms stay open_clip's. The block computes `ln_1(x)` once and hands it to the
wrapper, so trunk and adapter share it. Backbone state-dict keys are unchanged (the wrapper aliases the
wrapped module's tensors); adapter keys are `...resblocks.<i>.attn.adapter.*` / `.mlp.adapter.*`;
modules shared by all adapters (convpass_share) live once at `visual.transformer.shared_adapter`.

With LayerScale blocks (`ls_init_value`; no OpenAI/LAION CLIP uses it), the adapter term is inside the
branch and therefore scaled by γ like the trunk.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch import nn

from . import convpass as _convpass  # noqa: F401  (registers the Convpass kinds)
from .registry import AdapterConfig, AdapterTarget, get_adapter, make_config
from .tokens import TokenLayout, encoder_layout
from .wrappers import AdaptedModule, ParallelAdapter, SequentialAdapter

__all__ = [
    "add_adapters",
    "remove_adapters",
    "adapter_modules",
    "adapter_parameters",
    "adapted_modules",
    "count_trainable",
    "set_adapter_scale",
    "get_adapter_scale",
    "SHARED_NAME",
]

SHARED_NAME = "shared_adapter"
SITES = {"attn+mlp": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}
BLOCK_TYPES = (ResidualAttentionBlock, CustomResidualAttentionBlock)


def _blocks(visual: nn.Module) -> nn.ModuleList:
    """The encoder's transformer blocks, after checking the encoder is an open_clip ViT they can wrap."""
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(
            f"add_adapters needs an open_clip VisionTransformer (visual.transformer.resblocks); got "
            f"{type(visual).__name__}. timm towers, ModifiedResNet and other encoders are not supported"
        )
    foreign = sorted({type(b).__name__ for b in blocks if not isinstance(b, BLOCK_TYPES)})
    if foreign:
        raise TypeError(f"add_adapters wraps open_clip (Custom)ResidualAttentionBlocks only; this encoder has {foreign}")
    inner_norm = sorted({type(b.ln_attn).__name__ for b in blocks
                         if not isinstance(getattr(b, "ln_attn", nn.Identity()), nn.Identity)})
    if inner_norm:
        raise TypeError("add_adapters cannot wrap attention followed by a LayerNorm inside the branch "
                        f"(scale_attn=True gives CustomResidualAttentionBlock.ln_attn = {inner_norm}); "
                        "build the model without scale_attn")
    if not getattr(transformer, "batch_first", True):
        raise TypeError("add_adapters needs a batch-first transformer (tokens (B, N, width))")
    return blocks


def _check_no_patch_dropout(visual: nn.Module) -> None:
    patch_dropout = getattr(visual, "patch_dropout", None)
    if patch_dropout is not None and not isinstance(patch_dropout, nn.Identity) and getattr(patch_dropout, "prob", 1) > 0:
        raise ValueError(
            "this image encoder uses patch dropout, which drops tokens in training and breaks the adapters' patch "
            "grid; build the model with vision_cfg.patch_dropout = 0"
        )


def _layer_drop_rates(rate: float, layers: int) -> list[float]:
    """timm's stochastic-depth rule: 0 at the first block, `rate` at the last, linear in between."""
    if layers == 1:
        return [0.0]
    return [rate * index / (layers - 1) for index in range(layers)]


def add_adapters(
    visual: nn.Module,
    kind: str = "convpass",
    config: Optional[AdapterConfig] = None,
    *,
    layout: Optional[TokenLayout] = None,
    **options: Any,
) -> nn.ModuleList:
    """Wrap the sub-blocks of every block of an open_clip image encoder with adapters; freeze the rest.

    `kind` is a registered adapter kind ("convpass", "convpass_attn", "convpass_share"); give its
    options as a config (`ConvpassConfig(dim=8, ...)`) or as keywords (`dim=8, scale=10`); unknown
    options raise with the known ones. `layout` says where the patch grid sits among the tokens
    (default: [cls] + `visual.grid_size`). Adapters are created in fp32 on the encoder's device. Afterwards
    only adapter parameters require grad within `visual`. Returns the added modules (shared ones first).
    Refuses an encoder that already has adapters: call `remove_adapters` first.
    """
    spec = get_adapter(kind)
    config = make_config(kind, config, **options)
    placement = spec.resolve_placement(config)
    blocks = _blocks(visual)
    if any(isinstance(m, AdaptedModule) for m in visual.modules()) or hasattr(visual.transformer, SHARED_NAME):
        raise ValueError("this image encoder already has adapters; call remove_adapters(visual) before adding new ones")
    _check_no_patch_dropout(visual)

    target = AdapterTarget(width=int(visual.transformer.width), layers=len(blocks),
                           layout=layout if layout is not None else encoder_layout(visual))
    factory = spec.build(config, target)
    wrapper = SequentialAdapter if config.sequential else ParallelAdapter
    rates = _layer_drop_rates(config.drop_path, len(blocks))
    added: list[nn.Module] = [factory.shared] if factory.shared is not None else []
    wrapped: list[tuple[nn.Module, str, AdaptedModule]] = []
    for block, rate in zip(blocks, rates):
        for site in SITES[placement]:
            adapter = factory.make(site)
            wrapped.append((block, site, wrapper(getattr(block, site), adapter, config.scale, rate)))
            added.append(adapter)

    reference = next(visual.parameters())
    modules = nn.ModuleList(added).to(device=reference.device, dtype=torch.float32)
    for block, site, module in wrapped:
        setattr(block, site, module)
    if factory.shared is not None:
        visual.transformer.add_module(SHARED_NAME, factory.shared)
    modules.train(visual.training)
    trainable = {id(p) for p in modules.parameters()}
    for param in visual.parameters():
        param.requires_grad_(id(param) in trainable)
    return modules


def adapted_modules(module: nn.Module) -> list[AdaptedModule]:
    """Every adapter wrapper inside `module` (an encoder, a CLIP model or a classifier holding one)."""
    return [m for m in module.modules() if isinstance(m, AdaptedModule)]


def remove_adapters(visual: nn.Module) -> nn.ModuleList:
    """Undo `add_adapters`: put the wrapped modules back and return the removed adapters.

    Trunk parameters keep their current `requires_grad` (frozen)."""
    blocks = _blocks(visual)
    removed = adapter_modules(visual)
    if not removed:
        raise ValueError("this image encoder has no adapters to remove")
    for block in blocks:
        for site in ("attn", "mlp"):
            module = getattr(block, site)
            if isinstance(module, AdaptedModule):
                setattr(block, site, module.unwrap())
    if hasattr(visual.transformer, SHARED_NAME):
        delattr(visual.transformer, SHARED_NAME)
    return removed


def adapter_modules(module: nn.Module) -> nn.ModuleList:
    """Every adapter module inside `module` (shared ones first), each once."""
    found: list[nn.Module] = []
    for sub in module.modules():
        shared = getattr(sub, SHARED_NAME, None) if not isinstance(sub, AdaptedModule) else None
        if isinstance(shared, nn.Module):
            found.append(shared)
    found += [wrapper.adapter for wrapper in adapted_modules(module)]
    return nn.ModuleList(found)


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters inside `module`, each once."""
    return list(adapter_modules(module).parameters())


def count_trainable(module: nn.Module) -> int:
    """Number of trainable parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _wrappers(module: nn.Module) -> list[AdaptedModule]:
    wrappers = adapted_modules(module)
    if not wrappers:
        raise ValueError(f"{type(module).__name__} has no adapters: call add_adapters first")
    return wrappers


def set_adapter_scale(module: nn.Module, scale: float) -> None:
    """Set the adapter scale s of every adapter inside `module` (s = 0 gives the frozen encoder)."""
    scale = AdapterConfig(scale=scale).scale
    for wrapper in _wrappers(module):
        wrapper.scale = scale


def get_adapter_scale(module: nn.Module) -> float:
    """The adapter scale s shared by all adapters inside `module`."""
    scales = {wrapper.scale for wrapper in _wrappers(module)}
    if len(scales) != 1:
        raise ValueError(f"adapters have different scales {sorted(scales)}; set one with set_adapter_scale")
    return next(iter(scales))
