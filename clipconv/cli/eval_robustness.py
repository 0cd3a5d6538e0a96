"""`scripts/eval_robustness.py`: re-evaluate a saved adapter checkpoint on the robustness suite."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .common import bad_input_errors, fail, plain_warnings
from .options import add_shared_args, shared_configs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a trained adapter checkpoint (RUN/adapter.safetensors, or the run folder RUN) on "
                    "ImageNet, -V2, -Sketch, -A and -R. The data settings (--data-root, --eval-sets, ...) and "
                    "--model/--pretrained default to what the run recorded (RUN/config.json, else the checkpoint); "
                    "the classification head is in the checkpoint (no prompt templates are used). Writes "
                    "metrics.json, results.md, run_summary.json and log.txt to a new folder RUN/eval-<time>.")
    parser.add_argument("--checkpoint", required=True,
                        help="adapter.safetensors written by a training run, or that run's folder")
    parser.add_argument("--output-dir", help="where metrics.json, results.md, run_summary.json and log.txt go "
                                             "(default: a new RUN/eval-<time> beside the checkpoint); a folder "
                                             "already holding results is refused unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results already in --output-dir (their clipconv files are deleted first)")
    parser.add_argument("--save-logits", action="store_true",
                        help="also write <set>_logits.safetensors (logits and labels of every set) to the output folder")
    parser.set_defaults(_fields=add_shared_args(parser, skip=("crop_scale", "templates")))
    return parser


def run_settings(checkpoint: Path) -> dict[str, Any]:
    """The data and backbone settings recorded in the run's config.json beside `checkpoint` ({} if none):
    the fallback of every data flag and of --model/--pretrained."""
    from ..io import read_json
    from ..run import CONFIG_FILE

    path = checkpoint.parent / CONFIG_FILE
    if not path.is_file():
        return {}
    saved = read_json(path, what_to_do="give --data-root and --model/--pretrained explicitly, or repair the run")
    data = {k: v for k, v in (saved.get("data") or {}).items() if k != "templates"}
    backbone = {k: v for k, v in (saved.get("backbone") or {}).items() if k in ("model", "pretrained")}
    return {**data, **backbone}


class _Classifier:
    """Adapts a trained ImageClassifier to the method interface the evaluation suite expects."""

    frozen_image_encoder = False

    def __init__(self, classifier: Any) -> None:
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
    from ..data import ClassList
    from ..distributed import init_from_env, is_main, local_device, on_main
    from ..engine import resolve_precision
    from ..methods.finetune import load_classifier
    from ..run import logits_saver, setup_logging, write_results
    from ..session import open_session

    from ..rundir import RUN_FILES, check_output_dir, claim_output_dir, held_files, new_run_dir

    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "adapter.safetensors"
        if not checkpoint.is_file():
            fail(f"--checkpoint {args.checkpoint}: no adapter.safetensors in that folder; give a training run's "
                 "folder or its adapter.safetensors")
    with bad_input_errors():
        meta = read_metadata(checkpoint)
        recorded = run_settings(checkpoint)
        if args.output_dir:  # before any work
            check_output_dir(args.output_dir)
            if not args.overwrite and held_files(Path(args.output_dir), RUN_FILES, ("*_logits.safetensors",)):
                claim_output_dir(args.output_dir, RUN_FILES, ("*_logits.safetensors",))  # refuses, naming the files
    source = meta.get("source", {})
    fallback = {"model": source.get("model"), "pretrained": source.get("pretrained"), **recorded}
    configs, _ = shared_configs(args, args._fields, parser, fallback=fallback)
    data, backbone_cfg, runtime = configs["data"], configs["backbone"], configs["runtime"]
    with bad_input_errors():
        from ..session import open_data_family

        family = open_data_family(data)
        universe = family.universe()  # every class id the run's dataset family knows
        ids = meta.get("class_ids") or []
        unknown = [i for i in ids if i not in universe.index]
        if not ids or unknown:
            fail(f"checkpoint '{checkpoint}' has classes {unknown[:5] or '(none recorded)'} that are not in the "
                 f"class universe of '{family.data_root}' ({universe.source})")
        classes = ClassList(ids, [universe.names[universe.index[i]] for i in ids], universe.ids, universe.source)
        if classes.hash() != meta["classes"]["hash"]:
            fail(f"checkpoint '{checkpoint}': class list hash differs from its recorded class ids")
        init_from_env(runtime.device)  # under torchrun: join the process group, each rank scores a shard
        device = local_device(resolve_device(runtime.device))
        backbone = load_backbone(backbone_cfg.model, backbone_cfg.pretrained, device=device,
                                 precision=resolve_precision(backbone_cfg.precision, device),
                                 quick_gelu=meta["backbone"].get("quick_gelu"))
        classifier, _ = load_classifier(checkpoint, backbone)
        session = open_session(data, backbone_cfg, runtime, loaded=backbone, classes=classes)

        def create() -> Path:  # on rank 0 only under torchrun; the others get its path
            if args.output_dir:
                return claim_output_dir(args.output_dir, RUN_FILES, ("*_logits.safetensors",), overwrite=args.overwrite)
            return new_run_dir(checkpoint.parent, f"eval-{time.strftime('%Y%m%d-%H%M%S')}")

        out_dir = on_main(create)
    setup_logging(out_dir, runtime.quiet)
    metrics = session.evaluate(_Classifier(classifier), on_logits=logits_saver(out_dir) if args.save_logits else None)
    write_results(out_dir, meta.get("method", "checkpoint"), session.row(metrics), metrics,
                  {"checkpoint": str(checkpoint.resolve()), "evaluated": list(metrics),
                   "not_evaluated": session.missing}, columns=session.family.suite,
                  display=session.family.display)
    if is_main():
        print(f"results: {out_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
