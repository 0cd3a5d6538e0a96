"""Result files in CLIP_benchmark's format, so our scores merge with `clip_benchmark build`.

One JSON per evaluated set, in `<run folder>/clip_benchmark/`, named like CLIP_benchmark's default
`--output` ("{dataset}_{pretrained}_{model}_{language}_{task}.json", the dataset without its "wds/"
prefix and with "/" as "_"):

    {"dataset": "wds/imagenet1k", "model": "ViT-B-16", "pretrained": "openai",
     "task": "zeroshot_classification", "metrics": {"acc1": 0.6835, "acc5": 0.91, "mean_per_class_recall": 0.6834},
     "language": "en", "method": "zero_shot", ...}

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
from typing import Any, Mapping, Optional

from clipconv.methods.base import METHODS
from clipconv.runtime.outputs import write_json

__all__ = ["BENCHMARK_DIR", "benchmark_task", "benchmark_record", "benchmark_file_name", "write_benchmark_results"]

BENCHMARK_DIR = "clip_benchmark"
LANGUAGE = "en"


def benchmark_task(method: str) -> str:
    """CLIP_benchmark's task name for one of our methods: the one it declares (`Method.clip_benchmark_task`),
    else "fewshot_<method>"."""
    spec = METHODS.get(method)
    return (spec.clip_benchmark_task if spec is not None else "") or f"fewshot_{method}"


def _fraction(percent: Any) -> float:
    value = float(percent)
    return value / 100.0 if math.isfinite(value) else float("nan")


def benchmark_record(dataset: str, model: str, pretrained: Optional[str], task: str, metrics: Mapping[str, Any],
                     extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """CLIP_benchmark's result dict for one set from our metrics ({"top1", "top5", "mean_per_class_recall", ...} in %)."""
    classes = int(metrics.get("classes") or 0)
    record = {
        "dataset": dataset,
        "model": str(model),
        "pretrained": "none" if pretrained is None else str(pretrained),
        "task": task,
        "metrics": {
            "acc1": _fraction(metrics["top1"]),
            "acc5": _fraction(metrics["top5"]) if classes >= 5 else float("nan"),
            "mean_per_class_recall": _fraction(metrics.get("mean_per_class_recall", float("nan"))),
        },
        "language": LANGUAGE,
    }
    record.update({"n": int(metrics.get("n", 0)), "classes": classes, **dict(extra or {})})
    return record


def benchmark_file_name(dataset: str, model: str, pretrained: Optional[str], task: str) -> str:
    """CLIP_benchmark's default output name for these fields (file-name-safe)."""
    name = dataset.replace("wds/", "", 1).replace("/", "_")
    tag = "none" if pretrained is None else str(pretrained)
    tag = Path(tag).name if Path(tag).is_file() else tag
    text = f"{name}_{tag}_{Path(str(model)).name}_{LANGUAGE}_{task}.json"
    return "".join(c if c.isalnum() or c in "._-+=@" else "_" for c in text)


def write_benchmark_results(run_dir: Path, family: Any, metrics: Mapping[str, Mapping[str, Any]], model: str,
                            pretrained: Optional[str], method: str,
                            extra: Optional[Mapping[str, Any]] = None) -> list[Path]:
    """Write one CLIP_benchmark JSON per set of `metrics` into `run_dir/clip_benchmark/` (atomically);
    dataset names from `family.benchmark_name`. Returns the files written."""
    task = benchmark_task(method)
    written = []
    for set_name, scores in metrics.items():
        dataset = family.benchmark_name(set_name)
        record = benchmark_record(dataset, model, pretrained, task, scores, {"method": method, **dict(extra or {})})
        written.append(write_json(Path(run_dir) / BENCHMARK_DIR / benchmark_file_name(dataset, model, pretrained, task),
                                  record))
    return written
