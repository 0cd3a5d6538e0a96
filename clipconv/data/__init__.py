"""Data layer: dataset families (ImageNet, the demo world, your own folders), class mapping, robust image
decoding, few-shot splits."""
from clipconv.data.family import (
    FAMILIES, DatasetFamily, DemoFamily, FolderFamily, ImageNetFamily, TreeFamily, family_from_args, family_names,
    open_family, parse_eval_set, register_family
)
from clipconv.data.fewshot import FewShotSplit, load_split, sample_few_shot, save_split
from clipconv.data.folder import (
    Batch, ImageListDataset, ImagesChangedError, Sample, SkipTracker, collate_skip_bad, report_skipped
)
from clipconv.data.imagenet import (
    DATA_HELP, EVAL_SET_SPECS, EVAL_SETS, FEW_CLASSES_WARNING, ClassList, DataLayoutError, EvalScan, EvalSetSpec,
    EvalSplit, eval_split, eval_splits, load_universe, resolve_run_classes, scan_eval_set, train_samples
)
from clipconv.data.images import (
    IMAGE_EXTENSIONS, BrokenEntry, ImageDecodeError, is_decodable, list_class_folders, list_images, load_rgb
)
from clipconv.data.synthetic import make_class_folders, make_image_tree
from clipconv.data.wds import WdsFamily, image_dataset

__all__ = [
    "FAMILIES",
    "DatasetFamily",
    "TreeFamily",
    "ImageNetFamily",
    "DemoFamily",
    "FolderFamily",
    "WdsFamily",
    "image_dataset",
    "family_from_args",
    "family_names",
    "open_family",
    "parse_eval_set",
    "register_family",
    "BrokenEntry",
    "list_class_folders",
    "FEW_CLASSES_WARNING",
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
    "ImagesChangedError",
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
    "make_class_folders",
]
