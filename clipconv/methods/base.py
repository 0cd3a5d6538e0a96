"""The one interface every method shares: `fit(ctx)` then `logits(...)`, and the method registry.

Adding a method
---------------
1. Write its options as a dataclass: `class MyConfig(MethodConfig)` with one `option(default, help=...)`
   per option (the reference protocol's value as default; every numeric option declares its range, such as
   `check=positive` or `check=probability`). The command line (`--my-option`), `--help`, `--method-options`
   and config.json all come from it, and all enforce the range.
2. Subclass `Method`, set `config_class = MyConfig` (and `presets`, when its demo recipe differs from its
   reference defaults), take the config in `__init__(config)` (`config_from` also accepts keyword options),
   and implement `fit(ctx)` (train on
   `ctx.train`, choose hyper-parameters on `ctx.val` only, never touch `ctx.backbone` in place: copy
   what you train) and `logits(images)` — or `logits_from_features(features)` with
   `frozen_image_encoder = True` to score cached features. Seed, data-loading workers and the eval batch
   size come from `ctx` (`ctx.seed`, `ctx.workers`, `ctx.eval_batch_size`), not from options.
3. Decorate it with `@register_method("my_method")` and import its module in `methods/__init__.py`.
   Declare what the application shows of it as class attributes: `label`, `table2_order` (a row of the
   default Table 2), `published` (the paper's numbers), `clip_benchmark_task`, `data_parallel` (see `Method`).
4. Nothing else: `scripts/train_imagenet_fs.py --method my_method --help` lists its options, Table 2
   takes it with `--methods ... my_method`, and tests/test_method_contract.py fits it on a tiny world.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping, Optional, Protocol, Sequence, Union

import torch

from clipconv.backbone import Backbone
from clipconv.config import Config, ConfigT, OptionError, option
from clipconv.prompts import load_templates
from clipconv.registry import Registry
from clipconv.runtime.jsontypes import JSONObject

if TYPE_CHECKING:
    from clipconv.features import FeatureStore
    from clipconv.params import ParamSpec

__all__ = ["FitContext", "Method", "MethodConfig", "MethodSpec", "option", "METHODS", "register_method",
           "build_method", "method_names", "default_method", "table2_methods", "method_config_class", "method_config",
           "config_from", "MethodReferenceTemplates", "METHOD_REFERENCE_TEMPLATES", "PRESETS", "PAPER_AND_DEMO",
           "OVERLAY_PRESETS", "PRESET_CHOICES", "preset_options"]

Sample = tuple[str, int]


@dataclass
class MethodConfig(Config):
    """Every option of one method, with its reference default and help text (subclass per method).

    Build from loose options with `from_options`: unknown keys raise with the list of known ones.
    The generic base (`clipconv.config.Config`) is shared with the adapter kinds' configs.
    """


class MethodReferenceTemplates(tuple):
    """Marker type of FitContext's default `templates`: the run chose no template set, so every method
    uses its reference set (`Method.reference_templates`, resolved by `Method.templates_for`). Read as a
    plain sequence it is zero-shot CLIP's single prompt "a photo of a {}.", the reference of the
    text-initialized heads (zero-shot CLIP, Convpass)."""


#: the presets every method declares (`Method.presets`); "paper" is always the reference defaults
PRESETS = ("paper", "demo")
#: presets a method MAY declare, laid over "paper" or "demo": "robust" (the robustness-keeping recipe of the
#: trained-encoder methods, clipconv.methods.robust); "demo+robust" is the demo's recipe with it on top
OVERLAY_PRESETS = ("robust",)
#: the preset names a run takes and records: a base preset, or a base + an overlay ("robust" = "paper+robust")
PRESET_CHOICES = (*PRESETS, *OVERLAY_PRESETS, *(f"demo+{o}" for o in OVERLAY_PRESETS))
#: the presets of a method whose demo recipe is its reference one
PAPER_AND_DEMO: Mapping[str, Mapping[str, object]] = {"paper": {}, "demo": {}}

#: FitContext.templates when the run does not override the templates (each method uses its reference)
METHOD_REFERENCE_TEMPLATES = MethodReferenceTemplates(("a photo of a {}.",))


def config_from(config_class: type[ConfigT], config: Optional[ConfigT], options: Mapping[str, object]) -> ConfigT:
    """A method's config: `config` as given, or built from loose keyword `options` (never both)."""
    if config is None:
        return config_class.from_options(options)
    if options:
        raise ValueError(f"give either a {config_class.__name__} or keyword options, not both (got {sorted(options)})")
    if not isinstance(config, config_class):
        raise TypeError(f"expected a {config_class.__name__}, got {type(config).__name__}")
    return config


@dataclass
class FitContext:
    """Everything a method may use to fit: never a test set.

    `train` is the K-shot split and `val` a validation split drawn from the remaining train images
    (empty when no validation is requested); sample paths are relative to `data_root`.
    `features` is a `clipconv.features.FeatureStore` bound to `backbone` (cached frozen-encoder features).
    `templates` left at its default means "each method's reference templates"; an explicit list (named
    `templates_name`, e.g. the run's --templates) overrides them for every method that uses templates.
    """

    backbone: Backbone
    classnames: Sequence[str]
    data_root: Path
    train: Sequence[Sample]
    val: Sequence[Sample] = ()
    templates: Sequence[str] = METHOD_REFERENCE_TEMPLATES
    templates_name: str = ""
    features: Optional["FeatureStore"] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 1
    output_dir: Optional[Path] = None
    class_hash: str = ""
    class_ids: Sequence[str] = ()
    workers: int = 0
    eval_batch_size: int = 128
    draft: str = "off"  # reduced-size JPEG decoding of image loaders (clipconv.data.draft)
    #: keep the decoded train images for all epochs (clipconv.data.decoded): False, True (in memory) or a folder
    decoded_cache: Union[bool, str] = False
    resume: bool = False  # continue from the training state saved in output_dir
    log: Callable[[str], None] = print


class Method(abc.ABC):
    """A few-shot CLIP method. Frozen-image-encoder methods score cached features."""

    name: ClassVar[str] = ""
    frozen_image_encoder: ClassVar[bool] = True
    #: the options dataclass of this method (`build_method(name, config)` takes an instance of it)
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: named recipes, each a partial set of options over `config_class`'s defaults (`--preset NAME`):
    #: "paper" = the reference protocol (the defaults themselves), "demo" = the miniature benchmark's (`--demo`)
    presets: ClassVar[Mapping[str, Mapping[str, object]]] = PAPER_AND_DEMO
    #: the template set (`clipconv.prompts` name) the method's reference code uses; None: no templates used.
    #: "photo" (the single "a photo of a {}.") is zero-shot CLIP's and the text-initialized heads' reference.
    reference_templates: ClassVar[Optional[str]] = "photo"
    # ----- what the method declares about itself (read by the application: tables, result files, torchrun)
    #: its row label in Table 2 and the plots ("" = its registered name)
    label: ClassVar[str] = ""
    #: the row label also says the template count, "(1 template)" or "(80-template ensemble)"
    templates_in_label: ClassVar[bool] = False
    #: its position in the default Table 2 (`run_table2.py` without --methods); None: not in it
    table2_order: ClassVar[Optional[int]] = None
    #: CLIP_benchmark's task name in its result files ("" = "fewshot_<name>": CLIP_benchmark has none for it)
    clip_benchmark_task: ClassVar[str] = ""
    #: the Convpass paper's Table-2 numbers of this method (ViT-B/16, 16 shots): {ImageNet set name: top-1 %}
    published: ClassVar[Mapping[str, float]] = {}
    #: fit() splits its batches across torchrun's processes (DistributedDataParallel)
    data_parallel: ClassVar[bool] = False
    #: the paper's own method: the default --method of a run and the default "+ WiSE" row of Table 2
    default: ClassVar[bool] = False
    #: it is zero-shot CLIP itself (the reference point of the robustness frontier)
    is_zero_shot: ClassVar[bool] = False
    #: θ(α = 0) of its WiSE interpolation is zero-shot CLIP exactly (clipconv.wise; the frontier's chord start)
    wise_start_is_zero_shot: ClassVar[bool] = False

    def templates_for(self, ctx: FitContext, override: Union[str, Sequence[str], None] = None
                      ) -> tuple[str, list[str]]:
        """(set name, templates) this method uses: `override` (a method option: set name, file or list),
        else an explicit `ctx.templates`, else the method's `reference_templates`."""

        if override is not None:
            if isinstance(override, str):
                return override, load_templates(override)
            return "custom", list(override)
        if not isinstance(ctx.templates, MethodReferenceTemplates):
            return ctx.templates_name or "custom", list(ctx.templates)
        if self.reference_templates is None:
            raise ValueError(f"method '{self.name}' uses no prompt templates")
        return self.reference_templates, load_templates(self.reference_templates)

    @abc.abstractmethod
    def fit(self, ctx: FitContext) -> JSONObject:
        """Fit on ctx.train (choose hyper-parameters on ctx.val only); return a summary for the run log."""

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) from raw (unnormalized) frozen image features (N, D)."""
        raise NotImplementedError(f"method '{self.name}' does not score cached features")

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) from preprocessed images; frozen-encoder methods encode then score features."""
        raise NotImplementedError(f"method '{self.name}' must implement logits(images)")

    def summary(self) -> JSONObject:
        """Chosen hyper-parameters and anything else worth reporting."""
        return {}

    def check_backbone(self, backbone: Backbone, classnames: Sequence[str]) -> None:
        """Refuse (ValueError naming the option) options that `backbone` and `classnames` cannot run with, such
        as prompts longer than the text context or adapters the encoder cannot take. Entry points call it for
        every requested method before the first fit, so a run stops before anything is written. Override it
        with what `fit` would otherwise find out late; the default has nothing to check."""

    def trainable_count(self, spec: "ParamSpec") -> int:
        """Parameters this method (with its options) trains on `spec`'s model and classes (clipconv.params)."""
        raise NotImplementedError(f"method '{self.name}' does not report its trainable-parameter count")


class MethodSpec(Protocol):
    """What the method registry holds for a name: a `Method` subclass, or an entry a registry resolver builds
    for a parametrized name (`adapter:<kind>`, clipconv/methods/finetune.py), read like one: the class
    attributes above, and called with the options to build the method."""

    name: str
    config_class: type[MethodConfig]
    frozen_image_encoder: bool
    reference_templates: Optional[str]
    label: str
    templates_in_label: bool
    table2_order: Optional[int]
    clip_benchmark_task: str
    published: Mapping[str, float]
    data_parallel: bool
    default: bool
    is_zero_shot: bool
    wise_start_is_zero_shot: bool
    presets: Mapping[str, Mapping[str, object]]

    def __call__(self, config: Optional[MethodConfig] = None, **options: object) -> Method: ...


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator adding a method to the registry under `name`."""
    return METHODS.register(name)


def method_names() -> list[str]:
    """Every method name, the resolved ones (`adapter:<kind>` for every registered kind) included, sorted."""
    return sorted(METHODS)


def default_method() -> str:
    """The method that declares itself the default (`default = True`)."""
    return next(name for name, spec in METHODS.items() if spec.default)


def table2_methods() -> tuple[str, ...]:
    """The default Table 2's methods, in the order they declare (`table2_order`)."""
    ranked = [(spec.table2_order, name) for name, spec in METHODS.items() if spec.table2_order is not None]
    return tuple(name for _, name in sorted(ranked))


def method_config_class(cls: MethodSpec) -> type[MethodConfig]:
    """The options dataclass of a method (its `config_class`)."""
    return cls.config_class


def preset_options(name: str, preset: str) -> dict[str, object]:
    """The options of method `name`'s `preset`: one it declares, or "base+overlay" (each part's options over the
    last's, e.g. "demo+robust"). ValueError for a preset the method does not declare."""
    cls = METHODS.lookup(name)
    options: dict[str, object] = {}
    for part in str(preset).split("+"):
        if part not in cls.presets:
            raise ValueError(f"method '{name}': unknown preset '{part}'; choose one of {sorted(cls.presets)}")
        options.update(cls.presets[part])
    return options


def method_config(name: str, preset: str = "paper", options: Optional[Mapping[str, object]] = None) -> MethodConfig:
    """The typed config of method `name`: its `preset`'s options (`preset_options`), then `options` over them.
    Unknown methods, presets and options, and values of the wrong type, raise ValueError naming what is known."""
    method_names()
    cls = METHODS.lookup(name)
    given = preset_options(name, preset)
    try:
        return cls.config_class.from_options({**given, **(options or {})})
    except OptionError as err:  # still says which option: the command line names its flag
        raise err.within(f"method '{name}'") from None
    except ValueError as err:
        raise ValueError(f"method '{name}': {err}") from None


def build_method(name: str, config: Optional[MethodConfig] = None, **options: object) -> Method:
    """Instantiate a registered method from its typed `config` (passed on as is), or, as a convenience,
    from keyword `options` over its reference defaults (the config is then built here, once).
    Unknown names and unknown or invalid options raise ValueError listing what is known."""
    method_names()
    cls = METHODS.lookup(name)
    if config is None:
        config = method_config(name, options=options)
    elif options:
        raise ValueError(f"method '{name}': give either a config or keyword options, not both (got {sorted(options)})")
    elif not isinstance(config, cls.config_class):
        raise TypeError(f"method '{name}' takes a {cls.config_class.__name__}, got {type(config).__name__}")
    return cls(config)
