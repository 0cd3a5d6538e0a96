"""Atomic file writes: a killed run never leaves a half-written output behind.

Written files get the usual mode of a new file (0666 minus the umask), not mkstemp's private 0600. A write
that fails (disk full, file-size limit, no permission) raises `OutputWriteError` naming the file and the
reason, and leaves neither the temporary file nor a partial output. Run files that cannot be read back
(empty, truncated, not JSON) raise `DamagedFileError`, which names the file and what to do.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from clipconv.runtime.jsontypes import JSON, JSONObject

__all__ = ["OutputWriteError", "DamagedFileError", "atomic_path", "remove_stale_temps", "write_json", "write_text", "read_json",
           "read_json_object", "finite_or_null",
           "save_torch", "load_torch", "new_file_mode"]


class OutputWriteError(OSError):
    """A file could not be written (disk full, file-size limit, permissions); the message names the file."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno n]" prefix
        return str(self.strerror)


class DamagedFileError(ValueError):
    """A file exists but cannot be read back (empty, truncated, not the expected format)."""


def new_file_mode() -> int:
    """The mode a newly created file gets under the current umask (0666 & ~umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_failure(path: Path, tmp: Optional[Path], err: BaseException) -> OutputWriteError:
    """An OutputWriteError for `path` that says why, as concretely as the system lets us tell."""
    code = getattr(err, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) else str(err).strip() or type(err).__name__
    hints = []
    if code in (errno.ENOSPC, errno.EDQUOT):
        hints.append("free some disk space (or write elsewhere) and run again")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size = tmp.stat().st_size if tmp is not None and tmp.exists() else 0
    if code == errno.EFBIG or (limit != resource.RLIM_INFINITY and size >= limit):
        hints.append(f"the file-size limit is {limit} bytes (ulimit -f); raise it and run again")
    elif not isinstance(code, int):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(path.parent).free < (1 << 20):
                hints.append("the disk is full; free some space and run again")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hints.append(f"make '{path.parent}' writable or write elsewhere")
    message = f"could not write '{path}': {reason}" + (f"; {'; '.join(hints)}" if hints else "")
    out = OutputWriteError(code if isinstance(code, int) else errno.EIO, message)
    out.filename = str(path)
    return out


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    Every OSError while preparing, writing or renaming becomes an `OutputWriteError` naming `path`; the
    temporary file is always removed. Every process that calls it writes (under torchrun, write through
    `clipconv.runtime.outputs`, which lets rank 0 alone write).
    """
    path = Path(path)
    tmp: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp makes 0600 (and some writers replace the file): give it the mode of any new file
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except OutputWriteError:
        raise
    except OSError as err:
        raise _write_failure(path, tmp, err) from err
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def write_text(path: Union[str, Path], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def finite_or_null(value: object) -> object:
    """`value` with every NaN or ±infinity (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def write_json(path: Union[str, Path], data: object) -> Path:
    """Write `data` as strict JSON (RFC 8259: a NaN or infinity is written null), atomically; the one JSON
    writer of clipconv. Values JSON has no form for are written as their str."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str)  # default=str first: numpy scalars, paths
    return write_text(path, json.dumps(finite_or_null(json.loads(text)), indent=2, allow_nan=False) + "\n")


def read_json(path: Union[str, Path], what_to_do: str = "delete it or start a new run") -> JSON:
    """The JSON content of `path`; a file that is empty, truncated or not JSON raises DamagedFileError."""
    with open(path, "rb") as handle:
        text = handle.read()
    try:
        return json.loads(text.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, and UnicodeDecodeError from a binary file
        state = "empty" if not text.strip() else "not valid JSON (truncated?)"
        raise DamagedFileError(f"'{path}' is damaged: {state} ({err}); {what_to_do}") from err


def read_json_object(path: Union[str, Path], what_to_do: str = "delete it or start a new run") -> JSONObject:
    """The JSON object in `path` (a run record); a file that is damaged, or holds JSON that is not an object
    (a list, a string, null), raises DamagedFileError naming the file."""
    value = read_json(path, what_to_do)
    if not isinstance(value, dict):
        kind = "null" if value is None else f"a JSON {type(value).__name__}"
        raise DamagedFileError(f"'{path}' is damaged: it holds {kind} where a JSON object is expected; {what_to_do}")
    return value


def save_torch(path: Union[str, Path], obj: object) -> Path:
    """torch.save atomically (for training state: tensors, numbers, strings, RNG states)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's writer reports a failed write as RuntimeError
            raise _write_failure(path, tmp, err) from err
    return path


def load_torch(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu",
               what_to_do: str = "delete it to restart the run from scratch") -> Any:
    """torch.load restricted to tensors and plain containers (`weights_only=True`): never runs code.

    An empty or truncated file raises DamagedFileError; a file holding pickled code or objects raises a
    ValueError saying so.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:  # what weights_only=True raises for code or foreign objects
        raise ValueError(
            f"'{path}' could not be loaded safely (weights_only=True refuses pickled code or objects): {err}"
        ) from err
    except Exception as err:  # EOFError (empty), RuntimeError (truncated zip), ...
        size = os.path.getsize(path) if os.path.exists(path) else 0
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:160]
        state = "empty" if size == 0 else f"truncated or corrupted ({detail})"
        raise DamagedFileError(f"'{path}' is damaged: {state}; {what_to_do}") from err


def remove_stale_temps(path: Union[str, Path]) -> list[Path]:
    """Delete the temporary files a killed writer of `path` left beside it (`.<name>.*.tmp`); returns them."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale
