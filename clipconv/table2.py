"""Table 2 of the Convpass paper in one call: every method on the same K-shot splits, mean ± std over seeds.

For each seed a K-shot split (+ a disjoint validation split from the remaining train images, used for
every method's hyper-parameter choice) is drawn once and saved as `split_seed{s}.json`; all methods
are fitted on it and scored on the robustness suite. Frozen-encoder methods share one FeatureStore, so
each image set is encoded once per backbone (and once per augmentation seed). Results are written
after every method (`table2.json`, `table2.md`, `table2.csv`, atomically), next to the paper's
published numbers, labelled as such. The std is the population std over seeds (as CoOp reports it).
"""
from __future__ import annotations

import inspect
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .io import write_json, write_text
from .report import DISPLAY, PUBLISHED_TABLE2, SUITE, markdown_table, results_row, target_average

__all__ = ["Table2Config", "TABLE2_METHODS", "METHOD_LABELS", "PUBLISHED_LABEL", "run_table2",
           "method_options_for", "aggregate_seeds"]

TABLE2_METHODS = ("zero_shot", "linear_probe", "coop", "cocoop", "tip_adapter", "tip_adapter_f", "convpass")
METHOD_LABELS = {
    "zero_shot": "ZS CLIP", "linear_probe": "LP CLIP", "coop": "CoOp", "cocoop": "CoCoOp",
    "tip_adapter": "Tip-Adapter", "tip_adapter_f": "Tip-Adapter-F", "convpass": "Convpass_CLIP",
}
PUBLISHED_LABEL = "published (paper, ImageNet, ViT-B/16)"
COLUMNS = (*SUITE, "target_avg")


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
    templates: str = "photo"
    eval_sets: Sequence[str] = SUITE
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs_scale: float = 1.0
    cache_dir: Optional[str] = "default"  # None disables the feature cache
    device: str = "auto"
    precision: str = "fp32"  # "auto": bf16 on CUDA, fp32 on CPU
    workers: int = 0
    batch_size: int = 64


def _default_epochs(cls: type) -> Optional[int]:
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
    parameters = inspect.signature(cls.__init__).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
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


def _published_rows(methods: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    rows = []
    for name in methods:
        if name in PUBLISHED_TABLE2:
            values = dict(zip(SUITE, PUBLISHED_TABLE2[name]))
            values["target_avg"] = target_average(values)
            rows.append((METHOD_LABELS.get(name, name), values))
    return rows


def _write_outputs(out: Path, cfg: Table2Config, per_seed: dict[str, dict[int, dict]], timing: dict,
                   info: dict) -> dict[str, Any]:
    measured, stds, summary_rows = [], {}, {}
    for name in cfg.methods:
        seeds = per_seed.get(name, {})
        if not seeds:
            continue
        label = METHOD_LABELS.get(name, name)
        mean, std = aggregate_seeds([seeds[s]["row"] for s in sorted(seeds)])
        measured.append((label, mean))
        stds[label] = std
        summary_rows[name] = {"label": label, "mean": mean, "std": std, "seeds": sorted(seeds)}
    published = _published_rows([n for n in TABLE2_METHODS if n in PUBLISHED_TABLE2])
    seeds_text = ", ".join(str(s) for s in cfg.seeds)
    md = [f"# Table 2: {cfg.shots}-shot, top-1 (%), mean ± std over seeds {seeds_text}", "",
          f"Backbone {info['backbone']['model']} ({info['backbone']['weights_id']}); data {cfg.data_root}; "
          f"templates {cfg.templates}; validation: {cfg.val_shots} train images per class outside the K-shot set.",
          "", "## measured (this run)", "", markdown_table(measured, stds), "",
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


def run_table2(cfg: Table2Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit and score every method of `cfg.methods` on the same splits per seed; write table2.{md,csv,json}."""
    from .backbone import load_backbone, resolve_device
    from .data import eval_split, resolve_run_classes, sample_few_shot, save_split, train_samples
    from .evaluate import evaluate_method
    from .features import FeatureStore
    from .methods import FitContext, build_method
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
                      stacklevel=2)
    for name in methods:  # validate every option before any work
        method_options_for(name, METHODS[name], cfg.method_options.get(name, {}), cfg.epochs_scale)

    data_root = Path(cfg.data_root)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = resolve_run_classes(data_root, cfg.classnames)
    templates = load_templates(cfg.templates)
    device = resolve_device(cfg.device)
    precision = cfg.precision
    if precision == "auto":
        from .engine import resolve_precision

        precision = resolve_precision(precision, device)
    backbone = load_backbone(cfg.model, cfg.pretrained, device=device, precision=precision)
    store = FeatureStore(backbone, cfg.cache_dir, batch_size=cfg.batch_size, workers=cfg.workers, device=device)
    samples = train_samples(data_root, classes)
    splits = [s for s in (eval_split(data_root, name, classes) for name in cfg.eval_sets) if s is not None]
    if not splits:
        raise ValueError(f"none of the evaluation sets {list(cfg.eval_sets)} was found under '{data_root}'")
    info = {"backbone": backbone.describe(), "classes": len(classes),
            "eval_sets": {s.name: len(s.samples) for s in splits}}
    per_seed: dict[str, dict[int, dict]] = {}
    timing: dict[str, dict[str, float]] = {}
    result: dict[str, Any] = {}
    for seed in cfg.seeds:
        split = sample_few_shot(samples, cfg.shots, seed, val_shots=cfg.val_shots, root=data_root,
                                class_names=classes.names)
        save_split(out / f"split_seed{seed}.json", split,
                   {"class_ids": list(classes.ids), "data_root": str(data_root.resolve())})
        for name in methods:
            options = method_options_for(name, METHODS[name], cfg.method_options.get(name, {}), cfg.epochs_scale,
                                         generic={"seed": seed, "workers": cfg.workers,
                                                  "eval_batch_size": cfg.batch_size})
            method = build_method(name, **options)
            ctx = FitContext(backbone=backbone, classnames=list(classes.names), data_root=data_root,
                             train=split.train, val=split.val, templates=templates, features=store, device=device,
                             seed=seed, output_dir=out / f"{name}_seed{seed}", class_hash=classes.hash(),
                             workers=cfg.workers, log=log)
            if "class_ids" in inspect.signature(FitContext).parameters:
                ctx.class_ids = list(classes.ids)
            log(f"== seed {seed}: {name} {options or ''}")
            calls = store.encoder_calls
            before = _fingerprint(backbone.model)
            started = time.perf_counter()
            fit_summary = method.fit(ctx)
            fitted = time.perf_counter()
            if _fingerprint(backbone.model) != before:  # later methods share the backbone and its cached features
                raise RuntimeError(f"method '{name}' modified the shared backbone in place; it must work on a copy")
            metrics = evaluate_method(method, splits, data_root, device, features=store,
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
            result = _write_outputs(out, cfg, per_seed, timing, info)
    log(f"Table 2 written to {out / 'table2.md'}")
    return result


def _fingerprint(model: Any) -> tuple:
    """Parameter names, shapes and sums: changes when a method alters the shared backbone in place."""
    import torch

    with torch.no_grad():
        return tuple((n, tuple(p.shape), float(p.double().sum())) for n, p in model.state_dict().items())


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
