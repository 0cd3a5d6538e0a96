"""PNG figures of Table-2 results: accuracy per method and domain (bars), accuracy against the number of shots.

Both take the dict that `clipconv.app.table2.run_table2` returns (and writes as table2.json): its
"measured" entry maps a method to {"label", "mean": {column: top-1}, "std": {column: std}, "seeds"}.
matplotlib is imported (with the Agg backend) only when a figure is drawn, never at import of clipconv.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from clipconv.app.report import DISPLAY, SUITE
from clipconv.runtime.outputs import atomic_path

__all__ = ["BAR_COLUMNS", "SHOTS_COLUMNS", "column_label", "accuracy_bars", "accuracy_vs_shots", "robustness_sweep",
           "LOGIT_CLIP"]

BAR_COLUMNS = (*SUITE, "target_avg")
SHOTS_COLUMNS = (SUITE[0], "target_avg")  # ImageNet's source set and the target average
PathLike = Union[str, Path]
#: accuracies (fractions) are clipped into [LOGIT_CLIP, 1 − LOGIT_CLIP] for the logit axes (0 % and 100 % are ±∞)
LOGIT_CLIP = 1e-3


def column_label(column: str) -> str:
    """Display name of a result column ("imagenet" → "ImageNet", "target_avg" → "target avg")."""
    return DISPLAY.get(column, "target avg" if column == "target_avg" else column)


def _pyplot():
    import matplotlib  # heavy (~0.5 s); only the plotting commands need it

    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt  # heavy; imported after choosing the Agg backend

    return plt


def _measured(table: Mapping[str, Any], where: str) -> Mapping[str, Mapping[str, Any]]:
    measured = table.get("measured") if isinstance(table, Mapping) else None
    if not isinstance(measured, Mapping) or not measured:
        raise ValueError(f"{where}: the table has no measured methods (expected run_table2's result / table2.json)")
    return measured


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _save(fig: Any, path: PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def accuracy_bars(table: Mapping[str, Any], path: PathLike, title: Optional[str] = None,
                  columns: Sequence[str] = BAR_COLUMNS) -> Path:
    """Grouped bar chart: a group per domain column, a bar per method (mean top-1 over seeds), error bars =
    std over seeds when a method ran with several seeds; written to `path` (PNG, atomically)."""
    measured = _measured(table, "accuracy_bars")
    present = [c for c in columns if any(_finite(m.get("mean", {}).get(c)) for m in measured.values())]
    if not present:
        raise ValueError(f"accuracy_bars: no method has a value in any of the columns {list(columns)}")
    plt = _pyplot()
    methods = list(measured.values())
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(min(13.0, max(7.0, len(present) * (0.8 + 0.18 * len(methods)))), 4.5))
    try:
        for index, method in enumerate(methods):
            mean, std = method.get("mean", {}), method.get("std", {})
            several = len(method.get("seeds", ())) > 1
            heights = [mean.get(c, math.nan) for c in present]
            errors = [std.get(c, 0.0) if several and _finite(std.get(c)) else 0.0 for c in present]
            offsets = [x - 0.4 + width * (index + 0.5) for x in range(len(present))]
            ax.bar(offsets, heights, width, yerr=errors if several else None, capsize=2,
                   label=method.get("label", "?"))
        ax.set_xticks(range(len(present)), [column_label(c) for c in present])
        ax.set_ylabel("top-1 accuracy (%)")
        seeds = sorted({s for m in methods for s in m.get("seeds", ())})
        spread = f"; error bars: std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
        ax.set_title((title or "Top-1 accuracy per method and domain") + spread, fontsize=10)
        ax.set_ylim(0, 100 if max(_max_top(methods, present), 0) > 60 else None)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=min(4, len(methods)), loc="upper center", bbox_to_anchor=(0.5, -0.08),
                  frameon=False)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _max_top(methods: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> float:
    values = [m.get("mean", {}).get(c) for m in methods for c in columns]
    return max((v for v in values if _finite(v)), default=0.0)


def accuracy_vs_shots(results_by_shots: Mapping[int, Mapping[str, Any]], path: PathLike,
                      domain_columns: Sequence[str] = SHOTS_COLUMNS, title: Optional[str] = None) -> Path:
    """Top-1 against K (log2 x axis): a subplot per domain column (default: ImageNet = the source set, and the
    target average), a line per method (std over seeds as a band when there are several); PNG, atomically."""
    if len(results_by_shots) < 1:
        raise ValueError("accuracy_vs_shots: no results given (expected {shots: run_table2 result})")
    bad = [k for k in results_by_shots if not isinstance(k, int) or isinstance(k, bool) or k < 1]
    if bad:
        raise ValueError(f"accuracy_vs_shots: shots must be positive integers, got {bad}")
    if not domain_columns:
        raise ValueError("accuracy_vs_shots: give at least one domain column")
    shots = sorted(results_by_shots)
    curves: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for k in shots:
        for name, method in _measured(results_by_shots[k], f"accuracy_vs_shots ({k} shots)").items():
            label = method.get("label", name)
            several = len(method.get("seeds", ())) > 1
            for column in domain_columns:
                value = method.get("mean", {}).get(column)
                if _finite(value):
                    spread = method.get("std", {}).get(column, 0.0) if several else 0.0
                    curves.setdefault(label, {}).setdefault(column, []).append(
                        (k, value, spread if _finite(spread) else 0.0))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(domain_columns), figsize=(5.0 * len(domain_columns), 4.2), sharey=True,
                             squeeze=False)
    try:
        for ax, column in zip(axes[0], domain_columns):
            for label, by_column in curves.items():
                points = by_column.get(column, [])
                if not points:
                    continue
                xs, ys, ss = zip(*points)
                constant = len(set(ys)) == 1 and len(ys) > 1  # e.g. zero-shot: no training images used
                line, = ax.plot(xs, ys, marker="o", label=label, linestyle="--" if constant else "-")
                if any(ss):
                    ax.fill_between(xs, [y - s for y, s in zip(ys, ss)], [y + s for y, s in zip(ys, ss)],
                                    color=line.get_color(), alpha=0.15, linewidth=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(shots, [str(k) for k in shots])
            ax.minorticks_off()
            ax.set_xlabel("training images per class (shots)")
            name = column_label(column)
            ax.set_title(f"{name} (source)" if column == domain_columns[0] else name, fontsize=10)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("top-1 accuracy (%)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, ncol=min(4, max(1, len(labels))), loc="lower center",
                   bbox_to_anchor=(0.5, -0.02 - 0.05 * math.ceil(len(labels) / 4)), frameon=False)
        fig.suptitle(title or "Top-1 accuracy against the number of shots", fontsize=11)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _accuracy_pair(where: str, value: Any) -> tuple[float, float]:
    try:
        source, target = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"robustness_sweep: {where} must be (source top-1 %, target average %), got {value!r}") from None
    for v in (source, target):
        if not (math.isfinite(v) and 0.0 <= v <= 100.0):
            raise ValueError(f"robustness_sweep: {where} has an accuracy outside [0, 100] %: {value!r}")
    return source, target


def _logit_fraction(percent: float) -> float:
    return min(max(percent / 100.0, LOGIT_CLIP), 1.0 - LOGIT_CLIP)


def robustness_sweep(points: Mapping[float, Sequence[float]], path: PathLike, title: Optional[str] = None,
                     references: Optional[Mapping[str, Sequence[float]]] = None,
                     source_name: str = "ImageNet", target_name: str = "target avg") -> Path:
    """Effective-robustness view of a WiSE-FT sweep: x = source top-1, y = target average (both in %), on logit
    axes (accuracies as fractions, `set_xscale("logit")`; Taori et al., 2020, Figure 1; Wortsman et al., 2022).

    `points` maps each mixing coefficient α to (source %, target %): drawn as one line in α order, each point
    labelled "α=…"; `references` maps labels (e.g. "zero-shot", "Tip-Adapter") to (source %, target %), drawn
    as separate labelled markers. 0 % and 100 % are drawn at LOGIT_CLIP from the edge. PNG, written atomically.
    """
    if not points:
        raise ValueError("robustness_sweep: no points given (expected {alpha: (source top-1 %, target avg %)})")
    sweep = []
    for alpha, value in points.items():
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
            raise ValueError(f"robustness_sweep: alpha must be a finite number, got {alpha!r}")
        sweep.append((float(alpha), *_accuracy_pair(f"the point of alpha {alpha}", value)))
    sweep.sort()
    refs = [(str(label), *_accuracy_pair(f"reference '{label}'", value)) for label, value in (references or {}).items()]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    try:
        xs = [_logit_fraction(s) for _, s, _ in sweep]
        ys = [_logit_fraction(t) for _, _, t in sweep]
        ax.plot(xs, ys, marker="o", label="WiSE-FT: θ(α) = (1−α)·θ₀ + α·θ₁")
        for (alpha, _, _), x, y in zip(sweep, xs, ys):
            ax.annotate(f"α={alpha:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        markers = "s^Dvp*hX"
        for index, (label, source, target) in enumerate(refs):
            x, y = _logit_fraction(source), _logit_fraction(target)
            ax.plot([x], [y], marker=markers[index % len(markers)], linestyle="none", markersize=8, label=label)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
        from matplotlib.ticker import FuncFormatter, NullFormatter  # heavy; plots only

        percent = FuncFormatter(lambda value, _: f"{100 * value:.4g}%")
        for axis, set_scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
            set_scale("logit")
            axis.set_major_formatter(percent)
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{source_name} top-1 (source; logit scale)")
        ax.set_ylabel(f"{target_name} top-1 (logit scale)")
        ax.set_title(title or "Robustness of the weight-space interpolation", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best")
        return _save(fig, path)
    finally:
        plt.close(fig)
