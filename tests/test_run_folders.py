"""Run folders: one writer at a time (a lock held for the life of the run), --overwrite leaves nothing of the
old run, default names without ':'."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_world import refused_line

from clipconv.app.cli import eval_robustness, run_table2, train
from clipconv.app.rundir import RUN_FILES, claim_output_dir
from clipconv.app.table2 import RECORD_FILE, Table2Config

#: holds the claim of a folder (as a running training would) until its stdin closes
HOLDER = ("import sys; from clipconv.app.rundir import claim_output_dir; "
          "claim_output_dir(sys.argv[1], (), overwrite=True); print('held', flush=True); sys.stdin.read()")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from clipconv.data import make_image_tree

    return make_image_tree(tmp_path_factory.mktemp("run-folders") / "data", train_per_class=3, val_per_class=1,
                           variants=())


def _base(data, out, tiny_config):
    return ["--data-root", str(data), "--model", str(tiny_config), "--pretrained", "none", "--epochs", "1",
            "--workers", "0", "--output-dir", str(out), "--no-cache", "--shots", "2", "--eval-sets", "imagenet"]


class _Holder:
    """Another process that claimed `folder` and keeps running."""

    def __init__(self, folder: Path):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        assert self.process.stdout.readline().strip() == "held"

    def __enter__(self) -> "_Holder":
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def test_a_second_overwrite_of_a_folder_in_use_isrefused_line(data, tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert train.main(_base(data, run, tiny_config)) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name in RUN_FILES and p.name != "log.txt"}
    with _Holder(run) as holder:
        line = refused_line(train.main, _base(data, run, tiny_config) + ["--overwrite"], capsys)
        assert f"'{run}' is in use by another run (process {holder.process.pid})" in line
        line = refused_line(train.main, ["--resume", str(run)], capsys)
        assert "is in use by another run" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name in before} == before  # nothing removed
    assert train.main(_base(data, run, tiny_config) + ["--overwrite"]) == 0  # free again once the holder ends


def test_an_evaluation_into_a_folder_in_use_is_refused_before_any_work(data, tmp_path, tiny_config, capsys):
    run, out = tmp_path / "run", tmp_path / "eval"
    assert train.main(_base(data, run, tiny_config)) == 0
    with _Holder(out):
        line = refused_line(eval_robustness.main, ["--checkpoint", str(run), "--workers", "0", "--output-dir", str(out),
                                               "--overwrite"], capsys)
    assert f"'{out}' is in use by another run" in line


def test_a_claim_while_another_process_holds_the_folder_isrefused_line(tmp_path):
    with _Holder(tmp_path / "d"):
        with pytest.raises(ValueError, match="is in use by another run"):
            claim_output_dir(tmp_path / "d", RUN_FILES, overwrite=True)
    claim_output_dir(tmp_path / "d", RUN_FILES, overwrite=True)  # the holder ended: the lock is free


def test_table2_resume_of_a_folder_in_use_isrefused_line(tmp_path, capsys):
    out = tmp_path / "table"
    out.mkdir()
    cfg = Table2Config(methods=("zero_shot",), seeds=(1,), output_dir=str(out))
    (out / RECORD_FILE).write_text(json.dumps({"config": cfg.to_dict(), "shots": [16]}))
    with _Holder(out):
        line = refused_line(run_table2.main, ["--resume", str(out)], capsys)
    assert f"'{out}' is in use by another run" in line
    assert sorted(p.name for p in out.iterdir()) == [".clipconv.lock", RECORD_FILE]


def test_overwrite_leaves_nothing_of_the_old_run(data, tmp_path, tiny_config):
    run = tmp_path / "run"
    assert train.main(_base(data, run, tiny_config)) == 0
    for name in ("eval-20260101-120000", "wise-20260101-120000-2"):  # what eval_robustness.py writes beside it
        (run / name).mkdir()
        (run / name / "metrics.json").write_text("{}")
    (run / "notes").mkdir()  # not clipconv's: kept
    assert train.main(_base(data, run, tiny_config) + ["--overwrite"]) == 0
    assert not (run / "eval-20260101-120000").exists() and not (run / "wise-20260101-120000-2").exists()
    assert (run / "notes").is_dir() and (run / "metrics.json").is_file()


def test_the_default_run_folder_name_has_no_colon(data, tmp_path, tiny_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in _base(data, tmp_path / "unused", tiny_config) if a not in ("--output-dir", str(tmp_path / "unused"))]
    assert train.main(argv + ["--method", "adapter:lora"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert ":" not in run.name and run.name.startswith("adapter-lora_2shot_seed1_")
    assert (run / "metrics.json").is_file()


def test_quiet_train_still_shows_the_final_table(data, tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert train.main(_base(data, run, tiny_config) + ["--quiet"]) == 0
    captured = capsys.readouterr()
    assert "| method |" in captured.err and "\n| convpass |" in captured.err, captured.err
    assert "epoch 1/1" not in captured.err  # the progress lines stay quiet
    assert f"run directory: {run}" in captured.out
