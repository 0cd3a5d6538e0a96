"""LoRA: low-rank updates ΔW = (alpha/r)·B·A of the attention projections (Hu et al., "LoRA: Low-Rank
Adaptation of Large Language Models", ICLR 2022), on open_clip's image or text transformer.

The attention forward is never copied:
- a module whose projections are `nn.Linear` children (timm's packed `qkv` + `proj`; `q_proj`/`k_proj`/
  `v_proj`/`out_proj`) gets each targeted linear wrapped by `LoRALinear`: base(x) + s·(alpha/r)·B·A·drop(x),
  PEFT's formula, rows of a packed `qkv` addressed per target;
- a module holding a packed `in_proj_weight` (open_clip's `nn.MultiheadAttention`; its q/k/v rows stacked)
  is wrapped by `LoRAAttention`, which calls the module itself through `torch.func.functional_call` with
  `in_proj_weight + s·ΔW` (and `out_proj.weight + s·ΔW_o`). With LoRA dropout active in training the
  dropped input cannot be folded into a weight, so `LoRAAttention` projects q/k/v itself (base projection +
  LoRA branch on the dropped input, exactly PEFT's formula) and hands them to the module with an identity
  in-projection; dropout on `o`'s input (inside the attention) is impossible that way and is refused.

A (r × in) is kaiming-uniform (a = √5, as PEFT and CLIP-LoRA initialize it), B (out × r) is zero: a fresh
LoRA is the identity. `add_lora` puts LoRA on every block of a transformer (text or image);
the `lora` adapter kind does it on the image encoder with PEFT's defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipconv.adapters.inject import transformer_blocks
from clipconv.adapters.registry import AdapterConfig, AdapterFactory, AdapterTarget, register_adapter
from clipconv.adapters.wrappers import AdaptedModule, ModuleOutput
from clipconv.config import option, positive, probability

__all__ = ["LoRA", "LoRAConfig", "LoRALinear", "LoRAAttention", "LoRAVariant", "LORA_TARGETS", "add_lora",
           "lora_attention", "lora_wrappers"]

LORA_TARGETS = ("q", "k", "v", "o")
KIND = "lora"
# Linear children that hold one target, by common name; a packed linear holds q, k, v as row thirds.
_SINGLE = {"q": ("q_proj", "q"), "k": ("k_proj", "k"), "v": ("v_proj", "v"), "o": ("out_proj", "proj", "o_proj")}
_PACKED = ("qkv", "in_proj")


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = tuple(t for t in targets.replace(",", " ").split() if t)
    targets = tuple(targets)
    bad = sorted(set(targets) - set(LORA_TARGETS))
    if not targets or bad or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets must be distinct names among {LORA_TARGETS}, got {list(targets)}")
    return tuple(t for t in LORA_TARGETS if t in targets)  # canonical order


def _check_numbers(rank: object, alpha: object, dropout: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA on the image encoder's attention. Defaults: PEFT's `LoraConfig` (r = 8, lora_alpha = 8,
    lora_dropout = 0) and the LoRA paper's choice of W_q and W_v (Hu et al., 2022, §7.1)."""

    targets: tuple[str, ...] = option(("q", "v"), help="attention projections to adapt, any of q k v o (the LoRA "
                                                        "paper's q v; CLIP-LoRA uses q k v)")
    rank: int = option(8, check=positive, help="rank r of each update (PEFT's default 8)")
    alpha: float = option(8.0, check=positive, help="LoRA alpha; updates are scaled by alpha/r (PEFT's default 8)")
    dropout: float = option(0.0, check=probability,
                            help="dropout on the LoRA branch's input (PEFT's default 0; CLIP-LoRA 0.25)")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # "q,v" or "q v"
            self.targets = tuple(t for t in self.targets.replace(",", " ").split() if t)
        super().__post_init__()
        self.targets = _check_targets(self.targets)
        self.refuse_wrapper_options(KIND, placement=False)


class LoRAVariant:
    """How a `LoRA` becomes the adapted weight (PEFT's `LoraVariant`): plain LoRA, W + s·ΔW. A variant (DoRA,
    clipconv/adapters/dora.py) subclasses it; the wrappers, targets and A/B init stay LoRA's. Stateless: its
    parameters live on the `LoRA` module (`init`), which holds the variant as `lora.variant`."""

    #: the adapter kind its wrappers report
    kind: str = KIND

    def init(self, lora: LoRA, weight: torch.Tensor) -> None:
        """Add the variant's parameters to `lora` (fp32, on its device), given the base weight it updates."""

    def weight(self, lora: LoRA, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """The adapted weight (dtype of `weight`), differentiable in the LoRA parameters."""
        return weight + _delta(lora, weight, scale)

    def linear(self, wrapper: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """The output of a `LoRALinear`: base(x) + s·ΔW·drop(x), ΔW never formed."""
        lora = wrapper.adapter
        return wrapper.base_layer(x) + (lora(x.to(lora.dtype)) * wrapper.scale).to(x.dtype)


class LoRA(nn.Module):
    """The low-rank update of one weight (out × in), on some row blocks only (`rows`: target → (start, end)):
    ΔW[start:end] = (alpha/r)·B_t·A_t, zero elsewhere. `forward(x)` is ΔW·drop(x) without forming ΔW.
    `variant` makes the adapted weight of it: plain LoRA's by default, a variant's (DoRA) when one set its own."""

    variant: LoRAVariant = LoRAVariant()

    def __init__(self, in_features: int, out_features: int, rows: dict[str, tuple[int, int]], rank: int,
                 alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        _check_numbers(rank, alpha, dropout)
        for target, (start, end) in rows.items():
            if not 0 <= start < end <= out_features:
                raise ValueError(f"LoRA rows {start}:{end} of target '{target}' do not fit {out_features} outputs")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.rows = dict(sorted(rows.items(), key=lambda item: item[1]))
        self.scaling = float(alpha) / rank
        self.A = nn.ParameterDict({t: nn.Parameter(torch.empty(rank, in_features)) for t in self.rows})
        self.B = nn.ParameterDict({t: nn.Parameter(torch.zeros(end - start, rank)) for t, (start, end) in self.rows.items()})
        for weight in self.A.values():
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # PEFT's and CLIP-LoRA's init of A
        self.dropout = nn.Dropout(dropout)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.A.values())).dtype

    def _assemble(self, blocks: dict[str, torch.Tensor], width: int, like: torch.Tensor) -> torch.Tensor:
        """Row blocks {target: (rows, width)} stacked into (out_features, width), zero rows between."""
        parts, cursor = [], 0
        for target, (start, end) in self.rows.items():
            if start > cursor:
                parts.append(like.new_zeros((start - cursor, width)))
            parts.append(blocks[target])
            cursor = end
        if cursor < self.out_features:
            parts.append(like.new_zeros((self.out_features - cursor, width)))
        return torch.cat(parts, dim=0)

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out × in), zero outside the target rows."""
        blocks = {t: (self.B[t] @ self.A[t]) * self.scaling for t in self.rows}
        return self._assemble(blocks, self.in_features, next(iter(blocks.values())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in) → (…, out): ΔW·drop(x), through the rank-r bottleneck."""
        hidden = self.dropout(x)
        outs = [F.linear(F.linear(hidden, self.A[t]), self.B[t]) * self.scaling for t in self.rows]
        if len(outs) == 1 and self.rows[next(iter(self.rows))] == (0, self.out_features):
            return outs[0]
        pieces, cursor = [], 0
        for out, (start, end) in zip(outs, self.rows.values()):
            if start > cursor:
                pieces.append(out.new_zeros((*out.shape[:-1], start - cursor)))
            pieces.append(out)
            cursor = end
        if cursor < self.out_features:
            pieces.append(outs[0].new_zeros((*outs[0].shape[:-1], self.out_features - cursor)))
        return torch.cat(pieces, dim=-1)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rows={self.rows}, rank={self.rank}, scaling={self.scaling:g}"


def _delta(lora: LoRA, like: torch.Tensor, scale: float) -> torch.Tensor:
    return (lora.delta_weight() * scale).to(like.dtype)


class LoRALinear(AdaptedModule):
    """An `nn.Linear` plus its LoRA branch: base(x) + s·ΔW·drop(x) (`adapter` is a `LoRA`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.variant.linear(self, x)

    @torch.no_grad()
    def fold_(self) -> None:
        """Write the adapted weight (W + s·ΔW for LoRA) into the wrapped linear (then `unwrap` gives the merged
        plain linear)."""
        weight = self.base_layer.weight
        weight.copy_(self.adapter.variant.weight(self.adapter, weight, self.scale))


class LoRAAttentionAdapter(nn.Module):
    """The LoRA updates of one attention module with a packed `in_proj_weight`: `in_proj` (q/k/v rows) and
    `out_proj` (o), either may be None."""

    def __init__(self, in_proj: Optional[LoRA], out_proj: Optional[LoRA]) -> None:
        super().__init__()
        self.in_proj = in_proj
        self.out_proj = out_proj


class LoRAAttention(AdaptedModule):
    """An attention module with a packed `in_proj_weight` (q, k, v rows) and an `out_proj` linear, called
    with LoRA-updated weights through `functional_call`; its own forward runs unchanged."""

    def _weights(self) -> dict[str, torch.Tensor]:
        base, lora, params = self.base_layer, self.adapter, {}
        if lora.in_proj is not None:
            params["in_proj_weight"] = lora.in_proj.variant.weight(lora.in_proj, base.in_proj_weight, self.scale)
        if lora.out_proj is not None:
            params["out_proj.weight"] = lora.out_proj.variant.weight(lora.out_proj, base.out_proj.weight, self.scale)
        return params

    def forward(self, *args: object, **kwargs: object) -> ModuleOutput:
        lora = self.adapter.in_proj
        if lora is None or not (self.training and lora.dropout.p > 0):
            return torch.func.functional_call(self.base_layer, self._weights(), args, kwargs)
        return self._forward_dropped(*args, **kwargs)

    def _forward_dropped(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: object,
                         **kwargs: object) -> ModuleOutput:
        """Training with LoRA dropout (nn.MultiheadAttention): q/k/v = base projection + LoRA on the dropped
        input, passed to the module with an identity in-projection (so the module still does the rest)."""
        base, lora = self.base_layer, self.adapter.in_proj
        weight, bias, width = base.in_proj_weight, base.in_proj_bias, base.embed_dim

        def project(x: torch.Tensor, part: Optional[int]) -> torch.Tensor:
            rows = slice(None) if part is None else slice(part * width, (part + 1) * width)
            out = F.linear(x, weight[rows], None if bias is None else bias[rows])
            branch = (lora(x.to(lora.dtype)) * self.scale).to(out.dtype)
            return out + branch[..., rows]

        if query is key and key is value:  # self-attention (open_clip): one packed projection
            query, key, value = project(query, None).chunk(3, dim=-1)
        else:
            query, key, value = project(query, 0), project(key, 1), project(value, 2)
        eye = torch.eye(width, dtype=weight.dtype, device=weight.device)
        params: dict[str, Optional[torch.Tensor]] = {"in_proj_weight": eye.repeat(3, 1)}
        if bias is not None:
            params["in_proj_bias"] = torch.zeros_like(bias)
        if self.adapter.out_proj is not None:  # unreachable: refused at construction (dropout on o's input)
            raise RuntimeError("LoRA dropout on the attention output projection is not supported")
        return torch.func.functional_call(base, params, (query, key, value, *args), kwargs)

    @torch.no_grad()
    def fold_(self) -> None:
        """Add the updates into the wrapped module's weights (then `unwrap` gives the merged plain module)."""
        for name, merged in self._weights().items():
            target = self.base_layer.get_parameter(name)
            target.copy_(merged)


def _lora_on_attention(attn: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, dropout: float,
                       scale: float, variant: LoRAVariant = LoRA.variant) -> list[tuple[nn.Module, str, AdaptedModule]]:
    """The (parent, attribute, wrapper) replacements that put LoRA (`variant` of it) on one attention module."""
    device = next(attn.parameters()).device

    def lora(weight: torch.Tensor, rows: dict[str, tuple[int, int]]) -> LoRA:
        out_features, in_features = weight.shape
        module = LoRA(in_features, out_features, rows, rank, alpha, dropout).to(device=device, dtype=torch.float32)
        module.variant = variant
        variant.init(module, weight)
        return module

    packed = getattr(attn, "in_proj_weight", None)
    if isinstance(packed, torch.Tensor):
        if not isinstance(attn, nn.MultiheadAttention) and dropout > 0:
            raise ValueError(f"LoRA dropout needs the q/k/v inputs, which {type(attn).__name__} does not take; "
                             "use dropout=0 on it")
        out_features = packed.shape[0]
        width = out_features // 3
        qkv = {t: (i * width, (i + 1) * width) for i, t in enumerate(("q", "k", "v")) if t in targets}
        out_proj = getattr(attn, "out_proj", None) if "o" in targets else None
        if "o" in targets and not isinstance(out_proj, nn.Linear):
            raise TypeError(f"{type(attn).__name__} has no out_proj linear for LoRA target 'o'")
        if out_proj is not None and dropout > 0:
            raise ValueError("LoRA dropout on target 'o' of a packed attention module would need its internal "
                             "attention output; use dropout=0 with 'o', or targets among q k v")
        adapter = LoRAAttentionAdapter(
            lora(packed, qkv) if qkv else None,
            lora(out_proj.weight, {"o": (0, out_proj.out_features)}) if out_proj else None)
        return [(None, "", LoRAAttention(attn, adapter, scale))]

    replacements = []
    packed_linear = next((getattr(attn, n) for n in _PACKED if isinstance(getattr(attn, n, None), nn.Linear)), None)
    qkv_targets = [t for t in targets if t != "o"]
    if packed_linear is not None and qkv_targets:
        width = packed_linear.out_features // 3
        rows = {t: (i * width, (i + 1) * width) for i, t in enumerate(("q", "k", "v")) if t in qkv_targets}
        name = next(n for n in _PACKED if getattr(attn, n, None) is packed_linear)
        replacements.append((attn, name, LoRALinear(packed_linear, lora(packed_linear.weight, rows), scale)))
        qkv_targets = []
    for target in [*qkv_targets, *(["o"] if "o" in targets else [])]:
        name = next((n for n in _SINGLE[target] if isinstance(getattr(attn, n, None), nn.Linear)), None)
        if name is None:
            raise TypeError(f"{type(attn).__name__} has no linear for LoRA target '{target}' (looked for "
                            f"{list(_SINGLE[target]) + ([] if target == 'o' else list(_PACKED))})")
        linear = getattr(attn, name)
        replacements.append((attn, name, LoRALinear(
            linear, lora(linear.weight, {target: (0, linear.out_features)}), scale)))
    return replacements


def lora_attention(parent: nn.Module, name: str = "attn", targets: Sequence[str] = ("q", "k", "v"), rank: int = 2,
                   alpha: float = 1.0, dropout: float = 0.25, scale: float = 1.0,
                   variant: LoRAVariant = LoRA.variant) -> nn.ModuleList:
    """Put LoRA on the attention module `parent.<name>` (packed `in_proj_weight`, or linear children: `qkv`,
    `q_proj`/`k_proj`/`v_proj`, `out_proj`/`proj`); return the LoRA modules (fp32, requiring grad). The wrappers
    report `variant.kind`."""
    targets = _check_targets(targets)
    _check_numbers(rank, alpha, dropout)
    attn = getattr(parent, name)
    if any(isinstance(m, AdaptedModule) for m in attn.modules()):
        raise ValueError(f"{type(attn).__name__} already carries an adapter; remove it before adding LoRA")
    added = []
    for owner, attribute, wrapper in _lora_on_attention(attn, targets, rank, float(alpha), float(dropout), scale,
                                                        variant):
        wrapper.kind = variant.kind
        setattr(parent if owner is None else owner, name if owner is None else attribute, wrapper)
        added.append(wrapper.adapter)
    return nn.ModuleList(added)


def add_lora(
    module: nn.Module,
    targets: Sequence[str] = ("q", "k", "v"),
    rank: int = 2,
    alpha: float = 1.0,
    dropout: float = 0.25,
    scale: float = 1.0,
    variant: LoRAVariant = LoRA.variant,
) -> nn.ModuleList:
    """Put LoRA on the attention of every block of an open_clip transformer; return the LoRA modules.

    `module` is a `Transformer` (`model.transformer` for text, `model.visual.transformer`) or an encoder
    holding one as `.transformer` (`model.visual`; a whole CLIP model means its text transformer). Defaults: CLIP-LoRA's (Zanella & Ben Ayed, 2024: q, k, v,
    r = 2, alpha = 1, dropout 0.25). The LoRA parameters (fp32, on the weights' device) require grad;
    nothing else is frozen or unfrozen here. State-dict keys of the transformer stay the same, LoRA's are
    `...attn.adapter.in_proj.A.q` (packed attention) or `...attn.<linear>.adapter.A.q` (linear children).
    Refuses attention that already carries an adapter (nothing is changed then). `variant`: a LoRA variant
    (DoRA's), plain LoRA by default.
    """

    targets = _check_targets(targets)
    _check_numbers(rank, alpha, dropout)
    blocks = transformer_blocks(module, "add_lora")
    if any(isinstance(m, AdaptedModule) for block in blocks for m in block.attn.modules()):
        raise ValueError("this transformer's attention already carries adapters; remove them before adding LoRA")
    added = nn.ModuleList()
    for block in blocks:
        added.extend(lora_attention(block, "attn", targets, rank, alpha, dropout, scale, variant))
    return added


def lora_wrappers(module: nn.Module) -> list[AdaptedModule]:
    """Every LoRA wrapper inside `module` (text and image encoders alike)."""
    return [m for m in module.modules() if isinstance(m, (LoRALinear, LoRAAttention))]


@register_adapter(KIND, config=LoRAConfig, placement="attn", label="LoRA", mergeable=True)
def build_lora(config: LoRAConfig, target: AdapterTarget) -> AdapterFactory:
    """LoRA on every block's attention projections (`targets`) of the image encoder."""
    return AdapterFactory(inject=lambda visual: list(add_lora(visual.transformer, config.targets, config.rank,
                                                              config.alpha, config.dropout, config.scale)))
