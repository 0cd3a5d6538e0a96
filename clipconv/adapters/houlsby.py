"""The sequential bottleneck Adapter: Houlsby et al. (ICML 2019) after attention and after the MLP;
Pfeiffer et al. (EACL 2021) after the MLP only.

Each adapter reads its sub-block's output a and returns a + s·up(act(down(a))) — Houlsby's internal
skip connection, given by the `SequentialAdapter` wrapper (output = a + s·adapter(a)); the block then
adds its own residual. Up-projection zero-initialized (Houlsby: near-identity init), so a fresh
adapter is the identity.

Default: the Pfeiffer placement with bottleneck 8 — the "Adapter" baseline of the VTAB-1k tables the
Convpass paper compares against (0.16 M parameters on ViT-B/16, as taken from NOAH / VPT, whose Adapter
sits after the FFN); `variant="houlsby"` adds the adapter after attention (twice the parameters).
ReLU as in Pfeiffer's adapter; `activation="gelu"` is an option.
"""
from __future__ import annotations

from dataclasses import dataclass

from clipconv.adapters.bottleneck import ACTIVATIONS, Bottleneck
from clipconv.adapters.registry import AdapterConfig, AdapterFactory, AdapterTarget, register_adapter
from clipconv.config import option, positive, probability

__all__ = ["BottleneckAdapterConfig", "VARIANTS"]

VARIANTS = {"houlsby": "attn+mlp", "pfeiffer": "mlp"}


@dataclass
class BottleneckAdapterConfig(AdapterConfig):
    """Sequential Adapter hyper-parameters on top of the wrapper's options (`sequential` is always on)."""

    sequential: bool = option(True, help="always True: the adapter reads its sub-block's output")
    variant: str = option("pfeiffer", choices=tuple(VARIANTS),
                          help="pfeiffer: after the MLP only; houlsby: after attention and after the MLP")
    dim: int = option(8, check=positive,
                      help="bottleneck width h (8: the Adapter baseline of the Convpass paper's VTAB table)")
    activation: str = option("relu", choices=tuple(ACTIVATIONS), help="non-linearity of the bottleneck")
    dropout: float = option(0.0, check=probability, help="dropout after the non-linearity")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sequential is not True:
            raise ValueError("the 'adapter' kind is sequential by definition (sequential=True); for a parallel "
                             "bottleneck use 'adaptformer'")
        if self.variant not in VARIANTS:
            raise ValueError(f"adapter variant must be one of {sorted(VARIANTS)}, got '{self.variant}'")
        implied = VARIANTS[self.variant]
        if self.placement is None:
            self.placement = implied
        elif self.placement != implied:
            raise ValueError(f"adapter variant '{self.variant}' implies placement '{implied}', got "
                             f"placement='{self.placement}'")


@register_adapter("adapter", config=BottleneckAdapterConfig, label="Adapter")
def build_adapter(config: BottleneckAdapterConfig, target: AdapterTarget) -> AdapterFactory:
    return AdapterFactory(make=lambda site: Bottleneck(target.width, config.dim, config.activation, config.dropout))
