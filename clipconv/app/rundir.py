"""Output folders of runs: checked before any work, created uniquely, never silently reused.

* `check_output_dir(path, flag)`: a path that is a file, lies under a file, has a too-long name or cannot
  be written is refused (ValueError naming the flag) before anything is computed;
* `new_run_dir(parent, name)`: a fresh folder created exclusively (`name`, then `name-2`, `name-3`, ...),
  so two runs started in the same second never share one;
* `claim_output_dir(path, own_files, ...)`: an explicit --output-dir holding a finished or started run is
  refused unless `overwrite` (its clipconv files are removed first) or `resume`;
* both hold a lock on the folder for the life of the process (`fcntl.flock` on `.clipconv.lock` in it): a
  second writer (another --overwrite or --resume of the same folder) is refused at once, naming the
  process that holds it (`check_not_in_use`, `release_run_dir`);
* `interrupt_on_sigterm()`: SIGTERM raises KeyboardInterrupt, so a `kill` stops like Ctrl-C.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

__all__ = ["RUN_FILES", "ZERO_SHOT_FILES", "LOCK_FILE", "check_output_dir", "new_run_dir", "claim_output_dir",
           "check_not_in_use", "release_run_dir", "held_files", "remove_files", "Terminated", "interrupt_on_sigterm", "EXIT_SIGINT", "EXIT_SIGTERM"]

#: files a training / evaluation run writes in its folder (also in `scale_<s>/` sub-folders)
RUN_FILES = ("config.json", "split.json", "metrics.json", "results.md", "run_summary.json", "log.txt",
             "adapter.safetensors", "train_state.pt")
ZERO_SHOT_FILES = ("zero_shot.json", "zero_shot.md", "log.txt")
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
_PROBE = ".clipconv-write-probe"
#: the lock a run holds on its folder while it writes there (left behind, unlocked, when the run ends)
LOCK_FILE = ".clipconv.lock"
_HELD: dict[Path, int] = {}  # folder (resolved) -> the open, locked descriptor of its lock file


def _in_use_error(folder: Path, lock: Path, flag: str) -> ValueError:
    try:
        holder = lock.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        holder = ""
    by = f" (process {holder})" if holder.isdigit() else ""
    return ValueError(f"{flag} '{folder}' is in use by another run{by}; wait for it to finish or give another "
                      f"{flag}")


def _lock(folder: Path, flag: str) -> None:
    """Take the lock of `folder` for the life of this process (or until `release_run_dir`); refused
    (ValueError naming `flag`) while another process holds it."""
    key = folder.resolve()
    if key in _HELD:
        return
    lock = folder / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise ValueError(f"{flag} '{folder}': cannot create {LOCK_FILE} ({os.strerror(err.errno or errno.EIO)}); "
                         "make the folder writable or write elsewhere") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _in_use_error(folder, lock, flag) from err
        raise ValueError(f"{flag} '{folder}': cannot lock {LOCK_FILE} ({os.strerror(err.errno or errno.EIO)}); "
                         "write elsewhere") from err
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = fd


def check_not_in_use(path: Union[str, Path], flag: str = "--output-dir") -> None:
    """Refuse (ValueError naming `flag`) a folder whose lock another process holds; creates nothing."""
    folder = Path(path)
    lock = folder / LOCK_FILE
    if not lock.is_file() or folder.resolve() in _HELD:
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _in_use_error(folder, lock, flag) from err
    finally:
        os.close(fd)  # also drops the shared lock just taken


def release_run_dir(path: Union[str, Path]) -> None:
    """Release this process's lock on `path` (a no-op when not held); the lock file stays."""
    fd = _HELD.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)


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
            _lock(folder, flag)
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
    run's files (only clipconv's own) first. An empty or unrelated folder is used as it is.

    The folder is locked before anything in it is removed or written (see `_lock`): while another process
    holds it, the claim is refused."""
    folder = Path(path)
    check_output_dir(folder, flag)
    check_not_in_use(folder, flag)

    def refuse_held(locked_here: bool = False) -> None:
        held = held_files(folder, own_files, own_patterns)
        if held and not resume and not overwrite:
            shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
            hint = f", {resume_hint}" if resume_hint else ""
            if locked_here:
                release_run_dir(folder)
            raise ValueError(f"{flag} '{folder}' already holds a run ({shown}); give a new {flag}, "
                             f"--overwrite to replace it{hint}")

    refuse_held()  # before anything is written
    _make(folder, flag, exist_ok=True)
    locked_here = folder.resolve() not in _HELD
    _lock(folder, flag)
    refuse_held(locked_here)  # again under the lock: a run may have finished there meanwhile
    if overwrite and not resume:
        remove_files(folder, own_files, own_patterns)
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
