"""One few-shot run, from data to metrics: split → method.fit → robustness suite → run directory."""
from __future__ import annotations

import inspect
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .io import write_json, write_text

__all__ = ["RunConfig", "RunContext", "prepare_run", "run_method", "write_results", "setup_logging", "method_kwargs"]

log = logging.getLogger("clipconv")


@dataclass
class RunConfig:
    """Every setting of a run (saved as config.json; `--resume` reads it back)."""

    method: str = "convpass"
    data_root: Optional[str] = None
    demo: bool = False
    shots: int = 16
    seed: int = 1
    val_shots: int = 0
    split: Optional[str] = None
    model: str = "ViT-B-16"
    pretrained: Optional[str] = "openai"
    classnames: Optional[str] = None
    templates: Optional[str] = None  # None: each method's reference templates (Method.reference_templates)
    eval_sets: Sequence[str] = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    output_dir: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"
    crop_scale: Optional[float] = 0.08
    workers: int = 2
    eval_batch_size: int = 128
    cache: bool = True
    strict: bool = False
    method_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["eval_sets"] = list(self.eval_sets)
        return out


@dataclass
class RunContext:
    """What `prepare_run` resolved: backbone, classes, split, templates and the run directory."""

    config: RunConfig
    data_root: Path
    backbone: Any
    classes: Any
    split: Any
    templates: Optional[list[str]]  # None: each method's reference templates
    run_dir: Path
    device: torch.device


def setup_logging(run_dir: Optional[Path] = None) -> None:
    """Log to stderr and, when given, to run_dir/log.txt (appending, so a resumed run keeps its history)."""
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(stream)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file_handler)
    log.propagate = False


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method}_{cfg.shots}shot_seed{cfg.seed}_{stamp}"


def prepare_run(cfg: RunConfig, run_dir: Optional[Path] = None) -> RunContext:
    """Resolve data, classes, backbone, templates and the K-shot split; writes nothing."""
    from .backbone import load_backbone, resolve_device
    from .data import resolve_run_classes, sample_few_shot, train_samples
    from .data.fewshot import load_split
    from .engine import resolve_precision
    from .prompts import load_templates

    data_root = Path(cfg.data_root)
    classes = resolve_run_classes(data_root, cfg.classnames)
    templates = load_templates(cfg.templates) if cfg.templates else None
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if cfg.split:
        split, meta = load_split(cfg.split)
        saved_ids = meta.get("class_ids")
        if saved_ids is not None and list(saved_ids) != list(classes.ids):
            raise ValueError(f"split file '{cfg.split}' was drawn for other classes than the data under '{data_root}'")
    else:
        samples = train_samples(data_root, classes)
        split = sample_few_shot(samples, cfg.shots, cfg.seed, val_shots=cfg.val_shots, root=data_root,
                                class_names=classes.names)
    backbone = load_backbone(cfg.model, cfg.pretrained, device=device, precision=precision,
                             train_crop_scale=(cfg.crop_scale, 1.0))
    return RunContext(cfg, data_root, backbone, classes, split, templates,
                      Path(run_dir) if run_dir else default_run_dir(cfg), device)


def method_kwargs(method_name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options the method's constructor accepts (generic CLI flags apply where they make sense)."""
    from .methods.base import METHODS, MethodConfig, method_names

    method_names()
    cls = METHODS[method_name]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    allowed = {n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind in named}
    if cls.config_class is not MethodConfig:  # methods with an options dataclass accept its fields
        allowed |= set(cls.config_class.help())
    return {k: v for k, v in options.items() if v is not None and k in allowed}


def run_method(run: RunContext) -> dict[str, Any]:
    """Fit the configured method on the K-shot split and evaluate it on the suite; write the run dir."""
    from .data import eval_splits
    from .data.fewshot import save_split
    from .evaluate import evaluate_method
    from .features import FeatureStore, default_cache_dir
    from .methods import FitContext, build_method
    from .methods.base import METHOD_REFERENCE_TEMPLATES

    cfg, run_dir = run.config, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.method_options.get("resume"):  # a resumed run keeps its original config and split
        write_json(run_dir / "config.json", cfg.to_dict())
        split_meta = {"shots": cfg.shots, "seed": cfg.seed, "val_shots": cfg.val_shots,
                      "class_ids": list(run.classes.ids), "data_root": str(run.data_root.resolve())}
        save_split(run_dir / "split.json", run.split, split_meta)
    log.info(f"{cfg.method}: {len(run.classes)} classes, {len(run.split.train)} train / {len(run.split.val)} val "
             f"images, backbone {run.backbone.model_name} ({run.backbone.weights_id}), device {run.device}")

    options = dict(cfg.method_options)
    options.setdefault("seed", cfg.seed)
    options.setdefault("workers", cfg.workers)
    options.setdefault("eval_batch_size", cfg.eval_batch_size)
    method = build_method(cfg.method, **method_kwargs(cfg.method, options))
    features = FeatureStore(run.backbone, cache_dir=default_cache_dir() if cfg.cache else None,
                            batch_size=cfg.eval_batch_size, workers=cfg.workers, device=run.device)
    ctx = FitContext(
        backbone=run.backbone, classnames=list(run.classes.names), data_root=run.data_root,
        train=run.split.train, val=run.split.val, features=features, device=run.device,
        templates=METHOD_REFERENCE_TEMPLATES if run.templates is None else run.templates,
        templates_name=cfg.templates or "",
        seed=cfg.seed, output_dir=run_dir, class_hash=run.classes.hash(), class_ids=list(run.classes.ids), workers=cfg.workers,
        eval_batch_size=cfg.eval_batch_size, log=log.info,
    )
    started = time.perf_counter()
    fit_summary = method.fit(ctx)
    fit_seconds = time.perf_counter() - started

    splits = eval_splits(run.data_root, cfg.eval_sets, run.classes)
    started = time.perf_counter()
    metrics = evaluate_method(method, splits, run.data_root, run.device, features=features,
                              eval_transform=run.backbone.eval_transform, batch_size=cfg.eval_batch_size,
                              workers=cfg.workers, log=log.info, strict=cfg.strict)
    eval_seconds = time.perf_counter() - started
    missing = [name for name in cfg.eval_sets if name not in metrics]
    if missing:
        log.info(f"not evaluated (missing or empty): {', '.join(missing)}")
    summary = {"method": cfg.method, "summary": method.summary(), "fit": _jsonable(fit_summary),
               "fit_seconds": round(fit_seconds, 1), "eval_seconds": round(eval_seconds, 1),
               "evaluated": list(metrics), "not_evaluated": missing}
    write_results(run_dir, cfg.method, metrics, summary)
    return {"metrics": metrics, **summary}


def write_results(run_dir: Path, label: str, metrics: dict[str, dict[str, float]], summary: dict[str, Any]) -> None:
    """metrics.json ({set: {top1, top5, n}}), results.md (Table-2 row) and run_summary.json, atomically."""
    from .report import markdown_table, results_row

    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "run_summary.json", _jsonable(summary))
    table = markdown_table([(label, results_row(metrics))])
    counts = ", ".join(f"{name}: {int(m['n'])}" for name, m in metrics.items())
    write_text(run_dir / "results.md", f"# {label}: top-1 (%)\n\n{table}\nimages per set: {counts}\n")
    log.info("\n" + table)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
