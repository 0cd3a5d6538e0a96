"""The miniature benchmark end to end: --demo runs, and 16-shot Convpass beats the mini CLIP's zero-shot."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from clipconv.data.demo_world import generate_world

    return generate_world(tmp_path_factory.mktemp("mini") / "world", seed=3, train_per_class=16, test_per_class=6)


def test_demo_runs_end_to_end_for_one_method(small_world, tmp_path):
    from clipconv.app.cli import train

    out = tmp_path / "run"
    assert train.main(["--demo", "--data-root", str(small_world), "--method", "zero_shot", "--workers", "0",
                       "--output-dir", str(out), "--no-cache"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["source", "v2", "sketch", "adversarial", "rendition"]  # the demo family's suite
    assert metrics["source"]["n"] == 32 * 6 and metrics["adversarial"]["n"] == 16 * 6
    config = json.loads((out / "config.json").read_text())
    backbone = config["backbone"]
    assert backbone["model"].endswith("mini_clip.json") and backbone["pretrained"].endswith("mini_clip.safetensors")
    assert backbone["crop_scale"] == 0.9 and config["val_shots"] == 4


def _accuracy(classifier, root, samples, transform) -> float:
    from clipconv.evaluation import collect_logits
    from clipconv.metrics import topk_accuracy

    logits, labels = collect_logits(classifier, root, samples, transform, torch.device("cpu"), batch_size=256)
    return topk_accuracy(logits, labels)["top1"]


@pytest.mark.slow  # a full 30-epoch demo fit: ~100 s idle, ~400 s on a busy machine
def test_sixteen_shot_convpass_beats_zero_shot_through_its_adapters(small_world):
    from clipconv.adapters import set_adapter_scale
    from clipconv.data import eval_split, resolve_run_classes, sample_few_shot, train_samples
    from clipconv.methods import FitContext, build_method
    from clipconv.methods.base import method_config
    from clipconv.mini_clip import demo_backbone

    backbone = demo_backbone("cpu")
    classes = resolve_run_classes(small_world)
    split = sample_few_shot(train_samples(small_world, classes), 16, seed=1, root=small_world)
    source = eval_split(small_world, "imagenet", classes).samples

    # zero-shot CLIP, computed directly
    with torch.no_grad():
        text = backbone.model.encode_text(backbone.tokenizer([f"a photo of a {n}." for n in classes.names]))
        weights = F.normalize(text, dim=-1)
    zero_shot = _accuracy(lambda x: F.normalize(backbone.model.encode_image(x), dim=-1) @ weights.t(),
                          small_world, source, backbone.eval_transform)

    method = build_method("convpass", method_config("convpass", "demo"))
    ctx = FitContext(backbone=backbone, classnames=classes.names, data_root=small_world, train=split.train,
                     class_ids=classes.ids, class_hash=classes.hash(), workers=0, log=lambda *_: None)
    classifier = method.build(ctx)
    before = _accuracy(classifier, small_world, source, backbone.eval_transform)
    assert before == zero_shot, "an untrained classifier must be zero-shot CLIP"  # same correct count

    method.fit(ctx)
    trained = _accuracy(classifier, small_world, source, backbone.eval_transform)
    set_adapter_scale(classifier.visual, 0.0)  # the trained head alone, adapters switched off
    head_only = _accuracy(classifier, small_world, source, backbone.eval_transform)
    assert trained >= zero_shot + 5.0, (zero_shot, trained)
    assert trained >= head_only + 5.0, (head_only, trained)
