"""See and clear clipconv's on-disk caches: `python -m clipconv.app.cache info|clear [--dir DIR]`.

The cache folder is `$CLIPCONV_CACHE`, else `~/.cache/clipconv`. It holds image-feature entries
(`features/<40 hex>.safetensors`, see clipconv.features), decoded K-shot images and small evaluation sets
(`decoded/<40 hex>.safetensors`, see clipconv.data.decoded), webdataset shard listings and extracted
K-shot samples (`wds-index/`, `wds-samples/`, see clipconv.data.wds) and generated demo worlds
(`demo-world-<12 hex>/`). `clear` removes only those (and temporary files a killed write left behind);
anything else in the folder is left alone. It asks nothing and prints what it removed. While a run uses
the folder (runs hold its `.clipconv-cache.lock` shared for their whole life, and that of their feature-cache
folder when `--cache-dir` moves it: `clear` also checks `features/`) `clear` refuses at once.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from clipconv.app.cli.common import plain_warnings
from clipconv.app.cli.options import add_runtime_args, apply_runtime, runtime_from
from clipconv.runtime.cache import CACHE_LOCK, CacheInUseError, cache_exclusively, cache_root

__all__ = ["cache_root", "CacheContents", "scan", "clear", "main"]

_ENTRY = re.compile(r"^[0-9a-f]{40}\.safetensors$")
_ENTRY_TEMP = re.compile(r"^\.[0-9a-f]{40}\.safetensors\..+\.tmp$")
_WORLD = re.compile(r"^demo-world-[0-9a-f]{12}$")
WDS_FOLDERS = ("wds-index", "wds-samples")

def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())
    return path.lstat().st_size

@dataclass
class CacheContents:
    """What of clipconv's lies in a cache folder."""

    root: Path
    entries: list[Path] = field(default_factory=list)  # feature-cache entries
    decoded: list[Path] = field(default_factory=list)  # decoded-image entries (clipconv.data.decoded)
    leftovers: list[Path] = field(default_factory=list)  # temp files of interrupted writes
    worlds: list[Path] = field(default_factory=list)  # generated demo worlds
    webdataset: list[Path] = field(default_factory=list)  # shard listings and extracted samples (folders)

    def size(self, paths: Sequence[Path]) -> int:
        return sum(_size(p) for p in paths)

def scan(root: Optional[Path] = None) -> CacheContents:
    """The clipconv files in `root` (default `cache_root()`); nothing else is listed."""
    root = Path(root) if root is not None else cache_root()
    found = CacheContents(root)
    for folder, entries in ((root / "features", found.entries), (root / "decoded", found.decoded)):
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.is_file() and _ENTRY.match(path.name):
                    entries.append(path)
                elif path.is_file() and _ENTRY_TEMP.match(path.name):
                    found.leftovers.append(path)
    if root.is_dir():
        found.webdataset = [root / name for name in WDS_FOLDERS if (root / name).is_dir() and
                            not (root / name).is_symlink()]
        found.worlds = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.is_symlink() and _WORLD.match(p.name)]
    return found

def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover

def describe(found: CacheContents) -> str:
    """The `info` text: location, entries and sizes."""
    lines = [f"cache folder: {found.root}" + ("" if found.root.is_dir() else " (does not exist)"),
             f"feature entries: {len(found.entries)} ({_human(found.size(found.entries))}) in {found.root / 'features'}",
             f"demo worlds: {len(found.worlds)} ({_human(found.size(found.worlds))})"]
    if found.decoded:
        lines.insert(2, f"decoded-image entries: {len(found.decoded)} ({_human(found.size(found.decoded))}) in "
                        f"{found.root / 'decoded'}")
    if found.webdataset:
        lines.insert(-1, f"webdataset listings and samples: {_human(found.size(found.webdataset))} in "
                         + ", ".join(str(p) for p in found.webdataset))
    if found.leftovers:
        lines.append(f"leftover temporary files: {len(found.leftovers)} ({_human(found.size(found.leftovers))})")
    return "\n".join(lines)

def clear(root: Optional[Path] = None, worlds: bool = True) -> list[str]:
    """Remove clipconv's cache files under `root`; return one line per kind of thing removed. Holds the lock of
    `root` and of its features folder (a run's `--cache-dir` may be that folder) exclusively meanwhile:
    CacheInUseError, and nothing removed, while a run holds either."""
    root = Path(root) if root is not None else cache_root()
    with cache_exclusively(root, inner=(root / "features",)) if root.is_dir() else contextlib.nullcontext():
        found = scan(root)
        report = []
        for what, paths in (("feature entries", found.entries), ("decoded-image entries", found.decoded),
                            ("leftover temporary files", found.leftovers),
                            ("webdataset cache folders", found.webdataset),
                            ("demo worlds", found.worlds if worlds else [])):
            if not paths:
                continue
            size = found.size(paths)
            for path in paths:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            shown = "" if what != "demo worlds" else ": " + ", ".join(p.name for p in paths)
            report.append(f"removed {len(paths)} {what} ({_human(size)}) from {paths[0].parent}{shown}")
        for folder in (found.root / "features", found.root / "decoded"):
            if folder.is_dir() and all(p.name == CACHE_LOCK for p in folder.iterdir()):
                (folder / CACHE_LOCK).unlink(missing_ok=True)  # held exclusively here; a waiting run re-opens it
                folder.rmdir()
    return report

def main(argv: Optional[Sequence[str]] = None) -> int:
    plain_warnings()
    parser = argparse.ArgumentParser(prog="python -m clipconv.app.cache", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("info", "clear"), help="info: show what is cached; clear: remove it")
    parser.add_argument("--dir", help="cache folder (default $CLIPCONV_CACHE, else ~/.cache/clipconv)")
    parser.add_argument("--keep-worlds", action="store_true", help="clear: keep the generated demo worlds")
    runtime_fields = add_runtime_args(parser)
    args = parser.parse_args(argv)
    apply_runtime(runtime_from(args, runtime_fields, parser))
    root = Path(args.dir) if args.dir else cache_root()
    if root.exists() and not root.is_dir():
        print(f"error: cache folder '{root}' is a file, not a folder; check --dir or $CLIPCONV_CACHE", file=sys.stderr)
        return 2
    if args.action == "info":
        print(describe(scan(root)))
        return 0
    try:
        removed = clear(root, worlds=not args.keep_worlds)  # never under a running run
    except CacheInUseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: could not clear '{root}': {err}", file=sys.stderr)
        return 2
    print("\n".join(removed) if removed else f"nothing to clear in {root}")
    return 0

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
