"""The WiSE-FT sweep of trained checkpoints (`eval_robustness.py --wise`): a row per α, and the plot of source
top-1 against the target average with the chord from α = 0 to α = 1 and zero-shot CLIP and baselines as
reference points.

One checkpoint gives one sweep; several checkpoints of the same method (the seeds of a Table-2 folder) give the
mean over seeds per α, with the std as ± in the table and as error bars in the plot. Without a target average
(only the source set evaluated, or a target set missing) the plot is top-1 of each set against α instead, and
one line says why.

Files written (atomically) to a fresh folder: wise_sweep.json (per α: the Table-2 row, its std over seeds and the
metrics), wise_sweep.md (the same as a table, the height of each α above the chord, the reference points) and
wise_sweep.png (`plots.robustness_sweep`, or `plots.accuracy_vs_alpha`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

from clipconv.app.plot_geometry import alpha_chord_gaps, chord_gaps
from clipconv.app.plots import accuracy_vs_alpha, robustness_sweep
from clipconv.app.report import markdown_table
from clipconv.app.session import Session, jsonable
from clipconv.app.table2 import aggregate_seeds
from clipconv.evaluation import Scorer
from clipconv.runtime.jsontypes import JSON, JSONObject
from clipconv.runtime.outputs import write_json, write_text
from clipconv.wise import WISE_NOTE, wise_sweep

__all__ = ["run_sweep", "ZERO_SHOT_REFERENCE"]

log = logging.getLogger("clipconv")

#: the label of θ(0) drawn as a reference: for adapter methods it IS zero-shot CLIP (zero up-projections, text head)
ZERO_SHOT_REFERENCE = "zero-shot CLIP = θ(α=0) (exact for adapter methods)"


def _gaps_line(gaps: Mapping[float, float], asked: Sequence[float], what: str) -> str:
    cells = [f"α={a:g} {gaps[a]:+.2f}" for a in asked if a in gaps and not math.isnan(gaps[a]) and a not in (0.0, 1.0)]
    return f"Height above the chord from α = 0 to α = 1 ({what}), points: {', '.join(cells)}." if cells else ""


def run_sweep(session: Session, methods: Sequence[Scorer], alphas: Sequence[float], out_dir: Path,
              meta: Mapping[str, JSON], checkpoints: Sequence[Path], references: Mapping[str, tuple[float, float]],
              seeds: Optional[Sequence[Optional[int]]] = None) -> JSONObject:
    """Evaluate θ(α) of each checkpoint's method (`methods[i]` loaded from `checkpoints[i]`, seed `seeds[i]`) for
    each α (and α = 0, the zero-shot reference, when not asked) and write the sweep's table, JSON and plot into
    `out_dir`; with several checkpoints every row is the mean over them (± std). Returns what wise_sweep.json holds."""
    asked = sorted(set(float(a) for a in alphas))
    needed = sorted(set(asked) | {0.0, 1.0})  # the ends: the zero-shot reference and the chord
    seeds = list(seeds) if seeds is not None else [(meta.get("init") or {}).get("seed")] * len(methods)
    evaluated = [wise_sweep(session, method, needed) for method in methods]
    per_seed_rows = [{alpha: session.row(ev[alpha]) for alpha in ev} for ev in evaluated]
    rows, stds = {}, {}
    for alpha in needed:
        rows[alpha], std = aggregate_seeds([r[alpha] for r in per_seed_rows], session.columns)
        stds[alpha] = std if len(methods) > 1 else {}
    columns = session.columns
    source, display = session.family.suite[0], session.family.display
    name = meta.get("method", "checkpoint")
    several = len(methods) > 1

    def entry(alpha: float) -> JSONObject:
        if not several:
            return {"row": rows[alpha], "std": {}, "metrics": evaluated[0][alpha]}
        return {"row": rows[alpha], "std": stds[alpha],
                "per_seed": {str(s): {"row": r[alpha], "metrics": ev[alpha]}
                             for s, r, ev in zip(seeds, per_seed_rows, evaluated)}}

    robust = all(math.isfinite(rows[a][source]) and math.isfinite(rows[a]["target_avg"]) for a in needed)
    points = {a: (rows[a][source], rows[a]["target_avg"]) for a in needed} if robust else {}
    gaps = chord_gaps(points) if robust else alpha_chord_gaps({a: rows[a][source] for a in needed})
    result = {"checkpoint": str(Path(checkpoints[0]).resolve()),
              "checkpoints": [str(Path(c).resolve()) for c in checkpoints],
              "method": name, "alphas": asked, "note": WISE_NOTE, "seed": seeds[0], "seeds": seeds,
              "columns": list(columns), "source": source,
              "per_alpha": {f"{a:g}": entry(a) for a in asked},
              "above_chord": {f"{a:g}": g for a, g in gaps.items()},
              "zero_shot": {"label": ZERO_SHOT_REFERENCE, "row": rows[0.0]},
              "references": {label: {"source": s, "target_avg": t} for label, (s, t) in references.items()},
              "target_note": session.target_note(), "not_evaluated": session.missing}
    write_json(out_dir / "wise_sweep.json", jsonable(result))
    table = markdown_table([(f"θ(α = {a:g})", rows[a]) for a in asked], {f"θ(α = {a:g})": stds[a] for a in asked},
                           columns=session.family.suite, display=display)
    ref_lines = [f"| {label} | {s:.2f} | {t:.2f} |" for label, (s, t) in
                 [(ZERO_SHOT_REFERENCE, (rows[0.0][source], rows[0.0]["target_avg"])), *references.items()]]
    over = (f"mean ± std over {len(methods)} checkpoints (seeds {', '.join(str(s) for s in seeds)}): "
            + ", ".join(str(c) for c in checkpoints)) if several else f"Checkpoint {checkpoints[0]}"
    if robust:
        plot_line = "Plot: wise_sweep.png (source top-1 against target average, logit axes, dashed: the chord)."
    else:
        plot_line = (f"Plot: wise_sweep.png shows top-1 of each set against α (dashed: each set's chord), not the "
                     f"robustness view: there is no target average ({session.target_note()})")
        log.warning(f"wise: no target average to plot against, so wise_sweep.png shows top-1 against α "
                    f"({session.target_note()})")
    gaps_line = _gaps_line(gaps, asked, "source against target average, as drawn" if robust
                           else f"{display.get(source, source)} top-1 against α")
    md = [f"# WiSE-FT sweep of {name}: top-1 (%) per α", "", f"{over}; {WISE_NOTE}. θ₀: the "
          "zero-shot text head and the adapters as initialized (the up-projections are zero); θ₁: the checkpoint.",
          "", table, session.target_note(), "", *([gaps_line, ""] if gaps_line else []),
          "## reference points", "", f"| reference | {display.get(source, source)} | target avg |",
          "|---|---|---|", *ref_lines, "", plot_line]
    write_text(out_dir / "wise_sweep.md", "\n".join(md) + "\n")
    title = f"WiSE-FT sweep of {name} ({Path(checkpoints[0]).parent.name})" + (
        f", mean ± std over seeds {', '.join(str(s) for s in seeds)}" if several else "")
    if robust:
        zero = points[0.0]
        same = [label for label, point in references.items() if tuple(point) == zero]  # one marker, both names
        refs = {"\n= ".join([ZERO_SHOT_REFERENCE, *same]): zero,
                **{label: point for label, point in references.items() if label not in same}}
        spread = {a: (stds[a].get(source, 0.0), stds[a].get("target_avg", 0.0)) for a in needed} if several else None
        robustness_sweep(points, out_dir / "wise_sweep.png", title=title, references=refs,
                         source_name=display.get(source, source), spread=spread)
    else:
        accuracy_vs_alpha({a: rows[a] for a in needed}, out_dir / "wise_sweep.png", columns=session.family.suite,
                          display=display, title=title, spread={a: stds[a] for a in needed} if several else None)
    log.info("\n" + table)
    return result
