"""check_data: one pass over a data root; report where each set is, its size, and everything wrong.

Exit code 0 when the data is usable for training (warnings allowed), 1 when there are errors,
2 for bad arguments.
"""
from __future__ import annotations

import argparse
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch

from clipconv.app.cli.common import eval_set_arg, plain_warnings
from clipconv.app.cli.options import add_runtime_args, apply_runtime, runtime_from
from clipconv.data import image_dataset
from clipconv.data.family import FAMILIES, DatasetFamily, TreeFamily, family_from_args, family_names, open_family
from clipconv.data.folder import BadImage
from clipconv.data.imagenet import (
    ClassList, DataLayoutError, EvalScan, duplicate_names, find_split_dir, resolve_run_classes
)
from clipconv.data.images import describe_broken, is_decodable, list_class_folders
from clipconv.runtime.progress import progress

__all__ = ["main", "build_parser", "DataCheck", "check_data_root", "check_family"]


class DataCheck:
    """Collects report lines, errors (data unusable) and warnings (usable, but worth knowing)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    def error(self, text: str) -> None:
        self.errors.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def render(self) -> str:
        out = list(self.lines)
        out += [f"ERROR: {e}" for e in self.errors] + [f"WARNING: {w}" for w in self.warnings]
        verdict = "NOT usable" if self.errors else "usable"
        out.append(f"{verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(out)


def _layout_name(candidates: Sequence[str], layout: str) -> str:
    if len(candidates) == 1:
        return layout
    return f"{layout} ({'CoOp' if layout == candidates[0] else 'raw'} layout)"


def _verify(root: Path, paths: Sequence[str], what: str, report: DataCheck) -> None:

    bad = [p for p in progress(paths, desc=f"decoding {what}", unit="img") if not is_decodable(root / p)]
    if bad:
        shown = ", ".join(bad[:20]) + (f", ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
        report.warn(f"{what}: {len(bad)} undecodable file(s) will be skipped: {shown}")


def _preview(items: Sequence[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _check_train(family: TreeFamily, shots: int, verify: bool, report: DataCheck) -> ClassList:
    root = family.data_root
    layout = find_split_dir(root, family.train_candidates)
    if layout is None:
        raise DataLayoutError(family.missing_train_error())
    universe = family.universe()
    folders, broken = list_class_folders(root / layout, set(universe.ids))
    unknown = sorted(set(folders) - set(universe.ids))
    if unknown:
        report.error(
            f"{root / layout}: {len(unknown)} folder(s) are not class ids of {universe.source}: {_preview(unknown)} "
            "(remove them or pass --classnames FILE)"
        )
    if broken:
        report.error(describe_broken(root / layout, broken) + " (they will be skipped: fix or remove them)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classes = resolve_run_classes(root, strict=False, train_candidates=family.train_candidates, universe=universe)
        samples = family.train_samples(classes)
    per_class = Counter(label for _, label in samples)
    report.line(f"class universe: {len(universe)} classes from {universe.source}")
    expected = family.train_expected
    report.line(
        f"train       {_layout_name(family.train_candidates, layout)}: {len(classes)} classes, {len(samples):,} images"
        + (f" (expected {expected[1]} classes, {expected[0]:,} images)" if expected and expected[0] else "")
    )
    if not samples:
        report.error(f"train split '{root / layout}' holds no images")
    short = [f"{classes.ids[i]} ({per_class.get(i, 0)})" for i in range(len(classes)) if per_class.get(i, 0) < shots]
    if short and samples:
        report.warn(f"train: {len(short)} class(es) have fewer than {shots} images: {_preview(short)}")
    shared = duplicate_names(classes)
    if shared:
        report.warn(f"{len(shared)} class name(s) are shared by several classes (identical prompts): "
                    + "; ".join(f"'{name}' ({', '.join(ids)})" for name, ids in shared.items()))
    if verify:
        _verify(root, [p for p, _ in samples], "train", report)
    return classes


def _check_eval(family: TreeFamily, name: str, classes: ClassList, verify: bool, report: DataCheck) -> None:
    scan: EvalScan = family.scan(name, classes)
    spec = scan.spec
    expected = f"(expected {spec.expected_classes} classes, {spec.expected_images:,} images)" if spec.expected_images else ""
    if not scan.found:
        report.line(f"{spec.display_name:<11} missing {expected}".rstrip())
        report.warn(f"{spec.display_name} not found (looked for {', '.join(spec.candidates)}); it will be skipped")
        return
    scored = f", scored over {len(scan.subset)} class(es)" if scan.subset is not None else ""
    report.line(
        f"{spec.display_name:<11} {_layout_name(spec.candidates, scan.layout)}: {scan.class_folders} classes, "
        f"{scan.images:,} images, {len(scan.samples):,} in run classes, {scan.dropped:,} dropped{scored} {expected}".rstrip()
    )
    if scan.broken:
        report.error(f"{spec.display_name}: " + describe_broken(scan.root, scan.broken)
                     + " (they will be skipped: fix or remove them)")
    untrained = sorted(scan.unknown_folders + scan.outside_run_folders)
    if family.eval_classes_must_be_trained and untrained:
        report.error(f"{spec.display_name}: class folder(s) the train folder lacks: {_preview(untrained)}")
    for problem in scan.problems():
        if scan.unsorted or (not scan.samples and not scan.images):
            report.error(f"{spec.display_name}: {problem}")
        elif not (family.eval_classes_must_be_trained and scan.unknown_folders and "are not" in problem):
            report.warn(f"{spec.display_name}: {problem}")
    if verify and scan.samples:
        _verify(family.data_root, [p for p, _ in scan.samples], spec.display_name, report)


def check_family(family: DatasetFamily, shots: int = 16, verify: bool = False) -> DataCheck:
    """Inspect the train split and every evaluation set of a family and return the report."""
    report = DataCheck()
    if not isinstance(family, TreeFamily):
        return _check_listed(family, shots, verify, report)
    root = family.data_root
    report.line(f"data root: {root.resolve()}" + ("" if family.default else f" ({family.name} family)"))
    if not root.is_dir():
        report.error(f"data root '{root}' does not exist or is not a folder")
        return report
    try:
        classes = _check_train(family, shots, verify, report)
    except (DataLayoutError, FileNotFoundError, ValueError) as err:
        report.error(str(err))
        return report
    for name in family.suite:
        _check_eval(family, name, classes, verify, report)
    return report


def _decode_all(family: DatasetFamily, samples: Sequence, what: str, report: DataCheck) -> None:
    """Decode every image of `samples` with the family's reader; undecodable ones are a warning."""


    dataset = image_dataset(family.data_root, samples, None)
    items = dataset if isinstance(dataset, torch.utils.data.IterableDataset) else (dataset[i] for i in range(len(dataset)))
    bad = [item.path for item in progress(items, desc=f"decoding {what}", unit="img", total=len(samples))
           if isinstance(item, BadImage)]
    if bad:
        report.warn(f"{what}: {len(bad)} undecodable image(s) will be skipped: {_preview(bad, 20)}")


def _own_finding(warning: warnings.WarningMessage) -> bool:
    """A finding clipconv reported about the data (its warnings are plain UserWarnings), not Python's or a
    library's own kind of warning (ResourceWarning "unclosed file", DeprecationWarning, ...)."""
    return warning.category is UserWarning


def _check_listed(family: DatasetFamily, shots: int, verify: bool, report: DataCheck) -> DataCheck:
    """A family that is not a class-folder tree (webdataset shards): list it through its own interface."""
    report.line(f"data root: {family.data_root.resolve()} ({family.name} family)")
    try:
        classes = family.classes()
        samples = family.train_samples(classes)
        per_class = Counter(label for _, label in samples)
        report.line(f"class universe: {len(classes)} classes from {classes.source}")
        report.line(f"train       {len(per_class)} classes, {len(samples):,} images")
        short = [f"{classes.names[i]} ({per_class.get(i, 0)})" for i in range(len(classes)) if per_class.get(i, 0) < shots]
        if short:
            report.warn(f"train: {len(short)} class(es) have fewer than {shots} images: {_preview(short)}")
        if verify:
            _decode_all(family, samples, "train", report)
        for name in family.suite:
            display = family.display.get(name, name)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                splits = family.eval_splits([name], classes)
            for warning in caught:
                if _own_finding(warning):
                    report.warn(str(warning.message))
                else:  # e.g. a library's ResourceWarning: shown as Python shows it, not counted as a finding
                    warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            if not splits:
                report.line(f"{display:<11} missing")
                continue
            split = splits[0]
            scored = f", scored over {len(split.subset)} class(es)" if split.subset is not None else ""
            report.line(f"{display:<11} {len(split):,} images in run classes, {split.dropped:,} dropped{scored}")
            if verify:
                _decode_all(family, split.samples, display, report)
    except (DataLayoutError, FileNotFoundError, ValueError) as err:
        report.error(str(err))
    return report


def check_data_root(
    data_root: str, classnames: Optional[str] = None, shots: int = 16, verify: bool = False
) -> DataCheck:
    """Inspect every set of an ImageNet-family data root (the family --data-root selects) and return the report."""
    return check_family(family_from_args(data_root, classnames=classnames), shots, verify)


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="check_data.py",
        description="Check a dataset (ImageNet data root, --demo world, or your own --train-root/--eval-set "
                    "folders): layouts found, sizes, and everything wrong.",
        epilog="Exit code: 0 usable (warnings allowed), 1 errors, 2 bad arguments. Layouts: datasets/README.md.",
    )
    parser.add_argument("--data-root", default=None,
                        help="folder holding imagenet/, imagenetv2/, ... (or raw layouts); with --demo: a world folder")
    parser.add_argument("--demo", action="store_true", help="check the miniature demo world (generated on first use)")
    parser.add_argument("--train-root", default=None, help="your own data: a folder of class folders of train images")
    parser.add_argument("--eval-set", action="append", type=eval_set_arg, default=None, metavar="NAME=DIR",
                        help="your own data: a named test folder of class folders (repeatable; the first is the source)")
    parser.add_argument("--family", default=None, choices=[n for n in family_names() if FAMILIES[n].selected_by_name],
                        help="wds: CLIP_benchmark's webdataset shards under --data-root (wds_imagenet1k, ...)")
    parser.add_argument("--classnames", default=None, help="'<id> <name>' file defining the class universe "
                        "('<id><TAB><name>' lines for ids with spaces)")
    parser.add_argument("--shots", type=int, default=16, help="warn about train classes with fewer images (16)")
    parser.add_argument("--verify", action="store_true", help="decode every image to find undecodable files")
    parser.set_defaults(_runtime=add_runtime_args(parser))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    plain_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_runtime(runtime_from(args, args._runtime, parser))
    if args.shots <= 0:
        parser.error(f"--shots must be positive, got {args.shots}")
    if args.classnames is not None and not Path(args.classnames).is_file():
        parser.error(f"--classnames file '{args.classnames}' does not exist")
    if args.data_root is None and not args.demo and args.train_root is None:
        parser.error("give --data-root DIR (ImageNet), --train-root DIR with --eval-set NAME=DIR, or --demo")
    try:
        if args.family is not None:
            if args.data_root is None or args.demo or args.train_root is not None:
                raise ValueError(f"--family {args.family} takes --data-root only")

            family = open_family(args.family, data_root=args.data_root, classnames=args.classnames)
        else:
            family = family_from_args(args.data_root, args.demo, args.train_root, args.eval_set, args.classnames)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    report = check_family(family, args.shots, args.verify)
    print(report.render())
    if report.errors:
        print(f"\n{family.data_help}")
        if family.check_hint:
            print(family.check_hint)
        return 1
    return 0
