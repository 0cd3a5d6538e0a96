"""PNG figures of Table-2 results: accuracy per method and domain (bars), accuracy against the number of shots,
and the WiSE-FT sweep (robustness view on logit axes, or top-1 against α).

The bar and shots figures take the dict that `clipconv.app.table2.run_table2` returns (and writes as
table2.json): its "measured" entry maps a method to {"label", "mean": {column: top-1}, "std": {column: std},
"seeds"}. The drawing pieces other figures reuse: `set_logit_axes`, `draw_chord`, `draw_error_bars`,
`draw_labels` (labels placed so they do not overlap; the numbers behind them are in `plot_geometry`).
matplotlib is imported (with the Agg backend) only when a figure is drawn, never at import of clipconv.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

from clipconv.app.plot_geometry import LOGIT_CLIP, Point, logit_fraction, marker_box, place_labels
from clipconv.app.report import DISPLAY, SUITE
from clipconv.runtime.jsontypes import JSON
from clipconv.runtime.outputs import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["BAR_COLUMNS", "SHOTS_COLUMNS", "column_label", "accuracy_bars", "accuracy_vs_shots", "robustness_sweep",
           "accuracy_vs_alpha", "LOGIT_CLIP", "CHORD_LABEL", "set_logit_axes", "draw_chord", "draw_error_bars",
           "draw_labels"]

BAR_COLUMNS = (*SUITE, "target_avg")
SHOTS_COLUMNS = (SUITE[0], "target_avg")  # ImageNet's source set and the target average
PathLike = Union[str, Path]
CHORD_LABEL = "chord θ(0)–θ(1): a point above it gains over joining the ends"
_logit_fraction = logit_fraction  # the name this module used before plot_geometry


def column_label(column: str) -> str:
    """Display name of a result column ("imagenet" → "ImageNet", "target_avg" → "target avg")."""
    return DISPLAY.get(column, "target avg" if column == "target_avg" else column)


def _pyplot():
    import matplotlib  # heavy (~0.5 s); only the plotting commands need it

    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt  # heavy; imported after choosing the Agg backend

    return plt


def _measured(table: Mapping[str, JSON], where: str) -> Mapping[str, Mapping[str, JSON]]:
    measured = table.get("measured") if isinstance(table, Mapping) else None
    if not isinstance(measured, Mapping) or not measured:
        raise ValueError(f"{where}: the table has no measured methods (expected run_table2's result / table2.json)")
    return measured


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def accuracy_bars(table: Mapping[str, JSON], path: PathLike, title: Optional[str] = None,
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


def _max_top(methods: Sequence[Mapping[str, JSON]], columns: Sequence[str]) -> float:
    values = [m.get("mean", {}).get(c) for m in methods for c in columns]
    return max((v for v in values if _finite(v)), default=0.0)


def accuracy_vs_shots(results_by_shots: Mapping[int, Mapping[str, JSON]], path: PathLike,
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


def _accuracy_pair(where: str, value: object) -> tuple[float, float]:
    try:
        source, target = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"robustness_sweep: {where} must be (source top-1 %, target average %), got {value!r}") from None
    for v in (source, target):
        if not (math.isfinite(v) and 0.0 <= v <= 100.0):
            raise ValueError(f"robustness_sweep: {where} has an accuracy outside [0, 100] %: {value!r}")
    return source, target


def set_logit_axes(ax: Axes) -> None:
    """Both axes of `ax` on the logit scale, ticks labelled in % (values are fractions: `logit_fraction`)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter  # heavy; plots only

    percent = FuncFormatter(lambda value, _: f"{100 * value:.4g}%")
    for axis, set_scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
        set_scale("logit")
        axis.set_major_formatter(percent)
        axis.set_minor_formatter(NullFormatter())


def draw_chord(ax: Axes, start: Point, end: Point, label: Optional[str] = CHORD_LABEL) -> None:
    """The straight segment from `start` to `end` (data coordinates, as drawn: fractions on logit axes), dashed."""
    ax.plot([start[0], end[0]], [start[1], end[1]], linestyle="--", color="0.45", linewidth=1.0, label=label)


def draw_error_bars(ax: Axes, xs: Sequence[float], ys: Sequence[float], xerr: Optional[Sequence[float]],
                    yerr: Optional[Sequence[float]], color: Optional[str] = None) -> None:
    """± bars at the points (data coordinates; kept inside (0, 1) on logit axes by the caller), no line."""
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor=color, elinewidth=0.8, capsize=2)


def draw_labels(ax: Axes, anchors: Sequence[Point], texts: Sequence[str], fontsize: float = 8,
                colors: Optional[Sequence[Optional[str]]] = None,
                markers: Sequence[tuple[Point, float]] = ()) -> list[Point]:
    """Annotate each anchor (data coordinates) with its text, placed by `plot_geometry.place_labels` so that no two
    labels overlap and none covers a marker: the anchors' own and `markers` (other points drawn: data coordinates
    and marker size in points, as matplotlib's `markersize`); a far label gets a thin leader line. `colors`: one
    text colour per label (None: the default). Call it once the axes' scales and limits are final. Returns the
    offsets chosen (pixels at the figure's dpi; drawn as points)."""
    fig = ax.figure
    ax.autoscale_view()
    renderer = fig.canvas.get_renderer()
    pixels = [tuple(map(float, ax.transData.transform(anchor))) for anchor in anchors]
    sizes = []
    for text in texts:  # measured with the renderer: the exact box of each label
        probe = ax.text(0.5, 0.5, text, fontsize=fontsize, transform=ax.transAxes)  # (0, 0) is -∞ on logit axes
        box = probe.get_window_extent(renderer)
        sizes.append((float(box.width), float(box.height)))
        probe.remove()
    step = fontsize * fig.dpi / 72.0 * 0.6
    frame = ax.bbox.extents  # inside the axes when there is room
    obstacles = [marker_box(tuple(map(float, ax.transData.transform(center))), size * fig.dpi / 72.0 / 2)
                 for center, size in markers]
    offsets = place_labels(pixels, sizes, step=step, marker=fontsize * fig.dpi / 72.0 * 0.5,
                           bounds=tuple(float(v) for v in frame), obstacles=obstacles)
    points = 72.0 / fig.dpi  # offsets in points: they scale with the text when saved at another dpi
    for anchor, text, color, (dx, dy) in zip(anchors, texts, colors or [None] * len(texts), offsets):
        far = math.hypot(dx, dy) > 2.5 * step
        ax.annotate(text, anchor, textcoords="offset points", xytext=(dx * points, dy * points), fontsize=fontsize,
                    ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                    arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "0.5"} if far else None, color=color)
    return offsets


def _inside(value: float, spread: float) -> tuple[float, float]:
    """(minus, plus) error of `value` ± `spread` (fractions) clipped into the logit axis' range."""
    return (min(spread, value - LOGIT_CLIP), min(spread, 1.0 - LOGIT_CLIP - value))


def robustness_sweep(points: Mapping[float, Sequence[float]], path: PathLike, title: Optional[str] = None,
                     references: Optional[Mapping[str, Sequence[float]]] = None,
                     source_name: str = "ImageNet", target_name: str = "target avg",
                     spread: Optional[Mapping[float, Sequence[float]]] = None) -> Path:
    """Effective-robustness view of a WiSE-FT sweep: x = source top-1, y = target average (both in %), on logit
    axes (accuracies as fractions, `set_xscale("logit")`; Taori et al., 2020, Figure 1; Wortsman et al., 2022).

    `points` maps each mixing coefficient α to (source %, target %): drawn as one line in α order, each point
    labelled "α=…"; the chord from α = 0 to α = 1 (when both are given) is drawn dashed, so the gain over joining
    the ends shows; `spread` maps α to (std source, std target) in % (over seeds): error bars. `references` maps
    labels (e.g. "zero-shot", "Tip-Adapter") to (source %, target %), drawn as separate labelled markers. Labels
    never overlap (`draw_labels`). 0 % and 100 % are drawn at LOGIT_CLIP from the edge. PNG, written atomically.
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
        xs = [logit_fraction(s) for _, s, _ in sweep]
        ys = [logit_fraction(t) for _, _, t in sweep]
        line, = ax.plot(xs, ys, marker="o", label="WiSE-FT: θ(α) = (1−α)·θ₀ + α·θ₁")
        markers = "s^Dvp*hX"
        for index, (label, source, target) in enumerate(refs):
            ax.plot([logit_fraction(source)], [logit_fraction(target)], marker=markers[index % len(markers)],
                    linestyle="none", markersize=8, label=label)
        ends = {alpha: (x, y) for (alpha, _, _), x, y in zip(sweep, xs, ys) if alpha in (0.0, 1.0)}
        if len(ends) == 2:
            draw_chord(ax, ends[0.0], ends[1.0])
        if spread:
            errors = [(x, y, [float(v) / 100.0 for v in spread[alpha]]) for (alpha, _, _), x, y in zip(sweep, xs, ys)
                      if alpha in spread]
            draw_error_bars(ax, [x for x, _, _ in errors], [y for _, y, _ in errors],
                            [list(e) for e in zip(*(_inside(x, d[0]) for x, _, d in errors))],
                            [list(e) for e in zip(*(_inside(y, d[1]) for _, y, d in errors))], color=line.get_color())
        set_logit_axes(ax)
        ax.set_xlabel(f"{source_name} top-1 (source; logit scale)")
        ax.set_ylabel(f"{target_name} top-1 (logit scale)")
        ax.set_title(title or "Robustness of the weight-space interpolation", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
        draw_labels(ax, [*zip(xs, ys), *((logit_fraction(s), logit_fraction(t)) for _, s, t in refs)],
                    [*(f"α={alpha:g}" for alpha, _, _ in sweep), *(label for label, _, _ in refs)])
        return _save(fig, path)
    finally:
        plt.close(fig)


def accuracy_vs_alpha(per_alpha: Mapping[float, Mapping[str, float]], path: PathLike, columns: Sequence[str],
                      display: Optional[Mapping[str, str]] = None, title: Optional[str] = None,
                      spread: Optional[Mapping[float, Mapping[str, float]]] = None) -> Path:
    """Top-1 (%) against α, a line per column of `columns` present in `per_alpha` ({α: {column: top-1}}), with
    its chord from α = 0 to α = 1 dashed and ± `spread` ({α: {column: std}}) as error bars: the sweep when there
    is no target average to draw the robustness view with (e.g. only the source set was evaluated). PNG."""
    alphas = sorted(per_alpha)
    shown = [c for c in columns if any(_finite(per_alpha[a].get(c)) for a in alphas)]
    if not shown:
        raise ValueError(f"accuracy_vs_alpha: no value in any of the columns {list(columns)}")
    titles = display or {}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    try:
        for column in shown:
            points = [(a, per_alpha[a][column]) for a in alphas if _finite(per_alpha[a].get(column))]
            line, = ax.plot([a for a, _ in points], [v for _, v in points], marker="o",
                            label=titles.get(column, column))
            values = dict(points)
            if 0.0 in values and 1.0 in values:
                ax.plot([0.0, 1.0], [values[0.0], values[1.0]], linestyle="--", color=line.get_color(), linewidth=1.0,
                        alpha=0.6)
            if spread:
                errors = [(a, v, (spread.get(a) or {}).get(column)) for a, v in points]
                errors = [(a, v, e) for a, v, e in errors if _finite(e)]
                if errors:
                    draw_error_bars(ax, [a for a, _, _ in errors], [v for _, v, _ in errors], None,
                                    [e for _, _, e in errors], color=line.get_color())
        ax.set_xlabel("α (θ(α) = (1−α)·θ₀ + α·θ₁)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title or "Top-1 against α (dashed: the chord from α = 0 to α = 1)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        return _save(fig, path)
    finally:
        plt.close(fig)
