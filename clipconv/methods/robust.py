"""Robustness-keeping training shared by the methods that train the image encoder (adapter tuning, CLIP-LoRA):
the options (`RobustOptions`: PromptSRC's zero-shot anchors and weight averaging, all off by default), the
recommended recipe (`ROBUST_RECIPE`, each such method's `--preset robust`) and the `robust:<method>` variants
(the method trained with the recipe laid over the run's preset; Table 2's "(robust)" rows).

How the recipe was chosen (docs/robustness.md), without any shifted set: its form and weights are PromptSRC's
published few-shot ImageNet setting, fixed in advance (logit KL weight 1, image-feature L1 weight 10, Gaussian
weight aggregation over epochs with mean 30, std 30). One common factor k over both anchor weights was then
to be picked on the SOURCE validation split alone by a rule fixed before looking: the larger k of {1, 10}
whose validation top-1 stays >= zero-shot's validation top-1 + 6 points (the issue's source margin), else
k = 1 (the published weights). On the miniature benchmark (seed 1, 16 validation images per class) k = 1
already scored 56.84 against the 58.93 needed, so the recipe is the published one (k = 1).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

from clipconv.config import non_negative, option
from clipconv.methods.base import METHODS, MethodConfig, MethodSpec
from clipconv.runtime.jsontypes import JSONObject
from clipconv.training import weight_average_problem

__all__ = ["RobustOptions", "ROBUST_PRESET", "ROBUST_RECIPE", "ROBUST_METHOD_PREFIX", "RobustVariant",
           "robust_method_name", "ROBUST_LABEL"]

#: the preset name (`--preset robust`; with --demo: "demo+robust")
ROBUST_PRESET = "robust"
#: the recommended recipe (see the module docstring): PromptSRC's weights × k, k picked on source validation
ROBUST_RECIPE: Mapping[str, object] = {"anchor_logits": 1.0, "anchor_features": 10.0, "weight_average": "gpa"}
#: `robust:<method>` is `<method>` trained with ROBUST_RECIPE over the run's preset
ROBUST_METHOD_PREFIX = "robust:"
#: appended to a variant's row label
ROBUST_LABEL = " (robust)"


@dataclass
class RobustOptions(MethodConfig):
    """Zero-shot anchors and weight averaging (project issue "Keep the robustness"); the defaults train as the
    reference protocol, bit-identically."""

    anchor_logits: float = option(0.0, check=non_negative,
                                  help="weight W of W·KL(zero-shot ‖ adapted class distribution) on every training "
                                       "batch, zero-shot = the frozen, un-adapted model (PromptSRC's L_SCL-logits, "
                                       "Khattak et al., ICCV 2023, T = 1); 0 = off (the reference)")
    anchor_features: float = option(0.0, check=non_negative,
                                    help="weight W of W·L1(adapted, frozen normalized image features) of the same "
                                         "augmented batch (PromptSRC's L_SCL-image); 0 = off (the reference)")
    weight_average: str = option("none", check=weight_average_problem,
                                 help="average the trained weights during training; the average is validated, "
                                      "evaluated and saved: none (the reference), ema:DECAY (every step, DECAY in "
                                      "(0, 1)), swa:EPOCHS (uniform over the last EPOCHS epochs) or gpa[:MEAN:STD] "
                                      "(PromptSRC's Gaussian weights over epochs, default mean 30, std 30)")

    @property
    def anchored(self) -> bool:
        """Whether a zero-shot anchor term is on (the frozen model then runs on every training batch)."""
        return self.anchor_logits > 0 or self.anchor_features > 0

    def robustness(self) -> JSONObject:
        """The robustness-keeping settings (recorded in checkpoints and summaries)."""
        return {"anchor_logits": self.anchor_logits, "anchor_features": self.anchor_features,
                "weight_average": self.weight_average}


def robust_method_name(name: str) -> str:
    return ROBUST_METHOD_PREFIX + name


@dataclass(frozen=True)
class RobustVariant:
    """The method `robust:<base>`: `base` (a registered method declaring the "robust" preset) whose options
    default to its robust recipe (`config_class`: the base's config class with those defaults, so each preset —
    paper, demo — comes with the recipe on top), with its own name and label ("Convpass_CLIP (robust)"), no
    default-Table-2 row, no published numbers, not the default. Built methods are the base's (same options,
    same checkpoints)."""

    base_name: str
    config_class: type[MethodConfig] = field(init=False, compare=False, repr=False)
    presets: Mapping[str, Mapping[str, object]] = field(init=False, compare=False, repr=False)
    table2_order: ClassVar[Optional[int]] = None
    published: ClassVar[Mapping[str, float]] = {}
    default: ClassVar[bool] = False

    def __post_init__(self) -> None:
        base = self.base
        recipe = base.presets[ROBUST_PRESET]
        parent = base.config_class
        fields = [(f.name, hints, field(default=recipe[f.name], metadata=f.metadata))
                  for f, hints in ((f, typing.get_type_hints(parent)[f.name]) for f in dataclasses.fields(parent))
                  if f.name in recipe]
        config = dataclasses.make_dataclass("Robust" + parent.__name__, fields, bases=(parent,))
        config.__module__ = __name__
        object.__setattr__(self, "config_class", config)
        object.__setattr__(self, "presets", {name: options for name, options in base.presets.items()
                                             if name != ROBUST_PRESET})

    @property
    def base(self) -> MethodSpec:
        return METHODS[self.base_name]

    @property
    def name(self) -> str:
        return robust_method_name(self.base_name)

    @property
    def label(self) -> str:
        return (self.base.label or self.base_name) + ROBUST_LABEL

    def __call__(self, config: Optional[MethodConfig] = None, **options: object) -> Any:
        return self.base(config, **options)

    def __getattr__(self, attribute: str) -> Any:  # the base method's attributes, whatever their types
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(self.base, attribute)


def _robust_bases() -> list[str]:
    """The registered methods (not the resolved names) that declare the robust preset."""
    return [name for name in METHODS.registered() if ROBUST_PRESET in getattr(METHODS[name], "presets", {})]


METHODS.resolver(ROBUST_METHOD_PREFIX, RobustVariant, _robust_bases)
