"""Linear probe: C is searched on train-derived validation data only; logits match scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipconv.methods.linear_probe as lp
from baseline_world import make_world
from clipconv.methods import build_method


@pytest.fixture()
def world(tmp_path, tiny_config):
    return make_world(tmp_path, tiny_config)


class SpyStore:
    """Wraps a FeatureStore and records every sample list it is asked to encode."""

    def __init__(self, store):
        self.store, self.requested = store, []

    def encode(self, root, samples, **kwargs):
        self.requested.append([path for path, _ in samples])
        return self.store.encode(root, samples, **kwargs)


def _spy_classifier(monkeypatch):
    seen = []
    real = lp.make_classifier

    def spy(C, max_iter):
        model = real(C, max_iter)
        fit = model.fit

        def recording_fit(x, y):
            seen.append(np.array(x))
            return fit(x, y)

        model.fit = recording_fit
        return model

    monkeypatch.setattr(lp, "make_classifier", spy)
    return seen


def _rows_in(rows: np.ndarray, pool: np.ndarray) -> bool:
    return all(np.isclose(pool, row, atol=1e-6).all(axis=1).any() for row in rows)


def test_search_never_sees_test_images(world, monkeypatch):
    seen = _spy_classifier(monkeypatch)
    spy = SpyStore(world.store)
    world.ctx.features = spy
    method = build_method("linear_probe", bisection_steps=2)
    summary = method.fit(world.ctx)
    allowed = {p for p, _ in world.ctx.train} | {p for p, _ in world.ctx.val}
    assert all(set(paths) <= allowed for paths in spy.requested)
    test_paths = {p for p, _ in world.test_samples}
    assert not any(test_paths & set(paths) for paths in spy.requested)
    train = F.normalize(world.store.encode(world.root, world.ctx.train), dim=-1).numpy()
    assert 7 + 1 <= len(seen) <= 7 + 2 * 2 + 1  # coarse grid, ≤ 2 new C per bisection step, final refit
    assert all(_rows_in(x, train) for x in seen)  # every fit, search and final, saw train rows only
    assert summary["C_source"] == "ctx.val" and 1e-6 <= summary["C"] <= 1e6


def test_empty_val_holds_out_a_train_fold(world, monkeypatch):
    seen = _spy_classifier(monkeypatch)
    world.ctx.val = []
    summary = build_method("linear_probe", bisection_steps=1).fit(world.ctx)
    assert summary["C_source"].startswith("held-out train fold")
    classes = len(world.ctx.classnames)
    shots = len(world.ctx.train) // classes
    held = min(4, shots - 1) * classes
    assert [len(x) for x in seen[:-1]] == [len(world.ctx.train) - held] * (len(seen) - 1)
    assert len(seen[-1]) == len(world.ctx.train)  # final refit on the whole K-shot set


def test_one_shot_without_val_uses_default_C(tmp_path, tiny_config):
    world = make_world(tmp_path, tiny_config, shots=1, val_shots=0)
    summary = build_method("linear_probe", default_C=0.5).fit(world.ctx)
    assert summary["C"] == 0.5 and summary["C_source"].startswith("default")


def test_logits_equal_sklearn_decision_function(world):
    from sklearn.linear_model import LogisticRegression

    method = build_method("linear_probe", C=1.0)
    method.fit(world.ctx)
    train, labels = world.store.encode(world.root, world.ctx.train, with_labels=True)
    reference = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000).fit(
        F.normalize(train, dim=-1).double().numpy(), labels.numpy())
    test = world.store.encode(world.root, world.test_samples)
    expected = reference.decision_function(F.normalize(test, dim=-1).double().numpy())
    torch.testing.assert_close(method.logits_from_features(test), torch.as_tensor(expected, dtype=torch.float32),
                               rtol=1e-4, atol=1e-4)


def test_search_picks_the_best_validation_C():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = (x[:, 0] > 0).astype(int)
    C, scores = lp.search_C(x[:40], y[:40], x[40:], y[40:], bisection_steps=3)
    assert scores[C] == max(scores.values())
    assert len(scores) >= 7


def test_single_class_training_set_is_refused(world):
    world.ctx.train = [s for s in world.ctx.train if s[1] == 0]
    with pytest.raises(ValueError, match="two classes"):
        build_method("linear_probe", C=1.0).fit(world.ctx)
