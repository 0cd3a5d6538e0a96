"""Command-line options generated from the config dataclasses (clipconv.config, each method's config_class).

Each `option(...)` field becomes one flag `--field-name` (plus its aliases) with the field's help text,
its default shown once and its checks run while parsing, so `--lr 0` or `--scale nan` stop with one line
naming the flag. Generated flags default to `argparse.SUPPRESS`: the namespace holds only what was
given, so a preset (`--preset`, `--demo`) fills the rest and `--resume` can tell which flags conflict with the
saved run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, NoReturn, Optional, Sequence, Union

import torch

from clipconv.app.cli.common import NO_DATA_HELP, eval_set_arg, fail
from clipconv.app.run import SECTIONS, setup_logging
from clipconv.backbone import resolve_device
from clipconv.config import Config, OptionError, RuntimeConfig
from clipconv.data.demo_world import ensure_world
from clipconv.methods.base import METHODS, OVERLAY_PRESETS, PRESET_CHOICES
from clipconv.mini_clip import MINI_CLIP_CONFIG, MINI_CLIP_CROP_SCALE, MINI_CLIP_WEIGHTS
from clipconv.runtime.cache import hold_cache

__all__ = ["add_config_args", "given", "shared_configs", "add_shared_args", "demo_overrides_help", "SHARED",
           "DEMO_RUN_SETTINGS", "add_preset_arg", "preset_of", "preset_notes", "method_json", "merge_method_options",
           "absolute_paths", "add_runtime_args", "runtime_from", "apply_runtime", "option_error_line"]

#: the shared sections of every run, in the order their option groups are shown
SHARED: dict[str, type[Config]] = SECTIONS

#: the demo preset's run settings (what --demo sets besides each method's demo preset and the generated world):
#: the shipped mini CLIP and its train crop scale (objects in its 48-px images; clipconv.mini_clip)
DEMO_RUN_SETTINGS: dict[str, object] = {"family": "demo", "model": str(MINI_CLIP_CONFIG),
                                        "pretrained": str(MINI_CLIP_WEIGHTS), "crop_scale": MINI_CLIP_CROP_SCALE}


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return tp


def _parser_for(tp: object, field: dataclasses.Field) -> Optional[dict[str, object]]:
    """argparse keyword arguments for a field's type, or None when it has no flag form."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        values = typing.get_args(tp)
        return {"type": _checked(type(values[0]), field), "choices": values}
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        element = _unwrap_optional(args[0]) if args else str
        if element not in (int, float, str):
            return None
        return {"type": _checked(element, field), "nargs": "+"}
    if tp is bool:
        return {"action": "store_false" if field.default is True else "store_true"}
    if tp in (int, float, str):
        return {"type": _checked(tp, field)}
    return None


def _checked(kind: type, field: dataclasses.Field):
    """Parse one value of `kind` and run the field's check: bad values fail in argparse, naming the flag."""
    check = field.metadata.get("check")

    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            noun = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise argparse.ArgumentTypeError(f"expected {noun}, got '{text}'") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        problem = check(value) if check is not None else None
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return ""
    if default is None or isinstance(default, bool) or "default" in field.metadata.get("help", ""):
        return ""
    if isinstance(default, (list, tuple)):
        default = " ".join(str(v) for v in default)
    return f"default: {default}"


def add_config_args(parser: argparse.ArgumentParser, config_class: type, *, title: Optional[str] = None,
                    prefix: str = "", skip: Iterable[str] = (), aliases: Mapping[str, Sequence[str]] = (),
                    notes: Mapping[str, str] = (), defaults: Optional[Mapping[str, object]] = None) -> list[str]:
    """One flag per `option` field of `config_class` (in a group titled `title`); returns the fields added.

    A field is left out when it is `cli=False`, in `skip`, has no flag form (dicts, nested configs) or its
    flag is already taken (it stays settable through --method-options). `aliases` adds flags per field,
    `notes` appends text to a field's help (e.g. the --demo value), `defaults` replaces shown defaults.
    The parsed value lands in `prefix + field name`.
    """
    target = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(config_class)
    taken = set(parser._option_string_actions)
    added = []
    for field in dataclasses.fields(config_class):
        if field.name in skip or not field.metadata.get("cli", True):
            continue
        kwargs = _parser_for(hints.get(field.name, Any), field)
        if kwargs is None:
            continue
        flag = "--" + ("no-" if kwargs.get("action") == "store_false" else "") + field.name.replace("_", "-")
        flags = [f for f in (flag, *field.metadata.get("aliases", ()), *dict(aliases).get(field.name, ()))
                 if f not in taken]
        if not flags or flags[0] != flag:
            continue
        shown = _default_text(field)
        if defaults and field.name in defaults:
            shown = f"default: {defaults[field.name]}"
        text = field.metadata.get("help", "")
        extra = "; ".join(t for t in (shown, dict(notes).get(field.name, "")) if t)
        text = f"{text} ({extra})" if extra and text else (text or extra)
        if "type" in kwargs and "choices" not in kwargs:
            kwargs["metavar"] = field.name.upper()
        target.add_argument(*flags, dest=prefix + field.name, default=argparse.SUPPRESS, help=text or None,
                            **kwargs)
        taken.update(flags)
        added.append(field.name)
    return added


def given(args: argparse.Namespace, fields: Iterable[str], prefix: str = "") -> dict[str, object]:
    """{field: value} of the generated flags that were given on the command line."""
    return {name: getattr(args, prefix + name) for name in fields if hasattr(args, prefix + name)}


def add_shared_args(parser: argparse.ArgumentParser, skip: Iterable[str] = (),
                    aliases: Mapping[str, Sequence[str]] = ()) -> dict[str, list[str]]:
    """--demo and the data, backbone and runtime groups; returns {section: fields added}."""

    parser.add_argument("--demo", action="store_true", help=demo_overrides_help())
    added = {section: add_config_args(parser, cls, title=section, skip=skip, aliases=aliases)
             for section, cls in SHARED.items()}
    if "eval_roots" not in skip:
        parser.add_argument("--eval-set", action="append", type=eval_set_arg, dest="eval_set", metavar="NAME=DIR",
                            default=argparse.SUPPRESS,
                            help="your own data: a named test folder of class folders (repeatable, in table order; "
                                 "the first is the source column; a set holding some of the classes is scored over "
                                 "those only)")
    return added


def demo_overrides_help() -> str:
    """--demo's help: what it sets (each method's demo preset is shown beside its options)."""

    settings = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_RUN_SETTINGS.items()
                         if k not in ("family", "model", "pretrained"))
    return ("use the offline miniature benchmark and the shipped mini CLIP (no downloads): the data root is the "
            f"generated world, --model/--pretrained the mini CLIP, {settings}, and --preset demo (each method's "
            "demo options, shown as '--preset demo: value' beside them); flags given win")


def add_preset_arg(parser: argparse.ArgumentParser, help: str) -> None:
    """--preset paper|demo|robust|demo+robust (default: demo with --demo, else paper)."""
    parser.add_argument("--preset", choices=PRESET_CHOICES, default=None,
                        help=f"{help} (default: demo with --demo, else paper; robust with --demo is demo+robust)")


def preset_of(args: argparse.Namespace) -> str:
    """The preset the flags select: --preset, else demo with --demo, else paper. An overlay preset (robust) is
    laid over the demo's recipe under --demo ("demo+robust"), over the reference protocol otherwise."""
    demo = getattr(args, "demo", False)
    if args.preset in OVERLAY_PRESETS and demo:
        return f"demo+{args.preset}"
    return args.preset or ("demo" if demo else "paper")


def preset_notes(method: str) -> dict[str, str]:
    """{option: "--preset demo: value"} of what `method`'s non-paper presets set (shown beside its flags)."""
    notes: dict[str, str] = {}
    for preset, options in METHODS[method].presets.items():
        for name, value in options.items():
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            notes[name] = "; ".join(filter(None, (notes.get(name), f"--preset {preset}: {shown}")))
    return notes


def method_json(text: str, fail: Callable[[str], NoReturn]) -> dict[str, object]:
    """The --method-options JSON object (`fail` on anything else)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        fail(f"--method-options is not valid JSON: {err}")
    if not isinstance(value, dict):
        fail("--method-options must be a JSON object")
    return value


def merge_method_options(flags: Mapping[str, object], extra: Mapping[str, object], where: str = "--method-options"
                         ) -> dict[str, object]:
    """The method flags and the --method-options keys together; one option given both ways with different
    values raises ValueError naming both."""
    clash = [f"--{k.replace('_', '-')} {_shown(flags[k])} vs {where} \"{k}\": {json.dumps(extra[k])}"
             for k in sorted(set(flags) & set(extra)) if not _same(flags[k], extra[k])]
    if clash:
        raise ValueError(f"a method option given twice with different values: {'; '.join(clash)}; give it once")
    return {**flags, **extra}


def option_error_line(err: OptionError, flags: Iterable[str], key_prefix: str = "") -> str:
    """The one line of a bad option value, naming where it came from: its flag (`--dim: must be positive, got
    0`) when given as one, else its --method-options key (`--method-options rank: must be positive, got 0`;
    Table 2's `--method-options lora.rank`, `key_prefix` "lora.")."""
    if err.name in set(flags):
        return f"--{err.name.replace('_', '-')}: {err.problem}"
    return f"--method-options {key_prefix}{err.name}: {err.problem}"


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _shown(value: object) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


#: the data and backbone options that are paths (stored absolute, so a run folder works from any directory)
PATH_OPTIONS = ("data_root", "classnames", "train_root", "cache_dir")
MAYBE_PATH_OPTIONS = ("templates", "model", "pretrained")  # names (photo, ViT-B-16, openai) or files


def absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def absolute_paths(values: dict[str, object]) -> dict[str, object]:
    """`values` (a section's options) with its paths absolute: data folders, files, and a model, weights or
    templates option that names an existing file."""
    out = dict(values)
    for name, value in values.items():
        if isinstance(value, str) and (name in PATH_OPTIONS or name in MAYBE_PATH_OPTIONS and Path(value).is_file()):
            out[name] = absolute(value)
        elif name == "eval_roots" and isinstance(value, dict):
            out[name] = {k: absolute(v) for k, v in value.items()}
    return out


def shared_configs(args: argparse.Namespace, fields: Mapping[str, list[str]], parser: argparse.ArgumentParser,
                   fallback: Optional[Mapping[str, object]] = None) -> dict[str, Config]:
    """The data, backbone and runtime configs of the parsed flags, with their paths absolute.

    Precedence: a flag given > `fallback` (e.g. what a checkpoint records) > --demo's run settings
    (`DEMO_RUN_SETTINGS`) > the config default. This is the one place --demo's run settings are applied.
    Bad values exit 2 through `parser.error`.
    """

    demo: dict[str, object] = DEMO_RUN_SETTINGS if getattr(args, "demo", False) else {}
    configs: dict[str, Config] = {}
    for section, cls in SHARED.items():
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in demo.items() if k in names}
        values.update({k: v for k, v in (fallback or {}).items() if k in names and v is not None})
        values.update(given(args, fields.get(section, ())))
        if section == "data" and hasattr(args, "eval_set"):
            values["eval_roots"] = dict(args.eval_set)
        try:
            configs[section] = cls.from_options(absolute_paths(values))
        except ValueError as err:
            parser.error(str(err))
    if "runtime" in configs:
        try:  # a device this machine lacks is refused before any work (e.g. generating the demo world)
            resolve_device(configs["runtime"].device)
        except ValueError as err:
            parser.error(str(err))
    if configs["data"].data_root is None and configs["data"].train_root is None:
        if not getattr(args, "demo", False) and configs["data"].family != "demo":
            parser.error(NO_DATA_HELP)
        hold_cache()  # for the life of the run: `cache.py clear` refuses while the demo world is in use

        try:
            world = ensure_world()
        except ValueError as err:  # e.g. CLIPCONV_CACHE is a file or cannot be written
            fail(str(err))
        configs["data"] = dataclasses.replace(configs["data"], data_root=str(world))
    return configs


def add_runtime_args(parser: argparse.ArgumentParser, *, device: bool = False) -> list[str]:
    """--threads and --quiet (and, for a script that computes on a device, --device), generated from
    RuntimeConfig as in the shared runtime group: the runtime options of entry points without that group."""
    wanted = {"threads", "quiet", *(("device",) if device else ())}
    skip = [f.name for f in dataclasses.fields(RuntimeConfig) if f.name not in wanted]
    return add_config_args(parser, RuntimeConfig, title="runtime", skip=skip)


def runtime_from(args: argparse.Namespace, fields: Iterable[str], parser: argparse.ArgumentParser,
                 defaults: Optional[Mapping[str, object]] = None) -> RuntimeConfig:
    """The RuntimeConfig of the runtime flags given over the script's own `defaults` (e.g. device cpu)."""
    try:
        return RuntimeConfig.from_options({**(defaults or {}), **given(args, fields)})
    except ValueError as err:
        parser.error(str(err))


def apply_runtime(runtime: RuntimeConfig) -> None:
    """Apply --threads (torch's CPU threads) and --quiet (warnings only on stderr) to this process."""
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    setup_logging(quiet=runtime.quiet)
