"""Output folders of runs: checked before any work, created uniquely, never silently reused.

* `check_output_dir(path, flag)`: a path that is a file, lies under a file, has a too-long name or cannot
  be written is refused (ValueError naming the flag) before anything is computed;
* `new_run_dir(parent, name)`: a fresh folder created exclusively (`name`, then `name-2`, `name-3`, ...),
  so two runs started in the same second never share one;
* `claim_output_dir(path, own_files, ...)`: an explicit --output-dir holding a finished or started run is
  refused unless `overwrite` (its clipconv files are removed first) or `resume`;
* `interrupt_on_sigterm()`: SIGTERM raises KeyboardInterrupt, so a `kill` stops like Ctrl-C.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

__all__ = ["RUN_FILES", "ZERO_SHOT_FILES", "check_output_dir", "new_run_dir", "claim_output_dir",
           "held_files", "remove_files", "Terminated", "interrupt_on_sigterm", "EXIT_SIGINT", "EXIT_SIGTERM"]

#: files a training / evaluation run writes in its folder (also in `scale_<s>/` sub-folders)
RUN_FILES = ("config.json", "split.json", "metrics.json", "results.md", "run_summary.json", "log.txt",
             "adapter.safetensors", "train_state.pt")
ZERO_SHOT_FILES = ("zero_shot.json", "zero_shot.md", "log.txt")
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
_PROBE = ".clipconv-write-probe"


def _name_max(existing: Path) -> int:
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long to look up
        return False


def check_output_dir(path: Union[str, Path], flag: str = "--output-dir") -> None:
    """Refuse (ValueError naming `flag`) a folder that cannot hold outputs; creates nothing.

    Checked: the path or one of its parents is a file, a name is longer than the file system allows,
    the nearest existing folder is not writable.
    """
    path = Path(path)
    existing = path
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    limit = _name_max(existing if _exists(existing) else Path("."))
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise ValueError(f"{flag} '{path}': the name '{part[:40]}...' is {len(os.fsencode(part))} bytes, "
                             f"longer than the file system allows ({limit}); give a shorter name")
    if _exists(existing) and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under '{existing}', which is a file"
        raise ValueError(f"{flag} '{path}' {where}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} '{path}': '{existing}' is not writable; make it writable or write elsewhere")


def _probe(folder: Path, flag: str) -> None:
    """Create and remove a small file in `folder`: the write permission as the file system sees it."""
    probe = folder / _PROBE
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{flag} '{folder}' cannot be written ({os.strerror(err.errno or errno.EIO)}); "
                         "make it writable or write elsewhere") from err


def _make(folder: Path, flag: str, exist_ok: bool) -> None:
    check_output_dir(folder, flag)
    try:
        folder.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        raise
    except OSError as err:
        raise ValueError(f"{flag} '{folder}' cannot be created ({os.strerror(err.errno or errno.EIO)}); "
                         "give another folder") from err
    _probe(folder, flag)


def new_run_dir(parent: Union[str, Path], name: str, flag: str = "--output-dir") -> Path:
    """Create and return a folder `parent/name` that did not exist before (`name-2`, `name-3`, ... on a
    collision; `mkdir` is atomic, so concurrent runs never get the same folder)."""
    parent = Path(parent)
    for attempt in range(1, 10_000):
        folder = parent / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            _make(folder, flag, exist_ok=False)
            return folder
        except FileExistsError:
            continue
    raise ValueError(f"{flag}: no free folder name '{name}-N' under '{parent}'; give --output-dir")


def held_files(folder: Path, own_files: Sequence[str], own_patterns: Sequence[str] = ()) -> list[str]:
    """The names of clipconv's own outputs present in `folder` (files and pattern matches, sorted)."""
    try:
        if not folder.is_dir():
            return []
    except OSError:
        return []
    found = [name for name in own_files if (folder / name).exists()]
    for pattern in own_patterns:
        found += sorted(p.name for p in folder.glob(pattern))
    return found


def remove_files(folder: Path, own_files: Sequence[str], own_patterns: Sequence[str] = ()) -> None:
    """Delete clipconv's own outputs in `folder` (files; pattern-matched sub-folders recursively). Anything
    else in the folder is left alone."""
    for name in own_files:
        target = folder / name
        if target.is_file() or target.is_symlink():
            target.unlink()
    for pattern in own_patterns:
        for target in folder.glob(pattern):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()


def claim_output_dir(path: Union[str, Path], own_files: Sequence[str], own_patterns: Sequence[str] = (),
                     overwrite: bool = False, resume: bool = False, resume_hint: Optional[str] = None,
                     flag: str = "--output-dir") -> Path:
    """Make `path` the output folder of a new run (or of a resumed one, `resume`): create it if needed and
    check it is writable. A folder already holding a run is refused unless `overwrite`, which removes that
    run's files (only clipconv's own) first. An empty or unrelated folder is used as it is."""
    folder = Path(path)
    check_output_dir(folder, flag)
    held = held_files(folder, own_files, own_patterns)
    if held and not resume:
        if not overwrite:
            shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            hint = f", {resume_hint}" if resume_hint else ""
            raise ValueError(f"{flag} '{folder}' already holds a run ({shown}); give a new {flag}, "
                             f"--overwrite to replace it{hint}")
        remove_files(folder, own_files, own_patterns)
    _make(folder, flag, exist_ok=True)
    return folder


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean stop (state saved, resume command) follows."""


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """While active, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread; the previous
    handler is restored afterwards."""
    def handler(signum, frame):  # noqa: ARG001
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(err: BaseException) -> int:
    """130 after Ctrl-C, 143 after SIGTERM (the shell's 128 + signal number)."""
    return EXIT_SIGTERM if isinstance(err, Terminated) else EXIT_SIGINT
