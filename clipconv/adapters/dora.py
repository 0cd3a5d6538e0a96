"""DoRA: weight-decomposed low-rank adaptation (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation",
ICML 2024), as a variant of LoRA (clipconv/adapters/lora.py), the way PEFT models it (a `LoraVariant`).

Each adapted weight W (out × in) is split into a direction and a magnitude: with LoRA's update s·ΔW
(ΔW = (alpha/r)·B·A, s the adapter scale),

    W' = m ⊙ (W + s·ΔW) / ||W + s·ΔW||_c,

where ||·||_c is the L2 norm of each output row over the input dimension and m holds one trainable
magnitude per output row, initialized to ||W||_c. Only the rows of the targets are decomposed: on open_clip's
packed `in_proj_weight` each of q, k, v has its own magnitudes for its own rows, the other rows stay W. The
norm is detached (treated as a constant in backpropagation, the paper's §4.3 and PEFT's `weight_norm.detach()`),
so gradients reach m, B and A but not through the norm. B = 0 at init, so a fresh DoRA is exactly W.

Everything else is LoRA's: the wrappers (`LoRAAttention` for the packed attention, `LoRALinear` for linear
children), the targets, the A/B init, the state-dict layout (plus `...adapter.in_proj.magnitude.<target>`).
`fold_` writes W' into the weight, so `clipconv.merge.merge_adapters` folds DoRA into a plain open_clip model.

Choices:
- no LoRA dropout: PEFT's DoRA with dropout mixes the dropped input into the magnitude rescaling of the base
  output (it is no longer one adapted weight), so a DoRA with `dropout` > 0 is refused;
- the adapter scale s multiplies ΔW only (PEFT's scaling): s = 0 gives m ⊙ W / ||W||_c, which is the plain
  encoder while m is at its init, not after m has trained;
- the norm is floored at the smallest normal float, so an all-zero row stays zero instead of giving NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from clipconv.adapters.lora import LoRA, LoRAConfig, LoRALinear, LoRAVariant, add_lora
from clipconv.adapters.registry import AdapterFactory, AdapterTarget, register_adapter
from clipconv.config import option

__all__ = ["DoRAConfig", "DoRAVariant", "DORA", "row_norm"]

KIND = "dora"
NO_DROPOUT = ("DoRA option dropout must be 0: with dropout the DoRA output is no longer one adapted weight W' "
              "(see clipconv/adapters/dora.py)")


def row_norm(rows: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row (over the input dimension), floored at the smallest normal float of its dtype."""
    return torch.linalg.vector_norm(rows, dim=1).clamp_min(torch.finfo(rows.dtype).tiny)


class DoRAVariant(LoRAVariant):
    """DoRA's adapted weight m ⊙ (W + s·ΔW) / ||W + s·ΔW||_c (norm detached), on the target rows of W."""

    kind = KIND

    def init(self, lora: LoRA, weight: torch.Tensor) -> None:
        """Magnitudes m_t = ||W_t||_c (fp32), one per output row of each target t; refuses LoRA dropout."""
        if lora.dropout.p > 0:
            raise ValueError(f"{NO_DROPOUT}, got {lora.dropout.p:g}")
        base = weight.detach().to(next(iter(lora.A.values())))  # the LoRA's device and dtype
        lora.magnitude = nn.ParameterDict({t: nn.Parameter(row_norm(base[start:end]))
                                           for t, (start, end) in lora.rows.items()})

    def weight(self, lora: LoRA, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """W' (dtype of `weight`): the target rows decomposed in the LoRA's dtype (fp32), the others W."""
        pieces, cursor = [], 0
        for target, (start, end) in lora.rows.items():
            if start > cursor:
                pieces.append(weight[cursor:start])
            adapted = weight[start:end].to(lora.dtype) + (lora.B[target] @ lora.A[target]) * (lora.scaling * scale)
            ratio = lora.magnitude[target] / row_norm(adapted).detach()
            pieces.append((adapted * ratio.unsqueeze(1)).to(weight.dtype))
            cursor = end
        if cursor < weight.shape[0]:
            pieces.append(weight[cursor:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)

    def linear(self, wrapper: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """The wrapped linear called with W' through `functional_call` (its own forward, bias included)."""
        weight = self.weight(wrapper.adapter, wrapper.base_layer.weight, wrapper.scale)
        return torch.func.functional_call(wrapper.base_layer, {"weight": weight}, (x,))


#: the DoRA variant (stateless) to pass as `add_lora(..., dropout=0.0, variant=DORA)`, e.g. on the text encoder
DORA = DoRAVariant()


def _zero_dropout(value: object) -> Optional[str]:
    return None if value == 0 else f"must be 0 ({NO_DROPOUT.split(': ', 1)[1]}), got {value}"


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA on the image encoder's attention: LoRA's options and defaults (r = 8, alpha = 8, targets q v);
    `dropout` must stay 0."""

    dropout: float = option(0.0, check=_zero_dropout, help="must be 0: DoRA here takes no dropout on the LoRA branch")

    def refuse_wrapper_options(self, kind: str, placement: bool = True) -> None:
        """LoRA's refusal of the wrapper options, naming this kind."""
        super().refuse_wrapper_options(KIND, placement)


@register_adapter(KIND, config=DoRAConfig, placement="attn", label="DoRA", mergeable=True)
def build_dora(config: DoRAConfig, target: AdapterTarget) -> AdapterFactory:
    """DoRA on every block's attention projections (`targets`) of the image encoder."""
    return AdapterFactory(inject=lambda visual: list(add_lora(visual.transformer, config.targets, config.rank,
                                                              config.alpha, config.dropout, config.scale, DORA)))
