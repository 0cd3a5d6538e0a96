"""The WiSE-FT sweep of one trained checkpoint (`eval_robustness.py --wise`): a row per α, and the plot of
source top-1 against the target average with zero-shot CLIP and baselines as reference points.

Files written (atomically) to a fresh folder: wise_sweep.json (per α: the Table-2 row and the metrics),
wise_sweep.md (the same as a table, then the reference points) and wise_sweep.png (`plots.robustness_sweep`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

from clipconv.app.plots import robustness_sweep
from clipconv.app.report import markdown_table
from clipconv.app.session import Session, jsonable
from clipconv.evaluation import Scorer
from clipconv.runtime.jsontypes import JSON, JSONObject
from clipconv.runtime.outputs import write_json, write_text
from clipconv.wise import WISE_NOTE, wise_sweep

__all__ = ["run_sweep", "ZERO_SHOT_REFERENCE"]

log = logging.getLogger("clipconv")

#: the label of θ(0) drawn as a reference: for adapter methods it IS zero-shot CLIP (zero up-projections, text head)
ZERO_SHOT_REFERENCE = "zero-shot CLIP = θ(α=0) (exact for adapter methods)"


def run_sweep(session: Session, method: Scorer, alphas: Sequence[float], out_dir: Path, meta: Mapping[str, JSON],
              checkpoint: Path, references: Mapping[str, tuple[float, float]]) -> JSONObject:
    """Evaluate θ(α) for each α (and α = 0, the zero-shot reference, when not asked) and write the sweep's
    table, JSON and plot into `out_dir`; returns what wise_sweep.json holds."""
    asked = sorted(set(float(a) for a in alphas))
    evaluated = wise_sweep(session, method, sorted(set(asked) | {0.0}))
    columns = session.columns
    source, display = session.family.suite[0], session.family.display
    rows = {alpha: session.row(evaluated[alpha]) for alpha in evaluated}
    name = meta.get("method", "checkpoint")
    result = {"checkpoint": str(checkpoint.resolve()), "method": name, "alphas": asked, "note": WISE_NOTE,
              "seed": (meta.get("init") or {}).get("seed"), "columns": list(columns), "source": source,
              "per_alpha": {f"{a:g}": {"row": rows[a], "metrics": evaluated[a]} for a in asked},
              "zero_shot": {"label": ZERO_SHOT_REFERENCE, "row": rows[0.0]},
              "references": {label: {"source": s, "target_avg": t} for label, (s, t) in references.items()},
              "not_evaluated": session.missing}
    write_json(out_dir / "wise_sweep.json", jsonable(result))
    table = markdown_table([(f"θ(α = {a:g})", rows[a]) for a in asked], columns=session.family.suite,
                           display=display)
    ref_lines = [f"| {label} | {s:.2f} | {t:.2f} |" for label, (s, t) in
                 [(ZERO_SHOT_REFERENCE, (rows[0.0][source], rows[0.0]["target_avg"])), *references.items()]]
    plotted = all(math.isfinite(rows[a][source]) and math.isfinite(rows[a]["target_avg"]) for a in evaluated)
    md = [f"# WiSE-FT sweep of {name}: top-1 (%) per α", "", f"Checkpoint {checkpoint}; {WISE_NOTE}. θ₀: the "
          "zero-shot text head and the adapters as initialized (the up-projections are zero); θ₁: the checkpoint.",
          "", table, "## reference points", "", f"| reference | {display.get(source, source)} | target avg |",
          "|---|---|---|", *ref_lines, "",
          "Plot: wise_sweep.png (source top-1 against target average, logit axes)." if plotted else
          "No plot: the target average needs every target set (missing: " + ", ".join(session.missing) + ")."]
    write_text(out_dir / "wise_sweep.md", "\n".join(md) + "\n")
    if plotted:

        zero = (rows[0.0][source], rows[0.0]["target_avg"])
        same = [label for label, point in references.items() if tuple(point) == zero]  # one marker, both names
        refs = {"\n= ".join([ZERO_SHOT_REFERENCE, *same]): zero,
                **{label: point for label, point in references.items() if label not in same}}
        robustness_sweep({a: (rows[a][source], rows[a]["target_avg"]) for a in asked}, out_dir / "wise_sweep.png",
                         title=f"WiSE-FT sweep of {name} ({checkpoint.parent.name})", references=refs,
                         source_name=display.get(source, source))
    log.info("\n" + table)
    return result
