"""Config dataclasses whose fields carry their help text, checks and command-line aliases.

Every setting of a run is declared ONCE, as a field made with `option(default, help=...)`. The command
line (`clipconv.app.cli.options`) is generated from these fields, `--help` shows their help and default,
config.json is their `to_dict()`, and `from_options` refuses unknown keys with the list of known ones.

The shared run settings are `DataConfig`, `BackboneConfig` and `RuntimeConfig`; each method adds its own
`MethodConfig` subclass (clipconv.methods.base).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, TypeVar, Union

from clipconv.runtime.jsontypes import JSONObject

__all__ = ["option", "Config", "DataConfig", "BackboneConfig", "RuntimeConfig", "Check", "OptionError", "positive",
           "non_negative", "seed_range", "fraction", "probability", "positive_odd", "DEFAULT_WORKERS", "Precision"]

ConfigT = TypeVar("ConfigT", bound="Config")
Check = Callable[[object], Optional[str]]  # value -> None when fine, else what is wrong ("must be positive")
Precision = Literal["auto", "fp32", "bf16", "fp16"]

#: data-loading processes: no more than the machine's cores (and 4 at most)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def _numbers(value: object) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def positive(value: object) -> Optional[str]:
    return next((f"must be positive, got {v}" for v in _numbers(value) if not v > 0), None)


def non_negative(value: object) -> Optional[str]:
    return next((f"must be zero or more, got {v}" for v in _numbers(value) if not v >= 0), None)


def fraction(value: object) -> Optional[str]:
    return next((f"must be in (0, 1], got {v}" for v in _numbers(value) if not 0 < v <= 1), None)


def probability(value: object) -> Optional[str]:
    """A rate such as a dropout or a momentum: in [0, 1)."""
    return next((f"must be in [0, 1), got {v}" for v in _numbers(value) if not 0 <= v < 1), None)


def positive_odd(value: object) -> Optional[str]:
    """A kernel size centred on its middle tap: 1, 3, 5, ..."""
    return next((f"must be a positive odd number, got {v}" for v in _numbers(value) if not (v > 0 and v % 2 == 1)),
                None)


def seed_range(value: object) -> Optional[str]:
    return next((f"must be an integer in [0, 2**32), got {v}" for v in _numbers(value)
                 if not (float(v).is_integer() and 0 <= v < 2**32)), None)


class OptionError(ValueError):
    """A bad value of one option, `name`; `problem` says what is wrong ("must be positive, got 0"). The command
    line turns it into a line naming the flag or the --method-options key the value came from."""

    def __init__(self, name: str, problem: str, owner: str = "", context: str = "") -> None:
        self.name, self.problem, self.owner, self.context = name, problem, owner, context
        where = f"option '{name}' of {owner}" if owner else f"option '{name}'"
        super().__init__(f"{context}: {where} {problem}" if context else f"{where} {problem}")

    def within(self, context: str) -> "OptionError":
        """The same error, its message prefixed by `context` (e.g. "method 'lora'")."""
        return OptionError(self.name, self.problem, self.owner, context)


def option(default: object = dataclasses.MISSING, *, help: str, default_factory: object = dataclasses.MISSING,
           choices: Optional[Sequence[object]] = None, check: Optional[Check] = None,
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


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _kind(tp: object) -> str:
    """What a value of type `tp` is, in words ("an integer", "one of ['a', 'b']", "a list of a number")."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _kind(a) for a in typing.get_args(tp))
    if origin in (tuple, list, collections.abc.Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_kind(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "an object"
    return _KIND_NAMES.get(tp, f"a {getattr(tp, '__name__', tp)}")


def _conforms(value: object, tp: object) -> bool:
    """Whether `value` is of type `tp` as JSON gives it: a bool is never a number, an int is never a bool,
    an int is a float, a list is a tuple."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)) or (origin is collections.abc.Sequence and isinstance(value, str)):
            return False
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis or origin is not tuple:
            return all(_conforms(v, args[0]) for v in value) if args else True
        return len(args) == len(value) and all(_conforms(v, a) for v, a in zip(value, args))
    if origin in (dict, collections.abc.Mapping):
        key, item = typing.get_args(tp) or (Any, Any)
        return isinstance(value, Mapping) and all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a type form not checked here


def _normalized(value: object, tp: object) -> object:
    """`value` in the field's own form: a float field holds a float, a tuple field a tuple."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _normalized(value, args[0]) if len(args) == 1 and value is not None else value
    if tp is float and isinstance(value, int):
        return float(value)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        element = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        return tuple(_normalized(v, element) for v in value) if element is not None else tuple(value)
    return value


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


@dataclass
class Config:
    """Base of every settings dataclass: validated on construction, built from loose options by name.

    Each value must be of its field's declared type (as JSON gives it: an int option refuses 1.5 and true,
    a bool option refuses numbers, a float option takes an int); float fields then hold floats and tuple
    fields tuples."""

    def __post_init__(self) -> None:
        types_ = _field_types(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = types_.get(f.name, Any)
            owner = type(self).__name__
            if not _conforms(value, tp):
                raise OptionError(f.name, f"must be {_kind(tp)}, got {value!r}", owner)
            normal = _normalized(value, tp)
            if normal is not value:
                object.__setattr__(self, f.name, normal)
                value = normal
            for v in _numbers(value):
                if isinstance(v, float) and not math.isfinite(v):
                    raise OptionError(f.name, f"must be a finite number, got {v}", owner)
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise OptionError(f.name, f"must be one of {list(choices)}, got {value!r}", owner)
            check = f.metadata.get("check")
            problem = check(value) if check is not None and value is not None else None
            if problem:
                raise OptionError(f.name, problem, owner)

    @classmethod
    def from_options(cls: type[ConfigT], options: Optional[Mapping[str, object]] = None) -> ConfigT:
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

    def to_dict(self) -> JSONObject:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class DataConfig(Config):
    """Where the images come from: the dataset family and its options."""

    family: Optional[str] = option(None, help="dataset family: imagenet, demo, folder or wds (CLIP_benchmark's webdataset "
                                              "shards under --data-root; default: demo with --demo, folder with "
                                              "--train-root, else imagenet: ImageNet and its variants)")
    data_root: Optional[str] = option(None, help="folder holding ImageNet and its variants (see datasets/README.md)")
    classnames: Optional[str] = option(None, help="file of '<id> <name>' lines ('<id><TAB><name>' for ids with spaces) "
                                                  "overriding the class universe")
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
                                            "and under $CLIPCONV_CACHE/decoded) nor evaluation sets of up to 512 MB "
                                            "after the eval Resize: decode every JPEG in every epoch and run")
    threads: Optional[int] = option(None, check=positive,
                                    help="CPU threads of torch (torch.set_num_threads; default: torch's choice)")
    quiet: bool = option(False, help="log warnings and the final table only")
