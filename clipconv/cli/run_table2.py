"""`scripts/run_table2.py`: every method on the same K-shot splits per seed, written as the paper's Table 2,
with a bar chart per method and domain; `--shots 1 2 4 8 16` adds the accuracy-vs-shots sweep."""
from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Optional, Sequence

from .common import DEFAULT_WORKERS, add_data_args, bad_input_errors, fail, non_negative_int, positive_float, positive_int

DESCRIPTION = """Reproduce Table 2 of the Convpass paper: zero-shot CLIP, linear probe, CoOp, CoCoOp, Tip-Adapter(-F)
and Convpass_CLIP, each fitted on the same K-shot split (and validation split, drawn from the remaining
train images) per seed, scored on ImageNet, -V2, -Sketch, -A and -R; mean ± std over seeds in
table2.md / table2.csv / table2.json beside the paper's published numbers, and table2_bars.png
(top-1 per method and domain, error bars = std over seeds).

Several values of --shots (e.g. --shots 1 2 4 8 16) run the whole table for each K with the same seeds,
one backbone and one feature store (the evaluation sets are encoded once for the sweep):
  <output-dir>/shots_<K>/       table2.{md,csv,json}, table2_bars.png, split_seed<s>.json for each K
  <output-dir>/table2.*, table2_bars.png         the largest K's table and chart
  <output-dir>/accuracy_vs_shots.{png,json,md}   top-1 on the source set and the target average vs K"""

EPILOG = """method options: --method-options '{"coop": {"epochs": 5, "views": 2}, "tip_adapter": {"search": "small"}}'
(keys are method names, values that method's constructor options); --epochs-scale 0.1 multiplies every
method's default epoch count (an explicit "epochs" option wins).

examples:
  python scripts/run_table2.py --demo --shots 16                  # miniature benchmark, offline
  python scripts/run_table2.py --demo --shots 1 2 4 8 16 --seeds 1  # + accuracy_vs_shots.png
  python scripts/run_table2.py --data-root $DATA --shots 16        # ImageNet + variants, OpenAI ViT-B/16"""


def build_parser() -> argparse.ArgumentParser:
    from ..table2 import TABLE2_METHODS

    parser = argparse.ArgumentParser(description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=positive_int, nargs="+", default=[16],
                        help="training images per class (default 16); several values (1 2 4 8 16) run a sweep "
                             "and plot accuracy against shots")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="split/training seeds (default 1 2 3)")
    parser.add_argument("--val-shots", type=non_negative_int, default=4,
                        help="validation images per class from train, outside the K shots (default 4)")
    parser.add_argument("--methods", nargs="+", default=list(TABLE2_METHODS),
                        help=f"methods to run (default: {' '.join(TABLE2_METHODS)})")
    parser.add_argument("--method-options", default="{}", help="JSON: {method: {option: value}} (see below)")
    parser.add_argument("--epochs-scale", type=positive_float, default=1.0,
                        help="multiply every method's default number of epochs (default 1)")
    add_data_args(parser)
    parser.add_argument("--crop-scale", type=positive_float, default=None,
                        help="smallest area fraction of the train random resized crop (default 0.08; 0.9 with --demo)")
    group = parser.add_argument_group("backbone")
    group.add_argument("--model", default=None, help="open_clip model name or model-config JSON (default ViT-B-16)")
    group.add_argument("--pretrained", default=None, help="open_clip tag, local weights file or 'none' (default openai)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="cuda, cpu or auto")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    group.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS, help="data-loading worker processes")
    group.add_argument("--batch-size", type=positive_int, default=128, help="images per encoder batch")
    group.add_argument("--output-dir", default="runs/table2",
                       help="where table2.*, table2_bars.png and split_seed*.json go (shots_<K>/ per K in a sweep)")
    group.add_argument("--no-cache", action="store_true", help="do not read or write the image-feature cache")
    group.add_argument("--cache-dir", default=None, help="feature cache (default $CLIPCONV_CACHE/features)")
    return parser


def _method_options(text: str) -> dict:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        fail(f"--method-options is not valid JSON: {err}")
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        fail('--method-options must be a JSON object of objects, e.g. {"coop": {"epochs": 5}}')
    return options


def _demo_options(given: dict) -> dict:
    """--demo: the demo module's per-method defaults, and CoOp with 4 tokens from "a photo of a" (the CoCoOp
    paper's domain-generalization CoOp; 16 tokens do not fit the mini CLIP's 16-token text context)."""
    from .. import demo

    from ..methods.base import METHODS, method_names

    method_names()
    defaults: dict = {}
    for name, options in getattr(demo, "DEMO_TRAIN_DEFAULTS", {}).items():
        if name in METHODS:  # keep only what the method's constructor accepts
            parameters = inspect.signature(METHODS[name].__init__).parameters
            open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
            defaults.setdefault(name, {}).update({k: v for k, v in options.items() if open_ended or k in parameters})
    merged = {name: dict(options) for name, options in defaults.items()}
    for name, options in given.items():
        merged.setdefault(name, {}).update(options)
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..table2 import SWEEP_FILE, Table2Config, run_shots_sweep, run_table2

    model, pretrained, data_root = args.model, args.pretrained, args.data_root
    shots = sorted(set(args.shots))
    benchmark_label = None
    method_options = _method_options(args.method_options)
    if args.demo:
        from .. import demo
        from ..demo import MINI_CLIP_CONFIG, MINI_CLIP_WEIGHTS, ensure_world

        data_root = data_root or str(ensure_world())
        model = model or str(MINI_CLIP_CONFIG)
        pretrained = pretrained or str(MINI_CLIP_WEIGHTS)
        method_options = _demo_options(method_options)
        if args.crop_scale is None:
            args.crop_scale = demo.DEMO_RUN_DEFAULTS["crop_scale"]
        if model == str(MINI_CLIP_CONFIG):
            benchmark_label = "miniature benchmark (mini CLIP, generated world; not ImageNet)"
    elif data_root is None:
        from .common import NO_DATA_HELP

        parser.error(NO_DATA_HELP)
    method_options = {k: v for k, v in method_options.items() if k in args.methods or not args.demo}
    cfg = Table2Config(
        data_root=data_root, output_dir=args.output_dir, shots=shots[-1], seeds=args.seeds,
        val_shots=args.val_shots, methods=args.methods, model=model or "ViT-B-16",
        pretrained="openai" if pretrained is None else pretrained, classnames=args.classnames,
        templates=args.templates, eval_sets=args.eval_sets, method_options=method_options,
        epochs_scale=args.epochs_scale, crop_scale=args.crop_scale if args.crop_scale is not None else 0.08,
        cache_dir=None if args.no_cache else (args.cache_dir or "default"),
        device=args.device, precision=args.precision, workers=args.workers, batch_size=args.batch_size,
        benchmark_label=benchmark_label,
    )
    out = Path(args.output_dir)
    with bad_input_errors():
        if len(shots) > 1:
            run_shots_sweep(cfg, shots)
        else:
            run_table2(cfg)
    print(f"table: {out / 'table2.md'}\nbar chart: {out / 'table2_bars.png'}")
    if len(shots) > 1:
        print(f"accuracy vs shots: {out / (SWEEP_FILE + '.png')} (tables: {out / (SWEEP_FILE + '.md')}, "
              f"per K: {out}/shots_<K>/)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
