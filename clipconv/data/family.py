"""Dataset families: where a benchmark's train images, classes and shifted evaluation sets come from.

A family bundles what the rest of clipconv needs to know about one benchmark: how to list the run's
classes, the train images the K-shot split is drawn from, the evaluation sets (in table order, the
first being the source domain, the others the shifted targets) with their display names and class
subsets, and the reference numbers published for it.

Adding a family: subclass `DatasetFamily`, implement the three listing methods, decorate the class with
`@register_family("name")` and make its constructor take keyword options only; `open_family(name,
**options)` then builds it for every entry point.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

from ..registry import Registry
from ..report import PUBLISHED_TABLE2
from .folder import Sample
from .imagenet import EVAL_SET_SPECS, ClassList, EvalSplit, eval_splits, resolve_run_classes, train_samples

__all__ = ["DatasetFamily", "ImageNetFamily", "FAMILIES", "register_family", "open_family", "family_names"]

PathLike = Union[str, Path]


class DatasetFamily(abc.ABC):
    """One benchmark: its classes, train images and evaluation suite (first set = source domain)."""

    name: ClassVar[str] = ""
    #: evaluation-set names in table order; the first is the source domain, the rest are targets
    suite: tuple[str, ...] = ()
    #: column titles for tables and plots, by evaluation-set name
    display: Mapping[str, str] = {}
    #: published reference numbers: {method name: {set name: top-1 %}} with the label saying where from
    published: Mapping[str, Mapping[str, float]] = {}
    published_label: str = ""

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

    def describe(self) -> dict[str, Any]:
        """What a run records about its data (config.json / table2.json)."""
        return {"family": self.name, "data_root": str(self.data_root)}


FAMILIES: Registry[type[DatasetFamily]] = Registry("dataset family")


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator adding a dataset family to the registry under `name`."""
    return FAMILIES.register(name)


def family_names() -> list[str]:
    return sorted(FAMILIES)


def open_family(name: str, **options: Any) -> DatasetFamily:
    """Build the registered family `name`; unknown names list the known ones."""
    return FAMILIES.lookup(name)(**options)


@register_family("imagenet")
class ImageNetFamily(DatasetFamily):
    """ImageNet-1k (or a class subset of it) and its shifted variants -V2, -Sketch, -A, -R."""

    suite = tuple(EVAL_SET_SPECS)
    display = {name: spec.display_name for name, spec in EVAL_SET_SPECS.items()}
    published = {method: dict(zip(tuple(EVAL_SET_SPECS), values)) for method, values in PUBLISHED_TABLE2.items()}
    published_label = "published (paper, ImageNet, ViT-B/16)"

    def __init__(self, data_root: PathLike, classnames: Optional[PathLike] = None) -> None:
        super().__init__(data_root)
        self.classnames = classnames

    def classes(self) -> ClassList:
        return resolve_run_classes(self.data_root, self.classnames)

    def train_samples(self, classes: ClassList) -> list[Sample]:
        return train_samples(self.data_root, classes)

    def eval_splits(self, names: Sequence[str], classes: ClassList) -> list[EvalSplit]:
        return eval_splits(self.data_root, names, classes)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "classnames": None if self.classnames is None else str(self.classnames)}
