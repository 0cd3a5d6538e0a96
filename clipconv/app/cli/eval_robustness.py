"""`scripts/eval_robustness.py`: re-evaluate a saved adapter checkpoint on the robustness suite."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from clipconv.app.cli.common import bad_input_errors, fail, join_process_group, plain_warnings
from clipconv.app.cli.options import add_shared_args, given, shared_configs
from clipconv.app.clip_benchmark import write_benchmark_results
from clipconv.app.run import CONFIG_FILE, logits_saver, relocated, setup_logging, write_results
from clipconv.app.rundir import RUN_FILES, check_not_in_use, check_output_dir, claim_output_dir, held_files, new_run_dir
from clipconv.app.session import open_data_family, open_session
from clipconv.app.table2 import RECORD_FILE
from clipconv.app.wise_report import run_sweep
from clipconv.backbone import load_backbone, model_name_of, resolve_device
from clipconv.checkpoint import read_metadata
from clipconv.data import ClassList
from clipconv.methods.finetune import FIT_IDENTITY_KEYS, load_classifier, load_endpoints
from clipconv.runtime.io import read_json_object
from clipconv.runtime.jsontypes import JSONObject
from clipconv.runtime.ranks import is_main, local_device, on_main
from clipconv.training import resolve_precision
from clipconv.wise import alpha_check

WISE_FILES = ("wise_sweep.json", "wise_sweep.md", "wise_sweep.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a trained adapter checkpoint (RUN/adapter.safetensors, or the run folder RUN) on "
                    "ImageNet, -V2, -Sketch, -A and -R. The data settings (--data-root, --eval-sets, ...) and "
                    "--model/--pretrained default to what the run recorded (RUN/config.json, else the checkpoint); "
                    "the classification head is in the checkpoint (no prompt templates are used). Writes "
                    "metrics.json, results.md, run_summary.json and log.txt to a new folder RUN/eval-<time>.")
    parser.add_argument("--checkpoint", required=True, nargs="+", metavar="CHECKPOINT",
                        help="adapter.safetensors written by a training run, or that run's folder; with --wise also "
                             "several (one method's fits with different seeds: the sweep is their mean ± std per α, "
                             "error bars in the plot) or a run_table2.py folder (every seed of its one trained method)")
    parser.add_argument("--output-dir", help="where metrics.json, results.md, run_summary.json and log.txt go "
                                             "(default: a new RUN/eval-<time> beside the checkpoint); a folder "
                                             "already holding results is refused unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results already in --output-dir (their clipconv files are deleted first)")
    parser.add_argument("--save-logits", action="store_true",
                        help="also write <set>_logits.safetensors (logits and labels of every set) to the output folder")
    parser.add_argument("--wise", type=_alpha, nargs="+", metavar="ALPHA",
                        help="evaluate the weight-space interpolation θ(α) = (1 − α)·θ₀ + α·θ₁ between the zero-shot "
                             "start θ₀ (rebuilt from the checkpoint's record) and the trained θ₁ for each α in [0, 1] "
                             "(WiSE-FT, Wortsman et al., 2022), e.g. --wise 0 0.25 0.5 0.75 1; writes wise_sweep.json, "
                             "wise_sweep.md and the plot wise_sweep.png (source top-1 vs target average, logit axes) "
                             "to a new folder RUN/wise-<time> (or --output-dir, which must hold no results)")
    parser.add_argument("--references", metavar="TABLE2_DIR",
                        help="with --wise: a run_table2.py output folder whose rows are drawn as reference points "
                             "(default: the Table 2 folder holding the checkpoint's run, if any; zero-shot CLIP = "
                             "θ(0) is always shown)")
    parser.set_defaults(_fields=add_shared_args(parser, skip=("crop_scale", "templates")))
    return parser


def _alpha(text: str) -> float:

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got '{text}'") from None
    problem = alpha_check(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def run_settings(checkpoint: Path) -> JSONObject:
    """The data and backbone settings recorded in the run's config.json beside `checkpoint`, or in the Table-2
    record (table2_config.json) of the folder holding a Table-2 fit ({} if none): the fallback of every data flag
    and of --model/--pretrained."""

    what_to_do = "give --data-root and --model/--pretrained explicitly, or repair the run"
    path = checkpoint.parent / CONFIG_FILE
    table = checkpoint.parent.parent / RECORD_FILE
    if path.is_file():
        saved = relocated(read_json_object(path, what_to_do=what_to_do), checkpoint.parent)  # the run may have moved
    elif table.is_file():
        record = read_json_object(table, what_to_do=what_to_do).get("config")
        saved = relocated(record, table.parent) if isinstance(record, dict) else {}
    else:
        return {}
    data = {k: v for k, v in (saved.get("data") or {}).items() if k != "templates"}
    backbone = {k: v for k, v in (saved.get("backbone") or {}).items() if k in ("model", "pretrained")}
    return {**data, **backbone}


def checkpoints_of(values: Sequence[str], wise: bool) -> list[Path]:
    """The adapter checkpoints `--checkpoint` names: each value an adapter.safetensors, a run folder holding one,
    or (with --wise) a run_table2.py folder: the fits of its one trained method, every seed. Refused (one line,
    exit 2): a value that is none of these, several checkpoints without --wise, the same checkpoint twice."""
    found: list[Path] = []
    for value in values:
        path = Path(value)
        if path.is_dir() and (path / "adapter.safetensors").is_file():
            found.append(path / "adapter.safetensors")
        elif path.is_dir() and (path / "table2.json").is_file() and wise:
            fits = sorted(path.glob("*_seed*/adapter.safetensors"))
            methods = sorted({f.parent.name.rsplit("_seed", 1)[0] for f in fits})
            if len(methods) != 1:
                fail(f"--checkpoint {value}: the Table-2 folder holds "
                     + (f"fits of several trained methods ({', '.join(methods)}); give one method's, e.g. "
                        f"--checkpoint {path / (methods[0] + '_seed*')}" if methods else "no trained fit (no "
                        "<method>_seed<s>/adapter.safetensors)"))
            found.extend(fits)
        elif path.is_dir():
            fail(f"--checkpoint {value}: no adapter.safetensors in that folder; give a training run's folder or its "
                 "adapter.safetensors" + (" (or, with --wise, a run_table2.py folder)" if not wise else ""))
        else:
            found.append(path)
    if len(found) > 1 and not wise:
        fail("--checkpoint: several checkpoints only with --wise (their sweeps are averaged); give one")
    twice = sorted({str(p) for p in found if [q.resolve() for q in found].count(p.resolve()) > 1})
    if twice:
        fail(f"--checkpoint: {', '.join(twice)} given twice; give each once")
    return found


def check_same_fit(checkpoints: Sequence[Path], metas: Sequence[JSONObject]) -> list[Optional[int]]:
    """The seeds of `checkpoints` (one method's fits on the same backbone and classes, each seed once), or a
    one-line refusal naming what differs."""
    first = metas[0]
    for path, meta in zip(checkpoints[1:], metas[1:]):
        for key in FIT_IDENTITY_KEYS:
            if meta.get(key) != first.get(key):
                fail(f"--checkpoint {path}: its {key} differs from {checkpoints[0]}'s; a sweep over several checkpoints "
                     "averages one method's fits (different seeds) on the same backbone and classes")
    seeds = [(meta.get("init") or {}).get("seed") for meta in metas]
    twice = sorted({str(s) for s in seeds if seeds.count(s) > 1})
    if len(checkpoints) > 1 and twice:
        fail(f"--checkpoint: seed {', '.join(twice)} appears in more than one checkpoint; one fit counted twice is no "
             "spread — give each seed's fit once")
    return seeds


class _Classifier:
    """Adapts a trained ImageClassifier to the method interface the evaluation suite expects."""

    frozen_image_encoder = False

    def __init__(self, classifier: nn.Module) -> None:
        self.classifier = classifier

    def logits(self, images):

        with torch.no_grad():
            return self.classifier(images)


class _Endpoints(_Classifier):
    """A loaded checkpoint with its starting point: interpolable by clipconv.wise."""

    def __init__(self, classifier: nn.Module, theta0: dict, theta1: dict) -> None:
        super().__init__(classifier)
        self._endpoints = (theta0, theta1)

    def interpolation_endpoints(self):
        return self._endpoints

    def load_interpolated(self, state) -> None:

        params = dict(self.classifier.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        self.classifier.eval()


def load_references(folder: Optional[str], checkpoint: Path, meta: dict) -> dict[str, tuple[float, float]]:
    """{label: (source %, target avg %)} of the Table 2 rows in `folder` (default: the Table 2 folder holding
    the checkpoint's run, if any): the checkpoint's seed when the table has it, else the mean over seeds; the
    checkpoint's own method and its WiSE rows are left out (the sweep draws them)."""

    path = Path(folder) / "table2.json" if folder else checkpoint.parent.parent / "table2.json"
    if not path.is_file():
        if folder:
            fail(f"--references {folder}: no table2.json there; give a run_table2.py output folder")
        return {}
    table = read_json_object(path, what_to_do="give another --references folder, or repair the table")
    columns = list(table.get("columns") or [])
    if not columns:
        fail(f"--references: {path} names no result columns; give a complete run_table2.py output folder")
    source = columns[0]
    seed = str((meta.get("init") or {}).get("seed"))
    own = meta.get("method")
    refs = {}
    for name, entry in (table.get("measured") or {}).items():
        if name == own or name.startswith(f"{own}+"):
            continue
        per_seed = (table.get("per_seed") or {}).get(name, {})
        row, note = (per_seed[seed]["row"], f"seed {seed}") if seed in per_seed else (entry["mean"], "mean")
        if row.get(source) is not None and row.get("target_avg") is not None:  # null: not measured
            refs[f"{entry['label']} ({note})"] = (float(row[source]), float(row["target_avg"]))
    return refs


def main(argv: Optional[Sequence[str]] = None) -> int:
    plain_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.references and not args.wise:
        fail("--references: only used with --wise (the reference points of the sweep plot)")
    if args.wise and args.overwrite:
        fail("--wise never replaces results: drop --overwrite and give a new --output-dir (or none)")
    if args.wise and args.save_logits:
        fail("--save-logits: not with --wise (one evaluation per α); save the logits of one α without --wise")
    checkpoints = checkpoints_of(args.checkpoint, bool(args.wise))
    checkpoint = checkpoints[0]
    with bad_input_errors():
        metas = [read_metadata(path) for path in checkpoints]
        seeds = check_same_fit(checkpoints, metas)
        meta = metas[0]
        recorded = run_settings(checkpoint)
        own = (*RUN_FILES, *WISE_FILES) if args.wise else RUN_FILES
        if args.output_dir:  # before any work
            check_output_dir(args.output_dir)
            check_not_in_use(args.output_dir)  # another process writing there
            if not args.overwrite and held_files(Path(args.output_dir), own, ("*_logits.safetensors", "clip_benchmark")):
                claim_output_dir(args.output_dir, own, ("*_logits.safetensors", "clip_benchmark"))  # refuses, naming the files
        own_seed = meta if len(checkpoints) == 1 else {**meta, "init": {}}  # several seeds: the table's means
        references = load_references(args.references, checkpoint, own_seed) if args.wise else {}
    trained_on = (meta.get("backbone") or {}).get("model")
    model_flag = given(args, args._fields["backbone"]).get("model")
    if model_flag and trained_on and model_name_of(model_flag) != trained_on:  # its weights cannot fit: say so now
        fail(f"--model {model_flag}: checkpoint '{checkpoint}' was trained on model '{trained_on}'; drop --model "
             "(the run's own model is used) or give that model")
    source = meta.get("source", {})
    fallback = {"model": source.get("model"), "pretrained": source.get("pretrained"), **recorded}
    configs = shared_configs(args, args._fields, parser, fallback=fallback)
    data, backbone_cfg, runtime = configs["data"], configs["backbone"], configs["runtime"]
    with bad_input_errors():

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
        join_process_group(runtime.device)  # under torchrun: join the process group, each rank scores a shard
        device = local_device(resolve_device(runtime.device))
        backbone = load_backbone(backbone_cfg.model, backbone_cfg.pretrained, device=device,
                                 precision=resolve_precision(backbone_cfg.precision, device),
                                 quick_gelu=meta["backbone"].get("quick_gelu"))
        if args.wise:
            endpoints = [_Endpoints(*load_endpoints(path, backbone, list(classes.names))[:3]) for path in checkpoints]
        else:
            classifier, _ = load_classifier(checkpoint, backbone)
        session = open_session(data, backbone_cfg, runtime, loaded=backbone, classes=classes)

        def create() -> Path:  # on rank 0 only under torchrun; the others get its path
            if args.output_dir:
                return claim_output_dir(args.output_dir, own, ("*_logits.safetensors", "clip_benchmark"),
                                        overwrite=args.overwrite)
            prefix = "wise" if args.wise else "eval"
            tables = {path.parent.parent for path in checkpoints}  # several fits of one Table-2 folder: there
            beside = tables.pop() if len(checkpoints) > 1 and len(tables) == 1 else checkpoint.parent
            return new_run_dir(beside, f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")

        out_dir = on_main(create)
    setup_logging(out_dir, runtime.quiet)
    if args.wise:

        run_sweep(session, endpoints, args.wise, out_dir, meta, checkpoints, references, seeds=seeds)
        print(f"results: {out_dir}")
        return 0
    metrics = session.evaluate(_Classifier(classifier), on_logits=logits_saver(out_dir) if args.save_logits else None)
    write_results(out_dir, meta.get("method", "checkpoint"), session.row(metrics), metrics,
                  {"checkpoint": str(checkpoint.resolve()), "evaluated": list(metrics),
                   "not_evaluated": session.missing}, columns=session.family.suite,
                  display=session.family.display, note=session.target_note())
    if is_main():

        write_benchmark_results(out_dir, session.family, metrics, backbone_cfg.model, backbone_cfg.pretrained,
                                meta.get("method", "checkpoint"), {"checkpoint": str(checkpoint.resolve())})
        print(f"results: {out_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
