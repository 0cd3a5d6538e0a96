"""`scripts/train_imagenet_fs.py`: K-shot training of one method and its robustness evaluation."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .common import (
    EXIT_BAD_INPUT,
    add_backbone_args,
    add_data_args,
    add_runtime_args,
    apply_demo,
    bad_input_errors,
    positive_float,
    positive_int,
    non_negative_int,
    fail,
    plain_warnings,
)

DESCRIPTION = """Train a few-shot CLIP method on K shots per class and evaluate it on ImageNet and its shifted
variants (-V2, -Sketch, -A, -R). Defaults are the Convpass paper's Convpass_CLIP protocol (Table 3):
ViT-B/16 OpenAI weights, Convpass h=8 beside attention and MLP, AdamW lr 1e-5, batch 64, 50 epochs, cosine."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", default="convpass", help="registered method (see --list-methods)")
    parser.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    parser.add_argument("--shots", type=positive_int, default=16, help="training images per class (K)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the K-shot split and of training")
    parser.add_argument("--val-shots", type=non_negative_int, default=0,
                        help="validation images per class drawn from train (disjoint from the K shots); "
                             "used to choose the scale, the epoch and baselines' hyper-parameters")
    parser.add_argument("--split", help="reuse a saved split.json instead of drawing one")
    add_data_args(parser)
    add_backbone_args(parser)
    group = parser.add_argument_group("Convpass")
    group.add_argument("--scale", type=float, nargs="+", default=None,
                       help="adapter scale s; several values are each trained and the best is chosen on --val-shots "
                            "(default 10, see README)")
    group.add_argument("--dim", type=positive_int, default=None, help="bottleneck width h (default 8)")
    group.add_argument("--placement", choices=("attn+mlp", "attn", "mlp"), default=None)
    group.add_argument("--sequential", action="store_true", default=None, help="adapters after the sub-blocks (Seq-)")
    group.add_argument("--kernel-size", type=int, choices=(1, 3), default=None)
    group.add_argument("--conv-init", choices=("identity", "xavier"), default=None)
    group = parser.add_argument_group("optimization")
    group.add_argument("--epochs", type=positive_int, default=None, help="default 50 (the paper's)")
    group.add_argument("--batch-size", type=positive_int, default=None, help="default 64")
    group.add_argument("--lr", type=positive_float, default=None, help="default 1e-5")
    group.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=None, help="default 0")
    group.add_argument("--warmup-epochs", type=float, default=None, help="default 0 (no warm-up)")
    group.add_argument("--crop-scale", type=positive_float, default=None,
                       help="smallest area fraction of the train random resized crop (default 0.08, the protocol's)")
    group.add_argument("--grad-checkpointing", action="store_true", default=None,
                       help="recompute trunk activations in backward (less memory, ~2x slower)")
    group.add_argument("--method-options", default="{}", help="JSON object of extra options for the method")
    add_runtime_args(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last epoch")
    return parser


def _config_from_args(args: argparse.Namespace):
    import json

    from ..run import RunConfig

    try:
        extra = json.loads(args.method_options)
    except json.JSONDecodeError as err:
        fail(f"--method-options is not valid JSON: {err}")
    if not isinstance(extra, dict):
        fail("--method-options must be a JSON object")
    options = {
        "scales": args.scale, "dim": args.dim, "placement": args.placement, "sequential": args.sequential,
        "kernel_size": args.kernel_size, "conv_init": args.conv_init, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs, "grad_checkpointing": args.grad_checkpointing,
        "precision": args.precision, **extra,
    }
    return RunConfig(
        method=args.method, data_root=args.data_root, demo=args.demo, shots=args.shots, seed=args.seed,
        val_shots=args.val_shots, split=args.split, model=args.model, pretrained=args.pretrained,
        classnames=args.classnames, templates=args.templates, eval_sets=tuple(args.eval_sets),
        output_dir=args.output_dir, device=args.device, precision=args.precision, workers=args.workers,
        crop_scale=args.crop_scale,
        eval_batch_size=args.eval_batch_size, cache=not args.no_cache, strict=args.strict,
        method_options={k: v for k, v in options.items() if v is not None},
    )


def _resume_config(run_dir: str):
    from ..io import read_json
    from ..run import RunConfig

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        fail(f"--resume {run_dir}: no config.json there; give the run directory of an earlier run")
    saved = read_json(path)
    saved["method_options"] = {**saved.get("method_options", {}), "resume": True}
    saved["output_dir"] = str(run_dir)
    if (Path(run_dir) / "split.json").is_file():
        saved["split"] = str(Path(run_dir) / "split.json")
    return RunConfig(**saved)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    plain_warnings()
    from ..methods import method_names

    if args.list_methods:
        print("\n".join(method_names()))
        return 0
    if args.method not in method_names():
        parser.error(f"unknown --method '{args.method}'; choose one of {', '.join(method_names())}")
    with bad_input_errors():  # a damaged config.json is one line, not a traceback
        cfg = _resume_config(args.resume) if args.resume else _config_from_args(args)
    if not args.resume:
        apply_demo(cfg, parser)
    from ..run import prepare_run, run_method, setup_logging

    with bad_input_errors():
        run = prepare_run(cfg, Path(cfg.output_dir) if cfg.output_dir else None)
    setup_logging(run.run_dir)
    try:
        with bad_input_errors():  # e.g. a damaged train_state.pt when resuming
            result = run_method(run)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished epoch is saved; continue with --resume {run.run_dir}", file=sys.stderr)
        return 130
    print(f"run directory: {run.run_dir}")
    return 0 if result["metrics"] else EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
