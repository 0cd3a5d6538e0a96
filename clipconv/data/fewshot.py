"""Seeded K-shot splits (train + optional disjoint val) that are identical on any filesystem."""
from __future__ import annotations

import json
import os
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from clipconv.data.folder import Sample
from clipconv.data.images import is_decodable
from clipconv.runtime.jsontypes import JSONObject
from clipconv.runtime.outputs import write_json

__all__ = ["FewShotSplit", "sample_few_shot", "save_split", "load_split", "check_split_entries", "SPLIT_FORMAT"]

SPLIT_FORMAT = "clipconv-fewshot-split/1"
PathLike = Union[str, Path]


@dataclass
class FewShotSplit:
    """A K-shot training set and a disjoint validation set, both sorted by path.

    `shortfall` / `val_shortfall`: {class: images drawn} for the classes that had fewer usable images
    than asked (keyed by class name, or by label when no names were given); empty when every class
    got its K. They are written to split.json, so the file says what was drawn.
    """

    train: list[Sample]
    val: list[Sample] = field(default_factory=list)
    shots: Optional[int] = None
    seed: Optional[int] = None
    val_shots: int = 0
    shortfall: dict[str, int] = field(default_factory=dict)
    val_shortfall: dict[str, int] = field(default_factory=dict)


def _draw(paths: list[str], count: int, usable) -> list[str]:
    """Up to `count` usable paths in the rng's shuffled order (a bad draw is replaced by the next one)."""
    chosen = []
    for path in paths:
        if len(chosen) == count:
            break
        if usable(path):
            chosen.append(path)
    return chosen


def sample_few_shot(
    samples: Sequence[Sample],
    shots: int,
    seed: int,
    val_shots: int = 0,
    root: Optional[PathLike] = None,
    verify: bool = True,
    class_names: Optional[Sequence[str]] = None,
) -> FewShotSplit:
    """Draw `shots` train and `val_shots` val images per class, deterministically from `seed`.

    Samples are grouped by label and sorted by path before a `random.Random(seed)` shuffle per class
    (classes in ascending label order), so the listing order of the filesystem never matters. With
    `verify`, each drawn file is decoded cheaply (relative to `root`) and an undecodable one is
    replaced by the next candidate. A class with too few images gives all it has, with one warning
    naming such classes (`class_names[label]` when given).
    """
    if shots <= 0:
        raise ValueError(f"shots must be a positive number of images per class, got {shots}")
    if val_shots < 0:
        raise ValueError(f"val_shots must be >= 0, got {val_shots}")
    by_label: dict[int, list[str]] = defaultdict(list)
    for path, label in samples:
        by_label[int(label)].append(path)
    base = Path(root) if root is not None else None
    bad: set[str] = set()

    def usable(path: str) -> bool:
        if not verify:
            return True
        if not is_decodable(base / path if base is not None else path):
            bad.add(path)
            return False
        return True

    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    short_train, short_val = [], []
    for label in sorted(by_label):
        paths = sorted(by_label[label])
        rng.shuffle(paths)
        picked = _draw(paths, shots, usable)
        train.extend((p, label) for p in picked)
        if len(picked) < shots:
            short_train.append((label, len(picked)))
        if val_shots:
            taken = set(picked)
            rest = [p for p in paths if p not in taken and p not in bad]
            picked_val = _draw(rest, val_shots, usable)
            val.extend((p, label) for p in picked_val)
            if len(picked_val) < val_shots:
                short_val.append((label, len(picked_val)))

    def key(label: int) -> str:
        if not class_names:
            return str(label)
        name = class_names[label]
        return name if list(class_names).count(name) == 1 else f"{name} (label {label})"

    def describe(shorts):
        return ", ".join(f"{key(label)} ({count})" for label, count in shorts)

    if short_train:
        warnings.warn(
            f"{len(short_train)} class(es) have fewer than {shots} usable images; took all they have: "
            f"{describe(short_train)}",
            stacklevel=2,
        )
    if short_val:
        warnings.warn(
            f"{len(short_val)} class(es) have fewer than {val_shots} images left for validation: "
            f"{describe(short_val)}",
            stacklevel=2,
        )
    if bad:
        warnings.warn(f"not drawn, undecodable: {', '.join(sorted(bad))}", stacklevel=2)
    return FewShotSplit(sorted(train), sorted(val), shots, seed, val_shots,
                        {key(label): count for label, count in short_train},
                        {key(label): count for label, count in short_val})


def save_split(path: PathLike, split: FewShotSplit, meta: JSONObject) -> Path:
    """Write a split as JSON (atomic): paths relative to the data root, shots, seed and `meta`
    (which should hold `class_ids`, the ordered run classes the labels index)."""
    reserved = {"format", "train", "val", "shortfall", "val_shortfall"} & set(meta)
    if reserved:
        raise ValueError(f"save_split: meta may not use the reserved keys {sorted(reserved)}")
    for rel, _ in split.train + split.val:
        if Path(rel).is_absolute():
            raise ValueError(f"save_split: sample path '{rel}' is absolute; store paths relative to the data root")
    payload = {
        "format": SPLIT_FORMAT,
        "shots": split.shots,
        "seed": split.seed,
        "val_shots": split.val_shots,
        "shortfall": dict(split.shortfall),
        "val_shortfall": dict(split.val_shortfall),
        **meta,
        "train": [[p, int(label)] for p, label in split.train],
        "val": [[p, int(label)] for p, label in split.val],
    }
    return write_json(path, payload)


def load_split(path: PathLike) -> tuple[FewShotSplit, JSONObject]:
    """Read a split written by `save_split`; returns it with the rest of the JSON as `meta`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file '{path}' does not exist")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"split file '{path}' is not UTF-8 text ({err.reason} at byte {err.start}); give a split "
                         "written by clipconv") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"split file '{path}' is not valid JSON: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != SPLIT_FORMAT:
        raise ValueError(f"split file '{path}' is not a clipconv few-shot split (format {SPLIT_FORMAT!r})")
    try:
        train = [(str(p), int(label)) for p, label in payload.pop("train")]
        val = [(str(p), int(label)) for p, label in payload.pop("val")]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"split file '{path}': train/val must be lists of [path, label] ({err})") from err
    class_ids = payload.get("class_ids")
    if class_ids is not None:
        bad = [label for _, label in train + val if not 0 <= label < len(class_ids)]
        if bad:
            raise ValueError(f"split file '{path}': labels {sorted(set(bad))[:5]} outside 0..{len(class_ids) - 1}")
    payload.pop("format")
    shortfall, val_shortfall = payload.pop("shortfall", {}) or {}, payload.pop("val_shortfall", {}) or {}
    if not (isinstance(shortfall, dict) and isinstance(val_shortfall, dict)):
        raise ValueError(f"split file '{path}': shortfall/val_shortfall must be {{class: images drawn}} objects")
    split = FewShotSplit(train, val, payload.get("shots"), payload.get("seed"), payload.get("val_shots", 0),
                         {str(k): int(v) for k, v in shortfall.items()},
                         {str(k): int(v) for k, v in val_shortfall.items()})
    return split, payload


def _entry_problem(rel: str, label: int, pool: dict[str, int], root: Path, class_ids: Sequence[str]) -> Optional[str]:
    """What is wrong with one split entry against the train listing `pool` ({path: label}), or None."""
    normal = os.path.normpath(rel)
    if Path(rel).is_absolute() or normal == ".." or normal.startswith(".." + os.sep):
        return f"entry '{rel}' leaves the data root '{root}'"
    if rel not in pool:
        if not os.path.lexists(root / rel):
            return f"entry '{rel}' does not exist under the data root '{root}'"
        return f"entry '{rel}' is not an image of the train set under '{root}'"
    if pool[rel] != label:
        def named(index: int) -> str:
            return f"{index} ({class_ids[index]})" if 0 <= index < len(class_ids) else str(index)
        return f"entry '{rel}' has label {named(label)} but its class folder is label {named(pool[rel])}"
    return None


def check_split_entries(split: FewShotSplit, pool: Sequence[Sample], root: PathLike, where: str,
                        class_ids: Sequence[str] = ()) -> None:
    """Refuse (ValueError naming `where` and the first bad entry) a split whose entries are not the train images
    listed in `pool` with their own labels, each once, the validation images apart from the training shots: an
    edited split.json is checked before use (a path leaving the data root, a missing file, a wrong label, a
    repeated entry, a validation image that is also a shot)."""
    root = Path(root)
    labels = {str(path): int(label) for path, label in pool}
    seen: dict[str, str] = {}
    for part, entries in (("train", split.train), ("val", split.val)):
        for rel, label in entries:
            problem = _entry_problem(rel, label, labels, root, class_ids)
            if problem is None and rel in seen:
                problem = (f"entry '{rel}' is repeated in {part}" if seen[rel] == part else
                           f"validation entry '{rel}' is also a training shot")
            if problem:
                raise ValueError(f"split file '{where}': {problem}; give a split written by clipconv for this data "
                                 "(or drop --split)")
            seen[rel] = part
