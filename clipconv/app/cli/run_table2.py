"""`scripts/run_table2.py`: every method on the same K-shot splits per seed, written as the paper's Table 2,
with a bar chart per method and domain; `--shots 1 2 4 8 16` adds the accuracy-vs-shots sweep."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from clipconv.app.cli.common import bad_input_errors, fail, join_process_group, plain_warnings, positive_int
from clipconv.app.cli.options import (
    absolute, absolute_paths, add_config_args, add_preset_arg, add_shared_args, given, option_error_line, preset_of,
    shared_configs
)
from clipconv.app.frontier import FRONTIER_FILES, write_frontier
from clipconv.app.run import PRESET_HELP, RESULT, check_resume_world_size, log, setup_logging
from clipconv.app.rundir import check_output_dir, exit_code, interrupt_on_sigterm, release_run_dir
from clipconv.app.session import build_method_config
from clipconv.app.table2 import (
    SWEEP_FILE, Table2Config, Table2Record, check_methods, load_record, measured_table, run_shots_sweep, run_table2
)
from clipconv.config import OptionError, RuntimeConfig
from clipconv.methods.base import MethodConfig
from clipconv.mini_clip import MINI_CLIP_CONFIG
from clipconv.runtime.ranks import is_main

DESCRIPTION = """Reproduce Table 2 of the Convpass paper: zero-shot CLIP, linear probe, CoOp, CoCoOp, Tip-Adapter(-F)
and Convpass_CLIP, each fitted on the same K-shot split (and validation split, drawn from the remaining
train images) per seed, scored on ImageNet, -V2, -Sketch, -A and -R; mean ± std over seeds in
table2.md / table2.csv / table2.json beside the paper's published numbers, and table2_bars.png
(top-1 per method and domain, error bars = std over seeds). Convpass also gets a row
"Convpass_CLIP + WiSE (α = 0.5)": the same fit interpolated halfway back to zero-shot CLIP in weight space
(WiSE-FT's default α, fixed in advance; --wise-alpha, --wise-methods).

Several values of --shots (e.g. --shots 1 2 4 8 16) run the whole table for each K with the same seeds,
one backbone and one feature store (the evaluation sets are encoded once for the sweep):
  <output-dir>/shots_<K>/       table2.{md,csv,json}, table2_bars.png, split_seed<s>.json for each K
  <output-dir>/table2.*, table2_bars.png         the largest K's table and chart
  <output-dir>/accuracy_vs_shots.{png,json,md}   top-1 on the source set and the target average vs K"""

EPILOG = """method options: --method-options '{"coop": {"epochs": 5, "views": 2}, "tip_adapter": {"search": "small"}}'
(keys are method names, values that method's options: scripts/train_imagenet_fs.py --method NAME --help
lists them), over each method's preset (--preset paper: its reference protocol; --preset demo, selected by --demo:
its miniature-benchmark recipe, `Method.presets`); --epochs-scale 0.1 multiplies every method's default epoch count
(an "epochs" option or preset value wins).

examples:
  python scripts/run_table2.py --demo --shots 16                  # miniature benchmark, offline
  python scripts/run_table2.py --demo --shots 1 2 4 8 16 --seeds 1  # + accuracy_vs_shots.png
  python scripts/run_table2.py --data-root $DATA --shots 16        # ImageNet + variants, OpenAI ViT-B/16
  python scripts/run_table2.py --resume runs/table2_16shot_<time>  # finish an interrupted table

output folder: a new runs/table2_<K>shot_<time> (runs/table2_1-2-4-8-16shot_<time> for a sweep) unless
--output-dir; a folder already holding a table is refused unless --overwrite or --resume. Ctrl-C or SIGTERM
stops cleanly (exit 130 / 143): the table is kept, marked incomplete, and the --resume command printed."""


TABLE2_FIELDS = ("output_dir", "seeds", "val_shots", "methods", "epochs_scale", "wise_alpha", "wise_methods")


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=positive_int, nargs="+", default=[Table2Config.shots],
                        help="training images per class (default 16); several values (1 2 4 8 16) run a sweep "
                             "and plot accuracy against shots")
    add_config_args(parser, Table2Config, skip=("shots", "preset"))
    add_preset_arg(parser, PRESET_HELP)
    parser.add_argument("--method-options", default="{}", help="JSON: {method: {option: value}} (see below)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the table already in --output-dir (its clipconv files are deleted first)")
    parser.add_argument("--frontier", nargs="+", metavar="TABLE2_DIR",
                        help="draw the robustness frontier of finished Table-2 folders instead of running a table: "
                             "frontier.png + frontier.json (source top-1 against the target average, logit axes, "
                             "mean ± std over seeds, WiSE curves and chords) in --output-dir (default: the first "
                             "folder); existing frontier files are refused unless --overwrite")
    parser.add_argument("--resume", metavar="DIR",
                        help="finish an interrupted table: the fits in DIR/table2.json are kept, only the missing "
                             "ones run (its saved settings are used; only runtime flags may be given)")
    parser.set_defaults(_fields=add_shared_args(parser, aliases={"eval_batch_size": ("--batch-size",)}))
    return parser


def _method_options(text: str) -> dict[str, dict[str, object]]:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        fail(f"--method-options is not valid JSON: {err}")
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        fail('--method-options must be a JSON object of objects, e.g. {"coop": {"epochs": 5}}')
    return options


def _resume_config(args: argparse.Namespace, argv: Sequence[str]) -> Table2Record:
    """The record of --resume DIR (read once), its config with the runtime flags given; other flags are refused."""

    runtime_flags = {"--" + name.replace("_", "-") for name in args._fields["runtime"]} | {"--batch-size", "--resume"}
    others = sorted({a.split("=")[0] for a in argv if a.startswith("--")} - runtime_flags)
    if others:
        fail(f"--resume {args.resume}: {', '.join(others)} cannot be changed when resuming (the saved settings are "
             "used); drop them, or start a new table")
    with bad_input_errors():
        record = load_record(Path(args.resume))
    runtime = {**record.config.runtime.to_dict(), **absolute_paths(given(args, args._fields["runtime"]))}
    with bad_input_errors():
        return record._replace(config=replace(record.config, output_dir=str(args.resume),
                                              runtime=RuntimeConfig.from_options(runtime)))


def _frontier(args: argparse.Namespace) -> int:
    """`--frontier DIR ...`: frontier.{png,json} of finished Table-2 folders (clipconv.app.frontier)."""
    if args.resume:
        fail("--frontier draws finished tables: drop --resume")
    out = Path(getattr(args, "output_dir", None) or args.frontier[0])  # (unset flags are absent)
    held = [name for name in FRONTIER_FILES if (out / name).exists()]
    if held and not args.overwrite:
        fail(f"--frontier: {out} already holds {', '.join(held)}; give another --output-dir or --overwrite")
    with bad_input_errors():
        check_output_dir(str(out))
        write_frontier([Path(f) for f in args.frontier], out)
    print(f"frontier: {out / FRONTIER_FILES[1]} (data: {out / FRONTIER_FILES[0]})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    plain_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.frontier:
        return _frontier(args)
    if args.overwrite and args.resume:
        fail("--overwrite and --resume exclude each other: --resume finishes the table, --overwrite replaces it")
    record = _resume_config(args, argv) if args.resume else None
    cfg, shots = (record.config, record.shots) if record is not None else _new_config(args, parser)


    with bad_input_errors():
        size = join_process_group(cfg.runtime.device)  # under torchrun: join the process group (no-op otherwise)
        if record is not None:  # as many processes as the table started with (table2_config.json records it)
            check_resume_world_size(record.saved, size, args.resume)
    setup_logging(quiet=cfg.runtime.quiet)
    state: dict = {}

    def keep(line: str) -> None:  # the folder, once created, for the resume hint
        if line.startswith("output folder: "):
            state["out"] = line[len("output folder: "):]
        log.info(line)

    try:
        with interrupt_on_sigterm(), bad_input_errors():
            if len(shots) > 1:
                results = run_shots_sweep(cfg, shots, log=keep, overwrite=args.overwrite, resume=bool(args.resume))
                result = results[shots[-1]]
                out = Path(result["output_dir"]).parent
            else:
                result = run_table2(cfg, log=keep, overwrite=args.overwrite, resume=bool(args.resume))
                out = Path(result["output_dir"])
    except KeyboardInterrupt as err:
        what = "terminated" if exit_code(err) == 143 else "interrupted"
        where = state.get("out") or cfg.output_dir
        hint = f"; finish it with: run_table2.py --resume {where}" if where else ""
        print(f"\n{what}: the finished fits are kept in the table (marked incomplete){hint}", file=sys.stderr)
        return exit_code(err)
    finally:
        if state.get("out"):
            release_run_dir(state["out"])  # held since the folder was claimed
    if not is_main():
        return 0
    log.log(RESULT, f"\n{shots[-1]}-shot top-1 (%):\n{measured_table(result)}")  # also under --quiet
    print(f"table: {out / 'table2.md'}\nbar chart: {out / 'table2_bars.png'}")
    if len(shots) > 1:
        print(f"accuracy vs shots: {out / (SWEEP_FILE + '.png')} (tables: {out / (SWEEP_FILE + '.md')}, "
              f"per K: {out}/shots_<K>/)")
    return 0


def _new_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Table2Config, list[int]]:
    """(Table2Config, shots) of the flags given. Each method's typed config is built here, once: its preset
    (--preset; --demo: demo), its --method-options over it, its epochs scaled by --epochs-scale."""

    shots = sorted(set(args.shots))
    options = _method_options(args.method_options)
    table = {k: absolute(v) if k == "output_dir" else v for k, v in given(args, TABLE2_FIELDS).items()}
    configs = shared_configs(args, args._fields, parser)
    label = None
    if configs["backbone"].model == str(MINI_CLIP_CONFIG):
        label = "miniature benchmark (mini CLIP, generated world; not ImageNet)"
    methods = table.get("methods", Table2Config.methods)  # the dataclass's defaults
    scale = table.get("epochs_scale", Table2Config.epochs_scale)
    with bad_input_errors():
        check_methods(methods)
        stray = sorted(set(options) - set(methods))
        if stray:
            raise ValueError(f"--method-options names method(s) {stray} that are not in --methods {list(methods)}")
        method_configs: dict[str, MethodConfig] = {}
        for name in methods:
            try:
                method_configs[name] = build_method_config(name, preset_of(args), options.get(name),
                                                           epochs_scale=scale, precision=configs["backbone"].precision)
            except OptionError as err:  # named as given: `--method-options lora.rank`
                fail(option_error_line(err, (), key_prefix=f"{name}."))
        return Table2Config(shots=shots[-1], preset=preset_of(args), method_configs=method_configs,
                            benchmark_label=label, **table, **configs), shots


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
