"""One experiment, the same way for every entry point: a `Session` and `fit_and_evaluate`.

A `Session` holds what several fits share: the dataset family and its classes, the prompt templates,
the frozen backbone, one `FeatureStore` (so each image set is encoded once per backbone) and the
evaluation suite's splits. `fit_and_evaluate(session, method, config, split)` builds the method from
its typed config, fits it on a K-shot split, checks that it left the shared backbone untouched, scores
it on the suite and times both steps.

    session = open_session(DataConfig(data_root=...), BackboneConfig(), RuntimeConfig())
    split = session.draw_split(shots=16, seed=1, val_shots=4)
    config = build_method_config("convpass", options={"epochs": 10})
    result = fit_and_evaluate(session, "convpass", config, split, seed=1, output_dir=Path("run"))
    result.metrics  # {set name: {"top1", "top5", "n", "classes"}}

Used by scripts/train_imagenet_fs.py (clipconv.app.run), run_table2.py (clipconv.app.table2), zero_shot.py and
eval_robustness.py (`Session.evaluate` of a loaded checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence, Union

import torch

from clipconv.app.report import averaged_targets, target_average, target_note
from clipconv.backbone import load_backbone, resolve_device
from clipconv.config import BackboneConfig, DataConfig, RuntimeConfig
from clipconv.data import sample_few_shot
from clipconv.data.decoded import decoded_cache_dir
from clipconv.data.family import family_from_config
from clipconv.data.fewshot import check_split_entries, load_split
from clipconv.evaluation import Scorer, evaluate_method
from clipconv.features import FeatureStore
from clipconv.methods import FitContext, build_method
from clipconv.methods.base import METHOD_REFERENCE_TEMPLATES, METHODS, method_config, method_names, preset_options
from clipconv.prompts import load_templates
from clipconv.runtime.cache import hold_cache
from clipconv.runtime.jsontypes import JSON, JSONObject
from clipconv.runtime.ranks import check_batch_size, local_device
from clipconv.training import resolve_precision
from clipconv.wise import WISE_NOTE, interpolate

if TYPE_CHECKING:
    from clipconv.backbone import Backbone
    from clipconv.data import ClassList, EvalSplit, FewShotSplit
    from clipconv.data.family import DatasetFamily
    from clipconv.methods.base import Method, MethodConfig

__all__ = ["Session", "FitResult", "open_session", "open_data_family", "fit_and_evaluate", "build_method_config", "check_processes",
           "check_backbone_fit", "backbone_fingerprint", "jsonable", "Scorer", "templates_used"]

log = logging.getLogger("clipconv")


def jsonable(value: object) -> JSON:
    """`value` with tensors/arrays as lists and anything else unknown as its str (for JSON files)."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def open_data_family(data: DataConfig) -> "DatasetFamily":
    """The dataset family of `data` (clipconv.data.family.family_from_config: the ONE place that maps data
    settings to a family)."""
    return family_from_config(data)


@dataclass
class Session:
    """Backbone, data family, classes, templates, FeatureStore and evaluation splits shared by fits."""

    data: DataConfig
    runtime: RuntimeConfig
    family: "DatasetFamily"
    classes: "ClassList"
    templates: Optional[list[str]]  # None: each method uses its reference set (Method.reference_templates)
    backbone: "Backbone"
    store: "FeatureStore"
    splits: list["EvalSplit"]
    device: torch.device
    precision: str
    _train: Optional[list] = field(default=None, repr=False)

    @property
    def data_root(self) -> Path:
        return self.family.data_root

    @property
    def missing(self) -> list[str]:
        """Requested evaluation sets that were not found (or hold no run class)."""
        found = {s.name for s in self.splits}
        return [name for name in self.data.eval_sets or self.family.suite if name not in found]

    def train_samples(self) -> list:
        if self._train is None:
            self._train = self.family.train_samples(self.classes)
        return self._train

    def draw_split(self, shots: int, seed: int, val_shots: int) -> "FewShotSplit":
        """`shots` train and `val_shots` validation images per class from the train pool, from `seed`."""

        return sample_few_shot(self.train_samples(), shots, seed, val_shots=val_shots, root=self.data_root,
                               verify=self.family.verify_draws, class_names=self.classes.names)

    def split_meta(self) -> JSONObject:
        return {"class_ids": list(self.classes.ids), "data_root": str(self.data_root.resolve())}

    def load_split(self, path: str, shots: int, seed: int, val_shots: int) -> "FewShotSplit":
        """A saved split; refused when drawn for other classes or with another K, seed or val shots, or when an
        entry is not a train image of the data with its own label, once (`check_split_entries`)."""

        split, meta = load_split(path)
        if meta.get("class_ids") is not None and list(meta["class_ids"]) != list(self.classes.ids):
            raise ValueError(f"split file '{path}' was drawn for other classes than the data under "
                             f"'{self.data_root}'")
        saved = {"shots": split.shots, "seed": split.seed, "val_shots": split.val_shots}
        wanted = {"shots": shots, "seed": seed, "val_shots": val_shots}
        differ = [f"--{k.replace('_', '-')} {wanted[k]} (the split has {v})" for k, v in saved.items()
                  if v is not None and v != wanted[k]]
        if differ:
            raise ValueError(f"split file '{path}' does not match this run: {', '.join(differ)}; "
                             "pass the split's values or drop --split")
        check_split_entries(split, self.train_samples(), self.data_root, path, self.classes.ids)
        return split

    def evaluate(self, method: Scorer, log_line: Callable[[str], None] = log.info,
                 on_logits: Optional[Callable[..., None]] = None) -> dict[str, dict[str, float]]:
        """{set name: {"top1", "top5", "n", "classes"}} of a fitted method on the session's evaluation splits."""

        return evaluate_method(method, self.splits, self.data_root, self.device, features=self.store,
                               eval_transform=self.backbone.eval_transform, batch_size=self.runtime.eval_batch_size,
                               workers=self.runtime.workers, log=log_line, strict=self.data.strict,
                               on_logits=on_logits, draft=self.runtime.draft, decoded_dir=_decoded_dir(self.runtime))

    @property
    def columns(self) -> tuple[str, ...]:
        """Result columns: the family's suite (source set first) and "target_avg"."""
        return (*self.family.suite, "target_avg")

    @property
    def targets(self) -> tuple[str, ...]:
        """The target sets the target average is over: those the run asked for (report.TARGET_RULE)."""
        return averaged_targets(self.family.targets, self.data.eval_sets)

    def row(self, metrics: dict[str, dict[str, float]], key: str = "top1") -> dict[str, float]:
        """{set: accuracy} for the suite's sets in `metrics`, plus "target_avg" over `targets` (NaN unless every
        one of them ran)."""
        row = {name: float(metrics[name][key]) for name in self.family.suite if name in metrics}
        row["target_avg"] = target_average(row, self.targets)
        return row

    def target_note(self) -> str:
        """The line stating which sets "target avg" averages in this session's tables, or why it is "–"."""
        return target_note(self.family.targets, self.data.eval_sets, [s.name for s in self.splits],
                           self.family.display)

    def info(self) -> JSONObject:
        """What results record about the session (table2.json, run_summary.json)."""
        return {"backbone": self.backbone.describe(), "classes": len(self.classes), "device": str(self.device),
                "precision": self.precision, "data": self.family.describe(),
                "eval_sets": {s.name: len(s.samples) for s in self.splits}}


def open_session(data: DataConfig, backbone: BackboneConfig, runtime: RuntimeConfig, *,
                 loaded: Optional["Backbone"] = None, classes: Optional["ClassList"] = None) -> Session:
    """Resolve the data family, classes, templates and device, load the backbone (unless `loaded`) and
    list the evaluation splits. `classes` overrides the family's (a checkpoint's own class list).
    Writes nothing."""

    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    hold_cache()  # shared, for the life of the process: the cache is not cleared under a run
    if runtime.cache and runtime.cache_dir:
        hold_cache(runtime.cache_dir)  # a feature cache elsewhere (--cache-dir) is held too
    family = open_data_family(data)
    unknown = [name for name in data.eval_sets or () if name not in family.suite]
    if unknown:
        raise ValueError(f"--eval-sets: unknown set(s) {unknown} for the {family.name} family; choose from "
                         f"{list(family.suite)}")
    classes = classes if classes is not None else family.classes()
    templates = (family.dataset_templates() if data.templates == "dataset" else
                 load_templates(data.templates) if data.templates else None)
    device = local_device(resolve_device(runtime.device))  # cuda:LOCAL_RANK under torchrun
    precision = resolve_precision(backbone.precision, device)
    if loaded is None:
        loaded = load_backbone(backbone.model, backbone.pretrained, device=device, precision=precision,
                               train_crop_scale=(backbone.crop_scale, 1.0))
    cache = runtime.cache_dir or "default"
    store = FeatureStore(loaded, cache if runtime.cache else None, batch_size=runtime.eval_batch_size,
                         workers=runtime.workers, device=device, draft=runtime.draft)
    names = data.eval_sets or family.suite
    splits = family.eval_splits(names, classes)
    if not splits:
        raise ValueError(f"none of the evaluation sets {list(names)} was found under '{family.data_root}'")
    return Session(data, runtime, family, classes, templates, loaded, store, splits, device, precision)


def build_method_config(name: str, preset: str = "paper", options: Optional[Mapping[str, object]] = None, *,
                        epochs_scale: float = 1.0, precision: Optional[str] = None) -> "MethodConfig":
    """The typed config method `name` is built with, built ONCE by the entry point: `preset`'s options, then
    `options` (unknown ones raise, listing the known ones); `epochs` scaled from the method's default when
    `epochs_scale` != 1 and neither gave it; the run's `precision` (--precision, resolved against the device
    as the backbone's is) for a method with a precision option neither gave."""

    if name not in method_names():
        raise ValueError(f"unknown method '{name}'; choose one of {method_names()}")
    cls = METHODS[name]
    given = {**preset_options(name, preset), **(options or {})}
    defaults = {f.name: f.default for f in dataclasses.fields(cls.config_class)}
    extra: dict[str, object] = {}
    if epochs_scale != 1.0 and "epochs" not in given and isinstance(defaults.get("epochs"), int):
        extra["epochs"] = max(1, int(round(defaults["epochs"] * epochs_scale)))
    if precision is not None and "precision" in defaults and "precision" not in given:
        extra["precision"] = precision
    config = method_config(name, preset, {**(options or {}), **extra})
    check_processes(name, config)
    return config


def check_processes(name: str, config: "MethodConfig") -> None:
    """Refuse a batch that torchrun's processes cannot split evenly, for a method trained with DDP (checked
    when the config is built and again once the process group is joined)."""
    if METHODS[name].data_parallel:
        try:
            check_batch_size(config.batch_size)
        except ValueError as err:
            raise ValueError(f"method '{name}': {err}") from None


def check_backbone_fit(session: Session, configs: Mapping[str, "MethodConfig"]) -> None:
    """Every requested method's options against the session's backbone and classes (`Method.check_backbone`:
    prompt lengths, adapter injection), all before the first fit: a method that could not run stops the run
    before anything is written, not after the others have run. ValueError naming the method and option."""
    for name, config in configs.items():
        build_method(name, config).check_backbone(session.backbone, list(session.classes.names))


def backbone_fingerprint(model: torch.nn.Module) -> tuple:
    """Parameter names, shapes and sums: changes when a method alters the shared backbone in place."""
    with torch.no_grad():
        return tuple((n, tuple(p.shape), float(p.double().sum())) for n, p in model.state_dict().items())


@dataclass
class FitResult:
    """One method fitted on one split and scored on the suite."""

    method: str
    options: JSONObject
    metrics: dict[str, dict[str, float]]
    fit: JSONObject
    summary: JSONObject
    fit_seconds: float
    eval_seconds: float
    images_encoded: int
    not_evaluated: list[str]
    fitted: Optional["Method"] = field(default=None, repr=False)  # the fitted Method

    def to_dict(self) -> JSONObject:
        return jsonable({"method": self.method, "options": self.options, "summary": self.summary, "fit": self.fit,
                         "fit_seconds": round(self.fit_seconds, 2), "eval_seconds": round(self.eval_seconds, 2),
                         "images_encoded": self.images_encoded, "evaluated": list(self.metrics),
                         "not_evaluated": self.not_evaluated})


def fit_and_evaluate(session: Session, name: str, config: "MethodConfig", split: "FewShotSplit", *, seed: int,
                     output_dir: Optional[Path] = None, resume: bool = False,
                     log_line: Callable[[str], None] = log.info,
                     on_logits: Optional[Callable[..., None]] = None,
                     wise_alpha: Optional[float] = None) -> FitResult:
    """Build `name` from its typed `config` (passed to the method as is), fit it on `split`, check the shared
    backbone is untouched, evaluate it on the session's suite; timings and the encoder images it cost in the
    result. With `wise_alpha` the fitted method is evaluated (and left) at θ(α) (clipconv.wise; files the fit
    wrote, such as adapter.safetensors, keep θ₁)."""

    method: "Method" = build_method(name, config)
    ctx = FitContext(backbone=session.backbone, classnames=list(session.classes.names), data_root=session.data_root,
                     train=split.train, val=split.val, features=session.store,
                     templates=METHOD_REFERENCE_TEMPLATES if session.templates is None else session.templates,
                     templates_name=session.data.templates or "",
                     device=session.device, seed=seed, output_dir=output_dir, class_hash=session.classes.hash(),
                     class_ids=list(session.classes.ids), workers=session.runtime.workers,
                     eval_batch_size=session.runtime.eval_batch_size, draft=session.runtime.draft,
                     decoded_cache=_decoded_cache(session.runtime), resume=resume, log=log_line)
    calls = session.store.encoder_calls
    before = backbone_fingerprint(session.backbone.model)
    started = time.perf_counter()
    fit_summary = method.fit(ctx)
    fitted = time.perf_counter()
    if backbone_fingerprint(session.backbone.model) != before:  # later fits share it and its cached features
        raise RuntimeError(f"method '{name}' modified the shared backbone in place; it must work on a copy")
    summary = method.summary()
    if wise_alpha is not None:

        interpolate(method, wise_alpha)
        log_line(f"evaluating θ(α) at α = {wise_alpha:g}: {WISE_NOTE}")
        summary = {**summary, "wise": {"alpha": wise_alpha, "evaluated": "theta(alpha)",
                                       "checkpoint": "theta1 (alpha = 1; the trained weights)"}}
    metrics = session.evaluate(method, log_line, on_logits)
    done = time.perf_counter()
    return FitResult(name, config.to_dict(), metrics, jsonable(fit_summary), jsonable(summary),
                     fitted - started, done - fitted, session.store.encoder_calls - calls, session.missing, method)


def _decoded_cache(runtime: RuntimeConfig) -> Union[bool, str]:
    """FitContext.decoded_cache: a folder under $CLIPCONV_CACHE, True (memory only, with --no-cache) or False."""
    if not runtime.decoded_cache:
        return False

    return str(decoded_cache_dir()) if runtime.cache else True


def _decoded_dir(runtime: RuntimeConfig) -> Optional[str]:
    """Where evaluation sets are kept decoded (`evaluate_method(decoded_dir=)`): the decoded-image cache folder,
    None with --no-decoded-cache or --no-cache (one scoring pass gains nothing from decoding into memory)."""
    cache = _decoded_cache(runtime)
    return cache if isinstance(cache, str) else None


def templates_used(name: str, fits: Sequence[Optional[JSONObject]], run_templates: Optional[str]
                   ) -> Optional[tuple[str, int]]:
    """(template set, count) a row's method used: from its fit summaries ("template_set", "templates"), else
    derived from the run's --templates or the method's reference set; None for a method without templates."""
    for fit in fits:
        if isinstance(fit, dict) and "template_set" in fit:
            return str(fit["template_set"]), int(fit["templates"])

    reference = getattr(METHODS.get(name), "reference_templates", None)
    if reference is None:
        return None
    chosen = run_templates or reference
    return chosen, len(load_templates(chosen))
