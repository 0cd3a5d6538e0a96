"""One application layer for every entry point: the same runtime flags everywhere, relocatable run folders
that record clipconv's version and commit, and strict JSON files."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_world import make_cli_world

import clipconv
from clipconv.app import bench, bench_data, cache, pretrain_mini_clip
from clipconv.app.cli import check_data, eval_robustness, export_merged, run_table2, train, zero_shot
from clipconv.app.run import relocated, source_commit
from clipconv.runtime.io import write_json


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_cli_world(tmp_path_factory.mktemp("runtime"), tiny_config)


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# ----- strict JSON -----------------------------------------------------------------------------------------
def test_json_files_are_strict_with_null_for_non_finite_numbers(tmp_path):
    metrics = {"imagenet": {"top1": 50.0, "top5": float("nan")}, "rows": [float("inf"), -float("inf"), 1.5],
               "target_avg": float("nan"), "pair": (1, float("nan"))}
    path = write_json(tmp_path / "metrics.json", metrics)
    saved = _strict(path.read_text())
    assert saved == {"imagenet": {"top1": 50.0, "top5": None}, "rows": [None, None, 1.5], "target_avg": None,
                     "pair": [1, None]}


# ----- the same runtime flags for every entry point -------------------------------------------------------
PARSERS = {  # entry point -> (parser, its required flags, whether it takes --device, --output-dir)
    "train_imagenet_fs": (lambda: train.build_parser("convpass"), (), True, True),
    "run_table2": (run_table2.build_parser, (), True, True),
    "eval_robustness": (eval_robustness.build_parser, ("--checkpoint", "run"), True, True),
    "zero_shot": (zero_shot.build_parser, (), True, True),
    "check_data": (check_data.build_parser, (), False, False),
    "export_merged": (export_merged.build_parser, ("--checkpoint", "run", "--output", "m.safetensors"), True, False),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_parser_takes_the_runtime_flags(name):
    build, required, device, output_dir = PARSERS[name]
    parser = build()
    args, unknown = parser.parse_known_args([*required, "--threads", "1", "--quiet"])
    assert unknown == [] and args.threads == 1 and args.quiet is True, name
    flags = parser._option_string_actions
    assert ("--device" in flags) == device and ("--output-dir" in flags) == output_dir, name


def test_the_other_entry_points_take_the_runtime_flags(tmp_path, capsys, monkeypatch):
    threads = torch.get_num_threads()
    try:
        assert cache.main(["info", "--dir", str(tmp_path / "cache"), "--threads", "1", "--quiet"]) == 0
        cfg, _ = bench.parse_args(["--threads", "1", "--quiet", "--device", "cpu"])
        assert cfg.threads == 1 and cfg.device == "cpu"
        loaders, _ = bench_data.parse_args(["--threads", "1", "--quiet"])
        assert not hasattr(loaders, "quiet")
        with pytest.raises(SystemExit) as info:  # flags parsed, then its own check refuses --steps 0
            pretrain_mini_clip.main(["--threads", "1", "--quiet", "--steps", "0", "--output", str(tmp_path / "w")])
        assert info.value.code == 2 and "--steps must be" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_check_data_applies_threads_and_quiet(world, capsys):
    threads = torch.get_num_threads()
    try:
        code = check_data.main(["--data-root", str(world["data"]), "--threads", "2", "--quiet"])
        assert code in (0, 1) and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


# ----- relocatable run folders, version and commit --------------------------------------------------------
def test_a_moved_run_is_evaluated_from_any_directory(world, tmp_path, monkeypatch):
    monkeypatch.chdir(world["root"])  # every path given relative to the working directory
    rel = lambda p: os.path.relpath(p, world["root"])  # noqa: E731
    run = tmp_path / "run"
    assert train.main(["--data-root", rel(world["data"]), "--model", rel(world["config"]), "--pretrained",
                       rel(world["weights"]), "--shots", "2", "--val-shots", "0", "--epochs", "1", "--batch-size", "4",
                       "--workers", "0", "--no-cache", "--output-dir", rel(run), "--eval-sets", "imagenet"]) == 0
    saved = json.loads((run / "config.json").read_text())
    for path in (saved["data"]["data_root"], saved["backbone"]["model"], saved["backbone"]["pretrained"],
                 saved["output_dir"]):
        assert Path(path).is_absolute(), path
    metrics = json.loads((run / "metrics.json").read_text())
    moved = tmp_path / "archive" / "moved-run"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert eval_robustness.main(["--checkpoint", str(moved), "--workers", "0", "--output-dir", "again"]) == 0
    assert json.loads((elsewhere / "again" / "metrics.json").read_text()) == metrics


def test_paths_into_the_run_folder_follow_it_when_it_moves(tmp_path):
    saved = {"output_dir": "/old/run", "split": "/old/run/split.json", "data": {"data_root": "/old/run/data",
             "train_root": "/data/train", "eval_roots": {"a": "/old/run/a"}}, "backbone": {"model": "ViT-B-16"},
             "environment": {"python": "/old/run/python"}}
    moved = relocated(saved, tmp_path)
    root = tmp_path.resolve()
    assert moved["output_dir"] == str(root) and moved["split"] == str(root / "split.json")
    assert moved["data"] == {"data_root": str(root / "data"), "train_root": "/data/train",
                             "eval_roots": {"a": str(root / "a")}}
    assert moved["backbone"] == {"model": "ViT-B-16"} and moved["environment"] == saved["environment"]


def _git_head(root: Path):
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out[1] if Path(out[0]).resolve() == root else None


def test_the_run_records_clipconv_version_and_commit(world, tmp_path, monkeypatch):
    assert train.main(["--data-root", str(world["data"]), "--model", str(world["config"]), "--pretrained",
                       str(world["weights"]), "--method", "zero_shot", "--shots", "1", "--val-shots", "0",
                       "--workers", "0", "--no-cache", "--output-dir", str(tmp_path / "run"),
                       "--eval-sets", "imagenet"]) == 0
    env = json.loads((tmp_path / "run" / "config.json").read_text())["environment"]
    assert env["clipconv"] == clipconv.__version__
    expected = _git_head(Path(clipconv.__file__).resolve().parent.parent)
    assert env["commit"] == expected and (expected is None or len(expected) == 40)
    monkeypatch.setattr(clipconv, "__file__", str(tmp_path / "site-packages" / "clipconv" / "__init__.py"))
    assert source_commit() is None  # not a git checkout


def test_strict_parser_reads_every_json_file_of_a_run(world, tmp_path):
    run = tmp_path / "run"
    assert train.main(["--data-root", str(world["data"]), "--model", str(world["config"]), "--pretrained",
                       str(world["weights"]), "--method", "zero_shot", "--shots", "1", "--val-shots", "0",
                       "--workers", "0", "--no-cache", "--output-dir", str(run), "--eval-sets", "imagenet",
                       "imagenet_a"]) == 0
    files = list(run.rglob("*.json"))
    assert len(files) >= 4
    for path in files:
        _strict(path.read_text())
    assert not math.isnan(json.loads((run / "metrics.json").read_text())["imagenet"]["top1"])
