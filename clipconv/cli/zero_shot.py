"""`scripts/zero_shot.py`: zero-shot CLIP on the robustness suite for one or several backbones, one table."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .common import DEFAULT_WORKERS, add_data_args, bad_input_errors, non_negative_int, positive_int

DESCRIPTION = """Zero-shot CLIP on ImageNet, -V2, -Sketch, -A and -R. Several --model/--pretrained pairs (given in
the same order) are compared in one table. Writes zero_shot.json and zero_shot.md to --output-dir."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(parser)
    group = parser.add_argument_group("backbones (pairs, in order)")
    group.add_argument("--model", action="append", default=None,
                       help="open_clip model name or model-config JSON; repeat for several (default ViT-B-16)")
    group.add_argument("--pretrained", action="append", default=None,
                       help="open_clip tag, weights file or 'none'; one per --model (default openai)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    group.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS)
    group.add_argument("--batch-size", type=positive_int, default=128)
    group.add_argument("--output-dir", default="runs/zero_shot")
    group.add_argument("--no-cache", action="store_true", help="do not read or write the image-feature cache")
    return parser


def backbone_pairs(models: Optional[Sequence[str]], pretrained: Optional[Sequence[str]]) -> list[tuple[str, str]]:
    """Pair --model and --pretrained values; a single --pretrained applies to every model."""
    models = list(models or ["ViT-B-16"])
    tags = list(pretrained or ["openai"])
    if len(tags) == 1 and len(models) > 1:
        tags = tags * len(models)
    if len(tags) != len(models):
        raise ValueError(f"got {len(models)} --model but {len(tags)} --pretrained values; give one per model "
                         "(or a single --pretrained for all)")
    return list(zip(models, tags))


def compare_zero_shot(data_root: Path, pairs: Sequence[tuple[str, str]], output_dir: Path, templates: Optional[str] = None,
                      eval_sets: Optional[Sequence[str]] = None, classnames: Optional[str] = None,
                      device: str = "auto", precision: str = "auto", workers: int = 0, batch_size: int = 128,
                      cache: bool = True, strict: bool = False, log: Callable[[str], None] = print,
                      backbones: Optional[Sequence[Any]] = None) -> dict[str, Any]:
    """Zero-shot accuracy of each backbone on the suite; writes zero_shot.json and zero_shot.md atomically.

    `backbones` (already loaded, one per pair) replaces loading by name — used by --demo.
    """
    from ..backbone import load_backbone, resolve_device
    from ..data import EVAL_SETS, eval_splits, resolve_run_classes
    from ..engine import resolve_precision
    from ..evaluate import evaluate_method
    from ..features import FeatureStore
    from ..io import write_json, write_text
    from ..methods import FitContext, build_method
    from ..methods.zero_shot import ZeroShot
    from ..prompts import load_templates
    from ..report import markdown_table, results_row

    classes = resolve_run_classes(data_root, classnames)
    templates = templates or ZeroShot.reference_templates  # zero-shot CLIP's reference: the single "photo"
    template_list = load_templates(templates)
    dev = resolve_device(device)
    splits = eval_splits(data_root, eval_sets or EVAL_SETS, classes)
    if not splits:
        raise ValueError(f"no evaluation set found under '{data_root}' (see datasets/README.md)")
    rows, results = [], []
    for index, (model, tag) in enumerate(pairs):
        backbone = backbones[index] if backbones else load_backbone(
            model, tag, device=dev, precision=resolve_precision(precision, dev))
        store = FeatureStore(backbone, "default" if cache else None, batch_size=batch_size, workers=workers, device=dev)
        method = build_method("zero_shot")
        started = time.perf_counter()
        method.fit(FitContext(backbone=backbone, classnames=list(classes.names), data_root=data_root, train=[],
                              templates=template_list, templates_name=templates, features=store, device=dev,
                              log=log))
        metrics = evaluate_method(method, splits, data_root, dev, features=store,
                                  eval_transform=backbone.eval_transform, batch_size=batch_size, workers=workers,
                                  log=log, strict=strict)
        label = f"{backbone.model_name} ({Path(tag).name if tag and Path(tag).exists() else tag})"
        rows.append((label, results_row(metrics)))
        results.append({"label": label, "model": model, "pretrained": tag, "backbone": backbone.describe(),
                        "metrics": metrics, "row": results_row(metrics), "images_encoded": store.encoder_calls,
                        "seconds": round(time.perf_counter() - started, 2)})
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {"templates": templates, "n_templates": len(template_list), "data_root": str(data_root),
               "classes": len(classes), "results": results}
    write_json(output_dir / "zero_shot.json", payload)
    table = markdown_table(rows)
    write_text(output_dir / "zero_shot.md",
               f"# Zero-shot CLIP, templates '{templates}' ({len(template_list)}): top-1 (%)\n\n{table}")
    log("\n" + table)
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    backbones = None
    data_root = args.data_root
    with bad_input_errors():
        if args.demo:
            from .. import demo

            data_root = data_root or str(demo.ensure_world())
            if not args.model:
                backbones = [demo.demo_backbone(args.device if args.device != "auto" else None)]
                args.model, args.pretrained = [str(demo.MINI_CLIP_CONFIG)], [str(demo.MINI_CLIP_WEIGHTS)]
        elif data_root is None:
            from .common import NO_DATA_HELP

            parser.error(NO_DATA_HELP)
        pairs = backbone_pairs(args.model, args.pretrained)
        compare_zero_shot(Path(data_root), pairs, Path(args.output_dir), templates=args.templates,
                          eval_sets=args.eval_sets, classnames=args.classnames, device=args.device,
                          precision=args.precision, workers=args.workers, batch_size=args.batch_size,
                          cache=not args.no_cache, strict=args.strict, backbones=backbones)
    print(f"table: {Path(args.output_dir) / 'zero_shot.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
