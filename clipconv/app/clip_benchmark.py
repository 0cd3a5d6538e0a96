"""Result files in CLIP_benchmark's format, so our scores merge with `clip_benchmark build`.

One JSON per evaluated set, in `<run folder>/clip_benchmark/`, named like CLIP_benchmark's default
`--output` ("{dataset}_{pretrained}_{model}_{language}_{task}.json", the dataset without its "wds/"
prefix and with "/" as "_"):

    {"dataset": "wds/imagenet1k", "model": "ViT-B-16", "pretrained": "openai",
     "task": "zeroshot_classification", "metrics": {"acc1": 0.6835, "acc5": 0.91, "mean_per_class_recall": 0.6834},
     "language": "en", "method": "zero_shot", "templates": "photo", "n_templates": 1, ...}

- model and pretrained are portable names (`portable_name`): an open_clip model name or a model-config JSON's
  stem ("mini_clip"), a pretrained tag or a weights file's name ("mini_clip.safetensors"), never a local path
  (`clip_benchmark build` joins them into the model's name); a file's absolute path is kept apart, in
  "model_path" / "pretrained_path".
- templates / n_templates: the prompt-template set and its size a method used (zero-shot, the text-initialized
  heads); absent for a method that uses none.

- metrics are fractions (CLIP_benchmark's scale; ours are %): acc1 = top1/100, acc5 = top5/100 (NaN when
  fewer than 5 classes are scored, as CLIP_benchmark does), mean_per_class_recall = sklearn's balanced
  accuracy (ours / 100).
- task: the one a method declares (`Method.clip_benchmark_task`: "zeroshot_classification" for zero-shot CLIP,
  "linear_probe" for the linear probe, CLIP_benchmark's few-shot task), else "fewshot_<method>" (CLIP_benchmark
  has no name for the other trained methods).
- `clip_benchmark build` reads every *.json of the folders it is given, puts the metrics and the other
  top-level fields into one CSV row each and needs `model` and `pretrained` to be strings (it joins them
  into `model_fullname`); our extra fields (method, fewshot_k, seed, n, classes) become extra columns.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional

from clipconv.data.family import DatasetFamily
from clipconv.methods.base import METHODS
from clipconv.runtime.jsontypes import JSON, JSONObject
from clipconv.runtime.outputs import write_json

__all__ = ["BENCHMARK_DIR", "benchmark_task", "benchmark_record", "benchmark_file_name", "write_benchmark_results",
           "portable_name"]

BENCHMARK_DIR = "clip_benchmark"
LANGUAGE = "en"


def benchmark_task(method: str) -> str:
    """CLIP_benchmark's task name for one of our methods: the one it declares (`Method.clip_benchmark_task`),
    else "fewshot_<method>"."""
    spec = METHODS.get(method)
    return (spec.clip_benchmark_task if spec is not None else "") or f"fewshot_{method}"


def portable_name(value: Optional[str]) -> tuple[str, Optional[str]]:
    """(the name a result file records, the absolute path when `value` is a local file, else None): a file's
    name without a config JSON's suffix (`clipconv/assets/mini_clip.json` → "mini_clip"; weights keep their
    suffix: "mini_clip.safetensors"), an open_clip name or tag as it is, "none" for no weights."""
    if value is None or str(value) in ("", "none", "None"):
        return "none", None
    path = Path(str(value))
    if not path.is_file():
        return str(value), None
    return (path.stem if path.suffix == ".json" else path.name), str(path.resolve())


def _fraction(percent: float) -> float:
    value = float(percent)
    return value / 100.0 if math.isfinite(value) else float("nan")


def benchmark_record(dataset: str, model: str, pretrained: Optional[str], task: str, metrics: Mapping[str, float],
                     extra: Optional[Mapping[str, JSON]] = None) -> JSONObject:
    """CLIP_benchmark's result dict for one set from our metrics ({"top1", "top5", "mean_per_class_recall", ...} in %)."""
    classes = int(metrics.get("classes") or 0)
    (model_name, model_path), (weights_name, weights_path) = portable_name(str(model)), portable_name(pretrained)
    record = {
        "dataset": dataset,
        "model": model_name,
        "pretrained": weights_name,
        "task": task,
        "metrics": {
            "acc1": _fraction(metrics["top1"]),
            "acc5": _fraction(metrics["top5"]) if classes >= 5 else float("nan"),
            "mean_per_class_recall": _fraction(metrics.get("mean_per_class_recall", float("nan"))),
        },
        "language": LANGUAGE,
    }
    paths = {key: path for key, path in (("model_path", model_path), ("pretrained_path", weights_path)) if path}
    record.update({"n": int(metrics.get("n", 0)), "classes": classes, **paths, **dict(extra or {})})
    return record


def benchmark_file_name(dataset: str, model: str, pretrained: Optional[str], task: str) -> str:
    """CLIP_benchmark's default output name for these fields (file-name-safe)."""
    name = dataset.replace("wds/", "", 1).replace("/", "_")
    text = f"{name}_{portable_name(pretrained)[0]}_{portable_name(str(model))[0]}_{LANGUAGE}_{task}.json"
    return "".join(c if c.isalnum() or c in "._-+=@" else "_" for c in text)


def write_benchmark_results(run_dir: Path, family: DatasetFamily, metrics: Mapping[str, Mapping[str, float]],
                            model: str, pretrained: Optional[str], method: str,
                            extra: Optional[Mapping[str, JSON]] = None,
                            templates: Optional[tuple[str, int]] = None) -> list[Path]:
    """Write one CLIP_benchmark JSON per set of `metrics` into `run_dir/clip_benchmark/` (atomically);
    dataset names from `family.benchmark_name`; `templates`: (set name, count) the method used, if any.
    Returns the files written."""
    task = benchmark_task(method)
    used = {"templates": templates[0], "n_templates": int(templates[1])} if templates else {}
    written = []
    for set_name, scores in metrics.items():
        dataset = family.benchmark_name(set_name)
        record = benchmark_record(dataset, model, pretrained, task, scores,
                                  {"method": method, **used, **dict(extra or {})})
        written.append(write_json(Path(run_dir) / BENCHMARK_DIR / benchmark_file_name(dataset, model, pretrained, task),
                                  record))
    return written
