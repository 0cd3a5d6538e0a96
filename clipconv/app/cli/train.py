"""`scripts/train_imagenet_fs.py`: K-shot training of one method and its robustness evaluation.

The whole path from flags to metrics:
  1. `build_parser(method)`: flags generated from RunConfig, the shared Data/Backbone/Runtime configs and
     the chosen method's config class (two-stage parse: --method first, then its option group);
  2. `config_from_args`: a `RunConfig` holding the method's typed config, built ONCE here (the preset, then
     the method's flags, then --method-options; --demo's run settings applied in `options.shared_configs`);
  3. `clipconv.app.run.prepare_run` → `Session` + split + the run folder (checked before any work, created
     uniquely; an existing run is refused unless --overwrite or --resume);
  4. `clipconv.app.run.execute_run` → `session.fit_and_evaluate` (`build_method(name, config)`, the same
     config object) → metrics.json, results.md, run_summary.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

from clipconv.app.cli.common import EXIT_BAD_INPUT, bad_input_errors, fail, join_process_group, plain_warnings
from clipconv.app.cli.options import (
    absolute, absolute_paths, add_config_args, add_preset_arg, add_shared_args, given, merge_method_options,
    method_json, option_error_line, preset_notes, preset_of, shared_configs
)
from clipconv.app.run import (
    CONFIG_FILE, PRESET_HELP, RunConfig, check_resume_world_size, discard_unstarted, execute_run, prepare_run, relocated
)
from clipconv.app.rundir import exit_code, interrupt_on_sigterm, release_run_dir
from clipconv.app.session import build_method_config
from clipconv.config import Config, OptionError
from clipconv.methods.base import METHODS, default_method, method_names
from clipconv.runtime.io import read_json_object
from clipconv.runtime.ranks import is_main

DESCRIPTION = """Train a few-shot CLIP method on K shots per class and evaluate it on ImageNet and its shifted
variants (-V2, -Sketch, -A, -R). Defaults are the Convpass paper's Convpass_CLIP protocol (Table 3):
ViT-B/16 OpenAI weights, Convpass h=8 beside attention and MLP, AdamW lr 1e-5, batch 64, 50 epochs, cosine.
`--method NAME --help` lists that method's options; `--preset demo` (or `--demo`) its miniature-benchmark recipe."""

RUN_FIELDS = ("shots", "seed", "val_shots", "split", "output_dir", "save_logits", "wise_alpha")
PATH_FIELDS = ("split", "output_dir")  # stored absolute
METHOD_PREFIX = "method."


def _pre_parse(argv: Sequence[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--resume", default=None)
    return pre.parse_known_args(argv)[0]


def build_parser(method: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser for `method`: run flags, shared groups, then the method's own option group."""

    method = method or default_method()
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, RunConfig, skip=("method", "preset"))
    parser.add_argument("--method", default=default_method(),
                        help=f"registered method (default: {default_method()}; see --list-methods)")
    parser.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    add_preset_arg(parser, PRESET_HELP)
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run from its last epoch (only runtime flags may be given)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output-dir (its clipconv files are deleted first)")
    parser.set_defaults(_fields={"run": RUN_FIELDS, **add_shared_args(parser)})
    config_class = METHODS[method].config_class
    method_fields = add_config_args(parser, config_class, title=f"{method} options", prefix=METHOD_PREFIX,
                                    notes=preset_notes(method))
    parser.set_defaults(_method_fields=method_fields)
    parser.add_argument("--method-options", default="{}",
                        help=f"JSON object of further options of the method (an option also given as a flag must "
                             f"agree with it); known: {sorted(config_class.help())}")
    return parser


def run_values(args: argparse.Namespace) -> dict[str, object]:
    """The run flags given, their paths absolute."""
    return {k: absolute(v) if k in PATH_FIELDS else v for k, v in given(args, RUN_FIELDS).items()}


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """The RunConfig of parsed flags. The method's typed config is built here, once: its preset (--preset;
    --demo: demo), the method's flags over it, then --method-options (a key that disagrees with a flag is
    refused); any bad value exits 2 with one line."""

    extra = method_json(args.method_options, fail)
    configs = shared_configs(args, args._fields, parser)
    preset = preset_of(args)
    flags = given(args, args._method_fields, METHOD_PREFIX)
    with bad_input_errors():
        options = merge_method_options(flags, extra)
        try:
            method_config = build_method_config(args.method, preset, options, precision=configs["backbone"].precision)
        except OptionError as err:  # named as given: `--dim` or `--method-options rank`
            fail(option_error_line(err, flags))
        return RunConfig(**run_values(args), method=args.method, preset=preset, method_config=method_config,
                         **configs)


def _resume_config(run_dir: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """The saved RunConfig of `run_dir` (wherever the run folder is now); flags that conflict with it are
    refused, listed."""

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        fail(f"--resume {run_dir}: no {CONFIG_FILE} there; give the run directory of an earlier run")
    with bad_input_errors():
        saved = RunConfig.from_dict(relocated(read_json_object(path), Path(run_dir)))
    conflicts = []
    for name, value in run_values(args).items():
        if name == "save_logits" or (name == "output_dir" and Path(value).resolve() == Path(run_dir).resolve()):
            continue
        if _differs(saved, name, value):
            conflicts.append(f"--{name.replace('_', '-')} {value} (saved: {getattr(saved, name)})")
    if args.method_given and args.method_given != saved.method:
        conflicts.append(f"--method {args.method_given} (saved: {saved.method})")
    if args.preset and preset_of(args) != saved.preset:  # (--demo --preset robust is demo+robust)
        conflicts.append(f"--preset {args.preset} (saved: {saved.preset})")
    for section in ("data", "backbone"):
        recorded = getattr(saved, section).to_dict()
        for name, value in absolute_paths(given(args, args._fields[section])).items():
            if _differs(getattr(saved, section), name, value):
                conflicts.append(f"--{name.replace('_', '-')} {value} (saved: {recorded.get(name)})")
    free = {}  # method options that change speed only, never the numbers: they may differ on resume
    saved_options = saved.method_config.to_dict()
    for name, value in given(args, args._method_fields, METHOD_PREFIX).items():
        if name in RESUME_FREE_METHOD_OPTIONS:
            free[name] = value
        elif _differs(saved.method_config, name, value):
            conflicts.append(f"--{name.replace('_', '-')} {value} (saved: {saved_options.get(name)})")
    if method_json(args.method_options or "{}", fail):
        conflicts.append("--method-options (the saved run's options are used)")
    if conflicts:
        fail(f"--resume {run_dir}: these flags conflict with the saved run: {'; '.join(conflicts)}; "
             "drop them (only runtime flags such as --device/--workers may change) or start a new run")
    with bad_input_errors():
        runtime = type(saved.runtime).from_options({**saved.runtime.to_dict(),
                                                    **absolute_paths(given(args, args._fields["runtime"]))})
        return dataclasses.replace(saved, runtime=runtime, output_dir=absolute(run_dir),
                                   method_config=dataclasses.replace(saved.method_config, **free),
                                   save_logits=given(args, RUN_FIELDS).get("save_logits", saved.save_logits),
                                   split=absolute(str(Path(run_dir) / "split.json")))


def _differs(saved: Config, name: str, value: object) -> bool:
    """Whether flag value `value` of option `name` differs from `saved`'s, both in the option's own form (a
    list flag equals a saved tuple, 1 equals 1.0); a value the option refuses differs."""
    try:
        return dataclasses.replace(saved, **{name: value}).to_dict()[name] != saved.to_dict()[name]
    except (ValueError, TypeError):
        return True


#: method options that may change on --resume (speed only: torch.compile gives the same numbers)
RESUME_FREE_METHOD_OPTIONS = frozenset({"compile"})


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plain_warnings()

    pre = _pre_parse(argv)
    method = pre.method
    if pre.resume:  # the saved run's method (a different --method is reported as a conflict)

        path = Path(pre.resume) / "config.json"
        with bad_input_errors():  # a damaged config.json is one line, not a traceback
            method = read_json_object(path).get("method") if path.is_file() else method
    method = method or default_method()
    if method not in method_names():
        argparse.ArgumentParser(prog=Path(sys.argv[0]).name).error(
            f"unknown --method '{method}'; choose one of {', '.join(method_names())}")
    parser = build_parser(method)
    args = parser.parse_args(argv)
    args.method = method
    if args.list_methods:
        print("\n".join(method_names()))
        return 0
    args.method_given = pre.method
    if args.overwrite and args.resume:
        fail("--overwrite and --resume exclude each other: --resume continues the run, --overwrite replaces it")
    with bad_input_errors():
        cfg = _resume_config(args.resume, args, parser) if args.resume else config_from_args(args, parser)

    with bad_input_errors():
        size = join_process_group(cfg.runtime.device)  # under torchrun: join the process group (no-op otherwise)
        if args.resume:  # as many processes as the run started with (config.json records one world size)
            check_resume_world_size(read_json_object(Path(args.resume) / CONFIG_FILE), size, args.resume)
        run = prepare_run(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    try:
        with interrupt_on_sigterm(), bad_input_errors():  # e.g. a damaged train_state.pt when resuming
            result = execute_run(run)
    except SystemExit as stop:
        if stop.code == EXIT_BAD_INPUT:  # stopped before training: the folder keeps no run (a rerun may use it)
            discard_unstarted(run)
        raise
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (raised as Terminated)
        what = "terminated" if exit_code(err) == 143 else "interrupted"
        print(f"\n{what}: the last finished epoch is saved; continue with --resume {run.run_dir}", file=sys.stderr)
        return exit_code(err)
    finally:
        release_run_dir(run.run_dir)  # held since prepare_run claimed the folder
    if is_main():
        print(f"run directory: {run.run_dir}")
    return 0 if result.metrics else EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
