"""The robustness frontier of one or more Table-2 folders (`run_table2.py --frontier DIR ...`): source top-1 (x)
against the target average (y) on logit axes (Taori et al., 2020; WiSE-FT's Figure 1).

Drawn: every measured row as its mean over seeds with ± std error bars on both axes (the robust variants,
`robust:<method>`, as stars); each trained method's WiSE curve — from the sweeps of its fits
(`<method>_seed<s>/wise-*/wise_sweep.json`, `eval_robustness.py --wise`) averaged over seeds when there are
any, else from Table 2's rows: θ(0) (zero-shot's row, for the methods whose θ(0) is zero-shot CLIP), the
"+ WiSE (α)" row and the trained row θ(1) — with its chord from α = 0 to α = 1 (dashed) when both ends are
known, and its "α=…" labels in its colour, placed by `plots.draw_labels` clear of each other and of every
marker. Written atomically: frontier.json (exactly the numbers drawn) and frontier.png.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from clipconv.app.plots import LOGIT_CLIP, _logit_fraction, _pyplot, _save, draw_labels, set_logit_axes
from clipconv.app.run import folder_name
from clipconv.methods.base import METHODS
from clipconv.methods.robust import ROBUST_METHOD_PREFIX
from clipconv.runtime.io import read_json_object
from clipconv.runtime.jsontypes import JSON, JSONObject
from clipconv.runtime.outputs import write_json

__all__ = ["FRONTIER_FILES", "frontier_data", "frontier_plot", "write_frontier", "starts_at_zero_shot"]

FRONTIER_FILES = ("frontier.json", "frontier.png")
def starts_at_zero_shot(name: str) -> bool:
    """Whether method `name`'s θ(α = 0) is zero-shot CLIP (as the method declares: `wise_start_is_zero_shot`)."""
    return bool(getattr(METHODS.get(name), "wise_start_is_zero_shot", False))


def _is_zero_shot(name: str) -> bool:
    return bool(getattr(METHODS.get(name), "is_zero_shot", False))


def _table(folder: Path) -> JSONObject:
    path = Path(folder) / "table2.json"
    if not path.is_file():
        raise ValueError(f"--frontier {folder}: no table2.json there; give run_table2.py output folders")
    table = read_json_object(path, what_to_do="give another Table-2 folder, or run that table again")
    if not isinstance(table.get("measured"), dict) or not table.get("columns"):
        raise ValueError(f"--frontier {folder}: {path} has no measured rows or no columns; give a run_table2.py "
                         "output folder with finished fits")
    return table


def _pair(row: Mapping[str, JSON], source: str) -> Optional[tuple[float, float]]:
    s, t = row.get(source), row.get("target_avg")
    return (float(s), float(t)) if isinstance(s, (int, float)) and isinstance(t, (int, float)) else None


def _sweeps(folder: Path, method: str, source: str) -> dict[float, list[tuple[float, float]]]:
    """{α: [(source, target) of each seed]} from the newest wise sweep of each of `method`'s fits, for the α
    every such fit has (α = 0 from the sweep's zero-shot row)."""
    per_fit = []
    for fit_dir in sorted(Path(folder).glob(f"{folder_name(method)}_seed*")):
        sweeps = sorted(fit_dir.glob("wise-*/wise_sweep.json"))
        if not sweeps:
            continue
        sweep = read_json_object(sweeps[-1], what_to_do="delete that sweep folder or run the sweep again")
        points = {float(a): _pair(entry.get("row", {}), source) for a, entry in (sweep.get("per_alpha") or {}).items()}
        points[0.0] = _pair((sweep.get("zero_shot") or {}).get("row", {}), source)
        per_fit.append({a: p for a, p in points.items() if p is not None})
    if not per_fit:
        return {}
    common = set.intersection(*(set(points) for points in per_fit))
    return {a: [points[a] for points in per_fit] for a in sorted(common)}


def _mean(values: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return sum(v[0] for v in values) / len(values), sum(v[1] for v in values) / len(values)


def frontier_data(folders: Sequence[Path]) -> JSONObject:
    """The numbers the frontier draws from Table-2 `folders` (a label met again in a later folder is skipped):
    {"source": column, "points": [{label, key, kind: method|wise|robust, seeds, source, source_std, target,
    target_std, table}], "curves": [{of, label, alphas, source, target, from, chord}]}."""
    points: list[JSONObject] = []
    curves: list[JSONObject] = []
    seen: set[str] = set()
    source_column, source_display = "", ""
    for folder in folders:
        table = _table(folder)
        source = list(table["columns"])[0]
        if source_column and source != source_column:
            raise ValueError(f"--frontier {folder}: its source set is {source}, not {source_column} as in the "
                             "first folder; give tables of the same data")
        source_column, source_display = source, str(table["columns"].get(source, source)) \
            if isinstance(table["columns"], dict) else source
        measured, per_seed = table["measured"], table.get("per_seed") or {}
        for key, entry in measured.items():
            mean, std = entry.get("mean") or {}, entry.get("std") or {}
            point = _pair(mean, source)
            if point is None or entry["label"] in seen:
                continue
            seen.add(entry["label"])
            wise_of = next((v.get("of") for v in (per_seed.get(key) or {}).values() if isinstance(v, dict)), None)
            kind = "wise" if wise_of else "robust" if key.startswith(ROBUST_METHOD_PREFIX) else "method"
            points.append({"key": key, "label": entry["label"], "kind": kind, "seeds": list(entry.get("seeds", [])),
                           "source": point[0], "source_std": float(std.get(source) or 0.0),
                           "target": point[1], "target_std": float(std.get("target_avg") or 0.0),
                           "table": str(folder)})
            if not wise_of or wise_of not in measured:
                continue
            alpha = float(next(v["alpha"] for v in per_seed[key].values()))
            sweeps = _sweeps(Path(folder), wise_of, source)
            if sweeps:
                curve = {a: _mean(values) for a, values in sweeps.items()}
                origin = f"wise sweeps of {len(next(iter(sweeps.values())))} fit(s)"
            else:
                curve = {alpha: point, 1.0: _pair(measured[wise_of]["mean"], source)}
                zero = next((_pair(e["mean"], source) for k, e in measured.items() if _is_zero_shot(k)), None)
                if zero is not None and starts_at_zero_shot(wise_of):
                    curve[0.0] = zero
                origin = "Table-2 rows (θ(0) = zero-shot's row)" if 0.0 in curve else "Table-2 rows"
            alphas = sorted(a for a, p in curve.items() if p is not None)
            curves.append({"of": wise_of, "label": f"{measured[wise_of]['label']}: WiSE θ(α)", "alphas": alphas,
                           "source": [curve[a][0] for a in alphas], "target": [curve[a][1] for a in alphas],
                           "from": origin, "chord": 0.0 in curve and 1.0 in curve})
    if not points:
        raise ValueError(f"--frontier: no measured row with a source and a target average in {list(map(str, folders))}")
    return {"source": source_column, "source_display": source_display, "folders": [str(f) for f in folders], "points": points, "curves": curves,
            "note": "mean ± std (population) over each row's seeds; logit axes; WiSE α fixed in advance"}


def frontier_plot(data: Mapping[str, JSON], path: Path, title: Optional[str] = None,
                  source_name: str = "source") -> Path:
    """frontier.png of `frontier_data`'s result (see the module docstring)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 6.0))
    try:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        labels: list[tuple[tuple[float, float], str, str]] = []  # (anchor, "α=…", its curve's colour)
        for index, curve in enumerate(data["curves"]):
            color = colors[index % len(colors)]
            xs = [_logit_fraction(s) for s in curve["source"]]
            ys = [_logit_fraction(t) for t in curve["target"]]
            ax.plot(xs, ys, marker=".", color=color, alpha=0.7, label=curve["label"])
            labels.extend(((x, y), f"α={alpha:g}", color) for alpha, x, y in zip(curve["alphas"], xs, ys))
            if curve["chord"]:
                ax.plot([xs[0], xs[-1]], [ys[0], ys[-1]], linestyle="--", linewidth=1, color=color, alpha=0.7)
        markers = {"method": "o", "wise": "D", "robust": "*"}
        drawn: list[tuple[tuple[float, float], float]] = []  # the rows' markers: (centre, size in points)
        for index, point in enumerate(data["points"]):
            x, y = _logit_fraction(point["source"]), _logit_fraction(point["target"])
            seeds = len(point["seeds"])
            drawn.append(((x, y), 12 if point["kind"] == "robust" else 6))
            ax.errorbar([x], [y], xerr=[[min(point["source_std"] / 100, x - LOGIT_CLIP)], [point["source_std"] / 100]],
                        yerr=[[min(point["target_std"] / 100, y - LOGIT_CLIP)], [point["target_std"] / 100]],
                        marker=markers[point["kind"]], markersize=drawn[-1][1],
                        linestyle="none", capsize=3, color=colors[(index + 3) % len(colors)],
                        label=f"{point['label']} ({seeds} seed{'s' if seeds != 1 else ''})")
        set_logit_axes(ax)
        ax.set_xlabel(f"{source_name} top-1 (source; logit scale)")
        ax.set_ylabel("target average top-1 (logit scale)")
        ax.set_title(title or "Robustness frontier (mean ± std over seeds; dashed: WiSE chord α = 0 → 1)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        draw_labels(ax, [anchor for anchor, _, _ in labels], [text for _, text, _ in labels], fontsize=7,
                    colors=[color for _, _, color in labels], markers=drawn)  # clear of each other and every marker
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_frontier(folders: Sequence[Path], out_dir: Path, title: Optional[str] = None) -> JSONObject:
    """frontier.json and frontier.png of Table-2 `folders` in `out_dir` (each atomically); returns the data."""
    data = frontier_data([Path(f) for f in folders])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / FRONTIER_FILES[0], data)
    frontier_plot(data, out_dir / FRONTIER_FILES[1], title, source_name=str(data["source_display"]))
    return data
