"""`scripts/zero_shot.py`: zero-shot CLIP on the robustness suite for one or several backbones, one table."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from clipconv.app.cli.common import bad_input_errors, plain_warnings
from clipconv.app.cli.options import add_shared_args, shared_configs
from clipconv.app.clip_benchmark import BENCHMARK_DIR, write_benchmark_results
from clipconv.app.report import markdown_table
from clipconv.app.run import counts_line, log, recall_line, setup_logging
from clipconv.app.rundir import (
    ZERO_SHOT_FILES, check_not_in_use, check_output_dir, claim_output_dir, held_files, new_run_dir
)
from clipconv.app.session import build_method_config, fit_and_evaluate, open_session, templates_used
from clipconv.data import FewShotSplit
from clipconv.methods.zero_shot import ZeroShot
from clipconv.runtime.outputs import write_json, write_text

if TYPE_CHECKING:
    from clipconv.config import BackboneConfig, DataConfig, RuntimeConfig

DESCRIPTION = """Zero-shot CLIP on ImageNet, -V2, -Sketch, -A and -R. Several --model/--pretrained pairs (given in
the same order) are compared in one table. Writes zero_shot.json and zero_shot.md to a new folder
runs/zero_shot_<time> (or --output-dir; a folder already holding a comparison is refused unless --overwrite)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    group = parser.add_argument_group("backbones (pairs, in order)")
    group.add_argument("--model", action="append", default=None,
                       help="open_clip model name or model-config JSON; repeat for several (default ViT-B-16; "
                            "the mini CLIP with --demo)")
    group.add_argument("--pretrained", action="append", default=None,
                       help="open_clip tag, weights file or 'none'; one per --model (default openai)")
    parser.add_argument("--output-dir", default=None, help="where zero_shot.{json,md} go "
                                                           "(default: a new runs/zero_shot_<time>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the comparison already in --output-dir (its clipconv files are deleted first)")
    parser.set_defaults(_fields=add_shared_args(parser, skip=("model", "pretrained", "crop_scale"),
                                                aliases={"eval_batch_size": ("--batch-size",)}))
    return parser


def backbone_pairs(models: Optional[Sequence[str]], pretrained: Optional[Sequence[str]],
                   default: tuple[str, Optional[str]] = ("ViT-B-16", "openai")) -> list[tuple[str, Optional[str]]]:
    """Pair --model and --pretrained values; a single --pretrained applies to every model."""
    models = list(models or [default[0]])
    tags = list(pretrained or [default[1]])
    if len(tags) == 1 and len(models) > 1:
        tags = tags * len(models)
    if len(tags) != len(models):
        raise ValueError(f"got {len(models)} --model but {len(tags)} --pretrained values; give one per model "
                         "(or a single --pretrained for all)")
    return list(zip(models, tags))


def compare_zero_shot(data: "DataConfig", backbones: Sequence["BackboneConfig"], runtime: "RuntimeConfig",
                      output_dir: Optional[Path] = None, log: Callable[[str], None] = print,
                      overwrite: bool = False) -> dict:
    """Zero-shot accuracy of each backbone on the suite (one Session per backbone); writes zero_shot.json
    and zero_shot.md atomically in `output_dir` (a new runs/zero_shot_<time> when None; the payload's
    "output_dir"). The folder is checked before any work; one holding a comparison is refused unless
    `overwrite`."""


    ZERO_SHOT_PATTERNS = (BENCHMARK_DIR,)  # the CLIP_benchmark-format results folder
    if output_dir is not None:  # before any work
        check_output_dir(output_dir)
        check_not_in_use(output_dir)  # another process writing there
        if not overwrite and held_files(Path(output_dir), ZERO_SHOT_FILES, ZERO_SHOT_PATTERNS):
            claim_output_dir(output_dir, ZERO_SHOT_FILES, ZERO_SHOT_PATTERNS)
    if data.templates is None:  # zero-shot CLIP's reference: the single "a photo of a {}." (the paper's 66.73)

        data = dataclasses.replace(data, templates=ZeroShot.reference_templates)
    sessions = [open_session(data, backbone, runtime) for backbone in backbones]  # all checked before any work
    if output_dir is None:
        output_dir = new_run_dir("runs", f"zero_shot_{time.strftime('%Y%m%d-%H%M%S')}")
    else:
        output_dir = claim_output_dir(output_dir, ZERO_SHOT_FILES, ZERO_SHOT_PATTERNS, overwrite=overwrite)
    rows, results = [], []
    config = build_method_config("zero_shot")  # its reference options, for every backbone
    for backbone, session in zip(backbones, sessions):
        fit = fit_and_evaluate(session, "zero_shot", config, FewShotSplit(train=[]), seed=0, log_line=log)
        tag = backbone.pretrained
        label = f"{session.backbone.model_name} ({Path(tag).name if tag and Path(tag).exists() else tag})"
        rows.append((label, session.row(fit.metrics)))
        results.append({"label": label, "model": backbone.model, "pretrained": tag,
                        "backbone": session.backbone.describe(), "metrics": fit.metrics,
                        "row": session.row(fit.metrics), "images_encoded": fit.images_encoded,
                        "seconds": round(fit.fit_seconds + fit.eval_seconds, 2)})
        write_benchmark_results(output_dir, session.family, fit.metrics, backbone.model, tag, "zero_shot",
                                templates=templates_used("zero_shot", [fit.fit], data.templates))
    first = sessions[0]
    payload = {"output_dir": str(output_dir), "templates": data.templates, "n_templates": len(first.templates), "data_root": str(first.data_root),
               "classes": len(first.classes), "results": results}
    write_json(output_dir / "zero_shot.json", payload)
    table = markdown_table(rows, columns=first.family.suite, display=first.family.display) + \
        f"\n{first.target_note()}\n"
    write_text(output_dir / "zero_shot.md",
               f"# Zero-shot CLIP, templates '{data.templates}' ({len(first.templates)}): top-1 (%)\n\n{table}\n"
               + (counts_line(results[0]["metrics"], first.family.display) + "\n" if results else "")
               + "".join(f"{r['label']}: {recall_line(r['metrics'], first.family.display)}\n" for r in results))
    log("\n" + table)
    return payload


def main(argv: Optional[Sequence[str]] = None) -> int:
    plain_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    configs = shared_configs(args, args._fields, parser)
    backbone = configs["backbone"]
    with bad_input_errors():
        pairs = backbone_pairs(args.model, args.pretrained, default=(backbone.model, backbone.pretrained))
        backbones = [dataclasses.replace(backbone, model=m, pretrained=p) for m, p in pairs]

        setup_logging(quiet=configs["runtime"].quiet)
        payload = compare_zero_shot(configs["data"], backbones, configs["runtime"],
                                    Path(args.output_dir) if args.output_dir else None, log=log.info,
                                    overwrite=args.overwrite)
    print(f"table: {Path(payload['output_dir']) / 'zero_shot.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
