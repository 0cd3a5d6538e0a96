"""One few-shot run, from data to metrics: session → K-shot split → fit_and_evaluate → run directory.

    cfg = RunConfig(method="convpass", shots=16, data=DataConfig(data_root="$DATA"))
    run = prepare_run(cfg)          # validates everything, loads the backbone; creates the (empty) run folder
    result = execute_run(run)       # fit, untouched-backbone check, suite evaluation, run directory
"""
from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import open_clip
import torch
from safetensors.torch import save_file

from clipconv.app.clip_benchmark import write_benchmark_results
from clipconv.app.report import markdown_table
from clipconv.app.rundir import RUN_FILES, check_output_dir, claim_output_dir, held_files, new_run_dir
from clipconv.app.session import FitResult, Session, fit_and_evaluate, jsonable, method_options, open_session
from clipconv.config import (
    BackboneConfig, Config, DataConfig, RuntimeConfig, non_negative, option, positive, seed_range
)
from clipconv.data.fewshot import save_split
from clipconv.methods.base import METHODS
from clipconv.runtime import ranks
from clipconv.runtime.outputs import atomic_path, write_json, write_text
from clipconv.wise import alpha_check, supports_interpolation, wise_label

if TYPE_CHECKING:
    from clipconv.data import FewShotSplit

__all__ = ["RunConfig", "PreparedRun", "prepare_run", "execute_run", "write_results", "recall_line", "setup_logging",
           "environment", "VAL_SHOTS", "CONFIG_FILE", "counts_line", "logits_saver"]

log = logging.getLogger("clipconv")

#: validation images per class drawn from train, outside the K shots — the one default of every entry point.
#: It is what makes choosing hyper-parameters (Convpass's scale and epoch, the baselines' searches) possible
#: without a test set. Its cost: scoring 4 images per class after every epoch — forward only, so about 8 % of
#: 16-shot training's compute; measured on the demo (5 epochs, 1 thread, load 3.7): fit 13.5 s vs 10.4 s.
VAL_SHOTS = 4
#: a Convpass scale search's sub-folders; --save-logits; the CLIP_benchmark-format results
RUN_PATTERNS = ("scale_*", "*_logits.safetensors", "clip_benchmark")
CONFIG_FILE = "config.json"
VAL_HELP = ("validation images per class drawn from train, disjoint from the K shots; used to choose the scale, "
            "the epoch and the baselines' hyper-parameters (0: none)")


@dataclass
class RunConfig(Config):
    """Every setting of a single run (saved as config.json; `--resume` reads it back)."""

    method: str = option("convpass", help="registered method (see --list-methods)")
    shots: int = option(16, check=positive, help="training images per class (K)")
    seed: int = option(1, check=seed_range, help="seed of the K-shot split and of training")
    val_shots: int = option(VAL_SHOTS, check=non_negative, help=VAL_HELP)
    split: Optional[str] = option(None, help="reuse a saved split.json (drawn with the same --shots, --seed and "
                                             "--val-shots) instead of drawing one")
    output_dir: Optional[str] = option(None, help="run directory (default runs/<method>_<K>shot_seed<S>_<time>)")
    save_logits: bool = option(False, help="also write <set>_logits.safetensors (the logits and labels of every "
                                            "evaluation set) to the run directory")
    wise_alpha: Optional[float] = option(
        None, check=alpha_check,
        help="after training, evaluate θ(α) = (1 − α)·θ₀ + α·θ₁ between the zero-shot start θ₀ and the trained "
             "weights θ₁ (WiSE-FT, Wortsman et al., 2022; 0.5 is its default); adapter.safetensors keeps θ₁, so "
             "eval_robustness.py --wise can score any α later (default: off, the trained weights)")
    method_options: dict[str, Any] = option(default_factory=dict, cli=False, help="the method's options")
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "RunConfig":
        """The inverse of `to_dict` (config.json); the `environment` record is ignored."""
        sections = {"data": DataConfig, "backbone": BackboneConfig, "runtime": RuntimeConfig}
        values = {k: v for k, v in saved.items() if k != "environment"}
        for name, section in sections.items():
            values[name] = section.from_options(values.get(name, {}))
        return cls.from_options(values)


def environment(session: Session) -> dict[str, Any]:
    """Library versions, device and precision of a run (recorded beside its config)."""

    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "device": str(session.device), "precision": session.precision, "world_size": ranks.world_size(),
            "backend": ranks.backend(), "threads": torch.get_num_threads()}


def setup_logging(run_dir: Optional[Path] = None, quiet: bool = False) -> None:
    """Log to stderr (warnings only when `quiet`) and, when given, to run_dir/log.txt (appending).
    Under torchrun only rank 0 logs (the other ranks show warnings only and write no log.txt)."""
    if not ranks.is_main():
        run_dir, quiet = None, True
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(message)s"))
    stream.setLevel(logging.WARNING if quiet else logging.INFO)
    log.addHandler(stream)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file_handler)
    log.propagate = False


@dataclass
class PreparedRun:
    """A validated run: its session, K-shot split, method options and run directory (nothing written yet)."""

    config: RunConfig
    session: Session
    split: "FewShotSplit"
    options: dict[str, Any]
    run_dir: Path
    resume: bool = False


def prepare_run(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> PreparedRun:
    """Check the method options and the output folder, open the session, draw (or load) the split, then
    create the run folder; raises ValueError on bad input (and then creates nothing).

    Without `cfg.output_dir` the folder is a new `runs/<method>_<K>shot_seed<S>_<time>[-N]`, created
    exclusively. A given folder that already holds a run is refused unless `overwrite` (its clipconv files
    are removed first) or `resume`.
    """
    options = method_options(cfg.method, cfg.method_options)
    if cfg.wise_alpha is not None:

        if not supports_interpolation(METHODS[cfg.method]):
            raise ValueError(f"--wise-alpha: method '{cfg.method}' has no trained weights to interpolate; WiSE-FT "
                             "applies to trained methods (convpass, linear_probe, coop, cocoop, tip_adapter_f)")
    if cfg.output_dir:  # before any work: a file, a too-long name, an unwritable parent, an existing run
        check_output_dir(cfg.output_dir)
        if not resume and not overwrite and held_files(Path(cfg.output_dir), RUN_FILES, RUN_PATTERNS):
            claim_output_dir(cfg.output_dir, RUN_FILES, RUN_PATTERNS,
                             resume_hint=f"or --resume {cfg.output_dir} to continue it")
    session = open_session(cfg.data, cfg.backbone, cfg.runtime)
    if cfg.split:
        split = session.load_split(cfg.split, cfg.shots, cfg.seed, cfg.val_shots)
    else:
        split = session.draw_split(cfg.shots, cfg.seed, cfg.val_shots)
    options = method_options(cfg.method, options, precision=session.precision)

    def create() -> Path:  # on rank 0 only under torchrun; the others get its path
        if cfg.output_dir:
            return claim_output_dir(cfg.output_dir, RUN_FILES, RUN_PATTERNS, overwrite=overwrite, resume=resume)
        return new_run_dir("runs", f"{cfg.method}_{cfg.shots}shot_seed{cfg.seed}_{time.strftime('%Y%m%d-%H%M%S')}")

    run_dir = ranks.on_main(create)
    return PreparedRun(cfg, session, split, options, run_dir, resume)


def execute_run(run: PreparedRun) -> FitResult:
    """Fit and evaluate; writes config.json and split.json (not when resuming), the method's files,
    metrics.json, results.md and run_summary.json in the run directory."""

    cfg, session, run_dir = run.config, run.session, run.run_dir
    setup_logging(run_dir, cfg.runtime.quiet)
    if not run.resume:  # a resumed run keeps its original config and split
        write_json(run_dir / CONFIG_FILE, {**cfg.to_dict(), "environment": environment(session)})
        save_split(run_dir / "split.json", run.split,
                   {"shots": cfg.shots, "seed": cfg.seed, "val_shots": cfg.val_shots, **session.split_meta()})
    log.info(f"{cfg.method}: {len(session.classes)} classes, {len(run.split.train)} train / {len(run.split.val)} "
             f"val images, backbone {session.backbone.model_name} ({session.backbone.weights_id}), "
             f"device {session.device}")
    for what, short in (("K-shot", run.split.shortfall), ("validation", run.split.val_shortfall)):
        if short:
            log.info(f"{what} shortfall: {len(short)} class(es) got fewer images than asked (images drawn): "
                     + ", ".join(f"{name} ({n})" for name, n in sorted(short.items())))
    result = fit_and_evaluate(session, cfg.method, run.options, run.split, seed=cfg.seed, output_dir=run_dir,
                              resume=run.resume, on_logits=logits_saver(run_dir) if cfg.save_logits else None,
                              wise_alpha=cfg.wise_alpha)
    if result.not_evaluated:
        log.info(f"not evaluated (missing or empty): {', '.join(result.not_evaluated)}")
    shortfall = {"shortfall": dict(run.split.shortfall), "val_shortfall": dict(run.split.val_shortfall)}
    label = cfg.method if cfg.wise_alpha is None else wise_label(cfg.method, cfg.wise_alpha)
    write_results(run_dir, label, session.row(result.metrics), result.metrics, {**result.to_dict(), **shortfall},
                  columns=session.family.suite, display=session.family.display)
    write_benchmark_results(run_dir, session.family, result.metrics, cfg.backbone.model, cfg.backbone.pretrained,
                            cfg.method, {"fewshot_k": cfg.shots, "seed": cfg.seed})
    return result


def logits_saver(folder: Path):
    """`on_logits` for evaluation: writes folder/<set>_logits.safetensors ({"logits", "labels"}) atomically."""
    def save(name: str, logits: Any, labels: Any) -> None:


        with atomic_path(folder / f"{name}_logits.safetensors") as tmp:
            save_file({"logits": logits.float().contiguous(), "labels": labels.long().contiguous()}, str(tmp))

    return save


def counts_line(metrics: Mapping[str, Mapping[str, Any]], display: Optional[Mapping[str, str]] = None) -> str:
    """"images / classes per set: ImageNet 12 / 4, -A 6 / 2, ...": what each score is over (a restricted set
    such as -A/-R is scored over its own classes only)."""
    display = display or {}
    cells = [f"{display.get(name, name)} {int(m['n'])} / " + (str(int(m["classes"])) if "classes" in m else "?")
             for name, m in metrics.items()]
    return "images / classes per set: " + ", ".join(cells)


def recall_line(metrics: Mapping[str, Mapping[str, Any]], display: Optional[Mapping[str, str]] = None) -> str:
    """"mean per-class recall (%): ImageNet 70.12, -V2 ...": sklearn's balanced accuracy of each set."""
    display = display or {}
    cells = [f"{display.get(name, name)} {float(m['mean_per_class_recall']):.2f}" for name, m in metrics.items()
             if "mean_per_class_recall" in m]
    return "mean per-class recall (%): " + ", ".join(cells)


def write_results(run_dir: Path, label: str, row: dict[str, float], metrics: dict[str, dict[str, float]],
                  summary: dict[str, Any], columns: Sequence[str], display: Optional[Mapping[str, str]] = None) -> None:
    """metrics.json ({set: {top1, top5, n, classes}}), results.md (the Table-2 `row` over `columns`, then
    the images / classes each score is over) and run_summary.json, atomically."""

    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "run_summary.json", jsonable(summary))
    table = markdown_table([(label, row)], columns=columns, display=display)
    write_text(run_dir / "results.md", f"# {label}: top-1 (%)\n\n{table}\n{counts_line(metrics, display)}\n"
                                       f"{recall_line(metrics, display)}\n")
    log.info("\n" + table)
