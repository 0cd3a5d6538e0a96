"""Data layer: ImageNet-family layouts, class mapping, robust image decoding, few-shot splits."""
from .fewshot import FewShotSplit, load_split, sample_few_shot, save_split
from .folder import Batch, ImageListDataset, Sample, SkipTracker, collate_skip_bad, report_skipped
from .images import IMAGE_EXTENSIONS, ImageDecodeError, is_decodable, list_images, load_rgb
from .imagenet import (
    DATA_HELP,
    EVAL_SET_SPECS,
    EVAL_SETS,
    ClassList,
    DataLayoutError,
    EvalScan,
    EvalSetSpec,
    EvalSplit,
    eval_split,
    eval_splits,
    load_universe,
    resolve_run_classes,
    scan_eval_set,
    train_samples,
)
from .synthetic import make_image_tree

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "is_decodable",
    "list_images",
    "load_rgb",
    "Sample",
    "Batch",
    "ImageListDataset",
    "collate_skip_bad",
    "SkipTracker",
    "report_skipped",
    "DATA_HELP",
    "EVAL_SET_SPECS",
    "EVAL_SETS",
    "ClassList",
    "DataLayoutError",
    "EvalScan",
    "EvalSetSpec",
    "EvalSplit",
    "eval_split",
    "eval_splits",
    "load_universe",
    "resolve_run_classes",
    "scan_eval_set",
    "train_samples",
    "FewShotSplit",
    "sample_few_shot",
    "save_split",
    "load_split",
    "make_image_tree",
]
