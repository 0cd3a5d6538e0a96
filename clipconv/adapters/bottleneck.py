"""Bottleneck adapters: down (d→h) → activation → dropout → up (h→d), the module of AdaptFormer and of the
sequential Adapter (Houlsby / Pfeiffer). The wrapper adds the branch to the trunk (clipconv/adapters/wrappers.py)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

__all__ = ["Bottleneck", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class Bottleneck(nn.Module):
    """up(dropout(act(down(x)))): tokens (B, N, width) → (B, N, width), no residual inside.

    Initialization as AdaptFormer's "lora" option (and PEFT's LoRA A): down weight kaiming-uniform with
    a = √5, zero down bias; up weight and bias zero, so a fresh module outputs exactly zero.
    """

    #: token-wise: a prefix token's output depends on that token's input alone (see adapters/pooled.py)
    prefix_tokens_apart: bool = True

    def __init__(self, width: int, dim: int, activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; choose one of {sorted(ACTIVATIONS)}")
        self.down = nn.Linear(width, dim)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(dim, width)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))
