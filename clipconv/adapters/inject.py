"""Wrap the ResidualAttentionBlocks of an open_clip image encoder with adapters (PEFT-style).

Each block is replaced by a `ConvpassBlock`, a subclass of open_clip's `ResidualAttentionBlock` that
adopts the original's children under the same names, so backbone state-dict keys are unchanged and
original checkpoints still load. Adapters live in the block as `cp_attn` / `cp_mlp`; modules shared by
all adapters (convpass_share) live once on the encoder as `visual.transformer.shared_adapter`.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from . import convpass as _convpass  # noqa: F401  (registers the Convpass methods)
from .registry import PLACEMENTS, get_adapter

__all__ = [
    "ConvpassBlock",
    "add_adapters",
    "remove_adapters",
    "adapter_modules",
    "adapter_parameters",
    "adapter_state_dict",
    "count_trainable",
    "set_adapter_scale",
    "get_adapter_scale",
    "SHARED_NAME",
]

SHARED_NAME = "shared_adapter"


class ConvpassBlock(ResidualAttentionBlock):
    """A ResidualAttentionBlock with adapters beside (or after) its attention and MLP sub-blocks.

    Parallel (default), with `n1 = ln_1(x)` and `n2 = ln_2(x)` each computed once:
        x = x + ls_1(attn(n1)) + s·cp_attn(n1);  x = x + ls_2(mlp(n2)) + s·cp_mlp(n2)
    Sequential (`sequential=True`, the Seq- ablations): the adapter reads the sub-block's output
    `a = ls_1(attn(n1))` and is added to it residually, `x = x + a + s·cp_attn(a)` (same for the MLP).
    Adapter inputs are cast to the adapter's dtype and outputs back to the stream's dtype, so fp32
    adapters run inside a bf16/fp16 trunk. The signature matches open_clip's, which gradient
    checkpointing relies on (`block(x, None, None, attn_mask)`).
    """

    def __init__(
        self,
        block: ResidualAttentionBlock,
        cp_attn: Optional[nn.Module],
        cp_mlp: Optional[nn.Module],
        scale: float = 1.0,
        sequential: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in block.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in block._non_persistent_buffers_set)
        self.training = block.training
        self.cp_attn = cp_attn
        self.cp_mlp = cp_mlp
        self.adapter_scale = float(scale)
        self.sequential = bool(sequential)

    def adapters(self) -> list[nn.Module]:
        return [m for m in (self.cp_attn, self.cp_mlp) if m is not None]

    def _bypass(self, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dtype = getattr(adapter, "dtype", None) or next(adapter.parameters()).dtype
        return adapter(x.to(dtype)).to(x.dtype) * self.adapter_scale

    def _branch(self, adapter: Optional[nn.Module], normed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Sub-block output `out` plus the adapter term (reading `normed` in parallel, `out` in sequence)."""
        if adapter is None:
            return out
        return out + self._bypass(adapter, out if self.sequential else normed)

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: Optional[torch.Tensor] = None,
        v_x: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise ValueError("ConvpassBlock is a self-attention block of an image encoder: k_x and v_x must be None")
        n1 = self.ln_1(q_x)
        x = q_x + self._branch(self.cp_attn, n1, self.ls_1(self.attention(q_x=n1, attn_mask=attn_mask)))
        n2 = self.ln_2(x)
        return x + self._branch(self.cp_mlp, n2, self.ls_2(self.mlp(n2)))

    def unwrap(self) -> ResidualAttentionBlock:
        """A plain ResidualAttentionBlock adopting this block's trunk children (adapters dropped)."""
        plain = ResidualAttentionBlock.__new__(ResidualAttentionBlock)
        nn.Module.__init__(plain)
        for name, child in self.named_children():
            if name not in ("cp_attn", "cp_mlp"):
                plain.add_module(name, child)
        plain.training = self.training
        return plain

    def extra_repr(self) -> str:
        return f"adapter_scale={self.adapter_scale}, sequential={self.sequential}"


def _blocks(visual: nn.Module) -> nn.ModuleList:
    """The encoder's transformer blocks, after checking the encoder is an open_clip ViT they can wrap."""
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(
            f"add_adapters needs an open_clip VisionTransformer (visual.transformer.resblocks); got "
            f"{type(visual).__name__}. timm towers, ModifiedResNet and other encoders are not supported"
        )
    foreign = sorted({type(b).__name__ for b in blocks if not isinstance(b, ResidualAttentionBlock)})
    if foreign:
        raise TypeError(
            f"add_adapters wraps open_clip ResidualAttentionBlocks only; this encoder has {foreign} "
            "(custom blocks, e.g. from qk_norm/scale_* options, are not supported)"
        )
    if not getattr(transformer, "batch_first", True):
        raise TypeError("add_adapters needs a batch-first transformer (tokens (B, N, width))")
    return blocks


def _grid(visual: nn.Module) -> Optional[tuple[int, int]]:
    grid = getattr(visual, "grid_size", None)
    if grid is None:
        return None
    height, width = (grid, grid) if isinstance(grid, int) else tuple(grid)
    return int(height), int(width)


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"adapter scale must be a finite number, got {scale!r}")
    return float(scale)


def _check_no_patch_dropout(visual: nn.Module) -> None:
    patch_dropout = getattr(visual, "patch_dropout", None)
    if patch_dropout is not None and not isinstance(patch_dropout, nn.Identity) and getattr(patch_dropout, "prob", 1) > 0:
        raise ValueError(
            "this image encoder uses patch dropout, which drops tokens in training and breaks Convpass' patch grid; "
            "build the model with vision_cfg.patch_dropout = 0"
        )


def add_adapters(
    visual: nn.Module,
    method: str = "convpass",
    dim: int = 8,
    scale: float = 1.0,
    placement: Optional[str] = None,
    sequential: bool = False,
    kernel_size: int = 3,
    conv_init: str = "identity",
    dropout: float = 0.1,
) -> nn.ModuleList:
    """Wrap every block of an open_clip image encoder with adapters and freeze everything else.

    `method` is a registered adapter name ("convpass", "convpass_attn", "convpass_share");
    `placement` is "attn+mlp", "attn" or "mlp" (None: the method's own, else "attn+mlp");
    `sequential` puts each adapter after its sub-block instead of beside it; `scale` is s.
    Adapters are created in fp32 on the encoder's device. Afterwards only adapter parameters require
    grad within `visual`. Returns the added modules (shared ones first). Refuses an encoder that is
    already adapted: call `remove_adapters` first.
    """
    spec = get_adapter(method)
    if placement is None:
        placement = spec.placement or "attn+mlp"
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement '{placement}'; choose one of {PLACEMENTS}")
    if spec.placement is not None and placement != spec.placement:
        raise ValueError(f"adapter method '{method}' implies placement '{spec.placement}', got placement='{placement}'")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"adapter dim (bottleneck width h) must be a positive integer, got {dim!r}")
    scale = _check_scale(scale)
    blocks = _blocks(visual)
    if any(isinstance(b, ConvpassBlock) for b in blocks) or hasattr(visual.transformer, SHARED_NAME):
        raise ValueError("this image encoder already has adapters; call remove_adapters(visual) before adding new ones")
    _check_no_patch_dropout(visual)

    width = int(visual.transformer.width)
    reference = next(visual.parameters())
    factory = spec.build(width, dim=dim, kernel_size=kernel_size, conv_init=conv_init, dropout=dropout,
                         grid_size=_grid(visual))
    added: list[nn.Module] = [factory.shared] if factory.shared is not None else []
    wrapped: list[ConvpassBlock] = []
    for block in blocks:
        cp_attn = factory.make() if placement in ("attn+mlp", "attn") else None
        cp_mlp = factory.make() if placement in ("attn+mlp", "mlp") else None
        wrapped.append(ConvpassBlock(block, cp_attn, cp_mlp, scale=scale, sequential=sequential))
        added += wrapped[-1].adapters()

    for index, block in enumerate(wrapped):
        blocks[index] = block
    if factory.shared is not None:
        visual.transformer.add_module(SHARED_NAME, factory.shared)
    modules = nn.ModuleList(added).to(device=reference.device, dtype=torch.float32)
    for module in modules:
        module.train(visual.training)
    trainable = {id(p) for p in modules.parameters()}
    for param in visual.parameters():
        param.requires_grad_(id(param) in trainable)
    return modules


def remove_adapters(visual: nn.Module) -> nn.ModuleList:
    """Undo `add_adapters`: restore plain blocks (same trunk modules) and return the removed adapters.

    Trunk parameters keep their current `requires_grad` (frozen)."""
    blocks = _blocks(visual)
    removed = adapter_modules(visual)
    if not removed:
        raise ValueError("this image encoder has no adapters to remove")
    for index, block in enumerate(blocks):
        if isinstance(block, ConvpassBlock):
            blocks[index] = block.unwrap()
    if hasattr(visual.transformer, SHARED_NAME):
        delattr(visual.transformer, SHARED_NAME)
    return removed


def adapter_modules(module: nn.Module) -> nn.ModuleList:
    """Every adapter module inside `module` (an encoder, a CLIP model or a classifier holding one)."""
    found: list[nn.Module] = []
    for sub in module.modules():
        shared = getattr(sub, SHARED_NAME, None)
        if isinstance(shared, nn.Module):
            found.append(shared)
        if isinstance(sub, ConvpassBlock):
            found += sub.adapters()
    return nn.ModuleList(found)


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters inside `module`, each once."""
    return list(adapter_modules(module).parameters())


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` restricted to adapter parameters (names as in `module`), each once."""
    ids = {id(p) for p in adapter_parameters(module)}
    return {name: p.detach() for name, p in module.named_parameters() if id(p) in ids}


def count_trainable(module: nn.Module) -> int:
    """Number of trainable parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _adapted_blocks(module: nn.Module) -> list[ConvpassBlock]:
    blocks = [m for m in module.modules() if isinstance(m, ConvpassBlock)]
    if not blocks:
        raise ValueError(f"{type(module).__name__} has no adapters: call add_adapters first")
    return blocks


def set_adapter_scale(module: nn.Module, scale: float) -> None:
    """Set the adapter scale s of every adapted block inside `module` (s = 0 gives the frozen encoder)."""
    scale = _check_scale(scale)
    for block in _adapted_blocks(module):
        block.adapter_scale = scale


def get_adapter_scale(module: nn.Module) -> float:
    """The adapter scale s shared by all adapted blocks inside `module`."""
    scales: Iterable[float] = {block.adapter_scale for block in _adapted_blocks(module)}
    if len(scales) != 1:
        raise ValueError(f"adapted blocks have different scales {sorted(scales)}; set one with set_adapter_scale")
    return next(iter(scales))
