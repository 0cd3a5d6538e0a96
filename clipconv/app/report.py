"""Results as Table-2-style markdown and CSV: one column per evaluation set of a suite, then the target average.

The columns come from a dataset family (`family.suite`, `family.display`); the defaults are ImageNet's
(ImageNet | -V2 | -Sketch | -A | -R), and `SUITE`, `DISPLAY`, `TARGETS` stay importable as the ImageNet
family's values (the paper's published numbers are the methods' own: `Method.published`).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from clipconv.data.family import ImageNetFamily

__all__ = ["SUITE", "DISPLAY", "TARGETS", "target_average", "results_row", "markdown_table"]

SUITE: tuple[str, ...] = ImageNetFamily.suite
DISPLAY: Mapping[str, str] = ImageNetFamily.display
TARGETS: tuple[str, ...] = SUITE[1:]


def _is_missing(value: Optional[float]) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def target_average(values: Mapping[str, float], targets: Sequence[str] = TARGETS) -> float:
    """Mean over the shifted sets `targets`; NaN unless all of them were evaluated (or there are none)."""
    picked = [values.get(name) for name in targets]
    if not picked or any(_is_missing(v) for v in picked):
        return float("nan")
    return sum(picked) / len(picked)


def results_row(
    metrics: Mapping[str, Mapping[str, float]], key: str = "top1", suite: Sequence[str] = SUITE
) -> dict[str, float]:
    """{set: accuracy} for the suite's sets present in `metrics`, plus "target_avg" (over suite[1:])."""
    row = {name: float(metrics[name][key]) for name in suite if name in metrics}
    row["target_avg"] = target_average(row, tuple(suite)[1:])
    return row


def _fmt(value: Optional[float], std: Optional[float] = None) -> str:
    if _is_missing(value):
        return "–"
    return f"{value:.2f} ± {std:.2f}" if std is not None and not math.isnan(std) else f"{value:.2f}"


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, float]]],
    stds: Optional[Mapping[str, Mapping[str, float]]] = None,
    columns: Sequence[str] = SUITE,
    display: Optional[Mapping[str, str]] = None,
    extra: Sequence[tuple[str, Mapping[str, str]]] = (),
) -> str:
    """One markdown table: a row per (label, {set: value}); '–' where a set was not evaluated.

    `columns`: the suite (source first); `display`: column titles by set name (default ImageNet's).
    A row without "target_avg" gets the mean over `columns[1:]`. `extra`: further columns after the
    target average, each (title, {label: cell text}).
    """
    titles = DISPLAY if display is None else display
    targets = tuple(columns)[1:]
    header = ["method"] + [titles.get(c, c) for c in columns] + ["target avg"] + [title for title, _ in extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, values in rows:
        spread = (stds or {}).get(label, {})
        cells = [_fmt(values.get(c), spread.get(c)) for c in columns]
        cells.append(_fmt(values.get("target_avg", target_average(values, targets)), spread.get("target_avg")))
        cells += [texts.get(label, "–") for _, texts in extra]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines) + "\n"

