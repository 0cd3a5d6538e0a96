"""`scripts/eval_robustness.py`: re-evaluate a saved adapter checkpoint on the robustness suite."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

from .common import add_data_args, add_runtime_args, apply_demo, bad_input_errors, fail, plain_warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a trained adapter checkpoint (RUN_DIR/adapter.safetensors) on ImageNet, -V2, "
                    "-Sketch, -A and -R (any subset with --eval-sets).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="adapter.safetensors written by a training run")
    add_data_args(parser)
    group = parser.add_argument_group("backbone (default: as recorded in the checkpoint)")
    group.add_argument("--model", default=None, help="open_clip model name or model-config JSON")
    group.add_argument("--pretrained", default=None, help="open_clip tag or local weights file")
    add_runtime_args(parser)
    return parser


class _Classifier:
    """Adapts a trained ImageClassifier to the method interface the evaluation suite expects."""

    frozen_image_encoder = False

    def __init__(self, classifier):
        self.classifier = classifier

    def logits(self, images):
        import torch

        with torch.no_grad():
            return self.classifier(images)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    plain_warnings()
    from ..backbone import load_backbone, resolve_device
    from ..checkpoint import read_metadata
    from ..data import ClassList, eval_splits, load_universe
    from ..engine import resolve_precision
    from ..evaluate import evaluate_method
    from ..methods.finetune import load_classifier
    from ..run import RunConfig, setup_logging, write_results

    checkpoint = Path(args.checkpoint)
    with bad_input_errors():
        meta = read_metadata(checkpoint)
    source = meta.get("source", {})
    cfg = RunConfig(data_root=args.data_root, demo=args.demo, model=args.model or source.get("model"),
                    pretrained=args.pretrained or source.get("pretrained"), classnames=args.classnames)
    apply_demo(cfg, parser)
    device = resolve_device(args.device)
    with bad_input_errors():
        universe = load_universe(cfg.data_root, cfg.classnames)
        ids = meta.get("class_ids") or []
        unknown = [i for i in ids if i not in universe.index]
        if not ids or unknown:
            fail(f"checkpoint '{checkpoint}' has classes {unknown[:5] or '(none recorded)'} that are not in the "
                 f"class universe of '{cfg.data_root}' ({universe.source})")
        classes = ClassList(ids, [universe.names[universe.index[i]] for i in ids], universe.ids, universe.source)
        if classes.hash() != meta["classes"]["hash"]:
            fail(f"checkpoint '{checkpoint}': class list hash differs from its recorded class ids")
        backbone = load_backbone(cfg.model, cfg.pretrained, device=device,
                                 precision=resolve_precision(args.precision, device),
                                 quick_gelu=meta["backbone"].get("quick_gelu"))
        classifier, _ = load_classifier(checkpoint, backbone)
    out_dir = Path(args.output_dir) if args.output_dir else checkpoint.parent / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    setup_logging(out_dir)
    splits = eval_splits(cfg.data_root, args.eval_sets, classes)
    metrics = evaluate_method(_Classifier(classifier), splits, Path(cfg.data_root), device,
                              eval_transform=backbone.eval_transform, batch_size=args.eval_batch_size,
                              workers=args.workers, strict=args.strict)
    write_results(out_dir, meta.get("method", "checkpoint"), metrics,
                  {"checkpoint": str(checkpoint.resolve()), "evaluated": list(metrics),
                   "not_evaluated": [n for n in args.eval_sets if n not in metrics]})
    print(f"results: {out_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
