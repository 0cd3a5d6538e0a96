"""WiSE-FT from the command line: `train_imagenet_fs.py --wise-alpha A` and `eval_robustness.py --wise ...`.

One plain convpass run is the reference: its checkpoint is θ₁, a zero-shot run gives θ(0)'s scores, and every
interpolated score must match those exactly at the ends and the --wise-alpha run in between."""
from __future__ import annotations

import json

import pytest
import torch
from cli_world import make_cli_world, run_cli
from safetensors.torch import load_file
from tolerance import assert_close_scaled

from clipconv.app.cli import eval_robustness, train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_cli_world(tmp_path_factory.mktemp("wise-cli"), tiny_config)


TRAINING = ("--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--scale", "1")


def _train(world, out, *extra, training=TRAINING):
    argv = ["--data-root", str(world["data"]), "--model", str(world["config"]), "--pretrained", str(world["weights"]),
            "--shots", "4", "--seed", "2", *training, "--workers", "0", "--output-dir", str(out), "--no-cache", *extra]
    return train.main(argv)


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def _scores(metrics):
    return {name: (m["top1"], m["top5"], m["n"]) for name, m in metrics.items()}


@pytest.fixture(scope="module")
def runs(world):
    """The plain convpass run (θ₁), the same run with --wise-alpha 0.5, and zero-shot CLIP."""
    root = world["root"]
    assert _train(world, root / "plain") == 0
    assert _train(world, root / "half", "--wise-alpha", "0.5") == 0
    assert _train(world, root / "zs", "--method", "zero_shot", training=()) == 0
    return {"plain": root / "plain", "half": root / "half", "zs": root / "zs"}


def test_wise_alpha_run_keeps_theta1_and_records_alpha(runs):
    plain, half = runs["plain"], runs["half"]
    theta1, kept = load_file(str(plain / "adapter.safetensors")), load_file(str(half / "adapter.safetensors"))
    assert theta1.keys() == kept.keys() and all(torch.equal(theta1[k], kept[k]) for k in theta1)
    assert json.loads((half / "config.json").read_text())["wise_alpha"] == 0.5
    assert json.loads((plain / "config.json").read_text())["wise_alpha"] is None
    summary = json.loads((half / "run_summary.json").read_text())
    assert summary["summary"]["wise"]["alpha"] == 0.5
    assert "convpass + WiSE (α = 0.5)" in (half / "results.md").read_text()


def test_sweep_ends_are_zero_shot_and_the_trained_run_and_the_middle_is_the_wise_alpha_run(runs, tmp_path):
    out = tmp_path / "sweep"
    assert eval_robustness.main(["--checkpoint", str(runs["plain"]), "--workers", "0", "--output-dir", str(out),
                                 "--wise", "0", "0.5", "1"]) == 0
    sweep = json.loads((out / "wise_sweep.json").read_text())
    assert sweep["alphas"] == [0.0, 0.5, 1.0] and sweep["seed"] == 2
    per_alpha = {a: v["metrics"] for a, v in sweep["per_alpha"].items()}
    assert _scores(per_alpha["0"]) == _scores(_metrics(runs["zs"]))
    assert _scores(per_alpha["1"]) == _scores(_metrics(runs["plain"]))
    assert _scores(per_alpha["0.5"]) == _scores(_metrics(runs["half"]))
    assert _scores(per_alpha["0"]) != _scores(per_alpha["1"])  # the two ends differ: the checks above can fail
    md = (out / "wise_sweep.md").read_text()
    assert "| θ(α = 0.5) |" in md and "zero-shot CLIP = θ(α=0)" in md
    assert (out / "wise_sweep.png").read_bytes()[:8] == PNG_SIGNATURE


def test_sweep_without_alpha_0_still_shows_zero_shot_and_reads_table2_references(runs, tmp_path):
    table = tmp_path / "t2"
    table.mkdir()
    row = {"imagenet": 40.0, "imagenet_v2": 30.0, "imagenet_sketch": 20.0, "imagenet_a": 50.0, "imagenet_r": 50.0,
           "target_avg": 37.5}
    (table / "table2.json").write_text(json.dumps({
        "columns": {"imagenet": "ImageNet", "imagenet_v2": "-V2", "imagenet_sketch": "-Sketch", "imagenet_a": "-A",
                    "imagenet_r": "-R", "target_avg": "target avg"},
        "measured": {"linear_probe": {"label": "LP CLIP", "mean": row},
                     "convpass": {"label": "Convpass_CLIP", "mean": row}},
        "per_seed": {"linear_probe": {"2": {"row": {**row, "imagenet": 45.0}}}}}))
    out = tmp_path / "sweep"
    assert eval_robustness.main(["--checkpoint", str(runs["plain"] / "adapter.safetensors"), "--workers", "0",
                                 "--output-dir", str(out), "--wise", "0.75", "--references", str(table)]) == 0
    sweep = json.loads((out / "wise_sweep.json").read_text())
    assert list(sweep["per_alpha"]) == ["0.75"]
    assert _scores(_metrics(runs["zs"]))["imagenet"][0] == sweep["zero_shot"]["row"]["imagenet"]
    # the run's own seed (2) is taken from the table; its own method is left out (the sweep draws it)
    assert sweep["references"] == {"LP CLIP (seed 2)": {"source": 45.0, "target_avg": 37.5}}
    assert (out / "wise_sweep.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("value, message", [("1.5", "must be a number in [0, 1]"), ("-1", "must be a number in [0, 1]"),
                                            ("nan", "must be a finite number"), ("x", "expected a number")])
def test_bad_wise_alpha_exits_2_and_writes_nothing(world, tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as info:
        _train(world, tmp_path / "run", "--wise-alpha", value)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--wise-alpha: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["zero_shot", "tip_adapter"])
def test_wise_alpha_of_a_method_without_trained_weights_is_refused(world, tmp_path, capsys, method):
    with pytest.raises(SystemExit) as info:
        _train(world, tmp_path / "run", "--method", method, "--wise-alpha", "0.5", training=())
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"method '{method}' has no trained weights to interpolate" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (("--wise", "2"), "--wise: must be a number in [0, 1]"),
    (("--wise", "inf"), "--wise: must be a number in [0, 1]"),
    (("--wise", "a"), "--wise: expected a number in [0, 1]"),
    (("--wise", "0.5", "--overwrite"), "--wise never replaces results"),
    (("--references", "somewhere"), "--references: only used with --wise"),
    (("--wise", "0.5", "--references", "nowhere"), "--references nowhere: no table2.json there"),
])
def test_bad_sweep_flags_exit_2_and_write_nothing(runs, tmp_path, capsys, extra, message):
    before = sorted(p.name for p in runs["plain"].iterdir())
    with pytest.raises(SystemExit) as info:
        eval_robustness.main(["--checkpoint", str(runs["plain"]), "--workers", "0", "--output-dir",
                              str(tmp_path / "out"), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in runs["plain"].iterdir()) == before


def test_a_sweep_never_writes_into_a_folder_holding_results(runs, tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "wise_sweep.json").write_text("{}")
    with pytest.raises(SystemExit) as info:
        eval_robustness.main(["--checkpoint", str(runs["plain"]), "--workers", "0", "--output-dir", str(out),
                              "--wise", "0.5"])
    assert info.value.code == 2 and "wise_sweep.json" in capsys.readouterr().err
    assert (out / "wise_sweep.json").read_text() == "{}"


def test_default_sweep_folder_is_new_beside_the_checkpoint(runs):
    assert eval_robustness.main(["--checkpoint", str(runs["plain"]), "--workers", "0", "--wise", "1"]) == 0
    folders = [p for p in runs["plain"].iterdir() if p.name.startswith("wise-")]
    assert len(folders) == 1 and (folders[0] / "wise_sweep.md").is_file()
    assert _scores(json.loads((folders[0] / "wise_sweep.json").read_text())["per_alpha"]["1"]["metrics"]) == \
        _scores(_metrics(runs["plain"]))


def test_anchored_training_flags_reach_the_method(world, tmp_path, tiny_config):
    """--head frozen and --l2sp from the command line: recorded in config.json, and a frozen head
    is saved unchanged from the zero-shot text head (θ₁'s head = θ₀'s) while the adapters moved."""
    from clipconv.backbone import load_backbone
    from clipconv.methods.finetune import load_endpoints

    run = tmp_path / "frozen"
    assert _train(world, run, "--head", "frozen", "--l2sp", "0.5") == 0
    options = json.loads((run / "config.json").read_text())["method_options"]
    assert (options["head"], options["head_lr_scale"], options["l2sp"]) == ("frozen", 1.0, 0.5)
    backbone = load_backbone(str(tiny_config), pretrained=str(world["weights"]), device="cpu")
    _, theta0, theta1, _ = load_endpoints(run / "adapter.safetensors", backbone, _class_names(world))
    assert torch.equal(theta0["head.weight"], theta1["head.weight"])
    assert any(not torch.equal(theta0[k], theta1[k]) for k in theta0 if not k.startswith("head."))


def _class_names(world):
    """The class names of the generated tree, in the run's order (its family's)."""
    from clipconv.data.family import family_from_args

    family = family_from_args(str(world["data"]), False, None, None, None)
    return list(family.classes().names)


@pytest.mark.parametrize("extra, flag", [(("--head", "thaw"), "--head"), (("--head-lr-scale", "0"), "--head-lr-scale"),
                                         (("--l2sp", "-1"), "--l2sp"), (("--l2sp", "nan"), "--l2sp")])
def test_bad_anchored_training_flags_exit_2(world, tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as info:
        _train(world, tmp_path / "run", *extra)
    assert info.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_frozen_head_with_a_head_learning_rate_is_refused(world, tmp_path, capsys):
    """--head frozen trains no head: a --head-lr-scale beside it would silently do nothing."""
    with pytest.raises(SystemExit) as info:
        _train(world, tmp_path / "run", "--head", "frozen", "--head-lr-scale", "5")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "--head frozen" in errors[0] and "--head-lr-scale" in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_without_its_starting_point_is_refused_for_wise(runs, tmp_path, capsys):
    """A checkpoint written before θ₀ was recorded (no "init" metadata): --wise stops with one line, exit 2."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from clipconv.checkpoint import METADATA_KEY

    old = tmp_path / "old"
    shutil.copytree(runs["plain"], old, ignore=shutil.ignore_patterns("wise-*", "eval-*"))
    path = old / "adapter.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    record = json.loads(metadata[METADATA_KEY])
    del record["init"]
    save_file(tensors, str(path), metadata={**metadata, METADATA_KEY: json.dumps(record)})
    before = sorted(p.name for p in old.iterdir())
    with pytest.raises(SystemExit) as info:
        eval_robustness.main(["--checkpoint", str(old), "--workers", "0", "--wise", "0.5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "does not record its starting point" in err and "Traceback" not in err
    assert sorted(p.name for p in old.iterdir()) == before
    assert eval_robustness.main(["--checkpoint", str(old), "--workers", "0", "--output-dir", str(tmp_path / "e")]) == 0


def test_a_sweep_over_the_source_set_only_plots_top1_against_alpha_and_says_why(runs, tmp_path):
    out = tmp_path / "source-only"
    result = run_cli(eval_robustness.main, ["--checkpoint", str(runs["plain"]), "--workers", "0", "--output-dir",
                                            str(out), "--eval-sets", "imagenet", "--wise", "0", "0.5", "1"])
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "wise_sweep.png shows top-1 against α" in line]
    assert len(said) == 1 and "no target set" in said[0]  # one line, saying why
    assert (out / "wise_sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    sweep = json.loads((out / "wise_sweep.json").read_text())
    rows = {a: sweep["per_alpha"][a]["row"]["imagenet"] for a in ("0", "0.5", "1")}
    assert sweep["above_chord"]["0.5"] == pytest.approx(rows["0.5"] - (rows["0"] + rows["1"]) / 2)
    assert "top-1 of each set against α" in (out / "wise_sweep.md").read_text()


@pytest.fixture(scope="module")
def seed3(world):
    """A second convpass fit of the same data and options, seed 3 (the plain run is seed 2)."""
    out = world["root"] / "seed3"
    argv = ["--data-root", str(world["data"]), "--model", str(world["config"]), "--pretrained", str(world["weights"]),
            "--shots", "4", "--seed", "3", *TRAINING, "--workers", "0", "--output-dir", str(out), "--no-cache"]
    assert train.main(argv) == 0
    return out


def test_a_sweep_of_several_seeds_is_their_mean_with_the_std_as_error_bars(runs, seed3, tmp_path):
    out = tmp_path / "seeds"
    assert eval_robustness.main(["--checkpoint", str(runs["plain"]), str(seed3), "--workers", "0", "--output-dir",
                                 str(out), "--wise", "0.5", "1"]) == 0
    sweep = json.loads((out / "wise_sweep.json").read_text())
    assert sweep["seeds"] == [2, 3] and len(sweep["checkpoints"]) == 2
    ends = [_metrics(runs["plain"]), _metrics(seed3)]  # θ(1) of each seed is its trained run
    for name in ("imagenet", "imagenet_sketch"):
        values = [m[name]["top1"] for m in ends]
        assert_close_scaled(sweep["per_alpha"]["1"]["row"][name], sum(values) / 2)
        assert_close_scaled(sweep["per_alpha"]["1"]["std"][name], abs(values[0] - values[1]) / 2)
    assert sorted(sweep["per_alpha"]["0.5"]["per_seed"]) == ["2", "3"]
    assert "mean ± std over 2 checkpoints (seeds 2, 3)" in (out / "wise_sweep.md").read_text()
    assert (out / "wise_sweep.png").read_bytes()[:8] == PNG_SIGNATURE


def test_several_checkpoints_must_be_distinct_seeds_and_need_wise(runs, seed3, tmp_path, capsys):
    for extra, message in ((("--checkpoint", str(runs["plain"]), str(runs["plain"]), "--wise", "0.5"), "given twice"),
                           (("--checkpoint", str(runs["plain"]), str(runs["half"]), "--wise", "0.5"),
                            "seed 2 appears in more than one checkpoint"),
                           (("--checkpoint", str(runs["plain"]), str(seed3)), "several checkpoints only with --wise")):
        with pytest.raises(SystemExit) as info:
            eval_robustness.main([*extra, "--workers", "0", "--output-dir", str(tmp_path / "out")])
        assert info.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_a_table2_folder_names_every_seed_of_its_one_trained_method(tmp_path, capsys):
    """`--checkpoint TABLE2_DIR --wise ...`: the fits of its one trained method; the data settings come from the
    table's record (its fit folders hold no config.json)."""
    table = tmp_path / "t2"
    for fit in ("convpass_seed1", "convpass_seed2", "zero_shot_seed1"):
        (table / fit).mkdir(parents=True)
    for fit in ("convpass_seed1", "convpass_seed2"):
        (table / fit / "adapter.safetensors").write_bytes(b"")
    (table / "table2.json").write_text("{}")
    (table / "table2_config.json").write_text(json.dumps({"config": {
        "output_dir": "/elsewhere/t2", "data": {"data_root": "/elsewhere/t2/data", "eval_sets": ["imagenet"]},
        "backbone": {"model": "m.json", "pretrained": "none"}}, "shots": [2]}))
    found = eval_robustness.checkpoints_of([str(table)], wise=True)
    assert found == [table / "convpass_seed1" / "adapter.safetensors", table / "convpass_seed2" / "adapter.safetensors"]
    settings = eval_robustness.run_settings(found[0])  # the moved table's paths follow it
    assert settings["data_root"] == str((table / "data").resolve()) and settings["eval_sets"] == ["imagenet"]
    assert (settings["model"], settings["pretrained"]) == ("m.json", "none")
    (table / "lora_seed1").mkdir()
    (table / "lora_seed1" / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        eval_robustness.checkpoints_of([str(table)], wise=True)
    assert info.value.code == 2 and "fits of several trained methods (convpass, lora)" in capsys.readouterr().err
