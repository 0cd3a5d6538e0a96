"""Prompt templates and class-name files shipped in the repository's `prompts/` folder."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Union

__all__ = [
    "REPO_ROOT",
    "PROMPTS_DIR",
    "DATASETS_DIR",
    "TEMPLATE_SETS",
    "load_templates",
    "load_classnames_file",
    "imagenet_classes",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS_DIR = REPO_ROOT / "prompts"
DATASETS_DIR = REPO_ROOT / "datasets"

TEMPLATE_SETS: dict[str, Path] = {
    "photo": PROMPTS_DIR / "templates" / "photo.txt",  # the single "a photo of a {}." (Table 2's ZS CLIP)
    "clip80": PROMPTS_DIR / "templates" / "clip80.txt",  # OpenAI's 80-template ensemble
    "tip": PROMPTS_DIR / "templates" / "tip.txt",  # the 7 templates Tip-Adapter uses
}


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """Non-blank lines of a UTF-8 text file (BOM allowed) with their 1-based line numbers."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading BOM (Windows editors) is dropped
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} file '{path}' is not UTF-8 text ({err.reason} at byte {err.start}); save it as "
                         "UTF-8") from err
    lines = [(number, line.rstrip("\r\n")) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, line) for number, line in lines if line.strip()]
    if not lines:
        raise ValueError(f"{what} file '{path}' is empty")
    return lines


def load_templates(name_or_path: Union[str, Path]) -> list[str]:
    """Templates of a named set (`photo`, `clip80`, `tip`) or of a file, one per line with `{}` for the name."""
    key = str(name_or_path)
    path = TEMPLATE_SETS.get(key, Path(key))
    if key not in TEMPLATE_SETS and not path.is_file():
        raise FileNotFoundError(
            f"template set '{key}' is neither a known name ({', '.join(TEMPLATE_SETS)}) nor an existing file"
        )
    templates = []
    for number, line in _read_lines(path, "template"):
        rest = line.replace("{}", "", 1)
        if line.count("{}") != 1 or "{" in rest or "}" in rest:
            raise ValueError(
                f"{path}:{number}: a template must contain exactly one '{{}}' (the class name) "
                f"and no other braces, got {line!r}"
            )
        templates.append(line.strip())
    return templates


def _classnames_line(line: str) -> list[str]:
    """[id, name] of one class-names line: "<id><TAB><name>" when it holds a TAB (the id, e.g. a folder name,
    may then hold spaces), else "<id> <name with spaces>" (split at the first run of spaces)."""
    text = line.strip()  # trailing tabs or spaces left by an editor are no separator
    if "\t" in text:
        return [part.strip() for part in text.split("\t", 1)]
    return text.split(maxsplit=1)


def load_classnames_file(path: Union[str, Path]) -> list[tuple[str, str]]:
    """Parse a class-names file, in class-index order: one "<id> <name with spaces>" per line, or
    "<id><TAB><name>" for ids (folder names) that hold spaces themselves."""
    path = Path(path)
    entries: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    for number, line in _read_lines(path, "class-names"):
        parts = _classnames_line(line)
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected '<id> <class name>' (or '<id><TAB><class name>' when the id "
                             f"holds spaces), got {line!r}")
        class_id, name = parts[0], parts[1].strip()
        if class_id in first_line:
            raise ValueError(
                f"{path}:{number}: duplicate class id '{class_id}' (first on line {first_line[class_id]})"
            )
        first_line[class_id] = number
        entries.append((class_id, name))
    return entries


@lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[tuple[str, str], ...]:
    return tuple(load_classnames_file(PROMPTS_DIR / "imagenet_classnames.txt"))


def imagenet_classes() -> list[tuple[str, str]]:
    """The canonical 1000 ImageNet classes as (wnid, CLIP name), in class-index (sorted-wnid) order."""
    return list(_imagenet_classes())
