"""The ImageNet family on disk: layout detection, the class universe, run classes, train and eval samples.

Contract (other modules rely on it):
- The class universe is an ordered list of (id, name): the 1000 ImageNet classes (sorted wnids, CLIP
  names from prompts/) by default; `<data_root>/imagenet/classnames.txt` defines it instead when its
  ids are not all ImageNet wnids (the offline mini benchmark); an explicit `classnames_file` overrides
  both (ids, order and names as written in the file).
- The run classes are the universe ids present as folders under the train split, in universe order.
  A train folder outside the universe is an error (`strict=True`, default) or skipped with a warning.
- Eval sets map onto run classes: by folder name (val, -Sketch, -A, -R) or, for -V2, by
  `int(folder name)` = universe index. Images of classes not in the run are dropped and counted.
  -A/-R carry `subset`: the run-class indices of their class folders, ascending; every split carries
  `num_classes`, the number of classes its argmax is over (a restricted set over fewer than
  `FEW_CLASSES_WARNING` classes warns: its accuracy says little).
- Entries of a split folder that should be class folders but are not usable (dangling symlink, symlink
  loop, an un-extracted `<id>.tar`, a file named like a class id) are skipped with one warning naming
  them (scripts/check_data.py reports them as errors).
- The listing functions take the layout (`train_candidates`, `specs`, `universe`) as arguments, so other
  families laid out as class-folder trees (the demo world, a user's own folders) reuse them.
"""
from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from clipconv.data.folder import Sample
from clipconv.data.images import BrokenEntry, describe_broken, list_class_folders, list_images
from clipconv.prompts import imagenet_classes, load_classnames_file

__all__ = [
    "DataLayoutError",
    "EvalSetSpec",
    "EVAL_SET_SPECS",
    "EVAL_SETS",
    "TRAIN_CANDIDATES",
    "DATA_HELP",
    "FEW_CLASSES_WARNING",
    "ClassList",
    "EvalSplit",
    "EvalScan",
    "find_split_dir",
    "load_universe",
    "resolve_run_classes",
    "train_samples",
    "scan_eval_set",
    "eval_split",
    "eval_splits",
]

PathLike = Union[str, Path]

DATA_HELP = (
    "Lay out ImageNet as described in datasets/README.md (CoOp layout: $DATA/imagenet/images/train/<wnid>/..., "
    "or the raw train/<wnid>/ layout), and check it with `python scripts/check_data.py --data-root $DATA`."
)


#: a set whose argmax is restricted to fewer classes than this warns (chance is 1/num_classes: with one
#: class every prediction is right); ImageNet-A/-R have 200, a 4-class subset run of them has 2.
FEW_CLASSES_WARNING = 10


class DataLayoutError(ValueError):
    """The data root does not hold a usable dataset layout (the message says what was expected)."""


@dataclass(frozen=True)
class EvalSetSpec:
    """Where an evaluation set may live under the data root and what the protocol expects of it."""

    name: str
    display_name: str
    candidates: tuple[str, ...]
    expected_images: int
    expected_classes: int
    numeric_folders: bool = False  # -V2: folder k holds universe class index k
    restricted: bool = False  # -A/-R: argmax over their own classes only


TRAIN_CANDIDATES = ("imagenet/images/train", "imagenet/train", "train")
UNIVERSE_FILE = "imagenet/classnames.txt"

EVAL_SET_SPECS: dict[str, EvalSetSpec] = {
    spec.name: spec
    for spec in (
        EvalSetSpec("imagenet", "ImageNet", ("imagenet/images/val", "imagenet/val", "val"), 50_000, 1000),
        EvalSetSpec(
            "imagenet_v2",
            "-V2",
            (
                "imagenetv2/imagenetv2-matched-frequency-format-val",
                "imagenetv2-matched-frequency-format-val",
                "ImageNetV2-matched-frequency",
            ),
            10_000,
            1000,
            numeric_folders=True,
        ),
        EvalSetSpec(
            "imagenet_sketch", "-Sketch", ("imagenet-sketch/images", "imagenet-sketch/sketch", "sketch"), 50_889, 1000
        ),
        EvalSetSpec(
            "imagenet_a", "-A", ("imagenet-adversarial/imagenet-a", "imagenet-a"), 7_500, 200, restricted=True
        ),
        EvalSetSpec(
            "imagenet_r", "-R", ("imagenet-rendition/imagenet-r", "imagenet-r"), 30_000, 200, restricted=True
        ),
    )
}
EVAL_SETS = tuple(EVAL_SET_SPECS)


@dataclass(frozen=True)
class ClassList:
    """An ordered list of class ids and names; `universe` is the ordered id list it was drawn from."""

    ids: tuple[str, ...]
    names: tuple[str, ...]
    universe: tuple[str, ...] = ()
    source: str = field(default="", compare=False)  # where the universe came from (for messages)
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(self.ids))
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "universe", tuple(self.universe) or self.ids)
        if len(self.ids) != len(self.names):
            raise ValueError(f"ClassList: {len(self.ids)} ids but {len(self.names)} names")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("ClassList: duplicate class ids")
        outside = sorted(set(self.ids) - set(self.universe))
        if outside:
            raise ValueError(f"ClassList: ids {outside[:5]} are not in the universe")
        object.__setattr__(self, "index", {class_id: i for i, class_id in enumerate(self.ids)})

    def __len__(self) -> int:
        return len(self.ids)

    def hash(self) -> str:
        """Stable SHA-256 of the ordered ids (stored in checkpoints to match heads with classes)."""
        return hashlib.sha256("\n".join(self.ids).encode("utf-8")).hexdigest()

    @property
    def universe_indices(self) -> list[int]:
        """Index of each run class in the universe (e.g. its ImageNet class index)."""
        position = {class_id: i for i, class_id in enumerate(self.universe)}
        return [position[class_id] for class_id in self.ids]


@dataclass
class EvalSplit:
    """One evaluation set mapped onto the run classes."""

    name: str
    display_name: str
    root: Path
    samples: list[Sample]  # (path relative to the data root, run-class label), sorted by path
    subset: Optional[list[int]]  # -A/-R: run-class indices to restrict the argmax to; else None
    dropped: int  # images of classes outside the run (or of unknown/out-of-range folders)
    num_classes: int = 0  # classes the argmax is over: len(subset), or all run classes (0: unknown)
    #: time.time() when the set was listed: a file changed after it that fails to decode stops the scoring
    listed_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.subset is not None:
            self.num_classes = len(self.subset)

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class EvalScan:
    """Everything learnt by listing one evaluation set (used by `eval_split` and `check_data`)."""

    spec: EvalSetSpec
    root: Optional[Path] = None
    layout: Optional[str] = None
    samples: list[Sample] = field(default_factory=list)
    subset: Optional[list[int]] = None
    dropped: int = 0
    images: int = 0
    class_folders: int = 0
    unknown_folders: list[str] = field(default_factory=list)
    outside_run_folders: list[str] = field(default_factory=list)  # universe classes the run does not hold
    broken: list[BrokenEntry] = field(default_factory=list)
    out_of_range_folders: list[str] = field(default_factory=list)
    loose_images: int = 0
    universe_size: int = 0

    @property
    def found(self) -> bool:
        return self.root is not None

    @property
    def unsorted(self) -> bool:
        """Images lie directly in the set's root and no class folder exists (e.g. raw ImageNet val)."""
        return self.loose_images > 0 and self.class_folders == 0 and not self.unknown_folders

    def problems(self) -> list[str]:
        """Human-readable issues, each naming the path and what was expected (`broken` entries apart)."""
        spec, issues = self.spec, []
        if not self.found:
            return [f"{spec.display_name} not found (looked for {', '.join(spec.candidates)})"]
        if self.unsorted:
            issues.append(
                f"{self.root} has {self.loose_images} images directly inside: it must be sorted into class "
                "folders (see datasets/README.md, 'ImageNet val must be sorted into class folders')"
            )
        elif self.loose_images:
            issues.append(f"{self.root} has {self.loose_images} images outside class folders (ignored)")
        if self.unknown_folders:
            expected = "numeric class-index folders" if spec.numeric_folders else "class-id folders of the universe"
            issues.append(
                f"{self.root}: {len(self.unknown_folders)} folder(s) are not {expected} (ignored): "
                f"{_preview(self.unknown_folders)}"
            )
        if self.out_of_range_folders:
            issues.append(
                f"{self.root}: {len(self.out_of_range_folders)} numeric folder(s) outside 0..{self.universe_size - 1} "
                f"(ignored): {_preview(self.out_of_range_folders)}"
            )
        if not self.unsorted and not self.samples:
            issues.append(
                f"{self.root} has no images of the run's classes" if self.images else f"{self.root} has no images"
            )
        return issues


def _preview(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _check_root(data_root: PathLike) -> Path:
    root = Path(data_root)
    if not root.is_dir():
        raise DataLayoutError(f"data root '{root}' does not exist or is not a folder. {DATA_HELP}")
    return root


def find_split_dir(data_root: PathLike, candidates: Sequence[str]) -> Optional[str]:
    """The first candidate (relative path) that is a folder under `data_root`, or None."""
    root = Path(data_root)
    return next((c for c in candidates if (root / c).is_dir()), None)


def load_universe(data_root: PathLike, classnames_file: Optional[PathLike] = None) -> ClassList:
    """The ordered class universe for a data root (see the module docstring for the rule)."""
    if classnames_file is not None:
        entries = load_classnames_file(classnames_file)
        return ClassList([i for i, _ in entries], [n for _, n in entries], source=str(classnames_file))
    canonical = imagenet_classes()
    local_file = Path(data_root) / UNIVERSE_FILE
    if local_file.is_file():
        entries = load_classnames_file(local_file)
        wnids = {wnid for wnid, _ in canonical}
        if not all(class_id in wnids for class_id, _ in entries):
            return ClassList([i for i, _ in entries], [n for _, n in entries], source=str(local_file))
    return ClassList([w for w, _ in canonical], [n for _, n in canonical], source="prompts/imagenet_classnames.txt")


def _train_dir(data_root: PathLike, candidates: Sequence[str] = TRAIN_CANDIDATES) -> tuple[Path, str]:
    root = _check_root(data_root)
    layout = find_split_dir(root, candidates)
    if layout is None:
        if tuple(candidates) != TRAIN_CANDIDATES:
            raise DataLayoutError(f"train folder '{root / candidates[0]}' does not exist or is not a folder")
        raise DataLayoutError(
            f"no ImageNet train split under '{root}' (looked for {', '.join(TRAIN_CANDIDATES)}). {DATA_HELP}"
        )
    return root / layout, layout


def duplicate_names(classes: ClassList) -> dict[str, list[str]]:
    """{class name: [ids]} for names that several classes share (ImageNet: 'missile', 'sunglasses')."""
    by_name: dict[str, list[str]] = {}
    for class_id, name in zip(classes.ids, classes.names):
        by_name.setdefault(name, []).append(class_id)
    return {name: ids for name, ids in by_name.items() if len(ids) > 1}


def warn_duplicate_names(classes: ClassList) -> None:
    """One warning line naming the class names shared by several classes (their prompts coincide)."""
    shared = duplicate_names(classes)
    if shared:
        listing = "; ".join(f"'{name}' ({', '.join(ids)})" for name, ids in list(shared.items())[:5])
        warnings.warn(f"{len(shared)} class name(s) are shared by several classes, so their text prompts are "
                      f"identical: {listing}{' ...' if len(shared) > 5 else ''}", stacklevel=3)


def resolve_run_classes(
    data_root: PathLike,
    classnames_file: Optional[PathLike] = None,
    strict: bool = True,
    train_candidates: Sequence[str] = TRAIN_CANDIDATES,
    universe: Optional[ClassList] = None,
) -> ClassList:
    """The run's classes: universe ids present as train folders, in universe order.

    A train folder that is not a universe id raises `DataLayoutError` (or, with `strict=False`,
    is skipped with one warning naming it). Unusable entries (dangling symlinks, loops, archives)
    are skipped with one warning; class names shared by several classes warn once.
    `universe` replaces `load_universe(data_root, classnames_file)` (other families).
    """
    train_dir, _ = _train_dir(data_root, train_candidates)
    universe = universe if universe is not None else load_universe(data_root, classnames_file)
    listed, broken = list_class_folders(train_dir, set(universe.ids))
    if broken:
        warnings.warn(describe_broken(train_dir, broken) + "; skipped", stacklevel=2)
    folders = set(listed)
    if not folders:
        raise DataLayoutError(f"train split '{train_dir}' has no class folders (expected <class id>/<images>)")
    unknown = sorted(folders - set(universe.ids))
    if unknown:
        message = (
            f"{len(unknown)} folder(s) in '{train_dir}' are not class ids of the universe "
            f"({universe.source}, {len(universe)} classes): {_preview(unknown)}"
        )
        if strict:
            raise DataLayoutError(message + ". Remove them, pass --classnames FILE, or use strict=False to skip them.")
        warnings.warn(message + "; skipped", stacklevel=2)
    keep = [i for i, class_id in enumerate(universe.ids) if class_id in folders]
    if not keep:
        raise DataLayoutError(f"train split '{train_dir}' has no folder named after a class id of {universe.source}")
    classes = ClassList(
        [universe.ids[i] for i in keep], [universe.names[i] for i in keep], universe.ids, universe.source
    )
    warn_duplicate_names(classes)
    return classes


def train_samples(
    data_root: PathLike, classes: ClassList, train_candidates: Sequence[str] = TRAIN_CANDIDATES
) -> list[Sample]:
    """(path relative to data_root, run-class label) of every train image, sorted by path."""
    train_dir, layout = _train_dir(data_root, train_candidates)
    samples: list[Sample] = []
    empty = []
    for label, class_id in enumerate(classes.ids):
        folder = train_dir / class_id
        if not folder.is_dir():
            raise DataLayoutError(f"class folder '{folder}' is missing (class {label} of the run)")
        names = list_images(folder)
        if not names:
            empty.append(class_id)
        samples.extend((f"{layout}/{class_id}/{name}", label) for name in names)
    if empty:
        warnings.warn(f"{len(empty)} train class folder(s) in '{train_dir}' hold no images: {_preview(empty)}",
                      stacklevel=2)
    samples.sort()
    return samples


def _label_of_folder(
    spec: EvalSetSpec, folder: str, classes: ClassList, universe: set[str], scan: EvalScan
) -> Optional[int]:
    """Run label of a class folder; records unknown / out-of-range folders on `scan`."""
    if spec.numeric_folders:
        if not folder.isdigit():
            scan.unknown_folders.append(folder)
            return None
        index = int(folder)
        if index >= len(classes.universe):
            scan.out_of_range_folders.append(folder)
            return None
        class_id = classes.universe[index]
    else:
        class_id = folder
        if class_id not in universe:
            scan.unknown_folders.append(folder)
            return None
    scan.class_folders += 1
    if class_id not in classes.index:
        scan.outside_run_folders.append(folder)
    return classes.index.get(class_id)


def scan_eval_set(
    data_root: PathLike, name: str, classes: ClassList, specs: Optional[dict[str, EvalSetSpec]] = None
) -> EvalScan:
    """List one evaluation set and map it onto `classes` without warning or raising on data issues."""
    specs = EVAL_SET_SPECS if specs is None else specs
    if name not in specs:
        raise ValueError(f"unknown evaluation set {name!r}; choose from {', '.join(specs)}")
    spec = specs[name]
    scan = EvalScan(spec, universe_size=len(classes.universe))
    root = _check_root(data_root)
    layout = find_split_dir(root, spec.candidates)
    if layout is None:
        return scan
    scan.root, scan.layout = root / layout, layout
    scan.loose_images = len(list_images(scan.root))
    subset: set[int] = set()
    universe = set(classes.universe)
    folders, scan.broken = list_class_folders(scan.root, universe)
    for folder in folders:
        label = _label_of_folder(spec, folder, classes, universe, scan)
        names = list_images(scan.root / folder)
        scan.images += len(names)
        if label is None:
            scan.dropped += len(names)
            continue
        subset.add(label)
        scan.samples.extend((f"{layout}/{folder}/{n}", label) for n in names)
    scan.samples.sort()
    if spec.restricted:
        scan.subset = sorted(subset)
    return scan


def eval_split(
    data_root: PathLike, name: str, classes: ClassList, specs: Optional[dict[str, EvalSetSpec]] = None
) -> Optional[EvalSplit]:
    """An evaluation set mapped onto the run classes, or None (with one warning) when it is missing/unusable.

    An unsorted set (images directly in its root, e.g. raw ImageNet val) raises `DataLayoutError`.
    """
    return split_from_scan(scan_eval_set(data_root, name, classes, specs), data_root, len(classes))


def split_from_scan(scan: EvalScan, data_root: PathLike, run_classes: int) -> Optional[EvalSplit]:
    """The `EvalSplit` of a scan (warning about its problems), or None when it is missing or empty."""
    spec = scan.spec
    if not scan.found:
        warnings.warn(
            f"{spec.display_name} not found under '{data_root}' (looked for {', '.join(spec.candidates)}); skipped. "
            "See datasets/README.md.",
            stacklevel=2,
        )
        return None
    problems = scan.problems()
    if scan.broken:
        warnings.warn(describe_broken(scan.root, scan.broken) + "; skipped", stacklevel=2)
    if scan.unsorted:
        raise DataLayoutError(problems[0])
    if problems:
        warnings.warn(f"{spec.display_name}: " + "; ".join(problems), stacklevel=2)
    if not scan.samples:
        return None
    split = EvalSplit(spec.name, spec.display_name, scan.root, scan.samples, scan.subset, scan.dropped, run_classes)
    warn_few_classes(split)
    return split


def warn_few_classes(split: EvalSplit) -> None:
    """Warn when a restricted set's argmax is over fewer than `FEW_CLASSES_WARNING` classes."""
    if split.subset is not None and split.num_classes < FEW_CLASSES_WARNING:
        chance = 100.0 / max(split.num_classes, 1)
        warnings.warn(
            f"{split.display_name} is scored over only {split.num_classes} class(es) of the run (argmax restricted "
            f"to its classes; chance {chance:.0f}%{', every prediction is right' if split.num_classes == 1 else ''})",
            stacklevel=3,
        )


def eval_splits(
    data_root: PathLike, names: Sequence[str], classes: ClassList, specs: Optional[dict[str, EvalSetSpec]] = None
) -> list[EvalSplit]:
    """The evaluation sets among `names` that exist and hold run classes (each missing one warns once)."""
    return [split for split in (eval_split(data_root, name, classes, specs) for name in names) if split is not None]
