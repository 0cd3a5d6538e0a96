"""One few-shot run, from data to metrics: session → K-shot split → fit_and_evaluate → run directory.

    cfg = RunConfig(method="convpass", shots=16, data=DataConfig(data_root="$DATA"))
    run = prepare_run(cfg)          # validates everything, loads the backbone; creates the (empty) run folder
    result = execute_run(run)       # fit, untouched-backbone check, suite evaluation, run directory
"""
from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import open_clip
import torch
from safetensors.torch import save_file

import clipconv
from clipconv.app.clip_benchmark import write_benchmark_results
from clipconv.app.report import markdown_table
from clipconv.app.rundir import RUN_FILES, check_not_in_use, check_output_dir, claim_output_dir, held_files, new_run_dir
from clipconv.app.session import (
    FitResult, Session, build_method_config, check_backbone_fit, check_processes, fit_and_evaluate, jsonable,
    open_session, templates_used
)
from clipconv.config import (
    BackboneConfig, Config, DataConfig, RuntimeConfig, non_negative, option, positive, seed_range
)
from clipconv.data.fewshot import save_split
from clipconv.methods.base import METHODS, PRESET_CHOICES, MethodConfig, default_method
from clipconv.runtime import ranks
from clipconv.runtime.jsontypes import JSON, JSONObject
from clipconv.runtime.outputs import atomic_path, write_json, write_text
from clipconv.wise import WISE_DEFAULT_ALPHA, alpha_check, supports_interpolation, wise_label

if TYPE_CHECKING:
    from clipconv.data import FewShotSplit

__all__ = ["ExperimentConfig", "RunConfig", "PreparedRun", "relocated", "source_commit", "SECTIONS",
           "prepare_run", "execute_run", "write_results", "recall_line", "setup_logging",
           "environment", "VAL_SHOTS", "CONFIG_FILE", "counts_line", "logits_saver", "folder_name", "RESULT",
           "check_resume_world_size", "discard_unstarted", "START_FILES"]

log = logging.getLogger("clipconv")
#: the log level of a run's final table: shown on stderr also under --quiet (which hides INFO lines)
RESULT = logging.INFO + 5
logging.addLevelName(RESULT, "RESULT")

#: validation images per class drawn from train, outside the K shots — the one default of every entry point.
#: It is what makes choosing hyper-parameters (Convpass's scale and epoch, the baselines' searches) possible
#: without a test set. Its cost: scoring 4 images per class after every epoch — forward only, so about 8 % of
#: 16-shot training's compute; measured on the demo (5 epochs, 1 thread, load 3.7): fit 13.5 s vs 10.4 s.
VAL_SHOTS = 4
#: a Convpass scale search's sub-folders; --save-logits; the CLIP_benchmark-format results; the folders
#: eval_robustness.py writes beside the checkpoint by default (RUN/eval-<time>, RUN/wise-<time>)
RUN_PATTERNS = ("scale_*", "*_logits.safetensors", "clip_benchmark", "eval-[0-9]*", "wise-[0-9]*")
CONFIG_FILE = "config.json"
#: what a new run writes before it trains: a run that stops on bad input with nothing more removes them again
START_FILES = (CONFIG_FILE, "split.json", "log.txt")
VAL_HELP = ("validation images per class drawn from train, disjoint from the K shots; used to choose the scale, "
            "the epoch and the baselines' hyper-parameters (0: none)")


#: how a run and Table 2 build each method's config: its paper or demo recipe (`Method.presets`)
PRESET_HELP = ("each method's recipe: paper (its reference protocol: the defaults shown) or demo (the miniature "
               "benchmark's, chosen for the mini CLIP; --demo selects it); robust (methods that train the image "
               "encoder: the robustness-keeping recipe, docs/robustness.md) lies over either; method flags and "
               "--method-options go "
               "over it")
WISE_HELP = ("α of WiSE-FT's θ(α) = (1 − α)·θ₀ + α·θ₁ between the zero-shot start θ₀ and the trained weights θ₁ "
             "(Wortsman et al., 2022), fixed in advance, never chosen on a test set. A single run is evaluated at "
             "θ(α) after training (default: off, the trained weights; adapter.safetensors keeps θ₁, so "
             "eval_robustness.py --wise can score any α later); Table 2's '+ WiSE' rows use it (default: "
             f"WiSE-FT's {WISE_DEFAULT_ALPHA:g})")
SECTIONS: dict[str, type[Config]] = {"data": DataConfig, "backbone": BackboneConfig, "runtime": RuntimeConfig}


@dataclass
class ExperimentConfig(Config):
    """The settings a single run (`RunConfig`) and Table 2 (`Table2Config`) share, declared once: K, the
    validation shots, the methods' preset, WiSE's α, and the data, backbone and runtime sections."""

    shots: int = option(16, check=positive, help="training images per class (K)")
    val_shots: int = option(VAL_SHOTS, check=non_negative, help=VAL_HELP)
    preset: str = option("paper", choices=PRESET_CHOICES, help=PRESET_HELP)
    wise_alpha: Optional[float] = option(None, check=alpha_check, help=WISE_HELP)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> JSONObject:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v.to_dict() if isinstance(v, Config) else list(v) if isinstance(v, tuple) else v
                for k, v in out.items()}

    @classmethod
    def sections_from(cls, saved: Mapping[str, JSON]) -> JSONObject:
        """`saved` (a `to_dict`) with its data, backbone and runtime sections as configs, without the
        `environment` record."""
        values = {k: v for k, v in saved.items() if k != "environment"}
        for name, section in SECTIONS.items():
            values[name] = section.from_options(values.get(name, {}))
        return values


@dataclass
class RunConfig(ExperimentConfig):
    """Every setting of a single run (saved as config.json; `--resume` reads it back).

    `method_config` is the method's typed config, built once by the entry point (`build_method_config`) and
    passed to the method as is; left out, it is the method's `preset` (config.json: "method_options")."""

    method: str = option(default_method(), help="registered method (see --list-methods)")
    seed: int = option(1, check=seed_range, help="seed of the K-shot split and of training")
    split: Optional[str] = option(None, help="reuse a saved split.json (drawn with the same --shots, --seed and "
                                             "--val-shots) instead of drawing one")
    output_dir: Optional[str] = option(None, help="run directory (default runs/<method>_<K>shot_seed<S>_<time>)")
    save_logits: bool = option(False, help="also write <set>_logits.safetensors (the logits and labels of every "
                                            "evaluation set) to the run directory")
    method_config: Optional[MethodConfig] = option(None, cli=False, help="the method's typed config")

    def __post_init__(self) -> None:
        if self.method_config is None:
            self.method_config = build_method_config(self.method, self.preset, precision=self.backbone.precision)
        super().__post_init__()
        expected = METHODS.lookup(self.method).config_class
        if type(self.method_config) is not expected:
            raise ValueError(f"method '{self.method}' takes a {expected.__name__}, got a "
                             f"{type(self.method_config).__name__}")

    def to_dict(self) -> JSONObject:
        out = super().to_dict()
        out["method_options"] = out.pop("method_config")  # config.json's name for the method's options
        return out

    @classmethod
    def from_dict(cls, saved: Mapping[str, JSON]) -> "RunConfig":
        """The inverse of `to_dict` (config.json); the `environment` record is ignored. The method's config
        is built from the recorded "method_options" (over the recorded preset: an older run recorded only
        the options it was given)."""
        values = cls.sections_from(saved)
        method, options = values.get("method", default_method()), values.pop("method_options", {})
        if not isinstance(options, dict):
            raise ValueError(f"\"method_options\" must be an object, got {options!r}")
        values["method_config"] = build_method_config(method, values.get("preset", "paper"), options,
                                                      precision=values["backbone"].precision)
        return cls.from_options(values)


def folder_name(method: str) -> str:
    """`method` as part of a file or folder name: 'adapter:lora' -> 'adapter-lora' (a ':' breaks paths on some
    file systems and tools)."""
    return method.replace(":", "-")


def source_commit() -> Optional[str]:
    """`git rev-parse HEAD` of the clipconv source tree when it is a git checkout (its own top level), else None."""
    root = Path(clipconv.__file__).resolve().parent.parent
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return top[1] if len(top) == 2 and Path(top[0]).resolve() == root else None


def environment(session: Session) -> JSONObject:
    """clipconv's version and commit, library versions, device and precision of a run (recorded beside its
    config)."""

    return {"clipconv": clipconv.__version__, "commit": source_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "open_clip": open_clip.__version__,
            "device": str(session.device), "precision": session.precision, "world_size": ranks.world_size(),
            "backend": ranks.backend(), "threads": torch.get_num_threads()}


def check_resume_world_size(saved: Mapping[str, JSON], world_size: int, run_dir: str) -> None:
    """Refuse (ValueError) resuming a run under another number of processes than it started with (config.json's
    "environment"."world_size", 1 when not recorded): the record would no longer say how the run was trained."""
    environment_ = saved.get("environment")
    started = environment_.get("world_size", 1) if isinstance(environment_, dict) else 1
    if started != world_size:
        how = "plain python (one process)" if started == 1 else f"torchrun --nproc_per_node {started}"
        raise ValueError(f"--resume {run_dir}: the run was started as {started} process(es), this is {world_size}; "
                         f"resume it the way it started: {how}")


def relocated(saved: JSONObject, folder: Path) -> JSONObject:
    """A run record (config.json) read from `folder`: paths that pointed into the folder where the run was
    written (its recorded "output_dir") point into `folder`, where it is now (a moved or copied run)."""
    old = saved.get("output_dir")
    if not old:
        return saved
    old_root, new_root = Path(old), folder.resolve()

    def move(value: JSON) -> JSON:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, str) and Path(value).is_absolute():
            try:
                return str(new_root / Path(value).relative_to(old_root))
            except ValueError:
                return value
        return value

    return {k: v if k == "environment" else move(v) for k, v in saved.items()}


def setup_logging(run_dir: Optional[Path] = None, quiet: bool = False) -> None:
    """Log to stderr (warnings and the final table only when `quiet`: levels WARNING and RESULT) and, when
    given, to run_dir/log.txt (appending). Under torchrun only rank 0 logs (the other ranks show warnings only
    and write no log.txt)."""
    main = ranks.is_main()
    if not main:
        run_dir, quiet = None, True
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(message)s"))
    stream.setLevel(logging.INFO if not quiet else RESULT if main else logging.WARNING)
    log.addHandler(stream)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file_handler)
    log.propagate = False


@dataclass
class PreparedRun:
    """A validated run: its session, K-shot split and run directory (nothing written yet)."""

    config: RunConfig
    session: Session
    split: "FewShotSplit"
    run_dir: Path
    resume: bool = False


def prepare_run(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> PreparedRun:
    """Check the method and the output folder, open the session, draw (or load) the split, then
    create the run folder; raises ValueError on bad input (and then creates nothing).

    Without `cfg.output_dir` the folder is a new `runs/<method>_<K>shot_seed<S>_<time>[-N]`, created
    exclusively. A given folder that already holds a run is refused unless `overwrite` (its clipconv files
    are removed first) or `resume`.
    """
    check_processes(cfg.method, cfg.method_config)  # now that the process group (if any) is joined
    if cfg.wise_alpha is not None:

        if not supports_interpolation(METHODS[cfg.method]):
            raise ValueError(f"--wise-alpha: method '{cfg.method}' has no trained weights to interpolate; WiSE-FT "
                             "applies to trained methods (convpass, linear_probe, coop, cocoop, tip_adapter_f)")
    if cfg.output_dir:  # before any work: a file, a too-long name, an unwritable parent, an existing run
        check_output_dir(cfg.output_dir)
        check_not_in_use(cfg.output_dir)  # another process writing there (a second --overwrite or --resume)
        if not resume and not overwrite and held_files(Path(cfg.output_dir), RUN_FILES, RUN_PATTERNS):
            claim_output_dir(cfg.output_dir, RUN_FILES, RUN_PATTERNS,
                             resume_hint=f"or --resume {cfg.output_dir} to continue it")
    session = open_session(cfg.data, cfg.backbone, cfg.runtime)
    check_backbone_fit(session, {cfg.method: cfg.method_config})  # e.g. CoOp's prompts vs the text context
    if cfg.split:
        split = session.load_split(cfg.split, cfg.shots, cfg.seed, cfg.val_shots)
    else:
        split = session.draw_split(cfg.shots, cfg.seed, cfg.val_shots)

    def create() -> Path:  # on rank 0 only under torchrun; the others get its path
        if cfg.output_dir:
            return claim_output_dir(cfg.output_dir, RUN_FILES, RUN_PATTERNS, overwrite=overwrite, resume=resume)
        return new_run_dir("runs", f"{folder_name(cfg.method)}_{cfg.shots}shot_seed{cfg.seed}_"
                                   f"{time.strftime('%Y%m%d-%H%M%S')}")

    run_dir = ranks.on_main(create)
    return PreparedRun(cfg, session, split, run_dir, resume)


def execute_run(run: PreparedRun) -> FitResult:
    """Fit and evaluate; writes config.json and split.json (not when resuming), the method's files,
    metrics.json, results.md and run_summary.json in the run directory."""

    cfg, session, run_dir = run.config, run.session, run.run_dir
    setup_logging(run_dir, cfg.runtime.quiet)
    if not run.resume:  # a resumed run keeps its original config and split
        write_json(run_dir / CONFIG_FILE, {**cfg.to_dict(), "output_dir": str(run_dir.resolve()),
                                           "environment": environment(session)})
        save_split(run_dir / "split.json", run.split,
                   {"shots": cfg.shots, "seed": cfg.seed, "val_shots": cfg.val_shots, **session.split_meta()})
    log.info(f"{cfg.method}: {len(session.classes)} classes, {len(run.split.train)} train / {len(run.split.val)} "
             f"val images, backbone {session.backbone.model_name} ({session.backbone.weights_id}), "
             f"device {session.device}")
    for what, short in (("K-shot", run.split.shortfall), ("validation", run.split.val_shortfall)):
        if short:
            log.info(f"{what} shortfall: {len(short)} class(es) got fewer images than asked (images drawn): "
                     + ", ".join(f"{name} ({n})" for name, n in sorted(short.items())))
    result = fit_and_evaluate(session, cfg.method, cfg.method_config, run.split, seed=cfg.seed, output_dir=run_dir,
                              resume=run.resume, on_logits=logits_saver(run_dir) if cfg.save_logits else None,
                              wise_alpha=cfg.wise_alpha)
    if result.not_evaluated:
        log.info(f"not evaluated (missing or empty): {', '.join(result.not_evaluated)}")
    shortfall = {"shortfall": dict(run.split.shortfall), "val_shortfall": dict(run.split.val_shortfall)}
    label = cfg.method if cfg.wise_alpha is None else wise_label(cfg.method, cfg.wise_alpha)
    write_results(run_dir, label, session.row(result.metrics), result.metrics, {**result.to_dict(), **shortfall},
                  columns=session.family.suite, display=session.family.display, note=session.target_note())
    write_benchmark_results(run_dir, session.family, result.metrics, cfg.backbone.model, cfg.backbone.pretrained,
                            cfg.method, {"fewshot_k": cfg.shots, "seed": cfg.seed},
                            templates=templates_used(cfg.method, [result.fit], cfg.data.templates))
    return result


def discard_unstarted(run: PreparedRun) -> bool:
    """After a new run stopped on bad input: when its folder holds nothing but what a run writes before it trains
    (`START_FILES`), remove those, so the folder holds no run and the corrected command may use it again.
    Returns whether they were removed (never for a resumed run, or once anything trained was saved)."""
    held = held_files(run.run_dir, RUN_FILES, RUN_PATTERNS)
    if run.resume or not ranks.is_main() or not held or not set(held) <= set(START_FILES):
        return False
    for handler in list(log.handlers):  # log.txt is open
        if isinstance(handler, logging.FileHandler):
            log.removeHandler(handler)
            handler.close()
    for name in held:
        (run.run_dir / name).unlink(missing_ok=True)
    return True


def logits_saver(folder: Path):
    """`on_logits` for evaluation: writes folder/<set>_logits.safetensors ({"logits", "labels"}) atomically."""
    def save(name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:


        with atomic_path(folder / f"{name}_logits.safetensors") as tmp:
            save_file({"logits": logits.float().contiguous(), "labels": labels.long().contiguous()}, str(tmp))

    return save


def counts_line(metrics: Mapping[str, Mapping[str, JSON]], display: Optional[Mapping[str, str]] = None) -> str:
    """"images / classes per set: ImageNet 12 / 4, -A 6 / 2, ...": what each score is over (a restricted set
    such as -A/-R is scored over its own classes only)."""
    display = display or {}
    cells = [f"{display.get(name, name)} {int(m['n'])} / " + (str(int(m["classes"])) if "classes" in m else "?")
             for name, m in metrics.items()]
    return "images / classes per set: " + ", ".join(cells)


def recall_line(metrics: Mapping[str, Mapping[str, JSON]], display: Optional[Mapping[str, str]] = None) -> str:
    """"mean per-class recall (%): ImageNet 70.12, -V2 ...": sklearn's balanced accuracy of each set."""
    display = display or {}
    cells = [f"{display.get(name, name)} {float(m['mean_per_class_recall']):.2f}" for name, m in metrics.items()
             if "mean_per_class_recall" in m]
    return "mean per-class recall (%): " + ", ".join(cells)


def write_results(run_dir: Path, label: str, row: dict[str, float], metrics: dict[str, dict[str, float]],
                  summary: JSONObject, columns: Sequence[str], display: Optional[Mapping[str, str]] = None,
                  note: str = "") -> None:
    """metrics.json ({set: {top1, top5, n, classes}}), results.md (the Table-2 `row` over `columns`, `note`
    (what the target average is over: `Session.target_note`), then the images / classes each score is over) and
    run_summary.json, atomically."""

    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "run_summary.json", jsonable(summary))
    table = markdown_table([(label, row)], columns=columns, display=display) + (f"\n{note}\n" if note else "")
    write_text(run_dir / "results.md", f"# {label}: top-1 (%)\n\n{table}\n{counts_line(metrics, display)}\n"
                                       f"{recall_line(metrics, display)}\n")
    log.log(RESULT, "\n" + table)  # also under --quiet
