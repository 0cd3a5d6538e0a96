"""Wrappers that put an adapter beside (or after) a sub-module and delegate to it, PEFT-style.

`AdaptedModule(base, adapter)` stands where `base` stood (e.g. `block.attn`, `block.mlp` of an open_clip
ResidualAttentionBlock) and calls `base` itself — no forward is copied, so whatever attention module
open_clip uses (`nn.MultiheadAttention` returning a tuple, or its newer `Attention` returning a tensor)
keeps its own code. The wrapper *aliases* the wrapped module's parameter and buffer dicts and its
children, so state-dict keys are the original's (`attn.in_proj_weight`, `mlp.c_fc.weight`, ...) plus the
adapter's (`attn.adapter.*`); original checkpoints load, and freezing by identity sees the same
tensors. Attributes not found on the wrapper (`embed_dim`, `batch_first`, ...) are read from `base`.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn.modules import module as base

__all__ = ["AdaptedModule", "AdapterRecord", "ParallelAdapter", "SequentialAdapter", "attention_layout", "drop_path",
           "zero_padded", "ModuleOutput"]

#: what a wrapped module returns: a tensor, or nn.MultiheadAttention's (output, attention weights or None)
ModuleOutput = Union[torch.Tensor, tuple[Optional[torch.Tensor], ...]]

ADAPTER_NAME = "adapter"


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability `rate`, scale the kept ones by 1/(1-rate)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def _dtype_of(module: nn.Module, fallback: torch.dtype) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in module.parameters()), fallback)


def _has_hooks(module: nn.Module) -> bool:
    """Forward (pre-)hooks would see the adapter called: the fused path, which skips its __call__, is not taken."""

    return bool(module._forward_hooks or module._forward_pre_hooks
                or base._global_forward_hooks or base._global_forward_pre_hooks)


def attention_layout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` (B, N, width) as a batch-first nn.MultiheadAttention (`module`, or the one it wraps) best reads it off
    its inference fast path: a view of (N, B, width) memory, which the module's transpose makes contiguous."""
    base = module.base_layer if isinstance(module, AdaptedModule) else module
    if not isinstance(base, nn.MultiheadAttention) or not base.batch_first or x.dim() != 3:
        return x
    return x if x.transpose(0, 1).is_contiguous() else x.transpose(0, 1).contiguous().transpose(0, 1)


def zero_padded(rows: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, n, width) `rows` followed by zero rows up to `tokens` tokens: (B, tokens, width)."""
    return torch.cat([rows, rows.new_zeros(rows.shape[0], tokens - rows.shape[1], rows.shape[2])], dim=1)


def _attention_inputs(base: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """The call's (x, args, kwargs), or for a batch-first nn.MultiheadAttention off its inference fast path the same
    values laid out for its Python path (CPU: about 15 % less time for the attention sub-block's forward+backward):

    - x copied once into (N, B, width) memory order, viewed as (B, N, width): the module transposes its input to
      (N, B, width), which from contiguous (B, N, width) memory is not contiguous, and with grad enabled `linear`
      then runs the in-projection as N small batched matmuls, about 3× slower than one matmul;
    - key and value passed as distinct views of that copy: the module then projects q, k and v with three
      matmuls on its weight's thirds instead of one packed matmul whose output it copies apart (and whose
      backward zero-fills and sums three full-size gradients).
    Values, and so results, are those of the plain self-attention call (up to matmul rounding)."""
    if not isinstance(base, nn.MultiheadAttention) or not base.batch_first or x.dim() != 3:
        return x, args, kwargs
    if not (base.training or (torch.is_grad_enabled() and x.requires_grad)):
        return x, args, kwargs  # the fast path (torch._native_multi_head_attention) takes x as it is
    query = attention_layout(base, x)

    def fresh(value: object) -> object:
        return query.view_as(query) if value is x else value

    return query, tuple(fresh(a) for a in args), {k: fresh(v) for k, v in kwargs.items()}


class AdaptedModule(nn.Module):
    """Base of the wrappers: holds `base_layer` (not as a child: its tensors are aliased) and `adapter`.

    `scale` multiplies the adapter term; `drop_rate` is the stochastic-depth rate of both terms.
    Adapter inputs are cast to the adapter's dtype and its output back, so fp32 adapters run in a
    bf16 trunk.
    """

    #: False for wrappers whose adapter has no branch to scale (VPT prompts): `set_adapter_scale` then refuses s ≠ 1.
    scaled: bool = True
    #: The registered adapter kind that made this wrapper (set by the injection).
    kind: str = ""

    def __init__(self, base: nn.Module, adapter: nn.Module, scale: float = 1.0, drop_rate: float = 0.0) -> None:
        super().__init__()
        if ADAPTER_NAME in base._modules or ADAPTER_NAME in base._parameters:
            raise ValueError(f"{type(base).__name__} already has a '{ADAPTER_NAME}' member")
        self.__dict__["_base"] = (base,)  # a tuple: not a registered child
        # Share the tensor dicts: replacing a tensor through either object (to(), load_state_dict(assign=True))
        # is seen by both, and state-dict keys stay those of the wrapped module.
        self.__dict__["_parameters"] = base._parameters
        self.__dict__["_buffers"] = base._buffers
        self.__dict__["_non_persistent_buffers_set"] = base._non_persistent_buffers_set
        for name, child in base._modules.items():
            self._modules[name] = child
        self.adapter = adapter
        self.scale = float(scale)
        self.drop_rate = float(drop_rate)
        self.training = base.training

    @property
    def base_layer(self) -> nn.Module:
        return self.__dict__["_base"][0]

    def __getattr__(self, name: str) -> Any:  # also the wrapped module's attributes, whatever their types
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None:
                raise
            return getattr(base[0], name)

    def __setattr__(self, name: str, value: object) -> None:
        # A child replaced through the wrapper (convpass wrapping `attn` inside a VPT-wrapped block) must be
        # the one the wrapped module's own forward calls: replace it in both.
        base = self.__dict__.get("_base")
        if base is not None and isinstance(value, nn.Module) and name in base[0]._modules:
            setattr(base[0], name, value)
        super().__setattr__(name, value)

    def train(self, mode: bool = True) -> "AdaptedModule":
        super().train(mode)
        self.base_layer.training = mode  # its children are ours too, already set
        return self

    def _adapter_term(self, x: torch.Tensor) -> torch.Tensor:
        out = self.adapter(x.to(_dtype_of(self.adapter, x.dtype))).to(x.dtype) * self.scale
        return drop_path(out, self.drop_rate, self.training)

    def _combine(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    #: let adapters with an `add_into(out, x, scale)` method fold their output projection, the scale and the sum
    #: with the trunk into one call (see Convpass.add_into); False forces the plain `trunk + s·adapter(x)`
    fused: bool = True

    def _add(self, trunk: torch.Tensor, x: torch.Tensor, rows: Optional[int] = None) -> torch.Tensor:
        """trunk' + s·adapter(x), trunk' = drop_path(trunk): fused when the adapter can and nothing is dropped.
        With `rows`, `trunk` holds the first `rows` tokens only and so does the result: the adapter still reads
        every token of `x` (same shapes, so the same dropout draws) and its first `rows` output rows are added."""
        add_into = getattr(self.adapter, "add_into", None) if self.fused and not _has_hooks(self.adapter) else None
        same_dtype = trunk.dtype == x.dtype == _dtype_of(self.adapter, x.dtype) \
            or torch.is_autocast_enabled(trunk.device.type)
        if add_into is not None and same_dtype and (self.drop_rate == 0.0 or not self.training):
            return add_into(trunk, x, self.scale) if rows is None else add_into(trunk, x, self.scale, rows=rows)
        trunk = drop_path(trunk, self.drop_rate, self.training)
        term = self._adapter_term(x)
        return trunk + (term if rows is None else term[:, :rows])

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> ModuleOutput:
        base_x, args, kwargs = _attention_inputs(self.base_layer, x, args, kwargs)
        out = self.base_layer(base_x, *args, **kwargs)
        if isinstance(out, tuple):  # nn.MultiheadAttention: (output, weights)
            return (self._combine(x, out[0]), *out[1:])
        return self._combine(x, out)

    def unwrap(self) -> nn.Module:
        """The wrapped module, with this wrapper's train/eval mode."""
        base = self.base_layer
        base.train(self.training)
        return base

    def extra_repr(self) -> str:
        return f"base={type(self.base_layer).__name__}, scale={self.scale}, drop_rate={self.drop_rate}"


class ParallelAdapter(AdaptedModule):
    """output = base(x, ...) + s·adapter(x): the adapter reads the sub-block's (normalized) input."""

    def _combine(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        return self._add(trunk, x)

    def combine_rows(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        """The output's first rows from `trunk` = base(...) of those rows and `x`, the input of every token."""
        return self._add(trunk, x, rows=trunk.shape[1])


class SequentialAdapter(AdaptedModule):
    """output = a + s·adapter(a) with a = base(x, ...): the adapter reads the sub-block's output."""

    def _combine(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        return self._add(trunk, trunk)

    def combine_rows(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        """The output's first rows from `trunk` = base(...) of those rows; the adapter reads them zero-padded to
        `x`'s token count (the other rows cannot reach the first ones in an adapter that keeps them apart)."""
        return self._add(trunk, zero_padded(trunk, x.shape[1]), rows=trunk.shape[1])


class AdapterRecord(nn.Module):
    """What a kind with its own injection changed, when it adds no wrapper (BitFit makes existing tensors
    trainable): registered on the encoder (`visual.transformer.<kind>`), holding no tensors of its own
    (state-dict keys stay unchanged). `trainable()` lists the parameters the kind trains, `remove()`
    undoes the injection."""

    scaled: bool = False
    kind: str = ""

    def trainable(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError


class ParameterView(nn.Module):
    """An unregistered view of parameters that live elsewhere in a model (its `parameters()` are them)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)
