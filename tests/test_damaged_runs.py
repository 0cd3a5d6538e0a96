"""`train --resume` on a run whose files were damaged: one line naming the file, exit 2, no traceback."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_world import CliResult, run_cli

from clipconv.app.cli import eval_robustness, run_table2, train
from clipconv.app.cli.common import EXIT_BAD_INPUT


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_config):
    from clipconv.data import make_image_tree

    root = tmp_path_factory.mktemp("damaged")
    data = make_image_tree(root / "data", train_per_class=4, val_per_class=2, variants=(), seed=5)
    run = root / "run"
    result = run_cli(train.main, ["--data-root", str(data), "--model", str(tiny_config), "--pretrained", "none",
                                  "--shots", "2", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                                  "--output-dir", str(run), "--no-cache", "--eval-sets", "imagenet"])
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def _resume(run: Path) -> CliResult:
    return run_cli(train.main, ["--resume", str(run)])


def _damaged_copy(finished_run: Path, tmp_path: Path, name: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "metrics.json").unlink()  # an unfinished run, interrupted after its first checkpoint
    whole = (run / name).read_bytes()
    (run / name).write_bytes(whole[: len(whole) // 3])
    return run


@pytest.mark.parametrize("name, advice", [("train_state.pt", "delete it to restart the run from scratch"),
                                          ("config.json", "start a new run")])
def test_resume_with_a_truncated_file_is_one_line_and_exit_2(finished_run, tmp_path, name, advice):
    run = _damaged_copy(finished_run, tmp_path, name)
    before = sorted(p.name for p in run.iterdir())
    result = _resume(run)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"'{run / name}' is damaged" in errors[0] and advice in errors[0]
    assert sorted(p.name for p in run.iterdir()) == before  # no result written


def _one_error_line(result: CliResult, path: Path) -> str:
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"'{path}'" in errors[0], result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"just a string"', "null"])
def test_resume_with_a_config_that_is_json_but_no_object(finished_run, tmp_path, content):
    run = _damaged_copy(finished_run, tmp_path, "train_state.pt")
    (run / "config.json").write_text(content)
    line = _one_error_line(_resume(run), run / "config.json")
    assert "a JSON object is expected" in line


def test_eval_robustness_with_a_config_that_is_json_but_no_object(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "config.json").write_text('"just a string"')
    before = sorted(p.name for p in run.iterdir())
    result = run_cli(eval_robustness.main, ["--checkpoint", str(run)])
    assert "a JSON object is expected" in _one_error_line(result, run / "config.json")
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("content", ["[]", '{"config": [], "shots": [16]}', '{"config": {}, "shots": "16"}'])
def test_table2_resume_with_a_record_that_is_json_but_not_the_record(tmp_path, content):
    (tmp_path / "table2_config.json").write_text(content)
    result = run_cli(run_table2.main, ["--resume", str(tmp_path)])
    _one_error_line(result, tmp_path / "table2_config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table2_config.json"]
