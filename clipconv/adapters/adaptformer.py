"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck beside the MLP of every block ("AdaptMLP").

Defaults from the paper and its reference code (ShoufaChen/AdaptFormer: models/adapter.py,
custom_modules.py, main_image.py): bottleneck 64, ReLU, dropout 0.1 after the ReLU, scale s = 0.1,
no LayerNorm of its own (`adapter_layernorm_option="none"`), down kaiming-uniform(a=√5) / up zero
("lora" init), parallel to the MLP. Block: x = x + MLP(LN₂(x)) + s·up(ReLU(down(LN₂(x)))).

One difference from the reference code: there the parallel branch reads the block's un-normalized
residual stream x, while the paper's equation (§3.1) — and this kind, which sits beside `block.mlp`
and so receives its input — feeds it LN₂(x). `sequential=True` is the reference's "sequential" option.
"""
from __future__ import annotations

from dataclasses import dataclass

from clipconv.adapters.bottleneck import Bottleneck
from clipconv.adapters.registry import AdapterConfig, AdapterFactory, AdapterTarget, register_adapter
from clipconv.config import option, positive, probability

__all__ = ["AdaptFormerConfig"]


@dataclass
class AdaptFormerConfig(AdapterConfig):
    """AdaptFormer hyper-parameters (reference defaults) on top of the wrapper's options."""

    scale: float = option(0.1, help="scale s of the branch (AdaptFormer's 0.1)")
    dim: int = option(64, check=positive, help="bottleneck width (AdaptFormer's 64)")
    dropout: float = option(0.1, check=probability, help="dropout after the ReLU (the reference code's 0.1)")


@register_adapter("adaptformer", config=AdaptFormerConfig, placement="mlp", label="AdaptFormer")
def build_adaptformer(config: AdaptFormerConfig, target: AdapterTarget) -> AdapterFactory:
    return AdapterFactory(make=lambda site: Bottleneck(target.width, config.dim, "relu", config.dropout))
