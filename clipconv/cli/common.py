"""Arguments and error handling shared by the command-line entry points."""
from __future__ import annotations

import argparse
import os
import contextlib
import sys
from typing import Iterator, NoReturn

EXIT_BAD_INPUT = 2
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # data-loading processes: no more than the machine's cores
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
NO_DATA_HELP = (
    "no --data-root given. Lay out ImageNet and its variants as described in datasets/README.md "
    "(CoOp layout: $DATA/imagenet/images/{train,val}/<wnid>/, $DATA/imagenetv2/..., $DATA/imagenet-sketch/..., "
    "$DATA/imagenet-adversarial/imagenet-a/, $DATA/imagenet-rendition/imagenet-r/) and pass --data-root $DATA, "
    "or run the offline miniature benchmark with --demo"
)


def plain_warnings() -> None:
    """Show warnings as one `warning: message` line each, without source lines (CLI use)."""
    import warnings

    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def fail(message: str) -> NoReturn:
    """Print `error: message` and exit with the bad-input code (nothing has been written)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


@contextlib.contextmanager
def bad_input_errors() -> Iterator[None]:
    """Turn the library's bad-input exceptions into one clear line and exit code 2."""
    from ..backbone import WeightsUnavailableError
    from ..checkpoint import CheckpointMismatchError
    from ..io import OutputWriteError

    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError, WeightsUnavailableError,
            CheckpointMismatchError, OutputWriteError) as err:
        fail(str(err))


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "zero or more")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def eval_set_arg(text: str) -> tuple[str, str]:
    """argparse type of `--eval-set NAME=DIR`: (name, dir); a malformed value exits 2 naming the flag."""
    from ..data.family import parse_eval_set

    try:
        return parse_eval_set(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Data flags; `clipconv.data.family_from_args(args.data_root, args.demo, args.train_root, args.eval_set,
    args.classnames)` picks the family from them."""
    from ..data import EVAL_SETS

    group = parser.add_argument_group("data")
    group.add_argument("--data-root", help="folder holding ImageNet and its variants (see datasets/README.md)")
    group.add_argument("--train-root", metavar="DIR",
                       help="your own data: a folder with one sub-folder of train images per class")
    group.add_argument("--eval-set", action="append", type=eval_set_arg, metavar="NAME=DIR",
                       help="your own data: a named test folder of class folders (repeatable; the first is the "
                            "source column, a set holding some of the classes is scored over those only)")
    group.add_argument("--demo", action="store_true",
                       help="use the offline miniature benchmark and the shipped mini CLIP (no downloads)")
    group.add_argument("--classnames", help="file of '<id> <name>' lines overriding the class universe")
    group.add_argument("--templates", default=None,
                       help="prompt templates for every method that uses them: photo ('a photo of a {}.'), clip80, "
                            "tip, or a file with one per line (default: each method's reference set: photo for "
                            "zero-shot and Convpass, tip for Tip-Adapter(-F))")
    group.add_argument("--eval-sets", nargs="+", default=list(EVAL_SETS), choices=EVAL_SETS,
                       help="which sets of the robustness suite to evaluate")
    group.add_argument("--strict", action="store_true", help="stop at an undecodable image instead of skipping it")


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument("--model", default=None,
                       help=f"open_clip model name or model-config JSON (default {DEFAULT_MODEL}; mini CLIP with --demo)")
    group.add_argument("--pretrained", default=None,
                       help=f"open_clip tag, local weights file, or 'none' (default {DEFAULT_PRETRAINED})")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, or auto")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="frozen-trunk dtype and autocast (auto: bf16 on CUDA, fp32 on CPU)")
    group.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS, help="data-loading worker processes")
    group.add_argument("--eval-batch-size", type=positive_int, default=128)
    group.add_argument("--output-dir", help="run directory (default runs/<method>_<K>shot_seed<S>_<time>)")
    group.add_argument("--no-cache", action="store_true", help="do not read or write the image-feature cache")


def apply_demo(cfg, parser: argparse.ArgumentParser) -> None:
    """Fill data root, backbone and demo training defaults for --demo; otherwise require --data-root."""
    if cfg.demo:
        from ..demo import DEMO_RUN_DEFAULTS, DEMO_TRAIN_DEFAULTS, MINI_CLIP_CONFIG, MINI_CLIP_WEIGHTS, ensure_world

        if cfg.data_root is None:
            cfg.data_root = str(ensure_world())
        cfg.model = cfg.model or str(MINI_CLIP_CONFIG)
        if cfg.pretrained is None:
            cfg.pretrained = str(MINI_CLIP_WEIGHTS)
        for key, value in DEMO_TRAIN_DEFAULTS.get(cfg.method, {}).items():
            cfg.method_options.setdefault(key, value)
        if getattr(cfg, "crop_scale", None) is None:
            cfg.crop_scale = DEMO_RUN_DEFAULTS["crop_scale"]
    elif cfg.data_root is None:
        parser.error(NO_DATA_HELP)
    if getattr(cfg, "crop_scale", 0.08) is None:
        cfg.crop_scale = 0.08
    cfg.model = cfg.model or DEFAULT_MODEL
    if cfg.pretrained is None:
        cfg.pretrained = DEFAULT_PRETRAINED
