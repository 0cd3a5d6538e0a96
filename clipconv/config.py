"""Config dataclasses whose fields carry their help text, checks and command-line aliases.

Every setting of a run is declared ONCE, as a field made with `option(default, help=...)`. The command
line (`clipconv.app.cli.options`) is generated from these fields, `--help` shows their help and default,
config.json is their `to_dict()`, and `from_options` refuses unknown keys with the list of known ones.

The shared run settings are `DataConfig`, `BackboneConfig` and `RuntimeConfig`; each method adds its own
`MethodConfig` subclass (clipconv.methods.base).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, TypeVar

__all__ = ["option", "Config", "DataConfig", "BackboneConfig", "RuntimeConfig", "Check", "positive",
           "non_negative", "seed_range", "fraction", "DEFAULT_WORKERS", "Precision"]

ConfigT = TypeVar("ConfigT", bound="Config")
Check = Callable[[Any], Optional[str]]  # value -> None when fine, else what is wrong ("must be positive")
Precision = Literal["auto", "fp32", "bf16", "fp16"]

#: data-loading processes: no more than the machine's cores (and 4 at most)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def _numbers(value: Any) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def positive(value: Any) -> Optional[str]:
    return next((f"must be positive, got {v}" for v in _numbers(value) if not v > 0), None)


def non_negative(value: Any) -> Optional[str]:
    return next((f"must be zero or more, got {v}" for v in _numbers(value) if not v >= 0), None)


def fraction(value: Any) -> Optional[str]:
    return next((f"must be in (0, 1], got {v}" for v in _numbers(value) if not 0 < v <= 1), None)


def seed_range(value: Any) -> Optional[str]:
    return next((f"must be an integer in [0, 2**32), got {v}" for v in _numbers(value)
                 if not (float(v).is_integer() and 0 <= v < 2**32)), None)


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           choices: Optional[Sequence[Any]] = None, check: Optional[Check] = None,
           aliases: Sequence[str] = (), cli: bool = True) -> Any:
    """A config field that carries its help text (as PEFT's `LoraConfig` fields do).

    `help` is what `--help` shows (state the default in it only when the default is not a plain value);
    `choices` and `check` are enforced on construction; `aliases` are extra command-line flags
    (e.g. "--scale" for `scales`); `cli=False` keeps a field off the generated command line.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "check": check,
                "aliases": tuple(aliases), "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    """Base of every settings dataclass: validated on construction, built from loose options by name."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for v in _numbers(value):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"option '{f.name}' of {type(self).__name__} must be a finite number, got {v}")
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"option '{f.name}' of {type(self).__name__} must be one of {list(choices)}, "
                                 f"got {value!r}")
            check = f.metadata.get("check")
            problem = check(value) if check is not None and value is not None else None
            if problem:
                raise ValueError(f"option '{f.name}' of {type(self).__name__} {problem}")

    @classmethod
    def from_options(cls: type[ConfigT], options: Optional[Mapping[str, Any]] = None) -> ConfigT:
        """Build from {name: value}; unknown names raise with the list of known ones."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; known options: {sorted(known)}")
        return cls(**options)

    @classmethod
    def help(cls) -> dict[str, str]:
        """{option name: help text}."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class DataConfig(Config):
    """Where the images come from: the dataset family and its options."""

    family: Optional[str] = option(None, help="dataset family: imagenet, demo, folder or wds (CLIP_benchmark's webdataset "
                                              "shards under --data-root; default: demo with --demo, folder with "
                                              "--train-root, else imagenet: ImageNet and its variants)")
    data_root: Optional[str] = option(None, help="folder holding ImageNet and its variants (see datasets/README.md)")
    classnames: Optional[str] = option(None, help="file of '<id> <name>' lines overriding the class universe")
    train_root: Optional[str] = option(None, help="your own data: a folder with one sub-folder of train images per "
                                                  "class (give the test folders with --eval-set NAME=DIR)")
    eval_roots: dict[str, str] = option(default_factory=dict, help="folder family: {set name: folder}", cli=False)
    eval_sets: Optional[tuple[str, ...]] = option(
        None, help="which evaluation sets to score (default: the family's whole suite)")
    templates: Optional[str] = option(
        None, help="prompt templates for every method that uses them: photo ('a photo of a {}.'), clip80, tip, or "
                   "a file with one per line, or dataset (the data's own templates file: CLIP_benchmark's "
                   "zeroshot_classification_templates.txt, wds family) (default: each method's reference set: "
                   "photo for zero-shot and the adapter heads, tip for Tip-Adapter(-F))")
    strict: bool = option(False, help="stop at an undecodable image instead of skipping it")

    def __post_init__(self) -> None:
        if self.eval_sets is not None:
            self.eval_sets = tuple(self.eval_sets)
        super().__post_init__()


@dataclass
class BackboneConfig(Config):
    """The frozen CLIP backbone."""

    model: str = option("ViT-B-16", help="open_clip model name or model-config JSON")
    pretrained: Optional[str] = option("openai", help="open_clip tag, local weights file, or 'none'")
    crop_scale: float = option(0.08, check=fraction,
                               help="smallest area fraction of the train random resized crop (0.08: the protocol's)")
    precision: Precision = option("auto", choices=("auto", "fp32", "bf16", "fp16"),
                                  help="frozen-trunk dtype and autocast (auto: bf16 on CUDA, fp32 on CPU)")


@dataclass
class RuntimeConfig(Config):
    """Where and how fast: device, data loading, feature cache, threads, verbosity."""

    device: str = option("auto", help="cuda, cuda:1, cpu, or auto")
    workers: int = option(DEFAULT_WORKERS, check=non_negative,
                          help="data-loading worker processes (default: the core count, at most 4)")
    eval_batch_size: int = option(128, check=positive, help="images per encoder batch when scoring")
    cache: bool = option(True, help="do not read or write the image-feature cache")
    cache_dir: Optional[str] = option(None, help="feature cache folder (default $CLIPCONV_CACHE/features)")
    draft: Literal["eval", "all", "off"] = option("off", choices=("eval", "all", "off"),
                        help="decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) when the model transform shrinks "
                             "them at least that much (faster; top-1 moves < 1 point but near-tie predictions can "
                             "flip): eval (evaluation and feature loaders), all (training too), off (full-size "
                             "decoding everywhere, as the reference codes: the default)")
    decoded_cache: bool = option(True, help="do not keep the K-shot train and validation images decoded (in memory "
                                            "and under $CLIPCONV_CACHE/decoded): decode every JPEG in every epoch")
    threads: Optional[int] = option(None, check=positive,
                                    help="CPU threads of torch (torch.set_num_threads; default: torch's choice)")
    quiet: bool = option(False, help="log warnings and the final table only")
