"""Linear probe: lpclip's search replayed literally, raw features by default, C searched on train-derived
validation data only, logits match scikit-learn."""
from __future__ import annotations

import math

import numpy as np
import pytest
from baseline_world import make_world
from tolerance import assert_close_scaled, scaled_tolerance

import clipconv.methods.linear_probe as lp
from clipconv.methods import build_method
from clipconv.methods.linear_probe import LinearProbe, LinearProbeConfig


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
    tolerance = scaled_tolerance(pool)
    return all((np.abs(pool - row) <= tolerance).all(axis=1).any() for row in rows)


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
    train = world.store.encode(world.root, world.ctx.train).numpy()  # raw features: the reference default
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
    reference = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000).fit(train.double().numpy(), labels.numpy())
    test = world.store.encode(world.root, world.test_samples)
    expected = reference.decision_function(test.double().numpy())
    # float32 scoring of a float64 model: ulps of the summed terms |x|·|w| + |b|, not of the (cancelling) result
    terms = test.double().abs().numpy() @ np.abs(reference.coef_).T + np.abs(reference.intercept_)
    assert_close_scaled(method.logits_from_features(test), expected, scale=terms)


#: lpclip's sequence for score(C) = −|log10 C − 0.7|, worked by hand (exponents of the C values tried):
#: grid 6 … −6 peaks at 0 → range [−1, 1]; each step compares the ends and keeps the better half.
HAND_TRACE = [6, 4, 2, 0, -2, -4, -6,
              -1, 1,            # −1.7 < −0.3: keep right (C=10), range [0, 1]
              0, 1,             # −0.7 < −0.3: keep right, range [0.5, 1]
              0.5, 1,           # −0.2 > −0.3: keep left (C=10^0.5), range [0.5, 0.75]
              0.5, 0.75,        # −0.2 < −0.05: keep right, range [0.625, 0.75]
              0.625, 0.75,      # −0.075 < −0.05: keep right, range [0.6875, 0.75]
              0.6875, 0.75,     # −0.0125 > −0.05: keep left, range [0.6875, 0.71875]
              0.6875, 0.71875,  # −0.0125 > −0.01875: keep left, range [0.6875, 0.703125]
              0.6875, 0.703125]  # −0.0125 < −0.003125: keep right → C = 10^0.703125


def test_search_replays_lpclip_by_hand():
    chosen, trace = lp.lpclip_search(lambda C: -abs(math.log10(C) - 0.7))
    assert [C for C, _ in trace] == pytest.approx([10.0 ** e for e in HAND_TRACE], rel=1e-12)
    assert chosen == pytest.approx(10.0 ** 0.703125, rel=1e-12)


def test_search_ties_keep_the_largest_grid_C_then_the_left_end():
    """np.argmax takes the first best of [1e6, …, 1e-6] (the largest C); bisection ties keep the left end."""
    chosen, trace = lp.lpclip_search(lambda C: 0.5, bisection_steps=3)
    assert [C for C, _ in trace] == pytest.approx(
        [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6, 1e5, 1e7, 1e5, 1e6, 1e5, 10 ** 5.5], rel=1e-12)
    assert chosen == pytest.approx(1e5, rel=1e-12)
    # the result is the end kept at the last step, even when the grid peak scored better (as in lpclip:
    # the bisection range [c/10, 10c] does not contain c itself)
    scores = {0: 0.9, -1: 0.7}
    chosen, trace = lp.lpclip_search(lambda C: scores.get(round(math.log10(C), 6), 0.6), bisection_steps=1)
    assert [round(math.log10(C), 6) for C, _ in trace][7:] == [-1, 1]
    assert chosen == pytest.approx(0.1, rel=1e-12)


def test_search_C_fits_sklearn_once_per_distinct_C(monkeypatch):
    """search_C wires lpclip's search to scikit-learn fits: the chosen C is the replay's, each C fitted once."""
    fitted = []
    y_val = np.arange(1000) % 2

    class Fake:  # validation accuracy = 1 − |log10 C − 0.7| / 10, quantized to 1/1000
        def __init__(self, C, max_iter):
            self.C = C
            fitted.append(C)

        def fit(self, x, y):
            return self

        def predict(self, x):
            wrong = round(1000 * abs(math.log10(self.C) - 0.7) / 10)
            return np.where(np.arange(len(y_val)) < wrong, 1 - y_val, y_val)

    monkeypatch.setattr(lp, "make_classifier", Fake)
    chosen, scores = lp.search_C(np.zeros((4, 2)), np.array([0, 1, 0, 1]), np.zeros((1000, 2)), y_val)
    assert chosen == pytest.approx(10.0 ** 0.703125, rel=1e-12)
    distinct = list(dict.fromkeys(10.0 ** e for e in HAND_TRACE))
    assert fitted == pytest.approx(distinct, rel=1e-12) and len(scores) == len(distinct)


def test_default_features_are_raw_and_normalize_is_an_option(world, monkeypatch):
    seen = _spy_classifier(monkeypatch)
    method = build_method("linear_probe", C=1.0)
    assert method.config == LinearProbeConfig(C=1.0) and method.config.normalize is False
    summary = method.fit(world.ctx)
    raw = world.store.encode(world.root, world.ctx.train).double().numpy()
    assert summary["features"] == "raw"
    assert_close_scaled(seen[-1], raw)
    norms = np.linalg.norm(raw, axis=1)
    assert np.abs(norms - 1).max() > 0.1  # the premise: raw features are far from unit length
    seen.clear()
    normalized = LinearProbe(LinearProbeConfig(C=1.0, normalize=True))
    assert normalized.fit(world.ctx)["features"] == "l2-normalized"
    assert_close_scaled(seen[-1], raw / norms[:, None])
    test = world.store.encode(world.root, world.test_samples)
    logits = normalized.logits_from_features(test)
    assert_close_scaled(logits, normalized.logits_from_features(test * 3.0))  # scale-free only when normalized
    assert (method.logits_from_features(test * 3.0) - method.logits_from_features(test)).abs().max() > 1e-3


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown option.*colour"):
        build_method("linear_probe", colour=1)
    with pytest.raises(ValueError, match="option 'C' .*must be positive"):
        build_method("linear_probe", C=0.0)
    with pytest.raises(ValueError, match="bisection_steps"):
        build_method("linear_probe", bisection_steps=-1)


def test_single_class_training_set_is_refused(world):
    world.ctx.train = [s for s in world.ctx.train if s[1] == 0]
    with pytest.raises(ValueError, match="two classes"):
        build_method("linear_probe", C=1.0).fit(world.ctx)
