"""VPT-deep: learnable prompt tokens at the input of every transformer block (Jia et al., "Visual Prompt
Tuning", ECCV 2022, §3.2 "VPT-Deep").

Each block is wrapped by a `PromptedBlock` that delegates to open_clip's block: it inserts its own P prompt
tokens after the [cls] token, runs the block, and drops the P prompt outputs again. That is VPT-deep
exactly — the prompt outputs of block i are replaced by block i+1's own prompts, and after the last block
they are removed, so pooling ([cls] or the patch mean) and everything after the transformer is unchanged.
Block state-dict keys stay the same (prompts are `...resblocks.<i>.adapter.prompts`), and gradient
checkpointing (`block(x, None, None, attn_mask)`) calls the wrapper like the block.

Prompts sit after open_clip's `ln_pre` (which VPT's ViTs do not have): they are free tokens of the
residual stream, without position embedding, as in VPT. Init as VPT's code: uniform(−v, v) with
v = √(6 / (3·patch_area + width)) (a xavier-uniform bound over the patch-embedding fan-in). Dropout on the
prompts: VPT's config default 0.

VPT is *not* the identity at initialization (prompts take attention mass in every block): the kind is
registered with `identity_at_init=False`, and the contract tests assert that it does change the output.

Grid-aware adapters added after `vpt_deep` (convpass) see 1 + P leading non-patch tokens: `add_adapters`
derives their `TokenLayout` from the prompts present. Add `vpt_deep` first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from clipconv.adapters.inject import adapter_kinds, transformer_blocks
from clipconv.adapters.registry import AdapterConfig, AdapterFactory, AdapterTarget, register_adapter
from clipconv.adapters.wrappers import AdaptedModule
from clipconv.config import option, positive, probability

__all__ = ["VPTConfig", "DeepPrompts", "PromptedBlock", "vpt_init_bound"]

KIND = "vpt_deep"


@dataclass
class VPTConfig(AdapterConfig):
    """VPT-deep hyper-parameters (VPT's defaults; the number of prompts was searched per task in the paper)."""

    scaled: ClassVar[bool] = False

    tokens: int = option(10, check=positive,
                         help="prompt tokens P per block (the issue's 10; VPT searched {1, 5, 10, 50, 100, 200})")
    dropout: float = option(0.0, check=probability, help="dropout on the prompt tokens (VPT's config default 0)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.refuse_wrapper_options(KIND)


def vpt_init_bound(patch_size: tuple[int, int], width: int) -> float:
    """VPT's uniform init bound √(6 / (3·patch_area + width))."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + width))


class DeepPrompts(nn.Module):
    """The P prompt tokens (P, width) of one block, with their dropout."""

    def __init__(self, tokens: int, width: int, bound: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(tokens, width))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    @property
    def tokens(self) -> int:
        return self.prompts.shape[0]

    def forward(self, batch: int) -> torch.Tensor:
        """(batch, P, width)."""
        return self.dropout(self.prompts).unsqueeze(0).expand(batch, -1, -1)


class PromptedBlock(AdaptedModule):
    """A transformer block with VPT-deep prompts: insert the prompts after the `prefix` leading tokens
    ([cls]), run the block, drop the prompt outputs. `adapter` is the block's `DeepPrompts`."""

    scaled = False

    def __init__(self, base: nn.Module, adapter: DeepPrompts, prefix: int = 1) -> None:
        super().__init__(base, adapter)
        self.prefix = int(prefix)

    @property
    def prompt_tokens(self) -> int:
        return self.adapter.tokens

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"VPT expects batch-first tokens (B, N, width), got shape {tuple(x.shape)}")
        mask = kwargs.get("attn_mask", args[2] if len(args) > 2 else None)
        if mask is not None:
            raise ValueError("VPT prompts cannot be inserted into a block that gets an attention mask")
        prompts = self.adapter(x.shape[0]).to(x.dtype)
        head = self.prefix
        out = self.base_layer(torch.cat([x[:, :head], prompts, x[:, head:]], dim=1), *args, **kwargs)
        return torch.cat([out[:, :head], out[:, head + prompts.shape[1]:]], dim=1)

    def extra_repr(self) -> str:
        return f"base={type(self.base_layer).__name__}, prompts={self.prompt_tokens}, after={self.prefix} token(s)"


@register_adapter(KIND, config=VPTConfig, identity_at_init=False, label="VPT-deep")
def build_vpt_deep(config: VPTConfig, target: AdapterTarget) -> AdapterFactory:
    """VPT-deep: `tokens` prompts per block, inserted after the encoder's leading non-patch tokens."""
    if target.patch_size is None:
        raise ValueError("vpt_deep needs the encoder's patch size (visual.patch_size) for VPT's prompt init")
    bound = vpt_init_bound(target.patch_size, target.width)

    def inject(visual: nn.Module) -> list[nn.Module]:

        present = adapter_kinds(visual)
        if present:
            raise ValueError(f"add vpt_deep before any other adapter (this encoder has {present}): grid-aware "
                             "adapters must be built knowing the prompt tokens")
        blocks = transformer_blocks(visual)
        device = next(visual.parameters()).device
        added = []
        for index in range(len(blocks)):
            prompts = DeepPrompts(config.tokens, target.width, bound, config.dropout).to(device=device,
                                                                                     dtype=torch.float32)
            wrapper = PromptedBlock(blocks[index], prompts, prefix=target.layout.prefix)
            wrapper.kind = KIND
            blocks[index] = wrapper
            added.append(prompts)
        return added

    return AdapterFactory(inject=inject)
