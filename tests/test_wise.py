"""WiSE-FT weight-space interpolation (clipconv.wise): α = 0 is each method's starting point (zero-shot CLIP
for the adapter methods and the linear probe), α = 1 the trained model bit for bit, α = 0.5 the hand mix."""
from __future__ import annotations

import copy

import pytest
import torch
from baseline_world import make_world
from tolerance import assert_close_scaled, differs_beyond_tolerance

from clipconv.methods import build_method
from clipconv.wise import interpolate, mix, supports_interpolation, wise_sweep


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_world(tmp_path_factory.mktemp("wise"), tiny_config)


@pytest.fixture(scope="module")
def zero_shot(world):
    method = build_method("zero_shot")
    method.fit(world.ctx)
    return method


@pytest.fixture(scope="module")
def features(world):
    feats, _ = world.store.encode(world.root, world.test_samples, with_labels=True)
    return feats


def _images(world, count: int = 6) -> torch.Tensor:
    from clipconv.evaluation import image_loader

    loader = image_loader(world.root, world.test_samples[:count], world.backbone.eval_transform, count, 0)
    images, _ = next(iter(loader))
    return images


@pytest.fixture(scope="module")
def convpass(world):
    method = build_method("convpass", epochs=2, batch_size=4, lr=1e-2, scales=[1.0])
    method.fit(world.ctx)
    return method


# ----------------------------------------------------------------------------- mix
def test_mix_is_exact_at_the_ends_and_linear_between():
    theta0 = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    theta1 = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    assert all(torch.equal(mix(theta0, theta1, 0.0)[k], theta0[k]) for k in theta0)
    assert all(torch.equal(mix(theta0, theta1, 1)[k], theta1[k]) for k in theta0)
    half = mix(theta0, theta1, 0.25)
    for k in theta0:
        assert_close_scaled(half[k], 0.75 * theta0[k] + 0.25 * theta1[k])
    assert mix(theta0, theta1, 0.0)["w"] is not theta0["w"]  # copies: loading never aliases the endpoints


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        mix({"w": torch.zeros(1)}, {"w": torch.ones(1)}, alpha)


def test_mismatched_endpoints_are_refused():
    with pytest.raises(ValueError, match="differ in their tensors"):
        mix({"w": torch.zeros(1)}, {"v": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="shape of 'w'"):
        mix({"w": torch.zeros(1)}, {"w": torch.zeros(2)}, 0.5)


def test_untrained_methods_cannot_be_interpolated(zero_shot):
    assert not supports_interpolation(zero_shot)
    with pytest.raises(ValueError, match="no trained weights to interpolate"):
        interpolate(zero_shot, 0.5)
    with pytest.raises(RuntimeError, match="fit 'convpass' before interpolating"):
        interpolate(build_method("convpass"), 0.5)


# ----------------------------------------------------------------------------- adapter methods
def test_adapter_tuning_alpha0_is_zero_shot_alpha1_trained_half_hand_mixed(world, zero_shot, convpass):
    images = _images(world)
    trained = convpass.logits(images)
    reference = zero_shot.logits(images)
    assert differs_beyond_tolerance(trained, reference)  # training moved the model: the checks below can fail

    interpolate(convpass, 0.0)
    assert_close_scaled(convpass.logits(images), reference)

    theta0, theta1 = convpass.interpolation_endpoints()
    assert any(".up." in name for name in theta0) and "head.weight" in theta0
    assert all(not theta0[name].any() for name in theta0 if ".up." in name)  # zero up-projections at θ₀

    state = interpolate(convpass, 0.5)
    hand = copy.deepcopy(convpass.classifier)
    with torch.no_grad():
        for name, param in hand.named_parameters():
            if name in theta0:
                param.copy_(0.5 * theta0[name] + 0.5 * theta1[name])
    params = dict(convpass.classifier.named_parameters())
    assert all(torch.equal(params[name], state[name]) for name in state)
    half = convpass.logits(images)
    with torch.no_grad():
        assert torch.equal(half, hand.eval()(images))
    assert differs_beyond_tolerance(half, trained) and differs_beyond_tolerance(half, reference)

    interpolate(convpass, 1.0)
    assert torch.equal(convpass.logits(images), trained)


def test_sweeping_leaves_the_endpoints_untouched(convpass):
    theta0, theta1 = convpass.interpolation_endpoints()
    before = {k: (theta0[k].clone(), theta1[k].clone()) for k in theta0}
    for alpha in (0.0, 0.3, 1.0):
        interpolate(convpass, alpha)
    assert all(torch.equal(theta0[k], a) and torch.equal(theta1[k], b) for k, (a, b) in before.items())


# ----------------------------------------------------------------------------- linear probe
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_probe_alpha0_is_zero_shot_alpha1_trained(world, zero_shot, features, normalize):
    probe = build_method("linear_probe", C=1.0, normalize=normalize)
    probe.fit(world.ctx)
    trained = probe.logits_from_features(features)
    reference = zero_shot.logits_from_features(features)
    interpolate(probe, 0.0)
    assert_close_scaled(probe.logits_from_features(features), reference)
    interpolate(probe, 0.5)
    half = probe.logits_from_features(features)
    # one linear map on [normalize(f), f]: its θ(0.5) scores the average of the two models' logits
    assert_close_scaled(half, 0.5 * reference + 0.5 * trained, scale=torch.cat([reference, trained]))
    if normalize:  # a single head on normalized features: θ(0.5) is the hand-mixed head
        theta0, theta1 = probe.interpolation_endpoints()
        weight = 0.5 * theta0["weight_normalized"] + 0.5 * theta1["weight_normalized"]
        bias = 0.5 * theta0["bias"] + 0.5 * theta1["bias"]
        assert_close_scaled(half, torch.nn.functional.normalize(features, dim=-1) @ weight.t() + bias)
    interpolate(probe, 1.0)
    assert torch.equal(probe.logits_from_features(features), trained)


# ----------------------------------------------------------------------------- prompt learners, Tip-Adapter-F
def test_coop_alpha0_is_its_initial_context(world, features):
    coop = build_method("coop", epochs=2, views=1, batch_size=4, lr=0.5, init_phrase="a photo of a")
    coop.fit(world.ctx)
    trained = coop.logits_from_features(features)
    theta0, theta1 = coop.interpolation_endpoints()
    assert not torch.equal(theta0["ctx"], theta1["ctx"])
    interpolate(coop, 0.0)
    # the phrase context "a photo of a" scores as zero-shot CLIP with the prompt "a photo of a {}."
    reference = build_method("zero_shot")
    reference.fit(world.ctx)
    assert_close_scaled(coop.logits_from_features(features), reference.logits_from_features(features))
    interpolate(coop, 1.0)
    assert torch.equal(coop.logits_from_features(features), trained)


def test_cocoop_interpolates_context_and_meta_net(world, features):
    cocoop = build_method("cocoop", epochs=1, views=1, batch_size=4, lr=0.5, warmup_epochs=0)
    cocoop.fit(world.ctx)
    trained = cocoop.logits_from_features(features)
    theta0, theta1 = cocoop.interpolation_endpoints()
    assert "ctx" in theta0 and any(name.startswith("meta_net.") for name in theta0)
    state = interpolate(cocoop, 0.5)
    assert torch.equal(cocoop.meta_net.state_dict()[next(n for n in state if n.startswith("meta_net."))
                                                    .removeprefix("meta_net.")],
                       state[next(n for n in state if n.startswith("meta_net."))])
    assert differs_beyond_tolerance(cocoop.logits_from_features(features), trained)
    interpolate(cocoop, 1.0)
    assert torch.equal(cocoop.logits_from_features(features), trained)


def test_tip_adapter_f_alpha0_is_training_free_tip_adapter(world, features):
    plain = build_method("tip_adapter", search="none", augment_rounds=2)
    plain.fit(world.ctx)
    tuned = build_method("tip_adapter_f", search="none", augment_rounds=2, epochs=2, batch_size=4, lr=1e-2)
    tuned.fit(world.ctx)
    trained = tuned.logits_from_features(features)
    assert differs_beyond_tolerance(trained, plain.logits_from_features(features))
    interpolate(tuned, 0.0)
    assert_close_scaled(tuned.logits_from_features(features), plain.logits_from_features(features))
    theta0, theta1 = tuned.interpolation_endpoints()
    interpolate(tuned, 0.5)
    assert torch.equal(tuned.keys, (0.5 * theta0["keys"] + 0.5 * theta1["keys"]))
    interpolate(tuned, 1.0)
    assert torch.equal(tuned.logits_from_features(features), trained)


# ----------------------------------------------------------------------------- sweep through a session
@pytest.fixture(scope="module")
def session(world, tiny_config):
    from clipconv.app.session import open_session
    from clipconv.config import BackboneConfig, DataConfig, RuntimeConfig

    return open_session(DataConfig(data_root=str(world.root), eval_sets=("imagenet",)),
                        BackboneConfig(model=str(tiny_config), pretrained="none", precision="fp32"),
                        RuntimeConfig(device="cpu", workers=0, cache=False), loaded=world.backbone)


def test_wise_sweep_evaluates_each_alpha_and_ends_trained(world, session, zero_shot, convpass, features):
    probe = build_method("linear_probe", C=1.0)
    probe.fit(world.ctx)
    trained_logits = probe.logits_from_features(features)
    trained = session.evaluate(probe, log_line=lambda *_: None)
    results = wise_sweep(session, probe, [0.0, 0.5, 1.0], log_line=lambda *_: None)
    assert list(results) == [0.0, 0.5, 1.0]
    assert results[1.0] == trained
    assert results[0.0]["imagenet"]["top1"] == session.evaluate(zero_shot, log_line=lambda *_: None)["imagenet"]["top1"]
    assert results[0.0]["imagenet"]["n"] == len(world.test_samples)
    assert torch.equal(probe.logits_from_features(features), trained_logits)  # back at θ₁ after the sweep
    # an image-encoder method through the same session
    sweep = wise_sweep(session, convpass, [0.0, 1.0], log_line=lambda *_: None)
    assert sweep[0.0]["imagenet"]["top1"] == session.evaluate(zero_shot, log_line=lambda *_: None)["imagenet"]["top1"]
    assert sweep[1.0] == session.evaluate(convpass, log_line=lambda *_: None)


def test_wise_sweep_restores_the_trained_weights_when_evaluation_fails(world, features):
    probe = build_method("linear_probe", C=1.0)
    probe.fit(world.ctx)
    trained = probe.logits_from_features(features)

    class Failing:
        calls = 0

        def evaluate(self, method, **_):
            Failing.calls += 1
            if Failing.calls == 2:
                raise RuntimeError("disk full")
            return {"alpha_logits": method.logits_from_features(features)}

    with pytest.raises(RuntimeError, match="disk full"):
        wise_sweep(Failing(), probe, [0.0, 0.5])
    assert torch.equal(probe.logits_from_features(features), trained)
    with pytest.raises(ValueError, match="at least one"):
        wise_sweep(Failing(), probe, [])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        wise_sweep(Failing(), probe, [0.5, 2.0])
