"""The robustness-keeping recipe: `--preset robust` (laid over paper or demo), the `robust:<method>` variants
and their Table-2 rows, every adapter kind and CLIP-LoRA taking the anchors and weight averaging, and the
settings recorded in the train state (a resume with other ones is refused)."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from baseline_world import make_world
from cli_world import refused_line
from tiny_tasks import LinearTask, fixed_batches
from tolerance import assert_close_scaled

from clipconv.app.cli.options import preset_of
from clipconv.app.cli.run_table2 import main as table2_main
from clipconv.app.cli.train import main as train_main
from clipconv.app.run import CONFIG_FILE, RunConfig
from clipconv.config import BackboneConfig, DataConfig
from clipconv.data import make_image_tree
from clipconv.methods import build_method
from clipconv.methods.base import METHODS, PRESET_CHOICES, method_config
from clipconv.methods.robust import ROBUST_RECIPE, robust_method_name
from clipconv.training import STATE_FILE, Anchors, TrainConfig, Trainer, mean_over_ranks

CPU = torch.device("cpu")
#: one method per adapter kind (dora has no method of its own: `adapter:dora`)
KINDS = ("convpass", "lora", "adapter:dora", "adaptformer", "adapter", "vpt_deep", "bitfit")
ROBUST = {"anchor_logits": 1.0, "anchor_features": 1.0, "weight_average": "ema:0.5"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_world(tmp_path_factory.mktemp("recipe"), tiny_config, shots=2, val_shots=1, classes=3)


# ----------------------------------------------------------------------------- presets
def test_robust_preset_lies_over_paper_and_demo():
    assert {"robust", "demo+robust"} <= set(PRESET_CHOICES)
    for name in ("convpass", "lora", "clip_lora"):
        paper, robust = method_config(name, "paper").to_dict(), method_config(name, "robust").to_dict()
        assert robust == {**paper, **ROBUST_RECIPE}
        demo, both = method_config(name, "demo").to_dict(), method_config(name, "demo+robust").to_dict()
        assert both == {**demo, **ROBUST_RECIPE}
    with pytest.raises(ValueError, match="unknown preset 'robust'"):
        method_config("zero_shot", "robust")  # only methods that train the image encoder declare it


@pytest.mark.parametrize("preset, demo, expected", [(None, False, "paper"), (None, True, "demo"),
                                                    ("robust", False, "robust"), ("robust", True, "demo+robust"),
                                                    ("paper", True, "paper")])
def test_preset_flag_with_and_without_demo(preset, demo, expected):
    assert preset_of(argparse.Namespace(preset=preset, demo=demo)) == expected


def test_robust_variants_read_like_their_method():
    variant = METHODS[robust_method_name("convpass")]
    assert variant.label == "Convpass_CLIP (robust)" and variant.table2_order is None and not variant.default
    for preset in ("paper", "demo"):  # its options default to the recipe: every preset comes with it on top
        assert method_config(variant.name, preset).to_dict() == method_config("convpass", f"{preset}+robust").to_dict()
    assert issubclass(variant.config_class, METHODS["convpass"].config_class)
    assert type(build_method(variant.name).config) is variant.config_class
    assert robust_method_name("clip_lora") in METHODS and robust_method_name("zero_shot") not in METHODS


# ----------------------------------------------------------------------------- every kind, CLIP-LoRA
@pytest.mark.parametrize("kind", KINDS)
def test_every_adapter_kind_trains_with_anchors_and_averaging(world, kind):
    method = build_method(kind, epochs=1, batch_size=3, lr=1e-2, **ROBUST)
    result = method.fit(world.ctx)
    record = result["runs"][0]["history"][-1]
    assert record["anchor_logits_kl"] >= 0 and record["anchor_features_l1"] >= 0
    assert method.chosen["weight_average"] == "ema:0.5"


def test_clip_lora_anchors_pull_toward_the_unadapted_model(world):
    """Zero-shot of CLIP-LoRA is the un-adapted CLIP: at B = 0 both terms are 0; after training they are
    recorded, and a huge anchor keeps the trained model closer to zero-shot than plain training."""
    def fit(**options):
        method = build_method("clip_lora", iters_per_shot=2, batch_size=3, lr=1e-2, dropout=0.0, **options)
        method.fit(world.ctx)
        return method

    images = torch.stack([world.backbone.eval_transform(_image(world, p)) for p, _ in world.ctx.train])
    fresh = build_method("clip_lora")
    fresh.build(world.ctx)
    zero_shot = fresh.logits(images)
    plain, held = fit(), fit(anchor_logits=1e4, weight_average="ema:0.5")
    assert held.history[-1]["anchor_logits_kl"] >= 0 and "anchor_features_l1" not in held.history[-1]
    assert held.summary()["weight_average"] == "ema:0.5"
    drift = lambda m: float((m.logits(images) - zero_shot).abs().max())  # noqa: E731
    assert drift(held) < 0.5 * drift(plain)


def _image(world, path):
    from PIL import Image  # test-only helper

    return Image.open(world.root / path).convert("RGB")


# ----------------------------------------------------------------------------- recorded settings, resume
def test_anchors_and_averaging_are_recorded_and_a_resume_with_others_is_refused(tmp_path):
    saved = TrainConfig(epochs=1, lr=0.1, anchor_logits=1.0, anchor_features=10.0, weight_average="gpa")
    Trainer(LinearTask(fixed_batches()), saved, CPU, tmp_path, log=lambda *_: None).fit()
    recorded = torch.load(tmp_path / STATE_FILE, weights_only=True)["config"]
    assert (recorded["anchor_logits"], recorded["anchor_features"], recorded["weight_average"]) == (1.0, 10.0, "gpa")
    for other in ({"anchor_logits": 0.0}, {"anchor_features": 1.0}, {"weight_average": "none"}):
        trainer = Trainer(LinearTask(fixed_batches()), dataclasses.replace(saved, **other), CPU, tmp_path,
                          log=lambda *_: None)
        with pytest.raises(ValueError, match="training settings differ") as refused:
            trainer.resume_if_saved(True)
        assert "\n" not in str(refused.value) and next(iter(other)) in str(refused.value)
    with pytest.raises(ValueError, match="anchor_logits must be finite"):
        TrainConfig(anchor_logits=-1.0)


def test_cli_resume_with_other_anchors_or_averaging_is_refused_in_one_line(tmp_path, tiny_config, capsys):
    run = tmp_path / "run"
    run.mkdir()
    config = RunConfig(method="convpass", preset="robust", data=DataConfig(data_root=str(tmp_path)),
                       backbone=BackboneConfig(model=str(tiny_config), pretrained="none"))
    (run / CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    before = sorted(run.iterdir())
    line = refused_line(train_main, ["--resume", str(run), "--anchor-logits", "2", "--weight-average", "none"], capsys)
    assert "--anchor-logits 2.0 (saved: 1.0)" in line and "--weight-average none (saved: gpa)" in line
    assert "--preset paper (saved: robust)" in refused_line(train_main, ["--resume", str(run), "--preset", "paper"],
                                                            capsys)
    assert sorted(run.iterdir()) == before


# ----------------------------------------------------------------------------- torchrun: anchor terms over ranks
def test_anchor_terms_are_averaged_over_every_ranks_examples():
    """Under torchrun each rank sums its own terms; `mean_over_ranks` reduces them (here a stand-in all-reduce
    that adds the other rank's sums) to the mean over all examples, as one process over the whole batch."""
    def batch(seed: int, rows: int):
        g = torch.Generator().manual_seed(seed)
        logits, zs = torch.randn(rows, 3, generator=g), torch.randn(rows, 3, generator=g)
        f, fz = (torch.nn.functional.normalize(torch.randn(rows, 4, generator=g), dim=-1) for _ in range(2))
        return logits, zs, f, fz

    halves = [batch(1, 2), batch(2, 5)]  # unequal shards
    ranks = [Anchors(1.0, 1.0) for _ in halves]
    for anchors, terms in zip(ranks, halves):
        anchors.penalty(*terms)
    other = {id(ranks[0]._sums): ranks[1]._sums, id(ranks[1]._sums): ranks[0]._sums}
    metrics = [a.metrics(lambda t, a=a: t + other[id(a._sums)]) for a in ranks]
    assert metrics[0] == metrics[1]  # every rank logs the same numbers
    whole = Anchors(1.0, 1.0)
    rows = [torch.cat(parts) for parts in zip(*halves)]
    kl_halves = [Anchors(1.0, 0.0) for _ in halves]
    for anchors, terms in zip(kl_halves, halves):
        anchors.penalty(*terms)
    expected_kl = sum(a.metrics(lambda t: t)["anchor_logits_kl"] * len(h[0]) for a, h in zip(kl_halves, halves)) / 7
    assert_close_scaled(metrics[0]["anchor_logits_kl"], expected_kl)
    whole.penalty(*rows)  # the features' mean L1 over the 7 rows, as one process computes it (float32 sums)
    assert_close_scaled(metrics[0]["anchor_features_l1"], whole.metrics(lambda t: t)["anchor_features_l1"])
    assert mean_over_ranks(torch.zeros(3, dtype=torch.float64), lambda t: t) == [0.0, 0.0]


# ----------------------------------------------------------------------------- Table 2
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_image_tree(tmp_path_factory.mktemp("robust-t2") / "data", train_per_class=6, val_per_class=2)


@pytest.mark.slow  # a whole (tiny) Table 2: ~5 s idle
def test_table2_gains_a_robust_row_and_its_wise_row(tmp_path, tree, tiny_config):
    tiny = {"epochs": 2, "lr": 1e-2, "scales": [1.0], "batch_size": 4}
    variant = robust_method_name("convpass")
    argv = ["--data-root", str(tree), "--model", str(tiny_config), "--pretrained", "none", "--shots", "2",
            "--val-shots", "2", "--seeds", "1", "--workers", "0", "--device", "cpu", "--cache-dir",
            str(tmp_path / "cache"), "--methods", "zero_shot", variant, "--wise-methods", variant,
            "--method-options", json.dumps({variant: tiny}), "--output-dir", str(tmp_path / "out")]
    assert table2_main(argv) == 0
    table = json.loads((tmp_path / "out" / "table2.json").read_text())
    assert [row["label"] for row in table["measured"].values()] == [
        "ZS CLIP (1 template)", "Convpass_CLIP (robust)", "Convpass_CLIP (robust) + WiSE (α = 0.5)"]
    options = table["config"]["method_options"][variant]
    assert {k: options[k] for k in ROBUST_RECIPE} == dict(ROBUST_RECIPE)
    assert (tmp_path / "out" / "robust-convpass_seed1" / "adapter.safetensors").is_file()
