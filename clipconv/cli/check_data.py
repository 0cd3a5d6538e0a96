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

from ..data.imagenet import (
    DATA_HELP,
    EVAL_SET_SPECS,
    EVAL_SETS,
    TRAIN_CANDIDATES,
    ClassList,
    DataLayoutError,
    EvalScan,
    find_split_dir,
    load_universe,
    resolve_run_classes,
    scan_eval_set,
    train_samples,
)
from ..data.images import is_decodable, list_subdirs

__all__ = ["main", "build_parser", "DataCheck", "check_data_root"]

TRAIN_EXPECTED = (1_281_167, 1000)


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
    return f"{layout} ({'CoOp' if layout == candidates[0] else 'raw'} layout)"


def _verify(root: Path, paths: Sequence[str], what: str, report: DataCheck) -> None:
    from ..progress import progress

    bad = [p for p in progress(paths, desc=f"decoding {what}", unit="img") if not is_decodable(root / p)]
    if bad:
        shown = ", ".join(bad[:20]) + (f", ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
        report.warn(f"{what}: {len(bad)} undecodable file(s) will be skipped: {shown}")


def _check_train(root: Path, classnames: Optional[str], shots: int, verify: bool, report: DataCheck) -> ClassList:
    layout = find_split_dir(root, TRAIN_CANDIDATES)
    if layout is None:
        raise DataLayoutError(
            f"no ImageNet train split under '{root}' (looked for {', '.join(TRAIN_CANDIDATES)})"
        )
    universe = load_universe(root, classnames)
    unknown = sorted(set(list_subdirs(root / layout)) - set(universe.ids))
    if unknown:
        shown = ", ".join(unknown[:10]) + (f", ... ({len(unknown) - 10} more)" if len(unknown) > 10 else "")
        report.error(
            f"{root / layout}: {len(unknown)} folder(s) are not class ids of {universe.source}: {shown} "
            "(remove them or pass --classnames FILE)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classes = resolve_run_classes(root, classnames, strict=False)
        samples = train_samples(root, classes)
    per_class = Counter(label for _, label in samples)
    report.line(f"class universe: {len(universe)} classes from {universe.source}")
    report.line(
        f"train       {_layout_name(TRAIN_CANDIDATES, layout)}: {len(classes)} classes, {len(samples):,} images "
        f"(ImageNet-1k: {TRAIN_EXPECTED[1]} classes, {TRAIN_EXPECTED[0]:,} images)"
    )
    if not samples:
        report.error(f"train split '{root / layout}' holds no images")
    short = [f"{classes.ids[i]} ({per_class.get(i, 0)})" for i in range(len(classes)) if per_class.get(i, 0) < shots]
    if short and samples:
        shown = ", ".join(short[:10]) + (f", ... ({len(short) - 10} more)" if len(short) > 10 else "")
        report.warn(f"train: {len(short)} class(es) have fewer than {shots} images: {shown}")
    if verify:
        _verify(root, [p for p, _ in samples], "train", report)
    return classes


def _check_eval(root: Path, name: str, classes: ClassList, verify: bool, report: DataCheck) -> None:
    spec = EVAL_SET_SPECS[name]
    scan: EvalScan = scan_eval_set(root, name, classes)
    expected = f"(expected {spec.expected_classes} classes, {spec.expected_images:,} images)"
    if not scan.found:
        report.line(f"{spec.display_name:<11} missing {expected}")
        report.warn(f"{spec.display_name} not found (looked for {', '.join(spec.candidates)}); it will be skipped")
        return
    report.line(
        f"{spec.display_name:<11} {_layout_name(spec.candidates, scan.layout)}: {scan.class_folders} classes, "
        f"{scan.images:,} images, {len(scan.samples):,} in run classes, {scan.dropped:,} dropped {expected}"
    )
    for problem in scan.problems():
        if scan.unsorted or (not scan.samples and not scan.images):
            report.error(f"{spec.display_name}: {problem}")
        else:
            report.warn(f"{spec.display_name}: {problem}")
    if verify and scan.samples:
        _verify(root, [p for p, _ in scan.samples], spec.display_name, report)


def check_data_root(
    data_root: str, classnames: Optional[str] = None, shots: int = 16, verify: bool = False
) -> DataCheck:
    """Inspect every set under `data_root` and return the report."""
    report = DataCheck()
    root = Path(data_root)
    report.line(f"data root: {root.resolve()}")
    if not root.is_dir():
        report.error(f"data root '{root}' does not exist or is not a folder")
        return report
    try:
        classes = _check_train(root, classnames, shots, verify, report)
    except (DataLayoutError, FileNotFoundError, ValueError) as err:
        report.error(str(err))
        return report
    for name in EVAL_SETS:
        _check_eval(root, name, classes, verify, report)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="check_data.py",
        description="Check an ImageNet-family data root: layouts found, sizes, and everything wrong.",
        epilog="Exit code: 0 usable (warnings allowed), 1 errors, 2 bad arguments. Layouts: datasets/README.md.",
    )
    parser.add_argument("--data-root", required=True, help="folder holding imagenet/, imagenetv2/, ... (or raw layouts)")
    parser.add_argument("--classnames", default=None, help="'<id> <name>' file defining the class universe")
    parser.add_argument("--shots", type=int, default=16, help="warn about train classes with fewer images (16)")
    parser.add_argument("--verify", action="store_true", help="decode every image to find undecodable files")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shots <= 0:
        parser.error(f"--shots must be positive, got {args.shots}")
    if args.classnames is not None and not Path(args.classnames).is_file():
        parser.error(f"--classnames file '{args.classnames}' does not exist")
    report = check_data_root(args.data_root, args.classnames, args.shots, args.verify)
    print(report.render())
    if report.errors:
        print(
            f"\n{DATA_HELP}\nNo ImageNet at hand? The training and evaluation scripts take --demo, an offline mini "
            "benchmark that generates its own data."
        )
        return 1
    return 0
