"""A generated image tree + a tiny CLIP saved as a weights file, for tests that drive the command lines."""
from __future__ import annotations

import contextlib
import io
import logging
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from clipconv.app.cli.common import EXIT_BAD_INPUT
from clipconv.runtime import progress


def save_tiny_weights(root: Path, tiny_config: Path, seed: int = 7) -> Path:
    """`root/tiny.pt`: tiny-CLIP weights that are not the reproducible random init (so a run that silently
    fell back to random weights would differ)."""
    from clipconv.backbone import load_backbone

    torch.manual_seed(seed)
    backbone = load_backbone(str(tiny_config), pretrained=None, device="cpu")
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights = root / "tiny.pt"
    torch.save(backbone.model.state_dict(), weights)
    return weights


def make_cli_world(root: Path, tiny_config: Path) -> dict:
    """{"root", "data", "weights", "config"}: a 6/3 image tree and `save_tiny_weights`."""
    from clipconv.data import make_image_tree

    data = make_image_tree(root / "data", train_per_class=6, val_per_class=3, seed=3)
    return {"root": root, "data": data, "weights": save_tiny_weights(root, tiny_config), "config": tiny_config}


@dataclass
class CliResult:
    """What a shell sees of a command: exit code and output (as subprocess.CompletedProcess names them)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(main: Callable[[Sequence[str]], Optional[int]], argv: Sequence[str]) -> CliResult:
    """A command line's `main(argv)` run in this process (no interpreter start-up and torch import per call:
    seconds each on a busy machine). An uncaught exception becomes a traceback on stderr and exit code 1, as
    in a real process. Global state a CLI sets (warnings format, quiet progress, torch threads, the clipconv
    logger's handlers) is restored afterwards."""
    out, err = io.StringIO(), io.StringIO()
    logger = logging.getLogger("clipconv")
    saved = (warnings.formatwarning, torch.get_num_threads(), progress.is_quiet(), list(logger.handlers), logger.level)
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        try:
            code = int(main(list(argv)) or 0)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except Exception:  # noqa: BLE001 - a real process would print it and exit 1
            traceback.print_exc()
            code = 1
        finally:
            warnings.formatwarning = saved[0]
            torch.set_num_threads(saved[1])
            progress.set_quiet(saved[2])
            logger.handlers[:] = saved[3]
            logger.setLevel(saved[4])
    return CliResult(code, out.getvalue(), err.getvalue())


def refused_line(main: Callable[[Sequence[str]], Optional[int]], argv: Sequence[str], capsys) -> str:
    """`main(argv)` refuses its input the CLI way: exit code 2 and exactly one `error:` line, no traceback;
    returns that line (pytest's `capsys` captures the output)."""
    try:
        main(list(argv))
    except SystemExit as stop:
        code = stop.code
    else:
        code = 0
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]
