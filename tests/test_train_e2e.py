"""scripts/train_imagenet_fs.py end to end on a generated tree with a tiny model saved as a weights file."""
from __future__ import annotations

import json

import pytest
import torch
from cli_world import make_cli_world

from clipconv.app.cli import eval_robustness, train


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_cli_world(tmp_path_factory.mktemp("e2e"), tiny_config)


def _train(world, out, *extra, training=("--epochs", "2", "--batch-size", "4", "--lr", "1e-3")):
    argv = ["--data-root", str(world["data"]), "--model", str(world["config"]), "--pretrained", str(world["weights"]),
            "--shots", "4", *training, "--workers", "0", "--output-dir", str(out), "--no-cache", *extra]
    return train.main(argv)


def test_training_writes_every_output_and_reloading_reproduces_metrics(world):
    run = world["root"] / "run"
    assert _train(world, run) == 0
    for name in ("config.json", "split.json", "adapter.safetensors", "metrics.json", "results.md", "log.txt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    assert metrics["imagenet"]["n"] == 12 and metrics["imagenet_a"]["n"] == 6
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 4 * 4 and all(not p.startswith("/") for p, _ in split["train"])
    table = (run / "results.md").read_text()
    assert "| ImageNet | -V2 | -Sketch | -A | -R | target avg |" in table
    log = (run / "log.txt").read_text()
    assert "epoch 2/2: loss" in log

    again = world["root"] / "reeval"
    assert eval_robustness.main(["--checkpoint", str(run / "adapter.safetensors"), "--data-root", str(world["data"]),
                                 "--workers", "0", "--output-dir", str(again)]) == 0
    assert json.loads((again / "metrics.json").read_text()) == metrics

    subset = world["root"] / "reeval-subset"
    assert eval_robustness.main(["--checkpoint", str(run / "adapter.safetensors"), "--data-root", str(world["data"]),
                                 "--workers", "0", "--output-dir", str(subset), "--eval-sets", "imagenet_a"]) == 0
    assert json.loads((subset / "metrics.json").read_text()) == {"imagenet_a": metrics["imagenet_a"]}


def test_a_saved_split_is_reused_and_one_from_another_k_or_seed_is_refused(world, capsys):
    first, second = world["root"] / "split-a", world["root"] / "split-b"
    assert _train(world, first, "--eval-sets", "imagenet", "--epochs", "1", "--seed", "5") == 0
    assert _train(world, second, "--eval-sets", "imagenet", "--epochs", "1", "--seed", "5",
                  "--split", str(first / "split.json")) == 0
    a = json.loads((first / "split.json").read_text())
    b = json.loads((second / "split.json").read_text())
    assert a["train"] == b["train"]
    for flag, value, needle in (("--seed", "6", "--seed 6 (the split has 5)"),
                                ("--shots", "2", "--shots 2 (the split has 4)"),
                                ("--val-shots", "0", "--val-shots 0 (the split has 4)")):
        out = world["root"] / f"split-bad{flag}"
        argv = ["--eval-sets", "imagenet", "--epochs", "1", "--seed", "5", flag, value,
                "--split", str(first / "split.json")]
        with pytest.raises(SystemExit) as info:
            _train(world, out, *argv)
        assert info.value.code == 2 and needle in capsys.readouterr().err and not out.exists()


def test_checkpoint_refuses_other_weights(world, tmp_path, capsys):
    run = world["root"] / "run-other"
    assert _train(world, run, "--eval-sets", "imagenet", "--epochs", "1") == 0
    with pytest.raises(SystemExit) as exit_info:
        eval_robustness.main(["--checkpoint", str(run / "adapter.safetensors"), "--data-root", str(world["data"]),
                              "--pretrained", "none", "--workers", "0", "--output-dir", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "weights_id" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_variants_are_skipped_with_a_warning(world, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    shutil.rmtree(data / "imagenet-adversarial")
    run = tmp_path / "run"
    argv = ["--data-root", str(data), "--model", str(world["config"]), "--pretrained", str(world["weights"]),
            "--shots", "2", "--epochs", "1", "--workers", "0", "--output-dir", str(run), "--no-cache"]
    with pytest.warns(UserWarning, match="-A not found"):
        assert train.main(argv) == 0
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["not_evaluated"] == ["imagenet_a"]
    assert "imagenet_a" not in json.loads((run / "metrics.json").read_text())


def test_a_single_run_stops_a_method_that_alters_the_shared_backbone(world, tmp_path, monkeypatch):
    from tampering import make_zero_shot_tamper

    make_zero_shot_tamper(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="zero_shot.*in place"):
        _train(world, run, "--method", "zero_shot", "--eval-sets", "imagenet", training=())
    assert not (run / "metrics.json").exists()


# ---- run folders: nothing overwritten, refused before any work (issue 10) ----

def test_training_into_an_existing_run_is_refused_and_overwrite_replaces_only_its_files(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(world, run, "--eval-sets", "imagenet", "--epochs", "1", "--seed", "2") == 0
    config_before = (run / "config.json").read_bytes()
    metrics_before = (run / "metrics.json").read_bytes()
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _train(world, run, "--eval-sets", "imagenet", "--epochs", "1", "--seed", "3")
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert str(run) in err and "--overwrite" in err and f"--resume {run}" in err and "config.json" in err
    assert (run / "config.json").read_bytes() == config_before
    assert (run / "metrics.json").read_bytes() == metrics_before

    (run / "train_state.pt").write_bytes(b"stale")  # a leftover that --overwrite must remove
    assert _train(world, run, "--eval-sets", "imagenet", "--epochs", "1", "--seed", "3", "--overwrite") == 0
    assert json.loads((run / "config.json").read_text())["seed"] == 3
    assert not (run / "train_state.pt").exists() or (run / "train_state.pt").read_bytes() != b"stale"
    assert (run / "notes.txt").read_text() == "mine"  # not clipconv's: left alone
    assert len((run / "log.txt").read_text().split("epoch 1/1: loss")) == 2  # the old log is gone


def test_a_partial_run_folder_is_refused_and_an_empty_folder_is_used(world, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train_state.pt").write_bytes(b"x")
    with pytest.raises(SystemExit) as info:
        _train(world, partial, "--eval-sets", "imagenet", "--epochs", "1")
    assert info.value.code == 2 and "train_state.pt" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(world, empty, "--eval-sets", "imagenet", "--epochs", "1") == 0
    assert (empty / "metrics.json").is_file()


def test_overwrite_and_resume_together_are_refused(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(tmp_path), "--overwrite"])
    assert info.value.code == 2 and "--overwrite and --resume" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "under_file", "too_long"])
def test_unusable_output_dir_is_refused_before_any_work(world, tmp_path, capsys, monkeypatch, kind):
    # tests run as root, so a read-only folder cannot be simulated with chmod: a path through a file is
    # what "cannot be written" looks like here
    import clipconv.app.run

    called = []
    monkeypatch.setattr(clipconv.app.run, "open_session", lambda *a, **k: called.append(1))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = {"file": blocker, "under_file": blocker / "sub" / "run", "too_long": tmp_path / ("r" * 300)}[kind]
    with pytest.raises(SystemExit) as info:
        _train(world, out, "--epochs", "1")
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "--output-dir" in err
    assert not called, "the output folder must be checked before the session is opened"
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_runs_started_in_the_same_second_get_different_folders(world, tmp_path, monkeypatch):
    import clipconv.app.run
    from clipconv.app.run import RunConfig, prepare_run
    from clipconv.config import BackboneConfig, DataConfig, RuntimeConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(clipconv.app.run.time, "strftime", lambda fmt, *a: "20260101-000000")
    cfg = RunConfig(method="zero_shot", shots=2, data=DataConfig(data_root=str(world["data"])),
                    backbone=BackboneConfig(model=str(world["config"]), pretrained=str(world["weights"])),
                    runtime=RuntimeConfig(workers=0, cache=False))
    first, second = prepare_run(cfg).run_dir, prepare_run(cfg).run_dir
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name == "zero_shot_2shot_seed1_20260101-000000"
    assert second.name == "zero_shot_2shot_seed1_20260101-000000-2"


def test_concurrent_folder_creation_never_shares():
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from clipconv.app.rundir import new_run_dir

    with tempfile.TemporaryDirectory() as parent:
        with ThreadPoolExecutor(8) as pool:
            folders = list(pool.map(lambda _: new_run_dir(parent, "same"), range(16)))
        assert len(set(folders)) == 16


def test_console_entry_points_name_existing_mains():
    import configparser
    import importlib
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    entries = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert {"clipconv-train", "clipconv-eval", "clipconv-check-data", "clipconv-table2",
            "clipconv-zero-shot"} <= set(entries)
    for target in entries.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_eval_robustness_takes_every_setting_from_the_run_beside_the_checkpoint(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(world, run, "--eval-sets", "imagenet", "imagenet_a", "--epochs", "1") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"imagenet", "imagenet_a"}
    for given in (run / "adapter.safetensors", run):  # the checkpoint or the run folder, nothing else
        assert eval_robustness.main(["--checkpoint", str(given), "--workers", "0"]) == 0
    evals = sorted(p for p in run.iterdir() if p.name.startswith("eval-"))
    assert len(evals) == 2  # two evaluations in the same second: two folders
    for folder in evals:
        assert json.loads((folder / "metrics.json").read_text()) == metrics
    # an output folder that already holds results is refused, before any work
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        eval_robustness.main(["--checkpoint", str(run), "--output-dir", str(evals[0])])
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_eval_robustness_help_has_no_templates_and_names_the_output_folder(capsys):
    with pytest.raises(SystemExit):
        eval_robustness.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--templates" not in text and "RUN/eval-<time>" in text and "--data-root" in text


def test_scores_say_over_how_many_classes_and_shortfalls_reach_log_and_summary(world, tmp_path):
    run = tmp_path / "run"
    # 6 train images per class: 4 shots leave 2 of the 4 validation images asked for
    assert _train(world, run, "--eval-sets", "imagenet", "imagenet_a", "--epochs", "1") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    n_classes = len(split["class_ids"])
    assert metrics["imagenet"]["classes"] == n_classes
    assert 0 < metrics["imagenet_a"]["classes"] < n_classes  # -A is scored over its own classes only
    line = (f"images / classes per set: ImageNet {metrics['imagenet']['n']} / {n_classes}, "
            f"-A {metrics['imagenet_a']['n']} / {metrics['imagenet_a']['classes']}")
    assert line in (run / "results.md").read_text()
    summary = json.loads((run / "run_summary.json").read_text())
    assert split["val_shortfall"] and summary["val_shortfall"] == split["val_shortfall"]
    assert summary["shortfall"] == split["shortfall"] == {}
    log = (run / "log.txt").read_text()
    name, drawn = next(iter(sorted(split["val_shortfall"].items())))
    assert "validation shortfall" in log and f"{name} ({drawn})" in log


def test_per_class_accuracy_and_saved_logits_reproduce_the_scores(world, tmp_path):
    from safetensors.torch import load_file

    from clipconv.metrics import restrict_to_subset

    run = tmp_path / "run"
    assert _train(world, run, "--eval-sets", "imagenet", "imagenet_a", "--epochs", "1", "--save-logits") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for name, m in metrics.items():
        per_class = m["per_class"]
        assert len(per_class) == m["classes"]
        saved = load_file(str(run / f"{name}_logits.safetensors"))
        logits, labels = saved["logits"], saved["labels"]
        assert labels.shape == (m["n"],) and logits.shape[0] == m["n"]
        if name == "imagenet_a":  # restricted: scored over the classes present in the set
            subset = sorted(set(labels.tolist()))
            assert len(subset) == m["classes"]
            logits, labels = restrict_to_subset(logits, labels, subset)
        assert 100.0 * (logits.argmax(1) == labels).float().mean().item() == pytest.approx(m["top1"], abs=1e-9)
        counts = torch.bincount(labels, minlength=len(per_class)).tolist()
        weighted = sum(acc * c for acc, c in zip(per_class, counts) if acc is not None) / sum(counts)
        assert weighted == pytest.approx(m["top1"], rel=256 * torch.finfo(torch.float32).eps)
    assert not list(run.glob(".*.tmp"))

    again = tmp_path / "again"
    assert eval_robustness.main(["--checkpoint", str(run), "--workers", "0", "--output-dir", str(again),
                                 "--save-logits"]) == 0
    for name in metrics:
        a = load_file(str(run / f"{name}_logits.safetensors"))
        b = load_file(str(again / f"{name}_logits.safetensors"))
        assert torch.equal(a["labels"], b["labels"])
        tol = 256 * torch.finfo(torch.float32).eps * a["logits"].abs().max().item()
        assert (a["logits"] - b["logits"]).abs().max().item() <= tol


def test_per_class_top1_counts_each_class_and_marks_empty_ones():
    from clipconv.metrics import per_class_top1

    logits = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 5.0]])
    labels = torch.tensor([0, 0, 1, 3])
    assert per_class_top1(logits, labels, 4) == [50.0, 0.0, None, 100.0]
    # restricted to classes {1, 3}: argmax over those two columns only
    assert per_class_top1(logits[2:], labels[2:], 4, subset=[1, 3]) == [100.0, 100.0]
