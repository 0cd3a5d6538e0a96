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

import inspect
import math
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .io import atomic_path, write_json, write_text
from .report import DISPLAY, PUBLISHED_TABLE2, SUITE, markdown_table, results_row, target_average

__all__ = ["Table2Config", "TABLE2_METHODS", "METHOD_LABELS", "PUBLISHED_LABEL", "BARS_FILE", "SWEEP_FILE",
           "templates_used", "row_label", "run_table2", "run_shots_sweep", "shots_summary", "method_options_for", "aggregate_seeds"]

TABLE2_METHODS = ("zero_shot", "linear_probe", "coop", "cocoop", "tip_adapter", "tip_adapter_f", "convpass")
METHOD_LABELS = {
    "zero_shot": "ZS CLIP", "linear_probe": "LP CLIP", "coop": "CoOp", "cocoop": "CoCoOp",
    "tip_adapter": "Tip-Adapter", "tip_adapter_f": "Tip-Adapter-F", "convpass": "Convpass_CLIP",
}
PUBLISHED_LABEL = "published (paper, ImageNet, ViT-B/16)"
#: the template set behind a published row where the label must say it (the paper's ZS CLIP is single-prompt)
PUBLISHED_TEMPLATES = {"zero_shot": ("photo", 1)}
COLUMNS = (*SUITE, "target_avg")
BARS_FILE = "table2_bars.png"
SWEEP_FILE = "accuracy_vs_shots"  # .png, .json, .md


@dataclass
class Table2Config:
    """Settings of one Table-2 run (saved in table2.json)."""

    data_root: str
    output_dir: str = "runs/table2"
    shots: int = 16
    seeds: Sequence[int] = (1, 2, 3)
    val_shots: int = 4
    methods: Sequence[str] = TABLE2_METHODS
    model: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    classnames: Optional[str] = None
    templates: Optional[str] = None  # None: each method's reference set (Method.reference_templates)
    eval_sets: Sequence[str] = SUITE
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs_scale: float = 1.0
    crop_scale: float = 0.08  # smallest area of the train random resized crop (methods using train_transform)
    cache_dir: Optional[str] = "default"  # None disables the feature cache
    device: str = "auto"
    precision: str = "fp32"  # "auto": bf16 on CUDA, fp32 on CPU
    workers: int = 0
    batch_size: int = 64
    benchmark_label: Optional[str] = None  # what the data is, for plot titles (e.g. "miniature benchmark")


def _default_epochs(cls: type) -> Optional[int]:
    from .methods.base import method_option_defaults

    config_options = method_option_defaults(cls)
    if config_options is not None:
        epochs = config_options.get("epochs")
        return epochs if isinstance(epochs, int) else None
    parameters = inspect.signature(cls.__init__).parameters
    if "epochs" in parameters and isinstance(parameters["epochs"].default, int):
        return parameters["epochs"].default
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        try:  # methods trained by the engine take its options as keyword arguments
            from .engine import TrainConfig

            return int(TrainConfig().epochs)
        except (ImportError, AttributeError):
            return None
    return None


def method_options_for(name: str, cls: type, given: dict[str, Any], epochs_scale: float = 1.0,
                       generic: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Constructor options of one method: `given` (must be accepted, else a clear error), `epochs` scaled
    from the method's default when `epochs_scale` != 1 and not given, plus `generic` ones it accepts."""
    from .methods.base import method_option_defaults

    config_options = method_option_defaults(cls)
    parameters = config_options if config_options is not None else inspect.signature(cls.__init__).parameters
    open_ended = config_options is None and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [k for k in given if k not in parameters and not open_ended]
    if unknown:
        accepted = sorted(k for k in parameters if k != "self")
        raise ValueError(f"--method-options for '{name}': unknown option(s) {unknown}; it accepts {accepted}")
    options = dict(given)
    if epochs_scale != 1.0 and "epochs" not in options:
        default = _default_epochs(cls)
        if default is not None:
            options["epochs"] = max(1, int(round(default * epochs_scale)))
    for key, value in (generic or {}).items():
        if key not in options and key in parameters:
            options[key] = value
    return options


def aggregate_seeds(rows: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and population std over seeds, per column present in every row."""
    mean, std = {}, {}
    for column in COLUMNS:
        values = [row[column] for row in rows if column in row and not math.isnan(row[column])]
        if values and len(values) == len(rows):
            mu = sum(values) / len(values)
            mean[column] = mu
            std[column] = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))
    if "target_avg" not in mean:
        mean["target_avg"] = target_average(mean)
    return mean, std


def templates_used(name: str, fits: Sequence[dict[str, Any]], run_templates: Optional[str]
                   ) -> Optional[tuple[str, int]]:
    """(template set, count) a row's method used: from its fit summaries ("template_set", "templates"), else
    derived from the run's --templates or the method's reference set; None for a method without templates."""
    for fit in fits:
        if isinstance(fit, dict) and "template_set" in fit:
            return str(fit["template_set"]), int(fit["templates"])
    from .methods.base import METHODS
    from .prompts import load_templates

    reference = getattr(METHODS.get(name), "reference_templates", None)
    if reference is None:
        return None
    chosen = run_templates or reference
    return chosen, len(load_templates(chosen))


def row_label(name: str, used: Optional[tuple[str, int]]) -> str:
    """A row's label; zero-shot says single prompt or ensemble ("ZS CLIP (1 template)" — the paper's 66.73 —
    vs "ZS CLIP (80-template ensemble)", open_clip's 68.34)."""
    label = METHOD_LABELS.get(name, name)
    if name == "zero_shot" and used is not None:
        label += " (1 template)" if used[1] == 1 else f" ({used[1]}-template ensemble)"
    return label


def _templates_text(run_templates: Optional[str]) -> str:
    return f"{run_templates} for every method" if run_templates else "each method's reference set (--templates overrides)"


def _published_rows(methods: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    rows = []
    for name in methods:
        if name in PUBLISHED_TABLE2:
            values = dict(zip(SUITE, PUBLISHED_TABLE2[name]))
            values["target_avg"] = target_average(values)
            rows.append((row_label(name, PUBLISHED_TEMPLATES.get(name)), values))
    return rows


def _write_outputs(out: Path, cfg: Table2Config, per_seed: dict[str, dict[int, dict]], timing: dict,
                   info: dict) -> dict[str, Any]:
    measured, stds, summary_rows, template_lines = [], {}, {}, []
    for name in cfg.methods:
        seeds = per_seed.get(name, {})
        if not seeds:
            continue
        used = templates_used(name, [seeds[s].get("fit") for s in sorted(seeds)], cfg.templates)
        label = row_label(name, used)
        mean, std = aggregate_seeds([seeds[s]["row"] for s in sorted(seeds)])
        measured.append((label, mean))
        stds[label] = std
        summary_rows[name] = {"label": label, "mean": mean, "std": std, "seeds": sorted(seeds),
                              "template_set": used[0] if used else None, "templates": used[1] if used else 0}
        template_lines.append(f"| {label} | " + (f"{used[0]} ({used[1]})" if used else "none") + " |")
    published = _published_rows([n for n in TABLE2_METHODS if n in PUBLISHED_TABLE2])
    seeds_text = ", ".join(str(s) for s in cfg.seeds)
    md = [f"# Table 2: {cfg.shots}-shot, top-1 (%), mean ± std over seeds {seeds_text}", "",
          f"Backbone {info['backbone']['model']} ({info['backbone']['weights_id']}); data {cfg.data_root}; "
          f"templates: {_templates_text(cfg.templates)}; validation: {cfg.val_shots} train images per class outside "
          f"the K-shot set.",
          "", "## measured (this run)", "", markdown_table(measured, stds), "",
          "## prompt templates per row", "", "| method | template set (count) |", "|---|---|", *template_lines, "",
          "## " + PUBLISHED_LABEL, "",
          "Numbers printed in the Convpass paper (Table 2): full ImageNet, OpenAI ViT-B/16. For reference only — "
          "not comparable with a run on other data or another backbone.", "",
          markdown_table(published), "",
          "## wall time per method (seconds, summed over seeds)", "",
          "| method | fit | eval | images encoded by the feature cache |", "|---|---|---|---|"]
    for name, t in timing.items():
        md.append(f"| {METHOD_LABELS.get(name, name)} | {t['fit_seconds']:.1f} | {t['eval_seconds']:.1f} | "
                  f"{t['images_encoded']} |")
    write_text(out / "table2.md", "\n".join(md) + "\n")
    csv_lines = ["source,method," + ",".join(f"{c},{c}_std" for c in COLUMNS)]
    for label, mean in measured:
        cells = [f"{mean.get(c, float('nan')):.4f},{stds[label].get(c, float('nan')):.4f}" for c in COLUMNS]
        csv_lines.append(f"measured,{label}," + ",".join(cells))
    for label, values in published:
        csv_lines.append(f"\"{PUBLISHED_LABEL}\",{label}," + ",".join(f"{values[c]:.2f}," for c in COLUMNS))
    write_text(out / "table2.csv", "\n".join(csv_lines) + "\n")
    result = {"config": {**asdict(cfg), "seeds": list(cfg.seeds), "methods": list(cfg.methods),
                         "eval_sets": list(cfg.eval_sets)},
              **info, "columns": {c: DISPLAY.get(c, "target avg") for c in COLUMNS}, "measured": summary_rows,
              "per_seed": {n: {str(s): v for s, v in seeds.items()} for n, seeds in per_seed.items()},
              "timing": timing,
              "published": {"label": PUBLISHED_LABEL, "rows": {label: values for label, values in published}}}
    write_json(out / "table2.json", result)
    return result


@dataclass
class _Session:
    """What every K of a run shares: the backbone, the one FeatureStore, the class list, the data."""

    backbone: Any
    store: Any
    classes: Any
    templates: Optional[list]  # None: each method's reference set
    device: Any
    data_root: Path
    samples: list
    splits: list
    info: dict
    methods: list


def _open_session(cfg: Table2Config, cache_dir: Any) -> _Session:
    """Validate `cfg`, load the backbone once and list the train and evaluation images."""
    from .backbone import load_backbone, resolve_device
    from .data import eval_splits, resolve_run_classes, train_samples
    from .features import FeatureStore
    from .methods.base import METHODS, method_names
    from .prompts import load_templates

    if not cfg.seeds:
        raise ValueError("give at least one seed (--seeds 1 2 3)")
    known = method_names()
    unknown = [m for m in cfg.methods if m not in known and m != "convpass"]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {known}")
    stray = sorted(set(cfg.method_options) - set(cfg.methods))
    if stray:
        raise ValueError(f"--method-options names method(s) {stray} that are not in --methods {list(cfg.methods)}")
    methods = [m for m in cfg.methods if m in METHODS]
    if "convpass" in cfg.methods and "convpass" not in METHODS:
        warnings.warn("method 'convpass' is not registered (clipconv/methods/finetune.py missing); row skipped",
                      stacklevel=3)
    for name in methods:  # validate every option before any work
        method_options_for(name, METHODS[name], cfg.method_options.get(name, {}), cfg.epochs_scale)

    data_root = Path(cfg.data_root)
    classes = resolve_run_classes(data_root, cfg.classnames)
    templates = load_templates(cfg.templates) if cfg.templates else None
    device = resolve_device(cfg.device)
    precision = cfg.precision
    if precision == "auto":
        from .engine import resolve_precision

        precision = resolve_precision(precision, device)
    backbone = load_backbone(cfg.model, cfg.pretrained, device=device, precision=precision,
                             train_crop_scale=(cfg.crop_scale, 1.0))
    store = FeatureStore(backbone, cache_dir, batch_size=cfg.batch_size, workers=cfg.workers, device=device)
    samples = train_samples(data_root, classes)
    splits = eval_splits(data_root, cfg.eval_sets, classes)
    if not splits:
        raise ValueError(f"none of the evaluation sets {list(cfg.eval_sets)} was found under '{data_root}'")
    info = {"backbone": backbone.describe(), "classes": len(classes),
            "eval_sets": {s.name: len(s.samples) for s in splits}}
    return _Session(backbone, store, classes, templates, device, data_root, samples, splits, info, methods)


def _run_shots(cfg: Table2Config, session: _Session, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Every method for every seed at `cfg.shots`; table2.{md,csv,json} after each method, the bars at the end."""
    from .data import sample_few_shot, save_split
    from .evaluate import evaluate_method
    from .methods import FitContext, build_method
    from .methods.base import METHOD_REFERENCE_TEMPLATES, METHODS

    out.mkdir(parents=True, exist_ok=True)
    backbone, store, classes, data_root = session.backbone, session.store, session.classes, session.data_root
    per_seed: dict[str, dict[int, dict]] = {}
    timing: dict[str, dict[str, float]] = {}
    result: dict[str, Any] = {}
    for seed in cfg.seeds:
        split = sample_few_shot(session.samples, cfg.shots, seed, val_shots=cfg.val_shots, root=data_root,
                                class_names=classes.names)
        save_split(out / f"split_seed{seed}.json", split,
                   {"class_ids": list(classes.ids), "data_root": str(data_root.resolve())})
        for name in session.methods:
            options = method_options_for(name, METHODS[name], cfg.method_options.get(name, {}), cfg.epochs_scale,
                                         generic={"seed": seed, "workers": cfg.workers,
                                                  "eval_batch_size": cfg.batch_size})
            method = build_method(name, **options)
            ctx = FitContext(backbone=backbone, classnames=list(classes.names), data_root=data_root,
                             train=split.train, val=split.val, features=store,
                             templates=METHOD_REFERENCE_TEMPLATES if session.templates is None else session.templates,
                             templates_name=cfg.templates or "",
                             device=session.device, seed=seed, output_dir=out / f"{name}_seed{seed}",
                             class_hash=classes.hash(), workers=cfg.workers, eval_batch_size=cfg.batch_size, log=log)
            if "class_ids" in inspect.signature(FitContext).parameters:
                ctx.class_ids = list(classes.ids)
            log(f"== {cfg.shots}-shot, seed {seed}: {name} {options or ''}")
            calls = store.encoder_calls
            before = _fingerprint(backbone.model)
            started = time.perf_counter()
            fit_summary = method.fit(ctx)
            fitted = time.perf_counter()
            if _fingerprint(backbone.model) != before:  # later methods share the backbone and its cached features
                raise RuntimeError(f"method '{name}' modified the shared backbone in place; it must work on a copy")
            metrics = evaluate_method(method, session.splits, data_root, session.device, features=store,
                                      eval_transform=backbone.eval_transform, batch_size=cfg.batch_size,
                                      workers=cfg.workers, log=log)
            done = time.perf_counter()
            per_seed.setdefault(name, {})[seed] = {"row": results_row(metrics), "metrics": metrics,
                                                   "fit": _jsonable(fit_summary), "options": _jsonable(options),
                                                   "fit_seconds": fitted - started, "eval_seconds": done - fitted}
            t = timing.setdefault(name, {"fit_seconds": 0.0, "eval_seconds": 0.0, "images_encoded": 0})
            t["fit_seconds"] += fitted - started
            t["eval_seconds"] += done - fitted
            t["images_encoded"] += store.encoder_calls - calls
            result = _write_outputs(out, cfg, per_seed, timing, session.info)
    if result.get("measured"):
        from .plots import accuracy_bars

        accuracy_bars(result, out / BARS_FILE, title=f"{cfg.shots}-shot top-1, {_benchmark_title(cfg, session.info)}")
    log(f"Table 2 written to {out / 'table2.md'}")
    return result


def _benchmark_title(cfg: Table2Config, info: dict) -> str:
    """What the numbers are: the run's own label (e.g. the miniature benchmark) or the backbone and data."""
    if cfg.benchmark_label:
        return cfg.benchmark_label
    backbone = info["backbone"]
    return f"{Path(str(backbone['model'])).stem} ({backbone['weights_id']}) on {cfg.data_root}"


def run_table2(cfg: Table2Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit and score every method of `cfg.methods` on the same splits per seed; write table2.{md,csv,json}
    and table2_bars.png in `cfg.output_dir`."""
    session = _open_session(cfg, cfg.cache_dir)
    return _run_shots(cfg, session, Path(cfg.output_dir), log)


def run_shots_sweep(cfg: Table2Config, shots: Sequence[int],
                    log: Callable[[str], None] = print) -> dict[int, dict[str, Any]]:
    """Table 2 for each K of `shots` (same seeds, one backbone, one FeatureStore): per-K outputs in
    `shots_{K}/`, the largest K's table2.* and table2_bars.png copied to `cfg.output_dir`, and
    accuracy_vs_shots.{png,json,md} there (refreshed after each K). Returns {K: run_table2 result}.

    The splits of every K come from the same seed, so a K-shot set is contained in every larger one.
    With the feature cache disabled (`cache_dir=None`) a temporary cache lives for the sweep, so the
    evaluation sets are still encoded once, not once per K.
    """
    ks = sorted(set(int(k) for k in shots))
    if not ks or ks[0] < 1:
        raise ValueError(f"--shots must be positive integers, got {list(shots)}")
    out = Path(cfg.output_dir)
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="clipconv-sweep-features-") as scratch:
        session = _open_session(cfg, cfg.cache_dir if cfg.cache_dir is not None else scratch)
        for k in ks:
            k_cfg = replace(cfg, shots=k, output_dir=str(out / f"shots_{k}"))
            results[k] = _run_shots(k_cfg, session, out / f"shots_{k}", log)
            if len(results) > 1:  # refreshed after every K, so an interrupted sweep keeps what it measured
                _write_sweep_outputs(out, cfg, results, _benchmark_title(cfg, session.info))
    largest = out / f"shots_{ks[-1]}"
    for name in ("table2.md", "table2.csv", "table2.json", BARS_FILE):
        if (largest / name).is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(largest / name, tmp)
    log(f"Table 2 for {ks[-1]} shots written to {out / 'table2.md'}")
    return results


def shots_summary(results_by_shots: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """{"shots": [K...], "columns": {...}, "methods": {label: {column: {"K": {"mean", "std"}}}}} of a sweep."""
    ks = sorted(results_by_shots)
    methods: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for k in ks:
        for entry in results_by_shots[k].get("measured", {}).values():
            for column in COLUMNS:
                if column in entry["mean"]:
                    methods.setdefault(entry["label"], {}).setdefault(column, {})[str(k)] = {
                        "mean": entry["mean"][column], "std": entry["std"].get(column, float("nan"))}
    return {"shots": ks, "columns": {c: DISPLAY.get(c, "target avg") for c in COLUMNS}, "methods": methods}


def _write_sweep_outputs(out: Path, cfg: Table2Config, results: dict[int, dict[str, Any]], title: str) -> None:
    from .plots import SHOTS_COLUMNS, accuracy_vs_shots

    summary = shots_summary(results)
    summary["seeds"] = list(cfg.seeds)
    summary["benchmark"] = title
    summary["timing"] = {str(k): results[k].get("timing", {}) for k in summary["shots"]}  # seconds per K, method
    write_json(out / (SWEEP_FILE + ".json"), summary)
    ks = summary["shots"]
    seeds = ", ".join(str(s) for s in cfg.seeds)
    over = f"Mean ± std over seeds {seeds}" if len(cfg.seeds) > 1 else f"Seed {seeds}"
    md = [f"# Top-1 (%) against the number of shots: {title}", "",
          f"{over}; per-K tables in shots_<K>/table2.md.", ""]
    for column in SHOTS_COLUMNS:
        heading = DISPLAY.get(column, "target avg") + (" (source)" if column == SUITE[0] else "")
        md += [f"## {heading}", "",
               "| method | " + " | ".join(f"{k}-shot" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for label, by_column in summary["methods"].items():
            cells = by_column.get(column, {})
            md.append(f"| {label} | " + " | ".join(_mean_std(cells.get(str(k)), len(cfg.seeds) > 1) for k in ks)
                      + " |")
        md.append("")
    write_text(out / (SWEEP_FILE + ".md"), "\n".join(md))
    accuracy_vs_shots(results, out / (SWEEP_FILE + ".png"), title=f"Top-1 against shots, {title}")


def _mean_std(cell: Optional[dict[str, float]], with_std: bool) -> str:
    if not cell or math.isnan(cell["mean"]):
        return "–"
    std = cell.get("std", float("nan"))
    return f"{cell['mean']:.2f}" + ("" if math.isnan(std) or not with_std else f" ± {std:.2f}")


def _fingerprint(model: Any) -> tuple:
    """Parameter names, shapes and sums: changes when a method alters the shared backbone in place."""
    import torch

    with torch.no_grad():
        return tuple((n, tuple(p.shape), float(p.double().sum())) for n, p in model.state_dict().items())


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
