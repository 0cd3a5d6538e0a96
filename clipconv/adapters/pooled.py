"""The encoder's last block computed for the pooled token only.

An open_clip ViT that pools its [cls] token (`pool_type="tok"`, no attentional pooler, no tokens returned)
reads one row of the last block's output. In that block only [cls] needs a query, the attention's output
projection, the MLP and the adapters' outputs; keys and values still come from every token. `pool_last_block`
makes the last block compute just that (for the demo's 4-layer mini CLIP about a fifth of a training step's
FLOPs; for ViT-B/16 about 5 %).

The mathematics is unchanged; floats may round differently (other matrix shapes, another order of summing
the last block's input gradient), at the level of the matmuls' rounding. Adapters beside or after the last
block's sub-blocks must keep prefix tokens apart (`prefix_tokens_apart`: Convpass through its centre tap,
the token-wise bottlenecks); they still read every token's input (a sequential adapter: the trunk's [cls]
row, zero-padded), so their dropout draws the same masks as in the full block and the random stream of a run
is the same. Blocks of any other make (VPT-deep prompts, LoRA's attention, open_clip's custom blocks, an
attention mask) keep the full forward: `pool_last_block` then returns False and changes nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from clipconv.adapters.wrappers import AdaptedModule, ParallelAdapter, SequentialAdapter, attention_layout, zero_padded

__all__ = ["PooledLastBlock", "PooledVisionTransformer", "pool_last_block", "unpool_last_block", "pooled_block"]

#: the pooled token's rows at the front of the sequence ([cls])
POOLED_ROWS = 1


def _poolable(module: nn.Module) -> bool:
    """A sub-block the pooled forward can run: an open_clip module, or one wrapped beside/after by an adapter
    that keeps prefix tokens apart."""
    if isinstance(module, (ParallelAdapter, SequentialAdapter)):
        return bool(getattr(module.adapter, "prefix_tokens_apart", False)) and _poolable(module.base_layer)
    return not isinstance(module, AdaptedModule)


def _pools_cls(visual: nn.Module) -> bool:
    """`visual` returns its [cls] token only, and its blocks run once per call (no recomputation in backward)."""
    transformer = visual.transformer
    return (getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None
            and not getattr(visual, "output_tokens", True) and getattr(transformer, "batch_first", False)
            and not getattr(transformer, "grad_checkpointing", False))


class PooledLastBlock(ResidualAttentionBlock):
    """open_clip's `ResidualAttentionBlock` that, inside a call of its `PooledVisionTransformer`, returns the
    first `POOLED_ROWS` tokens only; called any other way (the transformer on its own) it is the full block.
    Parameters and state-dict keys are the block's."""

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None, v_x: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.__dict__.get("_pooled_call") or k_x is not None or v_x is not None or attn_mask is not None:
            return super().forward(q_x, k_x, v_x, attn_mask)
        rows = POOLED_ROWS
        y = self.ln_1(q_x)
        keys = attention_layout(self.attn, y)
        x = q_x[:, :rows] + self.ls_1(self._sub_block(self.attn, y, (y[:, :rows], keys, keys.view_as(keys)),
                                                      {"need_weights": False}))
        z = self.ln_2(x)
        return x + self.ls_2(self._sub_block(self.mlp, zero_padded(z, q_x.shape[1]), (z,), {}))

    @staticmethod
    def _sub_block(module: nn.Module, tokens: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The sub-block's output rows for `args` (the pooled rows), its adapter reading every row of `tokens`."""
        base = module.base_layer if isinstance(module, AdaptedModule) else module
        out = base(*args, **kwargs)
        trunk = out[0] if isinstance(out, tuple) else out
        return module.combine_rows(tokens, trunk) if isinstance(module, AdaptedModule) else trunk


class PooledVisionTransformer(VisionTransformer):
    """open_clip's `VisionTransformer` whose forward runs its `PooledLastBlock` for the pooled token only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.transformer.resblocks[-1]
        if not isinstance(block, PooledLastBlock) or not _pools_cls(self):
            return super().forward(x)
        block.__dict__["_pooled_call"] = True
        try:
            return super().forward(x)
        finally:
            block.__dict__["_pooled_call"] = False


def pooled_block(visual: nn.Module) -> Optional[nn.Module]:
    """The last block of `visual` when the pooled forward applies to it, else None."""
    if type(visual) not in (VisionTransformer, PooledVisionTransformer) or not _pools_cls(visual):
        return None
    block = visual.transformer.resblocks[-1]
    if type(block) not in (ResidualAttentionBlock, PooledLastBlock) or hasattr(block, "ln_1_kv"):
        return None
    base_attn = block.attn.base_layer if isinstance(block.attn, AdaptedModule) else block.attn
    if not isinstance(base_attn, nn.MultiheadAttention) or not base_attn.batch_first:
        return None
    return block if _poolable(block.attn) and _poolable(block.mlp) else None


def pool_last_block(visual: nn.Module) -> bool:
    """Compute the last block of `visual` for the pooled token only in `visual`'s forward, when it can be (see
    the module docstring); True when it is (now or already)."""
    block = pooled_block(visual)
    if block is None:
        unpool_last_block(visual)
        return False
    block.__class__ = PooledLastBlock
    visual.__class__ = PooledVisionTransformer
    return True


def unpool_last_block(visual: nn.Module) -> None:
    """Give `visual` and its last block their full forward back (no-op when they have it)."""
    if type(visual) is PooledVisionTransformer:
        visual.__class__ = VisionTransformer
        block = visual.transformer.resblocks[-1]
        if type(block) is PooledLastBlock:
            block.__class__ = ResidualAttentionBlock
            block.__dict__.pop("_pooled_call", None)
