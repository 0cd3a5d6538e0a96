"""Bad arguments: one clear message each, exit code 2, nothing written."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipconv.app.cli import eval_robustness, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from clipconv.data import make_image_tree

    return make_image_tree(tmp_path_factory.mktemp("bad-args") / "data", train_per_class=3, val_per_class=1,
                           variants=())


def _run(main, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def _base(data, out, tiny_config):
    return ["--data-root", str(data), "--model", str(tiny_config), "--pretrained", "none", "--epochs", "1",
            "--workers", "0", "--output-dir", str(out), "--no-cache"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--shots", "0"], "--shots: must be positive, got 0"),
        (["--shots", "-3"], "--shots: must be positive, got -3"),
        (["--seed", "one"], "--seed: expected an integer, got 'one'"),
        (["--method", "magic"], "unknown --method 'magic'"),
        (["--lr", "0"], "--lr: must be positive"),
        (["--method-options", "{not json"], "--method-options is not valid JSON"),
        (["--eval-sets", "imagenet_c"], "--eval-sets: unknown set(s) ['imagenet_c']"),
        (["--scale", "nan"], "--scales/--scale: must be a finite number, got nan"),
        (["--scale", "0"], "--scales/--scale: must be positive, got 0.0"),
        (["--scale", "1", "-2"], "--scales/--scale: must be positive, got -2.0"),
        (["--weight-decay", "-5"], "--weight-decay/--wd: must be zero or more, got -5.0"),
        (["--wd", "inf"], "--weight-decay/--wd: must be a finite number, got inf"),
        (["--warmup-epochs", "-1"], "--warmup-epochs: must be zero or more, got -1.0"),
        (["--seed", "1e23"], "--seed: expected an integer, got '1e23'"),
        (["--seed", str(2**40)], "--seed: must be an integer in [0, 2**32)"),
        (["--crop-scale", "1.5"], "--crop-scale: must be in (0, 1], got 1.5"),
        (["--threads", "0"], "--threads: must be positive, got 0"),
        (["--method-options", '{"lr": -1}'], "--method-options lr: must be positive, got -1"),
        (["--method-options", '{"scales": []}'], "give at least one adapter scale"),
        (["--method-options", '{"epochz": 3}'], "unknown option(s) ['epochz']"),
    ],
)
def test_bad_flags(data, tmp_path, tiny_config, capsys, extra, needle):
    out = tmp_path / "run"
    code, err = _run(train.main, _base(data, out, tiny_config) + extra, capsys)
    assert code == 2 and needle in err, err
    assert sum("error:" in line for line in err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_unknown_model(data, tmp_path, capsys, tiny_config):
    out = tmp_path / "run"
    argv = _base(data, out, tiny_config)
    argv[argv.index("--model") + 1] = "ViT-Z-1"
    code, err = _run(train.main, argv, capsys)
    assert code == 2 and "unknown model 'ViT-Z-1'" in err and not out.exists()


def test_templates_without_placeholder(data, tmp_path, capsys, tiny_config):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na photo without a slot.\n")
    out = tmp_path / "run"
    code, err = _run(train.main, _base(data, out, tiny_config) + ["--templates", str(templates)], capsys)
    assert code == 2 and "templates.txt:2:" in err and "exactly one" in err and not out.exists()


def test_classnames_file_not_matching_the_data(data, tmp_path, capsys, tiny_config):
    names = tmp_path / "names.txt"
    names.write_text("n99999999 nothing\nn88888888 nobody\n")
    out = tmp_path / "run"
    code, err = _run(train.main, _base(data, out, tiny_config) + ["--classnames", str(names)], capsys)
    assert code == 2 and "not class ids" in err and not out.exists()


def test_no_data_root_mentions_layout_and_demo(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(train.main, ["--shots", "16"], capsys)
    assert code == 2 and "datasets/README.md" in err and "--demo" in err
    assert not (tmp_path / "runs").exists()


def test_wrong_data_root(tmp_path, capsys, tiny_config):
    out = tmp_path / "run"
    code, err = _run(train.main, _base(tmp_path / "nowhere", out, tiny_config), capsys)
    assert code == 2 and "nowhere" in err and "does not exist" in err and not out.exists()


def test_checkpoint_from_another_class_set_or_architecture(data, tmp_path, capsys, tiny_config):
    from conftest import write_tiny_config

    run = tmp_path / "run"
    assert train.main(_base(data, run, tiny_config) + ["--shots", "2", "--eval-sets", "imagenet"]) == 0
    ckpt = str(run / "adapter.safetensors")

    wide = write_tiny_config(tmp_path, name="tiny-wide", vision_cfg={"width": 64, "head_width": 16})
    code, err = _run(eval_robustness.main, ["--checkpoint", ckpt, "--data-root", str(data), "--model", str(wide),
                                            "--workers", "0", "--output-dir", str(tmp_path / "e1")], capsys)
    assert code == 2 and "trained on model 'tiny-clip'" in err and not (tmp_path / "e1").exists()
    (tmp_path / "same-name").mkdir()  # the same model name, another architecture: found once loaded
    wide = write_tiny_config(tmp_path / "same-name", name=Path(tiny_config).stem,
                             vision_cfg={"width": 64, "head_width": 16})
    code, err = _run(eval_robustness.main, ["--checkpoint", ckpt, "--data-root", str(data), "--model", str(wide),
                                            "--workers", "0", "--output-dir", str(tmp_path / "e1")], capsys)
    assert code == 2 and "does not fit" in err and "(8, 32) vs model (8, 64)" in err and not (tmp_path / "e1").exists()

    from clipconv.data import make_image_tree

    other = make_image_tree(tmp_path / "other", wnids=["m000", "m001"], names=["red", "blue"], variants=(),
                            train_per_class=1, val_per_class=1)
    code, err = _run(eval_robustness.main, ["--checkpoint", ckpt, "--data-root", str(other), "--workers", "0",
                                            "--output-dir", str(tmp_path / "e2")], capsys)
    assert code == 2 and "not in the class universe" in err and not (tmp_path / "e2").exists()

    code, err = _run(eval_robustness.main, ["--checkpoint", str(tmp_path / "missing.safetensors"),
                                            "--data-root", str(data)], capsys)
    assert code == 2 and "does not exist" in err


def test_resume_of_a_folder_that_is_no_run(tmp_path, capsys):
    code, err = _run(train.main, ["--resume", str(tmp_path)], capsys)
    assert code == 2 and "no config.json" in err



def test_resume_refuses_flags_that_conflict_with_the_saved_run(data, tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert train.main(_base(data, run, tiny_config) + ["--shots", "2", "--eval-sets", "imagenet"]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "log.txt"}
    code, err = _run(train.main, ["--resume", str(run), "--epochs", "4", "--seed", "9", "--method", "zero_shot",
                                  "--output-dir", str(tmp_path / "elsewhere")], capsys)
    assert code == 2
    for needle in ("--epochs 4 (saved: 1)", "--seed 9 (saved: 1)", "--method zero_shot (saved: convpass)",
                   "--output-dir"):
        assert needle in err, (needle, err)
    assert not (tmp_path / "elsewhere").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "log.txt"} == before


def test_resume_accepts_runtime_flags_and_keeps_the_saved_config(data, tmp_path, tiny_config):
    import json

    run = tmp_path / "run"
    assert train.main(_base(data, run, tiny_config) + ["--shots", "2", "--eval-sets", "imagenet"]) == 0
    config = (run / "config.json").read_text()
    assert train.main(["--resume", str(run), "--workers", "0", "--quiet", "--epochs", "1"]) == 0
    assert (run / "config.json").read_text() == config
    saved = json.loads(config)
    assert saved["method_options"]["epochs"] == 1 and saved["environment"]["world_size"] == 1
    assert {"torch", "open_clip", "device", "precision"} <= set(saved["environment"])


def test_threads_and_quiet(data, tmp_path, tiny_config, capsys):
    import json

    threads = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        assert train.main(_base(data, run, tiny_config) + ["--shots", "2", "--eval-sets", "imagenet", "--threads",
                                                           "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert json.loads((run / "config.json").read_text())["environment"]["threads"] == 1
    err = capsys.readouterr().err
    assert "top-1" not in err and "epoch 1/1" in (run / "log.txt").read_text()


def test_resume_accepts_compile_which_changes_speed_only(data, tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    assert train.main(_base(data, run, tiny_config) + ["--shots", "2", "--eval-sets", "imagenet"]) == 0
    assert train.main(["--resume", str(run), "--workers", "0", "--quiet", "--compile"]) == 0
    code, err = _run(train.main, ["--resume", str(run), "--compile", "--lr", "0.5"], capsys)  # others still conflict
    assert code == 2 and "--lr 0.5" in err and "--compile" not in err.split("conflict")[1]
