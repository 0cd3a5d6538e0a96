"""Arguments and error handling shared by the command-line entry points."""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Iterator, NoReturn, Optional

from clipconv.backbone import WeightsUnavailableError
from clipconv.checkpoint import CheckpointMismatchError
from clipconv.data.family import parse_eval_set
from clipconv.runtime.io import OutputWriteError
from clipconv.runtime.progress import set_quiet
from clipconv.runtime.ranks import init_from_env, is_main

EXIT_BAD_INPUT = 2
NO_DATA_HELP = (
    "no --data-root given. Lay out ImageNet and its variants as described in datasets/README.md "
    "(CoOp layout: $DATA/imagenet/images/{train,val}/<wnid>/, $DATA/imagenetv2/..., $DATA/imagenet-sketch/..., "
    "$DATA/imagenet-adversarial/imagenet-a/, $DATA/imagenet-rendition/imagenet-r/) and pass --data-root $DATA; "
    "for your own folders pass --train-root DIR with --eval-set NAME=DIR (repeatable); "
    "or run the offline miniature benchmark with --demo"
)


def warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 line: Optional[str] = None) -> str:
    """clipconv's one message format for a warning: `warning: message` on one line, without Python's
    `file.py:NNN: UserWarning:` prefix and source line."""
    return f"warning: {' '.join(str(message).split())}\n"


def plain_warnings() -> None:
    """Route every warning this process shows (the library's, torch's, PIL's, ...) through clipconv's one
    message format, `warning: message`: called first thing by every command-line entry point. Python's display
    (and the progress bars', clipconv.runtime.progress) formats with `warnings.formatwarning`; code that records
    warnings (`catch_warnings(record=True)`, check_data's counts) still receives them."""

    warnings.formatwarning = warning_line


def join_process_group(device: str) -> int:
    """Under torchrun: join the process group (no-op otherwise); ranks other than 0 stay silent (rank 0 reports,
    and what only another rank sees is gathered to it first). Returns the world size."""
    size = init_from_env(device)
    if not is_main():
        warnings.simplefilter("ignore")
        set_quiet(True)
    return size


def fail(message: str) -> NoReturn:
    """Print `error: message` and exit with the bad-input code (nothing has been written)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


@contextlib.contextmanager
def bad_input_errors() -> Iterator[None]:
    """Turn the library's bad-input exceptions into one clear line and exit code 2."""

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


def eval_set_arg(text: str) -> tuple[str, str]:
    """argparse type of `--eval-set NAME=DIR`: (name, dir); a malformed value exits 2 naming the flag."""

    try:
        return parse_eval_set(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
