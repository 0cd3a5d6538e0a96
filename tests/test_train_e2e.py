"""scripts/train_imagenet_fs.py end to end on a generated tree with a tiny model saved as a weights file."""
from __future__ import annotations

import json

import pytest
import torch

from clipconv.cli import eval_robustness, train


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    from clipconv.backbone import load_backbone
    from clipconv.data import make_image_tree

    root = tmp_path_factory.mktemp("e2e")
    data = make_image_tree(root / "data", train_per_class=6, val_per_class=3, seed=3)
    torch.manual_seed(7)
    backbone = load_backbone(str(tiny_config), pretrained=None, device="cpu")
    with torch.no_grad():  # weights that are not the reproducible random init, saved as a file
        for p in backbone.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights = root / "tiny.pt"
    torch.save(backbone.model.state_dict(), weights)
    return {"root": root, "data": data, "weights": weights, "config": tiny_config}


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
