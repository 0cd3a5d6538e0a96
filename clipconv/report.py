"""Results as Table-2-style markdown and CSV: ImageNet | -V2 | -Sketch | -A | -R | target average."""
from __future__ import annotations

import csv
import io
import math
from typing import Mapping, Optional, Sequence

__all__ = ["SUITE", "DISPLAY", "TARGETS", "PUBLISHED_TABLE2", "target_average", "results_row", "markdown_table", "csv_table"]

SUITE = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
DISPLAY = {"imagenet": "ImageNet", "imagenet_v2": "-V2", "imagenet_sketch": "-Sketch", "imagenet_a": "-A", "imagenet_r": "-R"}
TARGETS = SUITE[1:]

# Convpass paper, Table 2 (ViT-B/16 CLIP, 16 shots): top-1 % on ImageNet / -V2 / -Sketch / -A / -R.
PUBLISHED_TABLE2 = {
    "zero_shot": (66.73, 60.83, 46.15, 47.77, 73.96),
    "linear_probe": (65.85, 56.26, 34.77, 35.68, 58.43),
    "coop": (71.51, 64.20, 47.99, 49.71, 75.21),
    "cocoop": (71.02, 64.07, 48.75, 50.63, 76.18),
    "tip_adapter_f": (73.41, 65.39, 48.58, 49.23, 77.54),
    "convpass": (74.23, 66.61, 49.10, 49.27, 78.17),
}


def target_average(values: Mapping[str, float]) -> float:
    """Mean over the four shifted sets; NaN unless all four were evaluated."""
    picked = [values.get(name) for name in TARGETS]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in picked):
        return float("nan")
    return sum(picked) / len(picked)


def results_row(metrics: Mapping[str, Mapping[str, float]], key: str = "top1") -> dict[str, float]:
    """{set: accuracy} for the suite's sets present in `metrics`, plus "target_avg"."""
    row = {name: float(metrics[name][key]) for name in SUITE if name in metrics}
    row["target_avg"] = target_average(row)
    return row


def _fmt(value: Optional[float], std: Optional[float] = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f} ± {std:.2f}" if std is not None and not math.isnan(std) else f"{value:.2f}"


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, float]]],
    stds: Optional[Mapping[str, Mapping[str, float]]] = None,
    columns: Sequence[str] = SUITE,
) -> str:
    """One markdown table: a row per (label, {set: value}); '–' where a set was not evaluated."""
    header = ["method"] + [DISPLAY.get(c, c) for c in columns] + ["target avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, values in rows:
        spread = (stds or {}).get(label, {})
        cells = [_fmt(values.get(c), spread.get(c)) for c in columns]
        cells.append(_fmt(values.get("target_avg", target_average(values)), spread.get("target_avg")))
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[tuple[str, Mapping[str, float]]], columns: Sequence[str] = SUITE) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", *columns, "target_avg"])
    for label, values in rows:
        writer.writerow([label, *(values.get(c, "") for c in columns), values.get("target_avg", target_average(values))])
    return buffer.getvalue()
