"""Dataset families: where a benchmark's train images, classes and shifted evaluation sets come from.

A family bundles what the rest of clipconv needs to know about one benchmark: how to list the run's
classes, the train images the K-shot split is drawn from, the evaluation sets (in table order, the
first being the source domain, the others the shifted targets) with their display names and class
subsets, and the reference numbers published for it. Every sample path a family returns (train and
eval) is relative to `family.data_root`.

Registered families:
- `imagenet`: ImageNet-1k (or a class subset) and -V2/-Sketch/-A/-R under one data root
  (datasets/README.md); the paper's Table-2 numbers (each method's `published`) apply to it.
- `demo`: the procedural miniature world of clipconv/data/demo_world.py, generated on first use; sets
  source | v2 | sketch | adversarial | rendition; no published numbers.
- `folder`: bring your own data. A train folder of class sub-folders plus named evaluation folders
  (each a folder of class sub-folders); the suite is the evaluation sets in the order given, the first
  being the source (in-domain) column. A set holding only some of the classes is scored with the argmax
  restricted to its classes (like ImageNet-A/-R); a class folder the train folder lacks is an error.
  Class names: from a `<folder name> <class name>` file (like ImageNet's classnames.txt; its order is
  the label order) or from the folder names (sorted, underscores read as spaces).
- `wds` (clipconv/data/wds.py): CLIP_benchmark's webdataset shards of ImageNet and its variants
  (wds_imagenet1k, wds_imagenetv2, wds_imagenet_sketch, wds_imagenet-a, wds_imagenet-r under one root).

Adding a family:
1. Subclass `DatasetFamily` (or `TreeFamily` when the sets are class-folder trees: then give
   `train_candidates`, `specs` and `universe()` and the listing comes for free).
2. Set `suite` (set names in table order, source first), `display`, and `published_label` when the
   paper's numbers (the methods' `published`, keyed by ImageNet's set names) apply; implement `classes`, `train_samples`,
   `eval_splits` (and `describe` for what a run should record).
3. Decorate it with `@register_family("name")`; its constructor takes keyword options only.
   `open_family("name", **options)` then builds it for every entry point, and `check_data.py`
   checks it. Add a test building a small tree of it (see tests/test_families.py).
"""
from __future__ import annotations

import abc
import os
import re
import unicodedata
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Optional, Sequence, Union

from clipconv.config import DataConfig
from clipconv.data.demo_world import DOMAINS, TRAIN_DIRECTORY, WORLD_CLASSES, ensure_world, read_manifest, world_params
from clipconv.data.folder import Sample
from clipconv.data.imagenet import (
    DATA_HELP, EVAL_SET_SPECS, TRAIN_CANDIDATES, ClassList, DataLayoutError, EvalScan, EvalSetSpec, EvalSplit,
    load_universe, resolve_run_classes, scan_eval_set, split_from_scan, train_samples
)
from clipconv.data.images import list_class_folders
from clipconv.prompts import load_classnames_file
from clipconv.registry import Registry
from clipconv.runtime.jsontypes import JSONObject

__all__ = [
    "DatasetFamily",
    "TreeFamily",
    "ImageNetFamily",
    "DemoFamily",
    "FolderFamily",
    "FAMILIES",
    "register_family",
    "open_family",
    "family_names",
    "family_from_args",
    "family_from_config",
    "parse_eval_set",
    "IMAGENET_PUBLISHED_LABEL",
]

PathLike = Union[str, Path]
EvalRoots = Union[Mapping[str, PathLike], Sequence[tuple[str, PathLike]]]


class DatasetFamily(abc.ABC):
    """One benchmark: its classes, train images and evaluation suite (first set = source domain)."""

    name: ClassVar[str] = ""
    #: evaluation-set names in table order; the first is the source domain, the rest are targets
    suite: tuple[str, ...] = ()
    #: column titles for tables and plots, by evaluation-set name
    display: Mapping[str, str] = {}
    #: the label of the paper's Table-2 rows when its numbers apply to this family's data (they are the methods'
    #: own, `Method.published`, keyed by ImageNet's set names); "" = they do not apply
    published_label: str = ""
    #: the family --data-root alone selects (reports name the others)
    default: ClassVar[bool] = False
    #: selected only by name (`--family NAME`): the data flags (--data-root, --demo, --train-root) never pick it
    selected_by_name: ClassVar[bool] = False
    #: what check_data adds after `data_help` when the data has errors
    check_hint: ClassVar[str] = ""
    #: what to tell a user whose data does not fit (appended to layout errors)
    data_help: str = ""
    #: CLIP_benchmark's dataset name of each set, for its result files (default: the set's own name)
    benchmark_names: Mapping[str, str] = {}
    #: decode each drawn K-shot image and replace an undecodable one (False: the family cannot read single
    #: images cheaply before the draw, e.g. webdataset shards; a bad one is then skipped when read)
    verify_draws: bool = True

    def __init__(self, data_root: PathLike) -> None:
        self.data_root = Path(data_root)

    @property
    def targets(self) -> tuple[str, ...]:
        """The shifted evaluation sets (the suite without its source set)."""
        return self.suite[1:]

    @abc.abstractmethod
    def classes(self) -> ClassList:
        """The run's classes in label order."""

    @abc.abstractmethod
    def train_samples(self, classes: ClassList) -> list[Sample]:
        """(path relative to `data_root`, label) of every train image, sorted by path."""

    @abc.abstractmethod
    def eval_splits(self, names: Sequence[str], classes: ClassList) -> list[EvalSplit]:
        """The evaluation sets among `names` that exist and hold run classes (a missing one warns)."""

    def describe(self) -> JSONObject:
        """What a run records about its data (config.json / table2.json)."""
        return {"family": self.name, "data_root": str(self.data_root)}

    def benchmark_name(self, set_name: str) -> str:
        """The set's dataset name in CLIP_benchmark result files."""
        return self.benchmark_names.get(set_name, set_name)

    def dataset_templates(self) -> list[str]:
        """Prompt templates shipped with the data (`--templates dataset`); most families have none."""
        raise ValueError(f"--templates dataset: the {self.name or type(self).__name__} family ships no templates "
                         "file; use photo, clip80, tip or a file")


class TreeFamily(DatasetFamily):
    """A family whose splits are folders of class folders under `data_root` (ImageNet's listing code).

    Subclasses give the train split's candidate locations, one `EvalSetSpec` per set and the class
    universe; `train_expected` = (images, classes) of the full train split when known (check_data).
    """

    train_candidates: tuple[str, ...] = TRAIN_CANDIDATES
    train_expected: Optional[tuple[int, int]] = None
    #: an evaluation class folder that is not a run class is an error (True) or dropped and counted (False)
    eval_classes_must_be_trained: bool = False

    @property
    def specs(self) -> dict[str, EvalSetSpec]:
        raise NotImplementedError

    @abc.abstractmethod
    def universe(self) -> ClassList:
        """Every class id the family knows, in label order (the run classes are those with train folders)."""

    def classes(self) -> ClassList:
        return resolve_run_classes(self.data_root, train_candidates=self.train_candidates, universe=self.universe())

    def train_samples(self, classes: ClassList) -> list[Sample]:
        return train_samples(self.data_root, classes, self.train_candidates)

    def missing_train_error(self) -> str:
        """What check_data says when no train split is found."""
        return f"train folder '{self.data_root / self.train_candidates[0]}' does not exist"

    def scan(self, name: str, classes: ClassList) -> EvalScan:
        """List one evaluation set without warning (check_data reports what it finds)."""
        return scan_eval_set(self.data_root, name, classes, self.specs)

    def eval_splits(self, names: Sequence[str], classes: ClassList) -> list[EvalSplit]:
        splits = (split_from_scan(self.scan(name, classes), self.data_root, len(classes)) for name in names)
        return [split for split in splits if split is not None]


FAMILIES: Registry[type[DatasetFamily]] = Registry("dataset family")


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator adding a dataset family to the registry under `name`."""
    return FAMILIES.register(name)


def family_names() -> list[str]:
    return sorted(FAMILIES)


def open_family(name: str, **options: object) -> DatasetFamily:
    """Build the registered family `name`; unknown names list the known ones."""
    return FAMILIES.lookup(name)(**options)


# ------------------------------------------------------------------------------------------- imagenet
IMAGENET_SUITE = tuple(EVAL_SET_SPECS)
IMAGENET_PUBLISHED_LABEL = "published (paper, ImageNet, ViT-B/16)"


@register_family("imagenet")
class ImageNetFamily(TreeFamily):
    """ImageNet-1k (or a class subset of it) and its shifted variants -V2, -Sketch, -A, -R."""

    suite = IMAGENET_SUITE
    display = {name: spec.display_name for name, spec in EVAL_SET_SPECS.items()}
    default = True
    published_label = IMAGENET_PUBLISHED_LABEL
    data_help = DATA_HELP
    check_hint = ("No ImageNet at hand? The training and evaluation scripts take --demo, an offline mini "
                  "benchmark that generates its own data.")
    benchmark_names = {"imagenet": "imagenet1k", "imagenet_v2": "imagenetv2", "imagenet_sketch": "imagenet_sketch",
                       "imagenet_a": "imagenet-a", "imagenet_r": "imagenet-r"}
    train_candidates = TRAIN_CANDIDATES
    train_expected = (1_281_167, 1000)

    def __init__(self, data_root: PathLike, classnames: Optional[PathLike] = None) -> None:
        super().__init__(data_root)
        self.classnames = classnames

    @property
    def specs(self) -> dict[str, EvalSetSpec]:
        return EVAL_SET_SPECS

    def universe(self) -> ClassList:
        return load_universe(self.data_root, self.classnames)

    def classes(self) -> ClassList:
        return resolve_run_classes(self.data_root, self.classnames)

    def missing_train_error(self) -> str:
        return f"no ImageNet train split under '{self.data_root}' (looked for {', '.join(self.train_candidates)})"

    def describe(self) -> JSONObject:
        return {**super().describe(), "classnames": None if self.classnames is None else str(self.classnames)}


# ----------------------------------------------------------------------------------------------- demo
#: the demo world's sets in table order (ImageNet's: source, V2, Sketch, A, R)
DEMO_SUITE = ("source", "v2", "sketch", "adversarial", "rendition")


@register_family("demo")
class DemoFamily(TreeFamily):
    """The offline miniature world (clipconv/data/demo_world.py), generated on first use into the cache.

    `data_root`: a world directory (generated there when empty; an existing world is used as it is
    unless `world` options are given); default: the cache's world for these parameters. `world`:
    `ensure_world`'s options (seed, train_per_class, test_per_class, image_size).
    """

    suite = DEMO_SUITE
    display = {name: name for name in DEMO_SUITE}
    published_label = ""
    data_help = "The demo world is generated by clipconv.data.demo_world.ensure_world; delete a damaged one to regenerate it."

    def __init__(self, data_root: Optional[PathLike] = None, classnames: Optional[PathLike] = None,
                 **world: int) -> None:

        world_params(**world)  # unknown or bad options fail here, before any generation
        self._world = world

        self._root = None if data_root is None else Path(data_root).expanduser()
        self._ready: Optional[Path] = None
        self.classnames = classnames
        self.train_candidates = (TRAIN_DIRECTORY,)

    @property
    def data_root(self) -> Path:  # type: ignore[override]
        """The world's directory, generated on first use."""
        if self._ready is None:

            if self._root is not None and not self._world and read_manifest(self._root) is not None:
                self._ready = self._root
            else:
                self._ready = Path(ensure_world(self._root, **self._world))
        return self._ready

    def _params(self) -> dict:

        return (read_manifest(self.data_root) or {}).get("params", {})

    @property
    def train_expected(self) -> Optional[tuple[int, int]]:  # type: ignore[override]

        per_class = self._params().get("train_per_class", 0)
        return (per_class * len(WORLD_CLASSES), len(WORLD_CLASSES))

    @property
    def specs(self) -> dict[str, EvalSetSpec]:

        per_class = self._params().get("test_per_class", 0)
        return {
            name: EvalSetSpec(
                name, self.display[name], (DOMAINS[name].directory,), per_class * len(DOMAINS[name].classes),
                len(DOMAINS[name].classes), numeric_folders=DOMAINS[name].numeric_folders,
                restricted=len(DOMAINS[name].classes) < len(WORLD_CLASSES),
            )
            for name in self.suite
        }

    def universe(self) -> ClassList:
        return load_universe(self.data_root, self.classnames)

    def describe(self) -> JSONObject:
        return {**super().describe(), "world": self._params(),
                "classnames": None if self.classnames is None else str(self.classnames)}


# --------------------------------------------------------------------------------------------- folder
SET_NAME = re.compile(r"^[^\W_][\w.+-]*$")  # letters and digits of any script (NFC), then also _ . + -
RESERVED_SET_NAMES = ("target_avg",)
FOLDER_HELP = (
    "Bring your own data: --train-root DIR (one sub-folder of images per class) and one --eval-set NAME=DIR per "
    "test set (each a folder of class sub-folders named like the train ones; the first is the source column)."
)


def parse_eval_set(text: str) -> tuple[str, str]:
    """'NAME=DIR' → (NAME, DIR); a clear ValueError otherwise (names: letters and digits of any script, _ . + -)."""
    name, sep, directory = text.partition("=")
    name, directory = unicodedata.normalize("NFC", name.strip()), directory.strip()
    if not sep or not name or not directory:
        raise ValueError(f"expected NAME=DIR (e.g. sketch=/data/my_sketches), got '{text}'")
    _check_set_name(name)
    return name, directory


def _check_set_name(name: str) -> None:
    if not SET_NAME.fullmatch(name) or name in RESERVED_SET_NAMES:
        raise ValueError(
            f"evaluation-set name '{name}' must start with a letter or digit and hold only letters, digits, "
            f"'_', '.', '+', '-' (and not be {', '.join(RESERVED_SET_NAMES)})"
        )


def _pairs(eval_roots: Optional[EvalRoots]) -> list[tuple[str, Path]]:
    if eval_roots is None:
        return []
    items = list(eval_roots.items()) if isinstance(eval_roots, Mapping) else list(eval_roots)
    pairs, seen = [], set()
    for item in items:
        name, directory = (parse_eval_set(item) if isinstance(item, str) else item)
        name = unicodedata.normalize("NFC", str(name))
        _check_set_name(name)
        if name in seen:
            raise ValueError(f"--eval-set name '{name}' is given twice; give each evaluation set its own name")
        seen.add(name)
        pairs.append((str(name), Path(directory).expanduser()))
    return pairs


def _require_folder(path: Path, flag: str) -> None:
    if not path.exists():
        raise DataLayoutError(f"{flag} '{path}' does not exist. {FOLDER_HELP}")
    if not path.is_dir():
        raise DataLayoutError(f"{flag} '{path}' is a file, not a folder of class folders. {FOLDER_HELP}")


@register_family("folder")
class FolderFamily(TreeFamily):
    """Your own data: a train folder of class folders and named evaluation folders (first = source column).

    `eval_roots`: {name: folder} or [(name, folder), ...] in table order. `classnames`: optional file of
    `<folder name> <class name>` lines (its order is the label order; it may list more classes than
    the train folder holds); without it, the train folder's sub-folders in sorted order, named by their
    folder name with underscores read as spaces.
    """

    data_help = FOLDER_HELP
    eval_classes_must_be_trained = True

    def __init__(self, train_root: PathLike, eval_roots: Optional[EvalRoots] = None,
                 classnames: Optional[PathLike] = None) -> None:
        if train_root is None:
            raise DataLayoutError(f"the folder family needs --train-root. {FOLDER_HELP}")
        self.train_root = Path(train_root).expanduser()
        _require_folder(self.train_root, "--train-root")
        self.eval_roots = dict(_pairs(eval_roots))
        if not self.eval_roots:
            raise DataLayoutError(f"give at least one --eval-set NAME=DIR (the first is the source column). "
                                  f"{FOLDER_HELP}")
        for name, directory in self.eval_roots.items():
            _require_folder(directory, f"--eval-set {name}")
        if classnames is not None and not Path(classnames).is_file():
            raise FileNotFoundError(f"--classnames file '{classnames}' does not exist")
        self.classnames = classnames
        absolute = [os.path.abspath(p) for p in (self.train_root, *self.eval_roots.values())]
        super().__init__(os.path.commonpath(absolute))
        self.train_candidates = (os.path.relpath(absolute[0], self.data_root),)
        self.suite = tuple(self.eval_roots)
        self.display = {name: name for name in self.suite}
        self._specs = {
            name: EvalSetSpec(name, name, (os.path.relpath(path, self.data_root),), 0, 0, restricted=True)
            for name, path in zip(self.suite, absolute[1:])
        }

    @property
    def specs(self) -> dict[str, EvalSetSpec]:
        return self._specs

    def universe(self) -> ClassList:
        if self.classnames is not None:
            entries = load_classnames_file(self.classnames)
            ids = [class_id for class_id, _ in entries]
            folders, _ = list_class_folders(self.train_root, set(ids))
            unlisted = sorted(set(folders) - set(ids))
            if unlisted:
                raise DataLayoutError(
                    f"class folder(s) of --train-root '{self.train_root}' missing from --classnames '{self.classnames}': "
                    f"{', '.join(unlisted[:10])}{' ...' if len(unlisted) > 10 else ''}; the file needs one "
                    "'<folder name> <class name>' line per class folder"
                )
            return ClassList(ids, [name for _, name in entries], source=str(self.classnames))
        folders, _ = list_class_folders(self.train_root)
        if not folders:
            raise DataLayoutError(f"--train-root '{self.train_root}' has no class folders. {FOLDER_HELP}")
        return ClassList(folders, [folder.replace("_", " ") for folder in folders], source=str(self.train_root))

    def scan(self, name: str, classes: ClassList) -> EvalScan:
        scan = super().scan(name, classes)
        if scan.subset is not None and len(scan.subset) == len(classes):
            scan.subset = None  # holds every class: an ordinary set, not a restricted one
        return scan

    def eval_splits(self, names: Sequence[str], classes: ClassList) -> list[EvalSplit]:
        unknown = [name for name in names if name not in self.specs]
        if unknown:
            raise ValueError(f"unknown evaluation set(s) {unknown}; this data has {', '.join(self.suite)}")
        splits = []
        for name in names:
            scan = self.scan(name, classes)
            untrained = sorted(scan.unknown_folders + scan.outside_run_folders)
            if untrained:
                raise DataLayoutError(
                    f"--eval-set {name}='{self.eval_roots[name]}' has class folder(s) the train folder "
                    f"'{self.train_root}' lacks: {', '.join(untrained[:10])}{' ...' if len(untrained) > 10 else ''}; "
                    "remove them or add train images for them"
                )
            if scan.unsorted:
                raise DataLayoutError(f"--eval-set {name}='{self.eval_roots[name]}' holds images but no class "
                                      f"folders. {FOLDER_HELP}")
            split = split_from_scan(scan, self.data_root, len(classes))
            if split is not None:
                splits.append(split)
        return splits

    def describe(self) -> JSONObject:
        return {**super().describe(), "train_root": str(self.train_root),
                "eval_roots": {name: str(path) for name, path in self.eval_roots.items()},
                "classnames": None if self.classnames is None else str(self.classnames)}


# ---------------------------------------------------------------------------------------- entry points
def family_from_args(
    data_root: Optional[PathLike] = None,
    demo: bool = False,
    train_root: Optional[PathLike] = None,
    eval_roots: Optional[EvalRoots] = None,
    classnames: Optional[PathLike] = None,
) -> DatasetFamily:
    """The family the command-line flags select: --demo, --train-root/--eval-set (folder) or --data-root
    (ImageNet). Conflicting or missing flags raise a ValueError naming them."""
    if eval_roots and train_root is None:
        raise ValueError("--eval-set needs --train-root (the folder family); ImageNet's sets are found under --data-root")
    if train_root is not None:
        if demo or data_root is not None:
            raise ValueError(f"--train-root cannot be combined with {'--demo' if demo else '--data-root'}: "
                             "give either your own folders or a benchmark")
        return open_family("folder", train_root=train_root, eval_roots=eval_roots, classnames=classnames)
    if demo:
        return open_family("demo", data_root=data_root, classnames=classnames)
    if data_root is None:
        raise ValueError(f"no data given: pass --data-root (ImageNet), --train-root with --eval-set NAME=DIR "
                         f"(your own folders) or --demo. {DATA_HELP}")
    return open_family("imagenet", data_root=data_root, classnames=classnames)


def family_from_config(data: DataConfig) -> DatasetFamily:
    """The dataset family of `data` (a run's data settings): the family the flags select (`family_from_args`)
    when `data.family` is unset or one of those, else the named family with the data root and class names."""
    if data.family in (None, "imagenet", "demo", "folder"):
        if data.family == "folder" and data.train_root is None:
            raise ValueError("--family folder needs --train-root DIR and --eval-set NAME=DIR")
        return family_from_args(data.data_root, data.family == "demo", data.train_root, data.eval_roots or None,
                                data.classnames)
    options = {"data_root": data.data_root, "classnames": data.classnames}
    return open_family(data.family, **{k: v for k, v in options.items() if v is not None})
