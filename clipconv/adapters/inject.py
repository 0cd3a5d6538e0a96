"""Put adapters into an open_clip image encoder (PEFT-style: wrap, delegate, never copy a forward).

Sub-block kinds (convpass, ...): in every transformer block, `block.attn` and/or `block.mlp` is replaced by a
`ParallelAdapter` (or a `SequentialAdapter`, or the kind's own `AdapterFactory.wrapper`) that delegates to
the original module and adds the adapter term; the block itself, its forward and its LayerNorms stay
open_clip's. The block computes `ln_1(x)` once and hands it to the wrapper, so trunk and adapter share it.
One exception, after injection: in an encoder that pools its [cls] token, the last block's forward computes
[cls] only when the adapters allow it (clipconv/adapters/pooled.py; same mathematics, fewer FLOPs).
Backbone state-dict keys are unchanged (the wrapper aliases the wrapped module's tensors); adapter keys are
`...resblocks.<i>.attn.adapter.*` / `.mlp.adapter.*`; modules shared by all adapters (convpass_share) live
once at `visual.transformer.shared_adapter`.

Kinds with their own injection (`AdapterFactory.inject`): LoRA wraps the attention modules (or their
linears), VPT-deep wraps whole blocks, BitFit leaves an `AdapterRecord` and trains existing biases. The
functions here find all of them by walking the encoder (`AdaptedModule` wrappers anywhere, records), so
`adapter_modules`, `remove_adapters` and `set_adapter_scale` work for every kind. One kind per encoder,
except that `vpt_deep` may come first and one other kind after it (grid-aware adapters then skip the prompts).

With LayerScale blocks (`ls_init_value`; no OpenAI/LAION CLIP uses it), the adapter term is inside the
branch and therefore scaled by γ like the trunk.
"""
from __future__ import annotations

from typing import Optional

import torch
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch import nn

from clipconv.adapters import convpass as _convpass  # noqa: F401  (registers the Convpass kinds)
from clipconv.adapters.pooled import pool_last_block, unpool_last_block
from clipconv.adapters.registry import AdapterConfig, AdapterFactory, AdapterTarget, get_adapter, make_config
from clipconv.adapters.tokens import TokenLayout, encoder_layout
from clipconv.adapters.wrappers import AdaptedModule, AdapterRecord, ParallelAdapter, ParameterView, SequentialAdapter

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
    "adapter_kinds",
    "prompt_tokens",
    "transformer_blocks",
    "unwrap_all",
]

SHARED_NAME = "shared_adapter"
VPT_KIND = "vpt_deep"  # the one kind that composes with another (its block wrappers sit outside theirs)
SITES = {"attn+mlp": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}
BLOCK_TYPES = (ResidualAttentionBlock, CustomResidualAttentionBlock)


def _unwrapped(block: nn.Module) -> nn.Module:
    """The open_clip block inside any block wrappers (VPT wraps whole blocks)."""
    while isinstance(block, AdaptedModule):
        block = block.base_layer
    return block


def transformer_blocks(module: nn.Module, who: str = "add_adapters") -> nn.ModuleList:
    """The blocks of an open_clip `Transformer` (text or image), given it or an encoder holding it as
    `.transformer`, after checking they are blocks the adapters can wrap (possibly already VPT-wrapped)."""
    transformer = module if hasattr(module, "resblocks") else getattr(module, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(
            f"{who} needs an open_clip VisionTransformer (visual.transformer.resblocks) or Transformer; got "
            f"{type(module).__name__}. timm towers, ModifiedResNet and other encoders are not supported"
        )
    foreign = sorted({type(_unwrapped(b)).__name__ for b in blocks if not isinstance(_unwrapped(b), BLOCK_TYPES)})
    if foreign:
        raise TypeError(f"{who} wraps open_clip (Custom)ResidualAttentionBlocks only; this encoder has {foreign}")
    inner_norm = sorted({type(b.ln_attn).__name__ for b in blocks
                         if not isinstance(getattr(b, "ln_attn", nn.Identity()), nn.Identity)})
    if inner_norm:
        raise TypeError(f"{who} cannot wrap attention followed by a LayerNorm inside the branch "
                        f"(scale_attn=True gives CustomResidualAttentionBlock.ln_attn = {inner_norm}); "
                        "build the model without scale_attn")
    if not getattr(transformer, "batch_first", True):
        raise TypeError(f"{who} needs a batch-first transformer (tokens (B, N, width))")
    return blocks


def _blocks(visual: nn.Module) -> nn.ModuleList:
    if not hasattr(visual, "transformer"):
        raise TypeError(
            f"add_adapters needs an open_clip VisionTransformer (visual.transformer.resblocks); got "
            f"{type(visual).__name__}. timm towers, ModifiedResNet and other encoders are not supported"
        )
    return transformer_blocks(visual)


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


def _records(module: nn.Module) -> list[AdapterRecord]:
    return [m for m in module.modules() if isinstance(m, AdapterRecord)]


def adapter_kinds(module: nn.Module) -> list[str]:
    """The adapter kinds present inside `module`, sorted."""
    return sorted({m.kind for m in [*adapted_modules(module), *_records(module)]})


def prompt_tokens(visual: nn.Module) -> int:
    """Tokens that block wrappers insert after [cls] (VPT prompts), which grid-aware adapters must skip."""
    counts = {int(getattr(w, "prompt_tokens", 0)) for w in adapted_modules(visual)} - {0}
    if len(counts) > 1:
        raise ValueError(f"blocks insert different numbers of prompt tokens {sorted(counts)}")
    return counts.pop() if counts else 0


def add_adapters(
    visual: nn.Module,
    kind: str = "convpass",
    config: Optional[AdapterConfig] = None,
    *,
    layout: Optional[TokenLayout] = None,
    **options: object,
) -> nn.ModuleList:
    """Add adapters of a registered kind to every block of an open_clip image encoder; freeze the rest.

    `kind` is a registered adapter kind (`ADAPTERS`); give its options as a config (`ConvpassConfig(dim=8,
    ...)`) or as keywords (`dim=8, scale=10`); unknown options raise with the known ones. `layout` says
    where the patch grid sits among the tokens (default: [cls], the prompt tokens of a `vpt_deep` already
    injected, then `visual.grid_size`). Adapters are created in fp32 on the encoder's device. Afterwards
    only adapter parameters (of every kind present) require grad within `visual`. Returns the added
    modules (shared ones first). One kind per encoder, except that `vpt_deep` may come first and one other
    kind after it (convpass then skips the prompts); otherwise call `remove_adapters` first.
    """
    spec = get_adapter(kind)
    config = make_config(kind, config, **options)
    placement = spec.resolve_placement(config)
    blocks = _blocks(visual)
    present = adapter_kinds(visual)
    if hasattr(visual.transformer, SHARED_NAME) or [k for k in present if k != VPT_KIND] or kind in present:
        raise ValueError(f"this image encoder already has adapters ({', '.join(present) or 'shared'}); call "
                         "remove_adapters(visual) before adding new ones (only vpt_deep, added first, composes "
                         "with another kind)")
    _check_no_patch_dropout(visual)

    patch = getattr(visual, "patch_size", None)
    patch = (int(patch), int(patch)) if isinstance(patch, int) else (tuple(int(p) for p in patch) if patch else None)
    target = AdapterTarget(width=int(visual.transformer.width), layers=len(blocks),
                           layout=layout if layout is not None else encoder_layout(visual, prompt_tokens(visual)),
                           patch_size=patch)
    factory = spec.build(config, target)
    if factory.inject is not None:
        modules = nn.ModuleList(factory.inject(visual))
    else:
        modules = _wrap_sub_blocks(visual, blocks, kind, config, placement, factory)
    modules.train(visual.training)
    trainable = {id(p) for p in adapter_parameters(visual)}
    for param in visual.parameters():
        param.requires_grad_(id(param) in trainable)
    pool_last_block(visual)  # the last block for [cls] only, where the adapters allow it (adapters/pooled.py)
    return modules


def _wrap_sub_blocks(visual: nn.Module, blocks: nn.ModuleList, kind: str, config: AdapterConfig, placement: str,
                     factory: AdapterFactory) -> nn.ModuleList:
    """The wrapper path: one adapter beside (or after) each chosen sub-block of every block."""
    wrapper = factory.wrapper or (SequentialAdapter if config.sequential else ParallelAdapter)
    rates = _layer_drop_rates(config.drop_path, len(blocks))
    added: list[nn.Module] = [factory.shared] if factory.shared is not None else []
    wrapped: list[tuple[nn.Module, str, AdaptedModule]] = []
    for block, rate in zip(blocks, rates):
        for site in SITES[placement]:
            adapter = factory.make(site)
            module = wrapper(getattr(block, site), adapter, config.scale, rate)
            module.kind = kind
            wrapped.append((block, site, module))
            added.append(adapter)

    reference = next(visual.parameters())
    modules = nn.ModuleList(added).to(device=reference.device, dtype=torch.float32)
    for block, site, module in wrapped:
        setattr(block, site, module)
    if factory.shared is not None:
        visual.transformer.add_module(SHARED_NAME, factory.shared)
    return modules


def adapted_modules(module: nn.Module) -> list[AdaptedModule]:
    """Every adapter wrapper inside `module` (an encoder, a CLIP model or a classifier holding one)."""
    return [m for m in module.modules() if isinstance(m, AdaptedModule)]


def unwrap_all(module: nn.Module, kinds: Optional[set[str]] = None) -> list[AdaptedModule]:
    """Put back the module each wrapper (of `kinds`, default all) inside `module` wraps, innermost first;
    return the removed wrappers."""
    found = [(parent, name, child) for parent in module.modules() for name, child in parent._modules.items()
             if isinstance(child, AdaptedModule) and (kinds is None or child.kind in kinds)]
    for parent, name, wrapper in reversed(found):  # modules() is pre-order: children after their parents
        setattr(parent, name, wrapper.unwrap())
    return [wrapper for _, _, wrapper in found]


def remove_adapters(visual: nn.Module) -> nn.ModuleList:
    """Undo `add_adapters` (every kind present): put the wrapped modules back, undo own injections (BitFit
    restores the original biases) and return the removed adapters.

    Trunk parameters keep their current `requires_grad` (frozen)."""
    _blocks(visual)
    removed = adapter_modules(visual)
    if not len(removed):
        raise ValueError("this image encoder has no adapters to remove")
    unpool_last_block(visual)
    unwrap_all(visual)
    for record in _records(visual):
        record.remove()
    if hasattr(visual.transformer, SHARED_NAME):
        delattr(visual.transformer, SHARED_NAME)
    return removed


def adapter_modules(module: nn.Module) -> nn.ModuleList:
    """Every adapter module inside `module` (shared ones first), each once; a kind that trains existing
    tensors (BitFit) contributes an unregistered `ParameterView` of them."""
    found: list[nn.Module] = []
    for sub in module.modules():
        shared = getattr(sub, SHARED_NAME, None) if not isinstance(sub, AdaptedModule) else None
        if isinstance(shared, nn.Module):
            found.append(shared)
    found += [wrapper.adapter for wrapper in adapted_modules(module)]
    found += [ParameterView(record.trainable()) for record in _records(module)]
    return nn.ModuleList(found)


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters inside `module`, each once."""
    return list(adapter_modules(module).parameters())


def count_trainable(module: nn.Module) -> int:
    """Number of trainable parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _scaled_wrappers(module: nn.Module) -> list[AdaptedModule]:
    wrappers = adapted_modules(module)
    records = _records(module)
    if not wrappers and not records:
        raise ValueError(f"{type(module).__name__} has no adapters: call add_adapters first")
    return [w for w in wrappers if w.scaled]


def set_adapter_scale(module: nn.Module, scale: float) -> None:
    """Set the adapter scale s of every adapter inside `module` (s = 0 gives the frozen encoder).

    Kinds without a branch to scale (bitfit, vpt_deep) accept only s = 1."""
    scale = AdapterConfig(scale=scale).scale
    wrappers = _scaled_wrappers(module)
    if scale != 1.0:
        fixed = sorted({m.kind for m in [*adapted_modules(module), *_records(module)] if not m.scaled})
        if fixed:
            raise ValueError(f"adapter kind(s) {fixed} have no branch to scale; their scale is 1, got {scale:g}")
    for wrapper in wrappers:
        wrapper.scale = scale


def get_adapter_scale(module: nn.Module) -> float:
    """The adapter scale s shared by all adapters inside `module` (1 for kinds without a scale)."""
    scales = {wrapper.scale for wrapper in _scaled_wrappers(module)}
    if len(scales) > 1:
        raise ValueError(f"adapters have different scales {sorted(scales)}; set one with set_adapter_scale")
    return next(iter(scales)) if scales else 1.0
