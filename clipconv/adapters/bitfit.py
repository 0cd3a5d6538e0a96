"""BitFit: train the bias terms of the image encoder, nothing added (Ben Zaken, Ravfogel & Goldberg, "BitFit:
Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", ACL 2022).

Which biases: BitFit trains every additive bias term b of the encoder — those of the q/k/v and output
projections, of both MLP linears and of the LayerNorms (the paper's b_LN; only the weights w and the LN
gains g stay frozen) — and the vision PETL benchmarks apply it to ViT as "every parameter named bias"
(VPT's and NOAH's baselines). On an open_clip ViT that is: ln_pre, each block's ln_1 / in_proj / out_proj /
ln_2 / c_fc / c_proj, and ln_post (the patch-embedding conv and the projection have no bias in CLIP).
ViT-B/16: 12·(7·768 + 3072) + 2·768 = 102,912 trainable numbers.

The biases train in place, so the state dict of the trained encoder is a plain open_clip one (merging is
free), checkpoints hold exactly these tensors under their own names, and the WiSE-FT end point θ₀ is the
original biases (zero-shot CLIP). `remove_adapters` restores the original biases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from clipconv.adapters.registry import AdapterConfig, AdapterFactory, AdapterTarget, register_adapter
from clipconv.adapters.wrappers import AdapterRecord, ParameterView

__all__ = ["BitFitConfig", "BitFitBiases", "RECORD_NAME", "encoder_biases"]

KIND = "bitfit"
RECORD_NAME = "bitfit"  # the record's attribute on visual.transformer


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit has no hyper-parameters of its own; it has no placement, branch scale or stochastic depth."""

    scaled: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.refuse_wrapper_options(KIND)


def encoder_biases(visual: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every bias parameter of the image encoder, in `named_parameters` order."""
    found = []
    for _, module in visual.named_modules():
        for name, param in module._parameters.items():
            if param is not None and (name == "bias" or name.endswith("_bias")):
                found.append((module, name))
    return found


class BitFitBiases(AdapterRecord):
    """Which biases BitFit trains (as (module, name) pairs, so a deep copy of the encoder maps them) and their
    original values (non-persistent buffers: no state-dict keys), restored by `remove`."""

    scaled = False
    kind = KIND

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.__dict__["_targets"] = encoder_biases(visual)
        self.__dict__["_owner"] = (visual.transformer,)
        if not self._targets:
            raise ValueError(f"{type(visual).__name__} has no bias parameters for BitFit")
        for index, (module, name) in enumerate(self._targets):
            self.register_buffer(f"original_{index}", getattr(module, name).detach().clone(), persistent=False)

    def trainable(self) -> list[nn.Parameter]:
        return [getattr(module, name) for module, name in self._targets]

    @torch.no_grad()
    def remove(self) -> None:
        for index, param in enumerate(self.trainable()):
            param.copy_(getattr(self, f"original_{index}"))
        self.fold_()

    def fold_(self) -> None:
        """Keep the trained biases (they already sit in the encoder's own tensors) and drop this record."""
        owner = self.__dict__["_owner"][0]
        if getattr(owner, RECORD_NAME, None) is self:
            delattr(owner, RECORD_NAME)

    def extra_repr(self) -> str:
        return f"biases={len(self._targets)}, numbers={sum(p.numel() for p in self.trainable())}"


@register_adapter(KIND, config=BitFitConfig, label="BitFit", mergeable=True)
def build_bitfit(config: BitFitConfig, target: AdapterTarget) -> AdapterFactory:
    """BitFit: every bias of the image encoder trainable, nothing added."""

    def inject(visual: nn.Module) -> list[nn.Module]:
        record = BitFitBiases(visual)
        visual.transformer.add_module(RECORD_NAME, record)
        return [ParameterView(record.trainable())]

    return AdapterFactory(inject=inject)
