"""Results as Table-2-style markdown and CSV: one column per evaluation set of a suite, then the target average.

The columns come from a dataset family (`family.suite`, `family.display`); the defaults are ImageNet's
(ImageNet | -V2 | -Sketch | -A | -R), and `SUITE`, `DISPLAY`, `TARGETS` stay importable as the ImageNet
family's values (the paper's published numbers are the methods' own: `Method.published`).

The target average follows ONE rule for every family (`TARGET_RULE`): the mean top-1 over the target sets the
run asked for (`averaged_targets`: --eval-sets, by default every set of the suite but the source), "–" when one
of them was not evaluated (or none was asked for). Every table states it for its run (`target_note`).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from clipconv.data.family import ImageNetFamily

__all__ = ["SUITE", "DISPLAY", "TARGETS", "TARGET_RULE", "target_average", "averaged_targets", "target_note",
           "results_row", "markdown_table"]

SUITE: tuple[str, ...] = ImageNetFamily.suite
DISPLAY: Mapping[str, str] = ImageNetFamily.display
TARGETS: tuple[str, ...] = SUITE[1:]
TARGET_RULE = ("the mean over the target sets the run asked for (--eval-sets; by default every set but the source), "
               "'–' when one of them was not evaluated")


def _is_missing(value: Optional[float]) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def target_average(values: Mapping[str, float], targets: Sequence[str] = TARGETS) -> float:
    """Mean over the shifted sets `targets`; NaN unless all of them were evaluated (or there are none)."""
    picked = [values.get(name) for name in targets]
    if not picked or any(_is_missing(v) for v in picked):
        return float("nan")
    return sum(picked) / len(picked)


def averaged_targets(targets: Sequence[str], asked: Optional[Sequence[str]]) -> tuple[str, ...]:
    """The target sets the target average is over: `targets` (a suite without its source set, in table
    order) that the run asked for (`asked`: --eval-sets; None = the whole suite)."""
    return tuple(name for name in targets if asked is None or name in asked)


def target_note(targets: Sequence[str], asked: Optional[Sequence[str]], evaluated: Sequence[str],
                display: Optional[Mapping[str, str]] = None) -> str:
    """One line for under a results table: which sets its "target avg" is the mean of, or why it is "–"
    (`targets`: the suite's target sets; `asked`: --eval-sets or None; `evaluated`: the sets scored)."""
    titles = display or {}

    def names(sets: Sequence[str]) -> str:
        return ", ".join(titles.get(name, name) for name in sets)

    over = averaged_targets(targets, asked)
    if not over:
        why = "the suite has no target set" if asked is None else f"--eval-sets asks only for {names(asked)}"
        return f"target avg: – (no target set: {why}); it is {TARGET_RULE}."
    missing = [name for name in over if name not in evaluated]
    if missing:
        return (f"target avg: – because {names(missing)} {'was' if len(missing) == 1 else 'were'} not evaluated "
                f"(missing, or no run class); it is {TARGET_RULE} — here {names(over)}. Give --eval-sets without "
                f"{'it' if len(missing) == 1 else 'them'} to average the others.")
    left = [name for name in targets if name not in over]
    return (f"target avg: the mean of {names(over)}" + (f" (the sets --eval-sets asked for; not asked: {names(left)})"
                                                        if left else " (every target set)") + ".")


def results_row(
    metrics: Mapping[str, Mapping[str, float]], key: str = "top1", suite: Sequence[str] = SUITE,
    asked: Optional[Sequence[str]] = None,
) -> dict[str, float]:
    """{set: accuracy} for the suite's sets present in `metrics`, plus "target_avg" (over the asked targets)."""
    row = {name: float(metrics[name][key]) for name in suite if name in metrics}
    row["target_avg"] = target_average(row, averaged_targets(tuple(suite)[1:], asked))
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

