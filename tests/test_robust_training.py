"""Robustness-keeping training of the adapter methods: PromptSRC's zero-shot anchors (logit KL, feature L1)
and weight averaging during training (EMA, SWA, GPA) as a Trainer hook; the defaults train bit-identically."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from baseline_world import make_world
from tiny_tasks import Killed, LinearTask, fixed_batches, stopped_after_saving
from tolerance import assert_close_scaled
from torch import nn

from clipconv.checkpoint import read_metadata
from clipconv.methods import build_method
from clipconv.training import (
    GPA_MEAN, GPA_STD, STATE_FILE, AnchoredClassifierTask, Anchors, TrainConfig, Trainer, make_averager
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_world(tmp_path_factory.mktemp("robust"), tiny_config, shots=3, val_shots=1, classes=3)


def _images(world, seed: int = 0, count: int = 3, size: int = 4):
    """Fixed random image batches of the tiny backbone's input size and labels of its classes."""
    side = world.backbone.model.visual.image_size
    side = side[0] if isinstance(side, (tuple, list)) else side
    generator = torch.Generator().manual_seed(seed)
    classes = len(world.ctx.classnames)
    data = [(torch.randn(size, 3, side, side, generator=generator),
             torch.randint(0, classes, (size,), generator=generator)) for _ in range(count)]
    return lambda g: data


def _classifier(world, **options):
    method = build_method("convpass", **{"lr": 1e-2, "epochs": 3, "batch_size": 4, "scales": [1.0], **options})
    return method, method.build(world.ctx)


def _trainables(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- options
def test_anchors_of_a_train_config_are_its_weights():
    anchors = Anchors.of(TrainConfig(epochs=1, anchor_logits=2.0, anchor_features=3.0))
    assert (anchors.logits, anchors.features, anchors.active) == (2.0, 3.0, True)
    assert not Anchors.of(TrainConfig(epochs=1)).active


def test_options_default_off_and_validate():
    cfg = build_method("convpass").config
    assert (cfg.anchor_logits, cfg.anchor_features, cfg.weight_average) == (0.0, 0.0, "none")
    helps = type(cfg).help()
    assert "PromptSRC" in helps["anchor_logits"] and "ema:DECAY" in helps["weight_average"]
    for options, match in (({"anchor_logits": -1.0}, "zero or more"), ({"anchor_features": math.inf}, "finite"),
                           ({"anchor_logits": math.nan}, "finite"), ({"weight_average": "ema:1"}, "DECAY"),
                           ({"weight_average": "ema"}, "DECAY"), ({"weight_average": "swa:0"}, "EPOCHS"),
                           ({"weight_average": "swa:1.5"}, "EPOCHS"), ({"weight_average": "gpa:3:0"}, "STD"),
                           ({"weight_average": "polyak"}, "none, ema"),
                           ({"weight_average": "swa:9", "epochs": 3}, "more epochs")):
        with pytest.raises(ValueError, match=match):
            build_method("convpass", **options)
    assert build_method("lora", weight_average="gpa:15:1").config.weight_average == "gpa:15:1"


def test_anchored_task_refuses_bad_weights(world):
    _, classifier = _classifier(world)
    for weight in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite and >= 0"):
            AnchoredClassifierTask(classifier, _images(world), 3, world.backbone.model.visual, anchor_logits=weight)


# ----------------------------------------------------------------------------- anchors
class _Counting(nn.Module):
    """The frozen encoder, counting its forwards."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(images)


def test_zero_weights_train_bit_identically_with_no_frozen_forward(world):
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=4, seed=1)
    _, plain = _classifier(world)
    Trainer.classifier(plain, _images(world), 3, cfg, CPU, log=lambda *_: None).fit()
    _, anchored = _classifier(world)
    frozen = _Counting(world.backbone.model.visual)
    task = AnchoredClassifierTask(anchored, _images(world), 3, frozen, anchor_logits=0.0, anchor_features=0.0)
    history = Trainer(task, cfg, CPU, log=lambda *_: None).fit()
    a, b = _trainables(plain), _trainables(anchored)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert frozen.calls == 0
    assert not any(k.startswith("anchor") for k in history[-1])


def _logit_drift(world, weight: float, features: float = 0.0) -> tuple[float, float, list[dict]]:
    """(max |logits − zero-shot logits|, max |zero-shot logits|, history) after 8 epochs × 3 steps of AdamW at
    lr 3e-3 (Adam's first step follows the cross-entropy alone — the KL's gradient is 0 at zero-shot — so even
    a huge anchor leaves an lr-sized wobble around zero-shot, which the later steps damp)."""
    _, classifier = _classifier(world)
    task = AnchoredClassifierTask(classifier, _images(world), 3, world.backbone.model.visual,
                                  anchor_logits=weight, anchor_features=features)
    probe = torch.cat([images for images, _ in _images(world, seed=5)(None)])
    _, zero_shot = task.zero_shot(probe)
    history = Trainer(task, TrainConfig(epochs=8, lr=3e-3, batch_size=4, seed=1), CPU, log=lambda *_: None).fit()
    with torch.no_grad():
        classifier.eval()
        logits = classifier(probe)
    return float((logits - zero_shot).abs().max()), float(zero_shot.abs().max()), history


def test_a_large_logit_anchor_keeps_the_zero_shot_logits(world):
    free, scale, _ = _logit_drift(world, 0.0)
    held, _, history = _logit_drift(world, 1e4)
    assert free > 0.5 * scale  # plain training moves the logits measurably
    assert held < 0.05 * scale and held < 0.1 * free  # the anchored logits stay near zero-shot's
    assert all(record["anchor_logits_kl"] >= 0 for record in history)
    assert "anchor_features_l1" not in history[-1]


def test_anchor_terms_follow_promptsrc_and_are_recorded(world):
    """The batch's penalty is W_l·KL(zs‖adapted)·T²/numel (sum over batch and classes) + W_f·mean L1."""
    _, classifier = _classifier(world)
    frozen = world.backbone.model.visual
    task = AnchoredClassifierTask(classifier, _images(world), 3, frozen, anchor_logits=2.0, anchor_features=3.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move head and adapters away from zero-shot so both terms are non-zero
        for param in task.trainable().values():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    images, labels = _images(world)(None)[0]
    out = task.loss((images, labels), classifier)
    with torch.no_grad():
        zs_features = F.normalize(frozen(images).float(), dim=-1)
        zs_logits = classifier.logit_scale * F.linear(zs_features, *task.head0)
        logits = classifier(images)
        features = classifier.features(images)
        p_zs = zs_logits.softmax(dim=1)
        kl = (p_zs * (p_zs.log() - logits.log_softmax(dim=1))).sum() / logits.numel()
        l1 = (features - zs_features).abs().mean()
    assert kl > 0 and l1 > 0
    assert_close_scaled(out.penalty.detach(), 2.0 * kl + 3.0 * l1, scale=2.0 * kl + 3.0 * l1)
    assert_close_scaled(out.total.detach(), F.cross_entropy(logits, labels, reduction="sum"))


def test_method_fit_records_anchor_terms_and_settings(world, tmp_path):
    method = build_method("convpass", epochs=2, batch_size=4, lr=1e-2, scales=[1.0], anchor_logits=1.0,
                          anchor_features=1.0, weight_average="ema:0.9")
    result = method.fit(dataclasses.replace(world.ctx, output_dir=tmp_path))
    history = result["runs"][0]["history"]
    assert all("anchor_logits_kl" in r and "anchor_features_l1" in r for r in history)
    meta = read_metadata(tmp_path / "adapter.safetensors")
    assert meta["training"] == {"anchor_logits": 1.0, "anchor_features": 1.0, "weight_average": "ema:0.9"}
    summary = method.summary()
    assert summary["weight_average"] == "ema:0.9" and summary["train"]["anchor_logits"] == 1.0


# ----------------------------------------------------------------------------- weight averaging
class _Linear(LinearTask):
    """LinearTask that records the weights after every step and validation."""

    def __init__(self, validate: bool = False) -> None:
        super().__init__(fixed_batches(2))
        self.steps: list[dict[str, torch.Tensor]] = []
        self.validated: list[dict[str, torch.Tensor]] = []
        self._validate = validate

    def after_step(self) -> None:
        self.steps.append({n: p.detach().clone() for n, p in self.model.named_parameters()})

    def validate(self):
        if not self._validate:
            return None
        self.validated.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return -float(len(self.validated))  # the first validated epoch stays the best


def _fit(spec: str, epochs: int = 4, validate: bool = False, run_dir=None) -> tuple[_Linear, Trainer]:
    task = _Linear(validate)
    trainer = Trainer(task, TrainConfig(epochs=epochs, lr=0.1, weight_average=spec), CPU, run_dir, log=lambda *_: None)
    trainer.fit()
    return task, trainer


def _expected(weights: list[float], tensors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: sum(w * t[n].double() for w, t in zip(weights, tensors)) for n in tensors[0]}


def _assert_model_is(task: _Linear, expected: dict[str, torch.Tensor]) -> None:
    for name, param in task.model.named_parameters():
        assert_close_scaled(param.detach(), expected[name], scale=max(t.abs().max() for t in expected.values()))


def test_no_averaging_leaves_the_trained_weights():
    task, trainer = _fit("none")
    assert trainer.averager is None
    assert all(torch.equal(p, task.steps[-1][n]) for n, p in task.model.named_parameters())


def test_ema_averages_every_step():
    task, _ = _fit("ema:0.8")
    steps = len(task.steps)
    weights = [0.8 ** (steps - 1)] + [0.2 * 0.8 ** (steps - 1 - i) for i in range(1, steps)]
    _expected_tensors = _expected(weights, task.steps)
    _assert_model_is(task, _expected_tensors)
    assert not torch.equal(task.model.weight, task.steps[-1]["weight"])


def test_swa_averages_the_last_epochs_uniformly():
    task, _ = _fit("swa:2", epochs=4)
    per_epoch = task.steps[1::2]  # two steps per epoch: the weights at the ends of epochs 1..4
    _assert_model_is(task, _expected([0.0, 0.0, 0.5, 0.5], per_epoch))


def test_gpa_uses_promptsrcs_gaussian_over_epochs():
    epochs = 4
    task, trainer = _fit("gpa", epochs=epochs)
    gauss = [math.exp(-0.5 * ((e - GPA_MEAN) / GPA_STD) ** 2) for e in range(1, epochs + 1)]
    weights = [g / sum(gauss) for g in gauss]
    assert trainer.averager.weights == pytest.approx(weights)
    _assert_model_is(task, _expected(weights, task.steps[1::2]))
    narrow = make_averager("gpa:2:0.5", epochs)
    assert max(narrow.weights) == narrow.weights[1] and sum(narrow.weights) == pytest.approx(1.0)


def test_validation_scores_and_keeps_the_averaged_weights():
    task, trainer = _fit("ema:0.5", epochs=3, validate=True)
    live_after_epoch_1 = task.steps[1]
    assert not torch.equal(task.validated[0]["weight"], live_after_epoch_1["weight"])  # the average was scored
    picked = trainer.restore_best()
    assert picked["epoch"] == 1
    assert all(torch.equal(p, task.validated[0][n]) for n, p in task.model.named_parameters())


@pytest.mark.parametrize("options", [{"weight_average": "ema:0.7"}, {"weight_average": "swa:2"},
                                     {"weight_average": "gpa:2:1", "anchor_logits": 1.0, "anchor_features": 1.0}],
                         ids=["ema", "swa", "gpa+anchors"])
def test_killed_run_resumes_to_bit_identical_averaged_weights(world, tmp_path, options):
    options = {"epochs": 3, "batch_size": 4, "lr": 1e-2, "scales": [1.0], **options}
    ctx = dataclasses.replace(world.ctx, val=[])  # no validation pick: the run keeps the last epoch's average
    straight = build_method("convpass", **options)
    straight.fit(dataclasses.replace(ctx, output_dir=tmp_path / "straight"))
    out = tmp_path / "killed"
    with stopped_after_saving(2), pytest.raises(Killed):
        build_method("convpass", **options).fit(dataclasses.replace(ctx, output_dir=out))
    assert torch.load(out / STATE_FILE, weights_only=True)["averager"] is not None
    torch.manual_seed(12345)
    resumed = build_method("convpass", **options)
    resumed.fit(dataclasses.replace(ctx, output_dir=out, resume=True))
    a, b = straight.interpolation_endpoints()[1], resumed.interpolation_endpoints()[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw = torch.load(out / STATE_FILE, weights_only=True)["trainable"]
    assert any(not torch.equal(raw[k], b[k]) for k in b)  # what was kept is the average, not the last weights
