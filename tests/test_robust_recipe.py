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
from tiny_tasks import LinearTask, fixed_batches

from clipconv.app.cli.options import preset_of
from clipconv.app.cli.run_table2 import main as table2_main
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
    assert variant.presets["demo"] == {**METHODS["convpass"].presets["demo"], **ROBUST_RECIPE}
    assert variant.config_class is METHODS["convpass"].config_class
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
