"""Convpass: a convolutional bypass for ViT tokens (Jie & Deng, "Convolutional Bypasses Are Better
Vision Transformer Adapters", §3.2–3.3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from clipconv.adapters.registry import AdapterConfig, AdapterFactory, AdapterTarget, register_adapter
from clipconv.adapters.tokens import TokenLayout
from clipconv.config import option, positive, positive_odd, probability

__all__ = ["Convpass", "ConvpassConfig", "SharedProjections", "CONV_INITS"]

CONV_INITS = ("identity", "xavier")


@dataclass
class ConvpassConfig(AdapterConfig):
    """Convpass hyper-parameters (paper §3.2, Table 3) on top of the wrapper's placement/scale/drop_path."""

    dim: int = option(8, check=positive, help="bottleneck width h (the paper's 8; 32 for convpass_share)")
    kernel_size: int = option(3, check=positive_odd,
                              help="k of the k×k conv over the patch grid (1: the Table 6 ablation)")
    conv_init: str = option("identity", choices=CONV_INITS,
                            help="conv init: identity (1 at each channel's centre tap) or xavier")
    dropout: float = option(0.1, check=probability, help="dropout before the up-projection (the official code's 0.1)")


class SharedProjections(nn.Module):
    """The bias-free 1×1 down (d→h) and up (h→d) projections that `convpass_share` shares across layers."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, dim, bias=False)
        self.up = nn.Linear(dim, width, bias=False)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.up.weight)


class Convpass(nn.Module):
    """down (d→h) → QuickGELU → k×k conv over the patch grid → QuickGELU → Dropout → up (h→d).

    Input and output: tokens (B, N, width) laid out as `layout` says (default: [cls] first, then a
    square row-major patch grid inferred from N). Every non-patch token ([cls], prompt tokens) goes
    through the same conv as a 1×1 image, i.e. a linear map by the kernel's centre tap.

    With `share` (a `SharedProjections`), this is the `convpass_share` adapter: the shared bias-free
    down/up projections and a depthwise k×k conv without bias. `share` is *not* registered as a child
    (it is registered once on the encoder), so `parameters()` here are the conv's only.
    Up-projection weights are zero, so a fresh adapter outputs exactly zero.
    """

    #: a prefix token's output depends on that token's input alone (the conv's centre tap): see adapters/pooled.py
    prefix_tokens_apart: bool = True

    def __init__(
        self,
        width: int,
        dim: int = 8,
        kernel_size: int = 3,
        conv_init: str = "identity",
        dropout: float = 0.1,
        share: Optional[SharedProjections] = None,
        layout: Optional[TokenLayout] = None,
    ) -> None:
        super().__init__()
        if width <= 0 or dim <= 0:
            raise ValueError(f"Convpass width and dim must be positive, got width={width}, dim={dim}")
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"Convpass kernel_size must be a positive odd number, got {kernel_size}")
        if conv_init not in CONV_INITS:
            raise ValueError(f"Convpass conv_init must be one of {CONV_INITS}, got '{conv_init}'")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Convpass dropout must be in [0, 1), got {dropout}")
        if share is not None and (share.down.in_features, share.down.out_features) != (width, dim):
            raise ValueError(
                f"shared projections map {share.down.in_features}→{share.down.out_features}, "
                f"but this Convpass has width={width}, dim={dim}"
            )
        self.width, self.dim, self.kernel_size = width, dim, kernel_size
        self.layout = layout if layout is not None else TokenLayout()
        self._share = (share,) if share is not None else ()  # a tuple: not registered as a child
        if share is None:
            self.down = nn.Linear(width, dim)
            self.up = nn.Linear(dim, width)
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
            self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)
        else:
            self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        self.reset_conv(conv_init)

    @property
    def shared(self) -> Optional[SharedProjections]:
        return self._share[0] if self._share else None

    @property
    def dtype(self) -> torch.dtype:
        return self.conv.weight.dtype

    def reset_conv(self, conv_init: str = "identity") -> None:
        """identity: zero kernel with 1 at the centre tap of each channel, zero bias; or xavier-uniform."""
        weight = self.conv.weight
        with torch.no_grad():
            if conv_init == "identity":
                weight.zero_()
                centre = self.kernel_size // 2
                channels = torch.arange(self.dim)
                in_index = torch.zeros_like(channels) if self.conv.groups == self.dim else channels
                weight[channels, in_index, centre, centre] = 1.0
            else:
                nn.init.xavier_uniform_(weight)
            if self.conv.bias is not None:
                self.conv.bias.zero_()

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self.shared, name) if self._share else getattr(self, name)
        return layer(x)

    def _cls_conv(self, cls: torch.Tensor) -> torch.Tensor:
        """The conv applied to [cls] as a 1×1 image: only the centre tap sees a non-padding pixel."""
        centre = self.kernel_size // 2
        tap = self.conv.weight[:, :, centre, centre]
        if self.conv.groups == self.dim:  # depthwise: a diagonal map
            return cls * tap[:, 0]
        return F.linear(cls, tap, self.conv.bias)

    def _centre_tap(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        return self._cls_conv(hidden) if hidden.shape[1] else None

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the up-projection: (B, N, width) → (B, N, h)."""
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"Convpass expects tokens (B, N, {self.width}), got shape {tuple(x.shape)}")
        batch, num_tokens, _ = x.shape
        height, width = self.layout.grid_for(num_tokens)
        start, end = self.layout.prefix, self.layout.prefix + height * width
        hidden = self.act(self._project("down", x))
        # (B, H·W, h) viewed as NCHW with channels-last strides: no copy in or out of the conv.
        patches = hidden[:, start:end].reshape(batch, height, width, self.dim).permute(0, 3, 1, 2)
        patches = self.conv(patches).permute(0, 2, 3, 1).reshape(batch, height * width, self.dim)
        parts = [self._centre_tap(hidden[:, :start]), patches, self._centre_tap(hidden[:, end:])]
        return self.dropout(self.act(torch.cat([p for p in parts if p is not None], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._project("up", self._hidden(x))

    def add_into(self, out: torch.Tensor, x: torch.Tensor, scale: float, rows: Optional[int] = None) -> torch.Tensor:
        """`out + scale · self(x)` (a new tensor) with the up-projection, its bias, the scale and the sum in one
        `torch.addmm`: the (B, N, width) adapter output is never materialized, nor scaled or added on its own.
        The bias rides along as an extra column of ones in the (B·N, h) hidden activations. With `rows`, `out`
        holds the first `rows` tokens only: those rows of `self(x)` are added."""
        hidden = self._hidden(x)
        if rows is not None:
            hidden = hidden[:, :rows]
        up = self.shared.up if self._share else self.up
        weight = up.weight
        if up.bias is not None:
            hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[:-1] + (1,))], dim=-1)
            weight = torch.cat([weight, up.bias.unsqueeze(1)], dim=1)
        if not out.is_contiguous() and out.transpose(0, 1).is_contiguous():
            # (B, N, width) viewed from (N, B, width) memory, as nn.MultiheadAttention returns it: sum in that
            # order (the small hidden is the one copied) and return the same kind of view
            total = torch.addmm(out.transpose(0, 1).reshape(-1, out.shape[-1]),
                                hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]), weight.t(), alpha=scale)
            return total.view(out.shape[1], out.shape[0], out.shape[2]).transpose(0, 1)
        total = torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), weight.t(),
                            alpha=scale)
        return total.view(out.shape)

    def extra_repr(self) -> str:
        kind = "share" if self._share else "full"
        return f"width={self.width}, dim={self.dim}, kernel_size={self.kernel_size}, {kind}"


@register_adapter("convpass", config=ConvpassConfig, label="Convpass_CLIP")
def build_convpass(config: ConvpassConfig, target: AdapterTarget) -> AdapterFactory:
    """Convpass (§3.2): one full adapter per sub-block."""
    return AdapterFactory(make=lambda site: Convpass(target.width, config.dim, config.kernel_size, config.conv_init,
                                                     config.dropout, layout=target.layout))


@register_adapter("convpass_attn", config=ConvpassConfig, placement="attn", label="Convpass (attn only)")
def build_convpass_attn(config: ConvpassConfig, target: AdapterTarget) -> AdapterFactory:
    """Convpass parallel to attention only."""
    return build_convpass(config, target)


@register_adapter("convpass_share", config=ConvpassConfig, label="Convpass-share")
def build_convpass_share(config: ConvpassConfig, target: AdapterTarget) -> AdapterFactory:
    """Convpass_share (§3.3): shared bias-free 1×1 down/up, a depthwise bias-free conv per adapter."""
    shared = SharedProjections(target.width, config.dim)
    return AdapterFactory(
        make=lambda site: Convpass(target.width, config.dim, config.kernel_size, config.conv_init, config.dropout,
                                   share=shared, layout=target.layout),
        shared=shared,
    )
