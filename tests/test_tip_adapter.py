"""Tip-Adapter(-F): α = 0 is zero-shot, logits follow the formula, α/β and the epoch come from ctx.val."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from baseline_world import make_world
from PIL import Image
from tolerance import assert_close_scaled, differs_beyond_tolerance

from clipconv.features import FeatureStore
from clipconv.methods import build_method
from clipconv.methods.frozen import text_classifier
from clipconv.methods.tip_adapter import (
    TipAdapterConfig, TipAdapterF, TipAdapterFConfig, search_grid, tip_cache_transform
)
from clipconv.prompts import load_templates
from clipconv.runtime.seeding import item_seed


@pytest.fixture()
def world(tmp_path, tiny_config):
    return make_world(tmp_path, tiny_config)


def test_alpha_zero_equals_zero_shot(world):
    world.ctx.templates, world.ctx.templates_name = load_templates("clip80"), "clip80"  # a run-level --templates
    zero_shot = build_method("zero_shot")
    assert zero_shot.fit(world.ctx)["template_set"] == "clip80"
    tip = build_method("tip_adapter", alpha=0.0, search="none", augment_rounds=2)
    assert tip.fit(world.ctx)["template_set"] == "clip80"  # the explicit set overrides both references
    feats = world.store.encode(world.root, world.test_samples)
    assert_close_scaled(tip.logits_from_features(feats), zero_shot.logits_from_features(feats))


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f"])
def test_reference_templates_are_tips_seven(world, name):
    """Without a run-level choice Tip-Adapter(-F) use the reference's 7 ImageNet templates."""
    extra = {"epochs": 1} if name == "tip_adapter_f" else {}
    tip = build_method(name, search="none", augment_rounds=1, **extra)
    assert type(tip).reference_templates == "tip"
    summary = tip.fit(world.ctx)
    assert (summary["template_set"], summary["templates"]) == ("tip", 7)
    assert torch.equal(tip.class_weights, text_classifier(world.ctx, load_templates("tip")))
    option = build_method(name, search="none", augment_rounds=1, templates="photo", **extra).fit(world.ctx)
    assert (option["template_set"], option["templates"]) == ("photo", 1)


def test_tip_templates_file_is_the_reference_set():
    assert load_templates("tip") == ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                                     "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                                     "a photo of the small {}."]


def test_cache_keys_are_averaged_augmented_views(world):
    rounds = 3
    tip = build_method("tip_adapter", search="none", augment_rounds=rounds)
    tip.fit(world.ctx)
    transform, _ = tip_cache_transform(world.backbone)
    model = world.backbone.model
    views = []
    for round_index in range(rounds):  # the FeatureStore's documented per-item seeding
        images = []
        for index, (path, _) in enumerate(sorted(world.ctx.train)):
            torch.manual_seed(item_seed(world.ctx.seed * 1000 + round_index, index))
            images.append(transform(Image.open(world.root / path).convert("RGB")))
        images = torch.stack(images)
        with torch.no_grad():
            views.append(model.encode_image(images).float())
    assert_close_scaled(tip.keys, F.normalize(torch.stack(views).mean(0), dim=-1))
    labels = torch.tensor([label for _, label in world.ctx.train])
    assert torch.equal(tip.values, F.one_hot(labels, len(world.ctx.classnames)).float())


def test_logits_follow_the_formula(world):
    tip = build_method("tip_adapter", alpha=1.7, beta=3.0, search="none", augment_rounds=2)
    tip.fit(world.ctx)
    feats = world.store.encode(world.root, world.test_samples)
    text = tip.class_weights
    expected = []
    for f in feats:  # one image at a time, written out term by term
        f = f / f.norm()
        clip = world.backbone.model.logit_scale.exp().item() * (text @ f)
        cache = torch.zeros(len(world.ctx.classnames))
        for key, value in zip(tip.keys, tip.values):
            cache += torch.exp(-3.0 * (1 - key @ f)) * value
        expected.append(clip + 1.7 * cache)
    assert_close_scaled(tip.logits_from_features(feats), torch.stack(expected))


def test_search_uses_val_only_and_finds_the_grid_optimum(world):
    requested = []
    store = world.store

    class Spy:
        def encode(self, root, samples, **kwargs):
            requested.append({p for p, _ in samples})
            return store.encode(root, samples, **kwargs)

    world.ctx.features = Spy()
    tip = build_method("tip_adapter", search="small", augment_rounds=2)
    summary = tip.fit(world.ctx)
    test_paths = {p for p, _ in world.test_samples}
    assert requested and not any(paths & test_paths for paths in requested)
    assert summary["alpha_beta_from"] == "ctx.val"
    val, labels = store.encode(world.root, world.ctx.val, with_labels=True)
    best = 0.0
    for beta in search_grid(7.0, 20):
        for alpha in search_grid(3.0, 10):
            tip.alpha, tip.beta = alpha, beta
            best = max(best, 100.0 * (tip.logits_from_features(val).argmax(-1) == labels).float().mean().item())
    assert summary["val_top1"] == pytest.approx(best)
    assert any(summary["beta"] == pytest.approx(b) for b in search_grid(7.0, 20))
    assert any(summary["alpha"] == pytest.approx(a) for a in search_grid(3.0, 10))


def test_no_val_keeps_initial_values(world):
    world.ctx.val = []
    summary = build_method("tip_adapter", augment_rounds=1).fit(world.ctx)
    assert (summary["alpha"], summary["beta"]) == (1.17, 1.0)
    assert "empty" in summary["alpha_beta_from"]


def test_tip_adapter_f_trains_keys_and_picks_epoch_on_val(world):
    plain = build_method("tip_adapter", search="none", augment_rounds=2)
    plain.fit(world.ctx)
    tuned = build_method("tip_adapter_f", search="none", augment_rounds=2, epochs=3, batch_size=4, lr=1e-2)
    summary = tuned.fit(world.ctx)
    assert tuned.keys.shape == plain.keys.shape and differs_beyond_tolerance(tuned.keys, plain.keys)
    assert torch.equal(tuned.values, plain.values) and torch.equal(tuned.class_weights, plain.class_weights)
    val_scores = [record["val_top1"] for record in tuned.history]
    assert summary["best_epoch"] == 1 + val_scores.index(max(val_scores))
    # per-epoch augmented features are cached: a second fit encodes nothing
    again_store = FeatureStore(world.backbone, world.store.cache_dir)
    world.ctx.features = again_store
    build_method("tip_adapter_f", search="none", augment_rounds=2, epochs=3, batch_size=4, lr=1e-2).fit(world.ctx)
    assert again_store.encoder_calls == 0


def test_tip_adapter_f_lowers_training_loss(world):
    tuned = build_method("tip_adapter_f", search="none", augment_rounds=1, epochs=6, batch_size=64, lr=5e-2)
    tuned.fit(world.ctx)
    assert tuned.history[-1]["loss"] < tuned.history[0]["loss"]


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="search"):
        build_method("tip_adapter", search="huge")
    with pytest.raises(ValueError, match="augment_rounds"):
        build_method("tip_adapter", augment_rounds=0)
    with pytest.raises(ValueError, match="epochs"):
        build_method("tip_adapter_f", epochs=0)
    with pytest.raises(ValueError, match="unknown option.*epochs"):
        build_method("tip_adapter", epochs=3)  # training options belong to Tip-Adapter-F only


def test_options_are_config_dataclasses():
    assert TipAdapterF(TipAdapterFConfig(epochs=2)).config.epochs == 2
    assert build_method("tip_adapter").config == TipAdapterConfig()
    defaults = TipAdapterFConfig()
    assert (defaults.alpha, defaults.beta, defaults.augment_rounds, defaults.epochs, defaults.lr, defaults.batch_size,
            defaults.eps) == (1.17, 1.0, 10, 20, 1e-3, 256, 1e-4)
    assert all(TipAdapterFConfig.help().values())
