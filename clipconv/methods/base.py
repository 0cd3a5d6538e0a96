"""The one interface every method shares: `fit(ctx)` then `logits(...)`."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from ..backbone import Backbone
from ..config import Config, option

__all__ = ["FitContext", "Method", "MethodConfig", "option", "METHODS", "register_method", "build_method",
           "method_names"]

Sample = tuple[str, int]


@dataclass
class MethodConfig(Config):
    """Every option of one method, with its reference default and help text (subclass per method).

    Build from loose options with `from_options`: unknown keys raise with the list of known ones.
    The generic base (`clipconv.config.Config`) is shared with the adapter kinds' configs.
    """


@dataclass
class FitContext:
    """Everything a method may use to fit: never a test set.

    `train` is the K-shot split and `val` a validation split drawn from the remaining train images
    (empty when no validation is requested); sample paths are relative to `data_root`.
    `features` is a `clipconv.features.FeatureStore` bound to `backbone` (cached frozen-encoder features).
    """

    backbone: Backbone
    classnames: Sequence[str]
    data_root: Path
    train: Sequence[Sample]
    val: Sequence[Sample] = ()
    templates: Sequence[str] = ("a photo of a {}.",)
    features: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 1
    output_dir: Optional[Path] = None
    class_hash: str = ""
    class_ids: Sequence[str] = ()
    workers: int = 0
    eval_batch_size: int = 128
    log: Callable[[str], None] = print


class Method(abc.ABC):
    """A few-shot CLIP method. Frozen-image-encoder methods score cached features."""

    name: ClassVar[str] = ""
    frozen_image_encoder: ClassVar[bool] = True
    #: the options dataclass of this method (`build_method(name, **options)` validates against it)
    config_class: ClassVar[type[MethodConfig]] = MethodConfig

    @abc.abstractmethod
    def fit(self, ctx: FitContext) -> dict[str, Any]:
        """Fit on ctx.train (choose hyper-parameters on ctx.val only); return a summary for the run log."""

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) from raw (unnormalized) frozen image features (N, D)."""
        raise NotImplementedError(f"method '{self.name}' does not score cached features")

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) from preprocessed images; frozen-encoder methods encode then score features."""
        raise NotImplementedError(f"method '{self.name}' must implement logits(images)")

    def summary(self) -> dict[str, Any]:
        """Chosen hyper-parameters and anything else worth reporting."""
        return {}


METHODS: dict[str, Callable[..., Method]] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator adding a method to the registry under `name`."""

    def decorate(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"method '{name}' registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def method_names() -> list[str]:
    from . import _load_all  # noqa: F401  (import side effect: registration)

    return sorted(METHODS)


def build_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method; unknown names list the known ones."""
    known = method_names()
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of {known}")
    return METHODS[name](**options)
