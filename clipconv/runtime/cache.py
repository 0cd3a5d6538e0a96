"""clipconv's cache folder and its entries: `$CLIPCONV_CACHE` (else `~/.cache/clipconv`), checksummed
safetensors entries written atomically (the feature cache, the decoded-image cache), and its lock: a run
holds it shared for its whole life (`hold_cache`), clearing takes it exclusively (`cache_exclusively`)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import safetensors.torch
import torch

from clipconv.runtime.io import OutputWriteError
from clipconv.runtime.outputs import atomic_path

__all__ = ["cache_root", "cache_dir_problem", "tensor_checksum", "transform_id", "write_cache_entry", "CACHE_LOCK",
           "hold_cache", "cache_exclusively", "CacheInUseError"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
#: the lock file in the cache folder: shared by every run using it, exclusive while it is cleared
CACHE_LOCK = ".clipconv-cache.lock"
_HELD: dict[str, int] = {}  # cache folder (absolute) -> the open descriptor holding its shared lock


class CacheInUseError(RuntimeError):
    """The cache folder is in use by a run (it holds the folder's lock shared)."""


def cache_root() -> Path:
    """`$CLIPCONV_CACHE`, else `~/.cache/clipconv`."""
    base = os.environ.get("CLIPCONV_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "clipconv"


def cache_dir_problem(folder: Union[str, Path]) -> Optional[str]:
    """Why `folder` cannot hold the cache (it, or a parent, is a file; it cannot be created or written), or None.

    Writability is tested by creating (and removing) a temporary file, which also works for root, whom
    permission bits do not stop.
    """
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not candidate.is_dir():
                return f"'{candidate}' is a file, not a folder"
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        return f"cannot write in '{folder}' ({err.strerror or err})"
    return None


def tensor_checksum(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `tensors[name]` for `names` (hashed in place)."""
    digest = hashlib.sha256()
    for name in names:
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode("utf-8"))
        if tensor.numel():
            digest.update(memoryview((tensor.to(torch.uint8) if tensor.dtype == torch.bool
                                      else tensor.view(torch.uint8)).numpy()))
    return digest.hexdigest()


def write_cache_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> None:
    """Write a cache entry (safetensors, atomically); a failed write is one warning naming `what`: a cache is
    an optimization, the caller still has its tensors."""
    try:
        with atomic_path(path) as tmp:
            try:
                safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
            except Exception as err:  # safetensors reports I/O errors as SafetensorError
                if isinstance(err, OSError):
                    raise
                raise OSError(f"{type(err).__name__}: {err}") from err
    except OutputWriteError as err:
        warnings.warn(f"{what} not saved: {err}", stacklevel=3)


def transform_id(transform: Callable) -> str:
    """A stable text id of a transform: its repr with process-specific memory addresses removed."""
    return _ADDRESS.sub("", repr(transform))


def hold_cache(root: Union[str, Path, None] = None) -> None:
    """Hold the lock of a cache folder (default `cache_root()`) shared for the life of this process (every run
    holds each folder it uses: the cache folder, and its feature cache when `--cache-dir` puts that elsewhere;
    the demo world, feature entries and extracted samples it reads stay put while `cache_exclusively` waits for
    no run). Waits while a clear is under way (and re-opens the lock file when the clear removed it); does
    nothing when the folder cannot hold a lock (the cache is then unusable anyway, which the places using it
    report)."""
    folder = Path(root) if root is not None else cache_root()
    key = os.path.abspath(folder)
    if key in _HELD or cache_dir_problem(folder):
        return
    while True:
        try:
            fd = os.open(folder / CACHE_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            current = os.path.samestat(os.fstat(fd), os.stat(folder / CACHE_LOCK))
        except FileNotFoundError:  # a clear removed the lock file while this waited: lock the new one
            current = False
        except OSError:
            os.close(fd)
            return
        if current:
            _HELD[key] = fd
            return
        os.close(fd)


def _lock_exclusively(folder: Path) -> Optional[int]:
    """The open lock file of `folder`, locked exclusively (None: none exists and none can be made, so no run can
    hold one); CacheInUseError at once while a run holds it."""
    try:
        fd = os.open(folder / CACHE_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:  # a folder this process cannot write: a run holding it made the lock file
            fd = os.open(folder / CACHE_LOCK, os.O_RDONLY)
        except OSError:
            return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise CacheInUseError(f"cache folder '{folder}' is in use by a running clipconv process (it holds "
                                  f"{CACHE_LOCK}); clear it once no run uses it") from None
        raise
    return fd


@contextlib.contextmanager
def cache_exclusively(root: Union[str, Path], inner: Sequence[Union[str, Path]] = ()) -> Iterator[None]:
    """Hold the lock of the cache folder `root`, and of those folders in `inner` that exist (folders inside it a
    run may use directly, e.g. its feature cache given as `--cache-dir`), exclusively (to clear them);
    CacheInUseError at once while a run holds any of them. The lock files of `inner` are removed before they
    are released, so a folder the clear emptied can go (a run waiting on one re-opens it, see `hold_cache`)."""
    fds: list[int] = []
    inner_locks: list[Path] = []  # the lock files of `inner` this holds
    try:
        for folder in (Path(root), *(Path(f) for f in inner if Path(f).is_dir())):
            fd = _lock_exclusively(folder)
            if fd is not None:
                fds.append(fd)
                if folder != Path(root):
                    inner_locks.append(folder / CACHE_LOCK)
        yield
        for lock in inner_locks:
            with contextlib.suppress(OSError):
                os.unlink(lock)
    finally:
        for fd in fds:
            os.close(fd)
