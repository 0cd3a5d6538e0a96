"""Table 2 of the Convpass paper in one call: every method on the same K-shot splits, mean ± std over seeds.

For each seed a K-shot split (+ a disjoint validation split from the remaining train images, used for
every method's hyper-parameter choice) is drawn once and saved as `split_seed{s}.json`; all methods
are fitted on it and scored on the robustness suite. Frozen-encoder methods share one FeatureStore, so
each image set is encoded once per backbone (and once per augmentation seed). Results are written
after every method (`table2.json`, `table2.md`, `table2.csv`, atomically), next to the paper's
published numbers, labelled as such; `table2_bars.png` (accuracy per method and domain) when all
methods are done. The std is the population std over seeds (as CoOp reports it).

`run_shots_sweep` does this for several K with one backbone and one FeatureStore (the evaluation sets
are encoded once for the whole sweep). Layout of its output directory:
```
shots_<K>/            table2.{md,csv,json}, table2_bars.png, split_seed<s>.json, <method>_seed<s>/ for each K
table2.*, table2_bars.png        copies of the largest K's
accuracy_vs_shots.{png,json,md}  top-1 on the source set and the target average against K (2+ values of K)
```
"""
from __future__ import annotations

import csv
import io
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

from torch import nn

from clipconv.app.clip_benchmark import write_benchmark_results
from clipconv.app.plots import accuracy_bars, accuracy_vs_shots
from clipconv.app.report import DISPLAY, SUITE, markdown_table, target_average
from clipconv.app.run import ExperimentConfig, counts_line, environment, folder_name
from clipconv.app.rundir import check_not_in_use, check_output_dir, claim_output_dir, held_files, new_run_dir
from clipconv.app.session import (
    FitResult, Session, build_method_config, check_backbone_fit, check_processes, fit_and_evaluate, open_session,
    templates_used
)
from clipconv.config import option, positive, seed_range
from clipconv.data import save_split
from clipconv.methods.base import METHODS, MethodConfig, build_method, method_names, table2_methods
from clipconv.params import ParamSpec, reference_spec
from clipconv.prompts import load_templates
from clipconv.runtime import ranks
from clipconv.runtime.io import DamagedFileError, read_json_object
from clipconv.runtime.jsontypes import JSONObject
from clipconv.runtime.outputs import atomic_path, write_json, write_text
from clipconv.wise import WISE_DEFAULT_ALPHA, WISE_NOTE, wise_key, wise_label, wise_methods, wise_sweep

__all__ = ["Table2Config", "TABLE2_METHODS", "PUBLISHED_LABEL", "BARS_FILE", "SWEEP_FILE",
           "run_table2", "run_shots_sweep", "check_methods", "shots_summary", "aggregate_seeds", "RECORD_FILE",
           "TABLE2_OWN_FILES",
           "TABLE2_OWN_PATTERNS", "Table2Record", "load_record", "measured_table"]

#: the default methods, in the order they declare (`Method.table2_order`); labels are the methods' own (`label`)
TABLE2_METHODS = table2_methods()
PUBLISHED_LABEL = "published (paper, ImageNet, ViT-B/16)"
COLUMNS = (*SUITE, "target_avg")  # ImageNet's; a run's columns come from its session's dataset family
BARS_FILE = "table2_bars.png"
SWEEP_FILE = "accuracy_vs_shots"  # .png, .json, .md
RECORD_FILE = "table2_config.json"  # written first: what `--resume` continues ({"config": ..., "shots": [K...]})
TABLE2_OWN_FILES = ("table2.json", "table2.md", "table2.csv", BARS_FILE, *(SWEEP_FILE + e for e in (".json", ".md",
                    ".png")), RECORD_FILE, "log.txt")
TABLE2_OWN_PATTERNS = ("split_seed*.json", "*_seed[0-9]*", "shots_[0-9]*")


@dataclass
class Table2Config(ExperimentConfig):
    """Settings of one Table-2 run (saved in table2.json). `method_configs` holds each method's typed config,
    built once by the entry point (`build_method_config`); a method left out gets its `preset` with its
    epochs scaled by `epochs_scale` (table2.json: "method_options"). `wise_alpha` defaults to WiSE-FT's α."""

    output_dir: Optional[str] = option(None, help="where table2.*, table2_bars.png and split_seed*.json go "
                                                  "(shots_<K>/ per K in a sweep; default: a new "
                                                  "runs/table2_<K>shot_<time>)")
    seeds: tuple[int, ...] = option((1, 2, 3), check=seed_range, help="split and training seeds")
    methods: tuple[str, ...] = option(TABLE2_METHODS, help="methods to run")
    method_configs: dict[str, MethodConfig] = option(default_factory=dict, cli=False,
                                                     help="{method: its typed config}")
    epochs_scale: float = option(1.0, check=positive, help="multiply every method's default number of epochs")
    benchmark_label: Optional[str] = option(None, cli=False, help="what the data is, for plot titles")
    wise_methods: Optional[tuple[str, ...]] = option(
        None, help="trained methods that also get a '+ WiSE (α)' row, from the same fit (default: convpass when it "
                   "runs; none: no WiSE rows)")

    def __post_init__(self) -> None:
        if self.wise_alpha is None:
            self.wise_alpha = WISE_DEFAULT_ALPHA
        for flag, values in (("--seeds", list(self.seeds)), ("--methods", list(self.methods))):
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:  # one fit counted twice would pass for two (a std of 0.00, or a row twice)
                raise ValueError(f"{flag}: {', '.join(twice)} {'is' if len(twice) == 1 else 'are'} given twice; "
                                 "give each once")
        stray = sorted(set(self.method_configs) - set(self.methods))
        if stray:
            raise ValueError(f"--method-options names method(s) {stray} that are not in --methods {list(self.methods)}")
        super().__post_init__()
        check_methods(self.methods)
        self.method_configs = dict(self.method_configs)  # the same config objects, in a dict of this table's own
        for name in self.methods:
            if name not in self.method_configs:
                self.method_configs[name] = self.method_config(name)
            elif type(self.method_configs[name]) is not METHODS[name].config_class:
                raise ValueError(f"method '{name}' takes a {METHODS[name].config_class.__name__}, got a "
                                 f"{type(self.method_configs[name]).__name__}")

    def method_config(self, name: str, options: Optional[Mapping[str, object]] = None) -> MethodConfig:
        """Method `name`'s config from this table's preset, `options` over it, and its epochs scaled."""
        return build_method_config(name, self.preset, options, epochs_scale=self.epochs_scale,
                                   precision=self.backbone.precision)

    def to_dict(self) -> JSONObject:
        out = super().to_dict()
        out["method_options"] = {name: config.to_dict() for name, config in out.pop("method_configs").items()}
        return out

    @classmethod
    def from_dict(cls, saved: JSONObject) -> "Table2Config":
        """The inverse of `to_dict` (the "config" of table2_config.json / table2.json)."""
        values = cls.sections_from(saved)
        options = values.pop("method_options", {})
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise ValueError(f"\"method_options\" must be an object of objects, got {options!r}")
        plain = cls.from_options(values)  # every method at its preset
        configs = {name: plain.method_config(name, opts) if name in plain.methods else opts
                   for name, opts in options.items()}
        return cls.from_options({**values, "method_configs": {**plain.method_configs, **configs}})


def check_methods(methods: Sequence[str]) -> None:
    """Raise ValueError naming the unknown ones among `methods`."""
    known = method_names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {known}")


def aggregate_seeds(rows: Sequence[dict[str, float]], columns: Sequence[str] = COLUMNS
                    ) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and population std over seeds, per column present in every row (`columns`: the suite, source
    set first, then "target_avg"); a NaN or null (a row read back from strict JSON) is missing."""
    mean, std = {}, {}
    for column in columns:
        values = [row[column] for row in rows if row.get(column) is not None and not math.isnan(row[column])]
        if values and len(values) == len(rows):
            mu = sum(values) / len(values)
            mean[column] = mu
            std[column] = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))
    if "target_avg" not in mean:
        mean["target_avg"] = target_average(mean, [c for c in columns[1:] if c != "target_avg"])
    return mean, std


def method_label(name: str) -> str:
    """The label method `name` declares (`Method.label`; its name for a method no longer registered)."""
    spec = METHODS.get(name)
    return spec.label or name if spec is not None else name


def row_label(name: str, used: Optional[tuple[str, int]]) -> str:
    """A row's label; a method that declares `templates_in_label` (zero-shot) says single prompt or ensemble
    ("ZS CLIP (1 template)" — the paper's 66.73 — vs "ZS CLIP (80-template ensemble)", open_clip's 68.34)."""
    label = method_label(name)
    spec = METHODS.get(name)
    if spec is not None and spec.templates_in_label and used is not None:
        label += " (1 template)" if used[1] == 1 else f" ({used[1]}-template ensemble)"
    return label


def _templates_text(run_templates: Optional[str]) -> str:
    return f"{run_templates} for every method" if run_templates else "each method's reference set (--templates overrides)"


def _published_rows(session: Session) -> list[tuple[str, dict[str, float]]]:
    """The paper's numbers the default methods declare (`Method.published`), when the family says they apply
    to its data (a `published_label`); labelled with the method's reference templates (the paper's)."""
    family = session.family
    if not family.published_label:
        return []
    rows = []
    for name in TABLE2_METHODS:
        spec = METHODS[name]
        values = {set_name: spec.published[set_name] for set_name in family.suite if set_name in spec.published}
        if values:
            values["target_avg"] = target_average(values, session.targets)  # the measured rows' rule
            reference = spec.reference_templates
            used = (reference, len(load_templates(reference))) if reference is not None else None
            rows.append((row_label(name, used), values))
    return rows


def _first_metrics(per_seed: dict[str, dict[int, dict]]) -> dict[str, dict[str, float]]:
    """The metrics of one fit (every fit is scored on the same sets): for the images / classes line."""
    for seeds in per_seed.values():
        for entry in seeds.values():
            if entry.get("metrics"):
                return entry["metrics"]
    return {}


def _missing(cfg: Table2Config, methods: Sequence[str], per_seed: dict[str, dict[int, dict]]) -> list[str]:
    """The "method seed s" fits (and WiSE rows) not done yet."""
    rows = [*methods, *map(wise_key, wise_methods(cfg.wise_methods, methods))]
    return [f"{name} seed {seed}" for seed in cfg.seeds for name in rows if seed not in per_seed.get(name, {})]


def changed_options(config: MethodConfig) -> dict[str, object]:
    """The options of `config` that differ from its class's defaults (the reference protocol's)."""
    default = type(config)().to_dict()
    return {k: v for k, v in config.to_dict().items() if v != default[k]}


def trainable_counts(name: str, config: MethodConfig, model: nn.Module, classes: int, shots: int
                     ) -> dict[str, Optional[int]]:
    """{"vit_b16": count on open_clip's ViT-B-16 with ImageNet's 1000 classes, "model": count on `model` with
    `classes`} for method `name` with `config` (the method's `trainable_count` hook; None if it has none)."""

    method = build_method(name, config)
    counts: dict[str, Optional[int]] = {}
    for key, spec in (("vit_b16", reference_spec(shots)), ("model", ParamSpec(model, classes, shots))):
        try:
            counts[key] = int(method.trainable_count(spec))
        except NotImplementedError:
            counts[key] = None
    return counts


def _count_text(count: Optional[int]) -> str:
    return "–" if count is None else f"{count:,}"


def _write_outputs(out: Path, cfg: Table2Config, per_seed: dict[str, dict[int, dict]], timing: dict,
                   session: Session, missing: Sequence[str] = ()) -> JSONObject:
    info = session.info()
    table_columns = {"columns": session.family.suite, "display": session.family.display}
    measured, stds, summary_rows, template_lines = [], {}, {}, []
    recall_rows, recall_stds = [], {}  # sklearn's balanced accuracy (CLIP_benchmark's mean_per_class_recall)
    wise = wise_methods(cfg.wise_methods, cfg.methods)
    for name in [k for m in cfg.methods for k in ((m, wise_key(m)) if m in wise else (m,))]:
        seeds = per_seed.get(name, {})
        if not seeds:
            continue
        base = name[:-len(wise_key(""))] if name.endswith(wise_key("")) else name
        used = templates_used(base, [entry.get("fit") for entry in per_seed.get(base, {}).values()], cfg.data.templates)
        label = row_label(base, used) if base == name else wise_label(row_label(base, used), cfg.wise_alpha)
        mean, std = aggregate_seeds([seeds[s]["row"] for s in sorted(seeds)], session.columns)
        std = std if len(seeds) > 1 else {}  # a single fit has no spread to show (not "± 0.00")
        measured.append((label, mean))
        stds[label] = std
        # a WiSE row has its method's parameters and fit (no training of its own)
        params = trainable_counts(base, cfg.method_configs[base], session.backbone.model, len(session.classes),
                                  cfg.shots)
        summary_rows[name] = {"label": label, "mean": mean, "std": std, "seeds": sorted(seeds),
                              "template_set": used[0] if used else None, "templates": used[1] if used else 0,
                              "params": params,
                              "train_seconds": timing.get(base, {}).get("fit_seconds", 0.0) / len(seeds)}
        template_lines.append(f"| {label} | " + (f"{used[0]} ({used[1]})" if used else "none") + " |")
        if all(seeds[s].get("metrics") and all("mean_per_class_recall" in m for m in seeds[s]["metrics"].values())
               for s in seeds):  # (tables resumed from before the recall was recorded have none)
            recall_mean, recall_std = aggregate_seeds(
                [session.row(seeds[s]["metrics"], "mean_per_class_recall") for s in sorted(seeds)], session.columns)
            recall_rows.append((label, recall_mean))
            recall_stds[label] = recall_std if len(seeds) > 1 else {}
    published = _published_rows(session)
    seeds_text = ", ".join(str(s) for s in cfg.seeds)
    over = f"mean ± std over seeds {seeds_text}" if len(cfg.seeds) > 1 else f"seed {seeds_text}"
    md = [f"# Table 2: {cfg.shots}-shot, top-1 (%), {over}", "",
          f"Backbone {info['backbone']['model']} ({info['backbone']['weights_id']}); data {session.data_root}; "
          f"templates: {_templates_text(cfg.data.templates)}; validation: {cfg.val_shots} train images per class "
          f"outside the K-shot set.", *([
              "", f"**INCOMPLETE**: {len(missing)} fit(s) not done yet ({', '.join(missing[:6])}"
              f"{', ...' if len(missing) > 6 else ''}); finish with `run_table2.py --resume {_top(out)}`."]
              if missing else []),
          "", "## measured (this run)", "", markdown_table(measured, stds, **table_columns, extra=_extra_columns(
              summary_rows, len(session.classes))), "", session.target_note(), "",
          "params: trainable parameters with this row's options — on open_clip's ViT-B-16 with ImageNet's 1000 "
          "classes, and in the model this run used; train s: fit wall time per seed.", "",
          *([f"+ WiSE (α = {cfg.wise_alpha:g}): {WISE_NOTE} (WiSE-FT's default α = 0.5 unless --wise-alpha).", ""]
            if any(wise_key(m) in per_seed for m in wise) else []),
          *([counts_line(_first_metrics(per_seed), session.family.display), ""] if _first_metrics(per_seed) else []),
          *([f"## mean per-class recall (%), {over}", "",
             markdown_table(recall_rows, recall_stds, **table_columns), ""] if recall_rows else []),
          "## prompt templates per row", "", "| method | template set (count) |", "|---|---|", *template_lines, "",
          *(["## " + session.family.published_label, "",
              "Numbers printed in the Convpass paper (Table 2): full ImageNet, OpenAI ViT-B/16. For reference only "
              "— not comparable with a run on other data or another backbone.", "",
              markdown_table(published, **table_columns), ""] if published else []),
          "## wall time per method (seconds, summed over seeds)", "",
          "| method | fit | eval | images encoded by the feature cache |", "|---|---|---|---|"]
    for name, t in timing.items():
        shown = method_label(name)
        if name.endswith(wise_key("")):  # the WiSE row: no fit of its own, one more evaluation per seed
            shown = wise_label(method_label(name[:-len(wise_key(""))]), cfg.wise_alpha)
        md.append(f"| {shown} | {t['fit_seconds']:.1f} | {t['eval_seconds']:.1f} | "
                  f"{t['images_encoded']} |")
    write_text(out / "table2.md", "\n".join(md) + "\n")
    write_text(out / "table2.csv", table2_csv(measured, stds, summary_rows, published, session.columns,
                                              session.family.published_label))
    result = {"complete": not missing, "missing": list(missing), "output_dir": str(out),
              "config": cfg.to_dict(), "environment": environment(session), **info,
              "columns": {c: session.family.display.get(c, "target avg") for c in session.columns},
              "target_note": session.target_note(), "measured": summary_rows,
              "per_seed": {n: {str(s): v for s, v in seeds.items()} for n, seeds in per_seed.items()},
              "timing": timing,
              "published": {"label": session.family.published_label, "rows": {label: values for label, values in published}}}
    write_json(out / "table2.json", result)
    return result


def csv_header(columns: Sequence[str]) -> list[str]:
    """table2.csv's column names: `origin` (measured, or the published rows' label), `method`, then
    `top1_<set>` and `top1_<set>_std` per result column (so a set named like another column, e.g. the demo's
    "source", never gives two columns one name), the trainable parameters, train seconds and the seed count."""
    return ["origin", "method", *(f"top1_{c}{end}" for c in columns for end in ("", "_std")),
            "params_vit_b16", "params_model", "train_seconds", "seeds"]


def table2_csv(measured: Sequence[tuple[str, Mapping[str, float]]], stds: Mapping[str, Mapping[str, float]],
               summary_rows: Mapping[str, JSONObject], published: Sequence[tuple[str, Mapping[str, float]]],
               columns: Sequence[str], published_label: str) -> str:
    """table2.csv: a row per measured label (mean, std over 2+ seeds, else empty), then the published rows."""
    def number(value: Optional[float], digits: int) -> str:
        return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(columns))
    by_label = {row["label"]: row for row in summary_rows.values()}
    for label, mean in measured:
        row = by_label[label]
        writer.writerow(["measured", label, *(number(v, 4) for c in columns for v in (mean.get(c), stds[label].get(c))),
                         *("" if row["params"][k] is None else str(row["params"][k]) for k in ("vit_b16", "model")),
                         f"{row['train_seconds']:.1f}", len(row["seeds"])])
    for label, values in published:
        writer.writerow([published_label, label, *(number(v, 2) for c in columns for v in (values.get(c), None)),
                         "", "", "", ""])
    return buffer.getvalue()


def measured_table(result: JSONObject) -> str:
    """The measured rows of a Table-2 result (table2.json) as one markdown table: mean (± std over 2+ seeds),
    then the line saying what its target average is over."""
    entries = list(result.get("measured", {}).values())
    titles = dict(result.get("columns", {}))
    table = markdown_table([(e["label"], e["mean"]) for e in entries], {e["label"]: e["std"] for e in entries},
                           columns=[c for c in titles if c != "target_avg"], display=titles)
    return table + (f"\n{result['target_note']}\n" if result.get("target_note") else "")


def _extra_columns(rows: dict[str, JSONObject], classes: int) -> list[tuple[str, dict[str, str]]]:
    """The params (ViT-B/16 and this model) and train-seconds columns of the measured table, and the number of
    seeds of each row when they differ."""
    columns = [("params ViT-B/16", {r["label"]: _count_text(r["params"]["vit_b16"]) for r in rows.values()}),
               (f"params here ({classes} classes)", {r["label"]: _count_text(r["params"]["model"])
                                                     for r in rows.values()}),
               ("train s", {r["label"]: f"{r['train_seconds']:.1f}" for r in rows.values()})]
    if len({len(r["seeds"]) for r in rows.values()}) > 1:  # an incomplete table: rows over different seeds
        columns.append(("seeds", {r["label"]: str(len(r["seeds"])) for r in rows.values()}))
    return columns


def _open_session(cfg: Table2Config, cache_dir: Optional[str] = None) -> tuple[Session, list[str]]:
    """Validate `cfg` (seeds and WiSE methods, before any work), open the shared session (with the
    feature cache in `cache_dir` when given, e.g. a sweep's temporary one)."""

    if not cfg.seeds:
        raise ValueError("give at least one seed (--seeds 1 2 3)")
    methods = list(cfg.methods)  # each with its config (checked when the Table2Config was built)
    for name in methods:  # now that the process group (if any) is joined
        check_processes(name, cfg.method_configs[name])
    wise_methods(cfg.wise_methods, methods)  # a method that does not run or cannot be interpolated: refused now
    runtime = cfg.runtime if cache_dir is None else replace(cfg.runtime, cache=True, cache_dir=cache_dir)
    session = open_session(cfg.data, cfg.backbone, runtime)
    check_backbone_fit(session, {name: cfg.method_configs[name] for name in methods})  # all before the first fit
    return session, methods


def _top(out: Path) -> Path:
    """The folder `--resume` takes: a sweep's top folder for its shots_<K>/ tables."""
    return out.parent if out.name.startswith("shots_") and (out.parent / RECORD_FILE).exists() else out


def _done_before(out: Path, methods: Sequence[str]) -> tuple[dict[str, dict[int, dict]], dict[str, dict[str, float]]]:
    """(per_seed, timing) already in out/table2.json (a resumed run keeps them), else empty."""

    if not (out / "table2.json").is_file():
        return {}, {}
    saved = read_json_object(out / "table2.json", what_to_do="delete it to re-run this table")
    per_seed = {name: {int(s): v for s, v in seeds.items()} for name, seeds in saved.get("per_seed", {}).items()
                if name in methods}
    return per_seed, {name: t for name, t in saved.get("timing", {}).items() if name in per_seed}


def _run_shots(cfg: Table2Config, session: Session, methods: Sequence[str], out: Path,
               log: Callable[[str], None], resume: bool = False) -> JSONObject:
    """Every method for every seed at `cfg.shots`; table2.{md,csv,json} after each method, the bars at the end.
    With `resume` the fits already in out/table2.json are kept and only the missing ones run (a trained
    method continues from the last epoch saved in its <method>_seed<s>/ folder). On
    KeyboardInterrupt the table is written as incomplete ("complete": false) and the interrupt re-raised."""

    if ranks.is_main():
        out.mkdir(parents=True, exist_ok=True)
    wise = wise_methods(cfg.wise_methods, methods)
    per_seed, timing = _done_before(out, [*methods, *map(wise_key, wise)]) if resume else ({}, {})
    result: JSONObject = {}
    for seed in cfg.seeds:  # a fit whose WiSE row is missing runs again (the row needs the fitted weights)
        todo = [name for name in methods if seed not in per_seed.get(name, {})
                or (name in wise and seed not in per_seed.get(wise_key(name), {}))]
        if not todo:
            log(f"== {cfg.shots}-shot, seed {seed}: done before ({', '.join(methods)})")
            continue
        split = session.draw_split(cfg.shots, seed, cfg.val_shots)
        save_split(out / f"split_seed{seed}.json", split, session.split_meta())
        for name in todo:
            config = cfg.method_configs[name]
            log(f"== {cfg.shots}-shot, seed {seed}: {name} {changed_options(config) or ''}")
            fit_dir = out / f"{folder_name(name)}_seed{seed}"
            try:
                fit = fit_and_evaluate(session, name, config, split, seed=seed,  # resume: from the last epoch
                                       output_dir=fit_dir, log_line=log, resume=resume)
            except KeyboardInterrupt:
                _write_outputs(out, cfg, per_seed, timing, session, _missing(cfg, methods, per_seed))
                log(f"interrupted during {name} seed {seed}: {out / 'table2.md'} is marked incomplete")
                raise
            write_benchmark_results(fit_dir, session.family, fit.metrics, cfg.backbone.model,
                                    cfg.backbone.pretrained, name, {"fewshot_k": cfg.shots, "seed": seed},
                                    templates=templates_used(name, [fit.fit], cfg.data.templates))
            if name in wise:  # the same fit at θ(α): no second training
                _add_wise_row(session, fit, cfg.wise_alpha, seed, per_seed, timing, log)
            per_seed.setdefault(name, {})[seed] = {"row": session.row(fit.metrics), "metrics": fit.metrics,
                                                   **fit.to_dict()}
            t = timing.setdefault(name, {"fit_seconds": 0.0, "eval_seconds": 0.0, "images_encoded": 0})
            t["fit_seconds"] += fit.fit_seconds
            t["eval_seconds"] += fit.eval_seconds
            t["images_encoded"] += fit.images_encoded
            result = _write_outputs(out, cfg, per_seed, timing, session, _missing(cfg, methods, per_seed))
    if not result:  # everything was done before: rewrite the tables from what is saved
        result = _write_outputs(out, cfg, per_seed, timing, session, _missing(cfg, methods, per_seed))
    if result.get("measured"):

        accuracy_bars(result, out / BARS_FILE, columns=session.columns, title=f"{cfg.shots}-shot top-1, {_benchmark_title(cfg, session)}")
    log(f"Table 2 written to {out / 'table2.md'}")
    return result


def _add_wise_row(session: Session, fit: FitResult, alpha: float, seed: int, per_seed: dict[str, dict[int, dict]],
                  timing: dict, log: Callable[[str], None]) -> None:
    """Score the fitted method of `fit` at θ(α) (its trained weights are loaded again afterwards) and record
    it under wise_key(method) for `seed`."""

    started = time.perf_counter()
    log(f"   {fit.method} + WiSE (alpha {alpha:g}): the same fit at θ(α) = (1 − α)·θ₀ + α·θ₁")
    metrics = wise_sweep(session, fit.fitted, [alpha], log_line=log)[alpha]
    seconds = time.perf_counter() - started
    per_seed.setdefault(wise_key(fit.method), {})[seed] = {"row": session.row(metrics), "metrics": metrics,
                                                           "alpha": alpha, "of": fit.method}
    t = timing.setdefault(wise_key(fit.method), {"fit_seconds": 0.0, "eval_seconds": 0.0, "images_encoded": 0})
    t["eval_seconds"] += seconds


def _benchmark_title(cfg: Table2Config, session: Session) -> str:
    """What the numbers are: the run's own label (e.g. the miniature benchmark) or the backbone and data."""
    if cfg.benchmark_label:
        return cfg.benchmark_label
    backbone = session.backbone
    return f"{Path(str(backbone.model_name)).stem} ({backbone.weights_id}) on {session.data_root}"


def check_table2_dir(cfg: Table2Config, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse (ValueError) an unusable --output-dir, or one holding a table, before any work."""
    if cfg.output_dir is None:
        return
    check_output_dir(cfg.output_dir)
    check_not_in_use(cfg.output_dir)  # another process writing there (a second --overwrite or --resume)
    if not (overwrite or resume) and held_files(Path(cfg.output_dir), TABLE2_OWN_FILES, TABLE2_OWN_PATTERNS):
        claim_output_dir(cfg.output_dir, TABLE2_OWN_FILES, TABLE2_OWN_PATTERNS,
                         resume_hint=f"or --resume {cfg.output_dir} to finish it")


def _claim_table2_dir(cfg: Table2Config, shots: Sequence[int], overwrite: bool, resume: bool,
                      log: Callable[[str], None]) -> Path:
    """The output folder, created: a new unique runs/table2_<K>shot_<time> by default; the run's record
    (table2_config.json) written in it unless resuming."""
    def create() -> Path:  # on rank 0 only under torchrun; the others get its path
        if cfg.output_dir is None:

            return new_run_dir("runs", f"table2_{'-'.join(str(k) for k in shots)}shot_{time.strftime('%Y%m%d-%H%M%S')}")
        return claim_output_dir(cfg.output_dir, TABLE2_OWN_FILES, TABLE2_OWN_PATTERNS, overwrite=overwrite,
                                resume=resume)

    out = ranks.on_main(create)
    log(f"output folder: {out}")
    if not resume:
        write_json(out / RECORD_FILE, {"config": replace(cfg, output_dir=str(out)).to_dict(), "shots": list(shots),
                                       "environment": {"world_size": ranks.world_size()}})
    return out


class Table2Record(NamedTuple):
    """A Table-2 run's record (table2_config.json), read once for `--resume`: its config and shots, and the
    record as read (`saved`: its "environment" says how many processes the run started as)."""

    config: Table2Config
    shots: list[int]
    saved: JSONObject


def load_record(folder: Path) -> Table2Record:
    """The record of the Table-2 run in `folder` (its table2_config.json), for `--resume`."""

    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        raise ValueError(f"--resume {folder}: no {RECORD_FILE} there; give the output folder of an earlier "
                         "run_table2.py run")
    what_to_do = "the run cannot be resumed; start a new one"
    saved = read_json_object(path, what_to_do=what_to_do)
    config, shots = saved.get("config"), saved.get("shots")
    if not isinstance(config, dict) or not isinstance(shots, list) or not shots \
            or not all(isinstance(k, int) and not isinstance(k, bool) for k in shots):
        raise DamagedFileError(f"'{path}' is damaged: it does not hold a \"config\" object and a \"shots\" list "
                               f"of integers; {what_to_do}")
    try:
        return Table2Record(Table2Config.from_dict(config), [int(k) for k in shots], saved)
    except (ValueError, TypeError, KeyError) as err:  # a record edited by hand: values of the wrong kind
        raise DamagedFileError(f"'{path}' is damaged: {err}; {what_to_do}") from err


def run_table2(cfg: Table2Config, log: Callable[[str], None] = print, overwrite: bool = False,
               resume: bool = False) -> JSONObject:
    """Fit and score every method of `cfg.methods` on the same splits per seed; write table2.{md,csv,json}
    and table2_bars.png in `cfg.output_dir` (a new unique folder when None; the result's "output_dir").
    An --output-dir holding a table is refused unless `overwrite` (its files removed first) or `resume`
    (the fits in its table2.json are kept, only the missing ones run)."""
    check_table2_dir(cfg, overwrite, resume)
    session, methods = _open_session(cfg)
    out = _claim_table2_dir(cfg, [cfg.shots], overwrite, resume, log)
    return _run_shots(replace(cfg, output_dir=str(out)), session, methods, out, log, resume=resume)


def run_shots_sweep(cfg: Table2Config, shots: Sequence[int], log: Callable[[str], None] = print,
                    overwrite: bool = False, resume: bool = False) -> dict[int, JSONObject]:
    """Table 2 for each K of `shots` (same seeds, one backbone, one FeatureStore): per-K outputs in
    `shots_{K}/`, the largest K's table2.* and table2_bars.png copied to `cfg.output_dir`, and
    accuracy_vs_shots.{png,json,md} there (refreshed after each K). Returns {K: run_table2 result}.

    The splits of every K come from the same seed, so a K-shot set is contained in every larger one.
    With the feature cache disabled (`runtime.cache=False`) a temporary cache lives for the sweep, so the
    evaluation sets are still encoded once, not once per K.
    """
    ks = sorted(set(int(k) for k in shots))
    if not ks or ks[0] < 1:
        raise ValueError(f"--shots must be positive integers, got {list(shots)}")
    check_table2_dir(cfg, overwrite, resume)
    results: dict[int, JSONObject] = {}
    with tempfile.TemporaryDirectory(prefix="clipconv-sweep-features-") as scratch:
        session, methods = _open_session(cfg, cache_dir=None if cfg.runtime.cache else scratch)
        out = _claim_table2_dir(cfg, ks, overwrite, resume, log)
        cfg = replace(cfg, output_dir=str(out))
        for k in ks:
            k_cfg = replace(cfg, shots=k, output_dir=str(out / f"shots_{k}"))
            results[k] = _run_shots(k_cfg, session, methods, out / f"shots_{k}", log, resume=resume)
            if len(results) > 1:  # refreshed after every K, so an interrupted sweep keeps what it measured
                _write_sweep_outputs(out, cfg, results, _benchmark_title(cfg, session))
    largest = out / f"shots_{ks[-1]}"
    for name in ("table2.md", "table2.csv", "table2.json", BARS_FILE):
        if (largest / name).is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(largest / name, tmp)
    log(f"Table 2 for {ks[-1]} shots written to {out / 'table2.md'}")
    return results


def shots_summary(results_by_shots: dict[int, JSONObject]) -> JSONObject:
    """{"shots": [K...], "columns": {...}, "methods": {label: {column: {"K": {"mean", "std"}}}}} of a sweep."""
    ks = sorted(results_by_shots)
    names = results_by_shots[ks[0]].get("columns") if ks else None
    names = names or {c: DISPLAY.get(c, "target avg") for c in COLUMNS}
    methods: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for k in ks:
        for entry in results_by_shots[k].get("measured", {}).values():
            for column in names:
                if column in entry["mean"]:
                    methods.setdefault(entry["label"], {}).setdefault(column, {})[str(k)] = {
                        "mean": entry["mean"][column], "std": entry["std"].get(column, float("nan"))}
    return {"shots": ks, "columns": dict(names), "methods": methods}


def _write_sweep_outputs(out: Path, cfg: Table2Config, results: dict[int, JSONObject], title: str) -> None:

    summary = shots_summary(results)
    source = next(iter(summary["columns"]))
    shown = (source, "target_avg")  # the source set and the target average
    summary["seeds"] = list(cfg.seeds)
    summary["benchmark"] = title
    summary["timing"] = {str(k): results[k].get("timing", {}) for k in summary["shots"]}  # seconds per K, method
    write_json(out / (SWEEP_FILE + ".json"), summary)
    ks = summary["shots"]
    seeds = ", ".join(str(s) for s in cfg.seeds)
    over = f"Mean ± std over seeds {seeds}" if len(cfg.seeds) > 1 else f"Seed {seeds}"
    md = [f"# Top-1 (%) against the number of shots: {title}", "",
          f"{over}; per-K tables in shots_<K>/table2.md.", ""]
    for column in shown:
        heading = summary["columns"][column] + (" (source)" if column == source else "")
        md += [f"## {heading}", "",
               "| method | " + " | ".join(f"{k}-shot" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for label, by_column in summary["methods"].items():
            cells = by_column.get(column, {})
            md.append(f"| {label} | " + " | ".join(_mean_std(cells.get(str(k)), len(cfg.seeds) > 1) for k in ks)
                      + " |")
        md.append("")
    write_text(out / (SWEEP_FILE + ".md"), "\n".join(md))
    accuracy_vs_shots(results, out / (SWEEP_FILE + ".png"), domain_columns=shown,
                      title=f"Top-1 against shots, {title}")


def _mean_std(cell: Optional[dict[str, float]], with_std: bool) -> str:
    if not cell or math.isnan(cell["mean"]):
        return "–"
    std = cell.get("std", float("nan"))
    return f"{cell['mean']:.2f}" + ("" if math.isnan(std) or not with_std else f" ± {std:.2f}")
