"""Weight-space interpolation of a trained method with its starting point (WiSE-FT; Wortsman et al., CVPR 2022).

θ(α) = (1 − α)·θ₀ + α·θ₁ on every trainable tensor of a fitted method, θ₀ its starting point and θ₁
its trained weights. A method takes part by implementing

    interpolation_endpoints() -> (theta0, theta1)   # dicts name → tensor, same keys and shapes
    load_interpolated(state)                        # make `state` the weights used by logits()

`interpolate(method, alpha)` sets θ(α); θ₁ is kept by the method, so several α are evaluated from one fit
(`interpolate(method, 1.0)` restores the trained model bit for bit). What α = 0 means per method:

- adapter methods (convpass, …): the text head and zero-initialized adapters — zero-shot CLIP exactly
  (the adapter scale s stays the chosen one; the zero up-projection makes the branch vanish whatever s);
- linear_probe: the zero-shot head (logit scale × text embeddings on L2-normalized features, zero bias —
  WiSE-FT's zero-shot classification head, which carries the logit scale so both heads produce logits on
  the same scale) — zero-shot CLIP exactly;
- coop / cocoop: the context as initialized at fit start (and CoCoOp's freshly initialized meta-net):
  zero-shot only when the context starts from a phrase (`init_phrase`, CoCoOp's default "a photo of a";
  with a matching prompt it reproduces that prompt's zero-shot classifier, CoCoOp's meta-net aside);
  with CoOp's reference random init, α = 0 is a random prompt, NOT zero-shot CLIP;
- tip_adapter_f: the untrained cache keys, i.e. training-free Tip-Adapter (with the α/β chosen after
  training), NOT zero-shot CLIP.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch

from clipconv.methods.base import METHODS, default_method, method_names

__all__ = ["Interpolable", "supports_interpolation", "mix", "interpolate", "wise_sweep", "alpha_check",
           "WISE_DEFAULT_ALPHA", "WISE_NOTE", "wise_key", "wise_label", "wise_methods"]

#: WiSE-FT's default mixing coefficient, fixed in advance (Wortsman et al., 2022), never chosen on a test set
WISE_DEFAULT_ALPHA = 0.5
WISE_NOTE = ("weight-space interpolation θ(α) = (1 − α)·θ₀ + α·θ₁ of the same fit with its starting point "
             "(WiSE-FT, Wortsman et al., CVPR 2022); α is fixed in advance, never chosen on a test set")

State = dict[str, torch.Tensor]


@runtime_checkable
class Interpolable(Protocol):
    def interpolation_endpoints(self) -> tuple[State, State]: ...

    def load_interpolated(self, state: Mapping[str, torch.Tensor]) -> None: ...


def supports_interpolation(method: Any) -> bool:
    """True when the method exposes interpolation endpoints (the trained methods)."""
    return isinstance(method, Interpolable)


def alpha_check(value: Any) -> Optional[str]:
    """Config check of a WiSE-FT α: None when it is a finite number in [0, 1], else what is wrong."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0.0 <= v <= 1.0):
            return f"must be a number in [0, 1] (0 = the starting point, 1 = the trained weights), got {v}"
    return None


def wise_key(name: str) -> str:
    """The result key of a method's WiSE row ("convpass" → "convpass+wise")."""
    return f"{name}+wise"


def wise_label(label: str, alpha: float) -> str:
    """"Convpass_CLIP" → "Convpass_CLIP + WiSE (α = 0.5)"."""
    return f"{label} + WiSE (α = {alpha:g})"


def wise_methods(asked: Optional[Sequence[str]], methods: Sequence[str], default: Optional[Sequence[str]] = None
                 ) -> list[str]:
    """The methods of `methods` that get a WiSE row: `asked` (None: those of `default` that run, by default the
    default method; ["none"]: none). Raises ValueError for a method that does not run or has no trained weights
    to interpolate."""
    default = (default_method(),) if default is None else default

    if asked is None:
        return [m for m in default if m in methods]
    asked = [m for m in asked if m != "none"]
    method_names()  # registers every method
    stray = [m for m in asked if m not in methods]
    if stray:
        raise ValueError(f"--wise-methods {stray}: not among --methods {list(methods)}")
    untrained = [m for m in asked if not supports_interpolation(METHODS[m])]
    if untrained:
        raise ValueError(f"--wise-methods {untrained}: no trained weights to interpolate (WiSE-FT applies to trained "
                         "methods such as convpass, linear_probe, coop, cocoop, tip_adapter_f)")
    return list(dict.fromkeys(asked))


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"WiSE-FT alpha must be in [0, 1] (0 = starting point, 1 = trained), got {alpha}")
    return alpha


def mix(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor], alpha: float) -> State:
    """(1 − α)·θ₀ + α·θ₁ per tensor (fp32 arithmetic, cast back); α = 0 / 1 return exact copies of θ₀ / θ₁."""
    alpha = _check_alpha(alpha)
    if set(theta0) != set(theta1):
        raise ValueError(f"interpolation endpoints differ in their tensors: {sorted(set(theta0) ^ set(theta1))}")
    out: State = {}
    for name, start in theta0.items():
        end = theta1[name]
        if start.shape != end.shape:
            raise ValueError(f"interpolation endpoints differ in the shape of '{name}': "
                             f"{tuple(start.shape)} vs {tuple(end.shape)}")
        if alpha == 0.0:
            out[name] = start.detach().clone()
        elif alpha == 1.0:
            out[name] = end.detach().clone()
        else:
            mixed = (1.0 - alpha) * start.detach().float() + alpha * end.detach().float().to(start.device)
            out[name] = mixed.to(start.dtype)
    return out


def interpolate(method: Any, alpha: float) -> State:
    """Load θ(α) into a fitted method and return it; the method's θ₀ and θ₁ are unchanged."""
    if not supports_interpolation(method):
        raise ValueError(f"method '{getattr(method, 'name', type(method).__name__)}' has no trained weights to "
                         "interpolate (WiSE-FT applies to trained methods)")
    theta0, theta1 = method.interpolation_endpoints()
    state = mix(theta0, theta1, alpha)
    method.load_interpolated(state)
    return state


def wise_sweep(session: Any, method: Any, alphas: Sequence[float], **evaluate_options: Any) -> dict[float, Any]:
    """{α: session.evaluate(method, …)} for each α of a fitted method; the trained weights (α = 1) are
    loaded again afterwards, whatever happens."""
    alphas = [_check_alpha(a) for a in alphas]
    if not alphas:
        raise ValueError("give at least one WiSE-FT alpha")
    results: dict[float, Any] = {}
    try:
        for alpha in alphas:
            interpolate(method, alpha)
            results[alpha] = session.evaluate(method, **evaluate_options)
    finally:
        interpolate(method, 1.0)
    return results
