"""Zero-shot-anchored training options of the adapter methods: a frozen text head, a head learning-rate
multiplier (AdamW param groups) and L2-SP toward the initialization; defaults leave training unchanged."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from baseline_world import make_world
from tolerance import assert_close_scaled
from torch import nn

from clipconv.methods import build_method
from clipconv.training import TrainConfig, Trainer

CPU = torch.device("cpu")


def _batches(seed: int = 0, count: int = 4, size: int = 8, dim: int = 8, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    data = [(torch.randn(size, dim, generator=generator), torch.randint(0, classes, (size,), generator=generator))
            for _ in range(count)]
    return lambda g: data


def _linear(seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(8, 3)


def _drift(model: nn.Module, start: list[torch.Tensor]) -> float:
    return max(float((p.detach() - s).abs().max()) for p, s in zip(model.parameters(), start))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_world(tmp_path_factory.mktemp("anchored"), tiny_config)


# ----------------------------------------------------------------------------- options
def test_defaults_are_the_papers_and_options_validate():
    cfg = build_method("convpass").config
    assert (cfg.head, cfg.head_lr_scale, cfg.l2sp) == ("train", 1.0, 0.0)
    helps = type(cfg).help()
    assert "Li, Grandvalet" in helps["l2sp"] and "LP-FT" in helps["head"]
    for options, match in (({"head": "linear"}, "head"), ({"head_lr_scale": 0}, "positive"),
                           ({"l2sp": -1.0}, "zero or more"), ({"head": "frozen", "head_lr_scale": 5}, "head_lr_scale")):
        with pytest.raises(ValueError, match=match):
            build_method("convpass", **options)


# ----------------------------------------------------------------------------- head learning rate
def test_head_lr_scale_makes_a_head_param_group(world):
    method = build_method("convpass", head_lr_scale=0.1, lr=1e-3)
    classifier = method.build(world.ctx)
    cfg = method.config.train_config(world.ctx)
    trainer = Trainer.classifier(classifier, _batches(), 1, cfg, CPU, log=lambda *_: None)
    groups = trainer.optimizer.param_groups
    head_ids = {id(p) for p in classifier.head.parameters()}
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in groups}
    low, high = sorted(by_lr)
    assert (low, high) == (pytest.approx(1e-4), 1e-3)
    assert by_lr[low] == head_ids
    assert by_lr[high] == {id(p) for p in classifier.parameters() if p.requires_grad} - head_ids
    # the default: one group at the base lr (the paper's optimizer)
    default = build_method("convpass", lr=1e-3)
    plain = Trainer.classifier(default.build(world.ctx), _batches(), 1, default.config.train_config(world.ctx), CPU)
    assert [g["lr"] for g in plain.optimizer.param_groups] == [1e-3]


def test_param_groups_at_scale_one_train_bit_identically():
    """The grouped optimizer path itself changes nothing: groups at multiplier 1 = one group."""
    results = []
    for lr_scales in ((), (("bias", 1.0),)):
        model = _linear()
        Trainer.classifier(model, _batches(), 4, TrainConfig(epochs=2, lr=1e-2, lr_scales=lr_scales), CPU,
                log=lambda *_: None).fit()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_head_lr_scale_slows_the_head_only():
    """With lr_scales on 'bias' the bias moves exactly as AdamW at the scaled lr would move it."""
    lr = 1e-2
    model = _linear()
    start = [p.detach().clone() for p in model.parameters()]
    Trainer.classifier(model, _batches(count=1), 1, TrainConfig(epochs=1, lr=lr, lr_scales=(("bias", 0.1),)), CPU,
            log=lambda *_: None).fit()
    # one AdamW step moves every element by lr·sign(grad) (bias-corrected first step), times the multiplier
    assert_close_scaled((model.bias.detach() - start[1]).abs(), torch.full_like(start[1], 0.1 * lr), ulps=4096)
    assert_close_scaled((model.weight.detach() - start[0]).abs(), torch.full_like(start[0], lr), ulps=4096)


# ----------------------------------------------------------------------------- L2-SP
def test_l2sp_objective_adds_half_weight_times_squared_distance():
    model = _linear()
    start = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer.classifier(model, _batches(), 1, TrainConfig(l2sp=0.3), CPU)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    images, labels = _batches()(None)[0]
    logits = model(images)
    squared = sum(float(((p.detach().double() - s.double()) ** 2).sum()) for p, s in zip(model.parameters(), start))
    expected = float(F.cross_entropy(logits.detach().double(), labels)) + 0.15 * squared
    got = float(trainer.task.objective(logits, labels).detach())
    assert squared > 0 and abs(got - expected) <= 256 * torch.finfo(torch.float32).eps * abs(expected)
    # gradient of the penalty: a·(θ − θ₀) on top of cross-entropy's
    model.zero_grad()
    trainer.task.objective(model(images), labels).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    for param, start_value, grad in zip(model.parameters(), start, grads):
        assert_close_scaled(grad - param.grad, 0.3 * (param.detach() - start_value), scale=grad)


def test_l2sp_training_matches_a_hand_written_loop():
    """Two AdamW steps on CE + a/2·||θ − θ₀||² written out by hand give the Trainer's weights and loss."""
    a, lr = 5.0, 1e-1
    model, reference = _linear(), _linear()
    trainer = Trainer.classifier(model, _batches(count=2), 2, TrainConfig(epochs=1, lr=lr, l2sp=a), CPU, log=lambda *_: None)
    trainer.fit()
    start = [p.detach().clone() for p in reference.parameters()]
    optimizer = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / 2)))
    losses = []
    for images, labels in _batches(count=2)(None):
        penalty = sum(((p - s) ** 2).sum() for p, s in zip(reference.parameters(), start))
        loss = F.cross_entropy(reference(images), labels) + 0.5 * a * penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert_close_scaled(ours, theirs)
    assert trainer.history[0]["loss"] == pytest.approx(sum(losses) / 2, rel=256 * torch.finfo(torch.float32).eps)


def test_l2sp_at_huge_weight_keeps_the_weights_at_the_start():
    """'L2-SP at infinite weight keeps θ = θ₀': with AdamW every step is at most ~lr, so the weights stay
    within one step of θ₀ (plain training drifts far beyond); larger weights pull closer."""
    lr = 1e-2
    drift = {}
    for a in (0.0, 1e2, 1e8):
        model = _linear()
        start = [p.detach().clone() for p in model.parameters()]
        Trainer.classifier(model, _batches(), 4, TrainConfig(epochs=10, lr=lr, l2sp=a), CPU, log=lambda *_: None).fit()
        drift[a] = _drift(model, start)
    assert drift[0.0] > 10 * lr  # plain training leaves θ₀ (the test can fail)
    assert drift[1e8] <= lr and drift[1e8] < drift[1e2] < drift[0.0]


def test_adapter_tuning_with_huge_l2sp_stays_at_zero_shot(world):
    lr = 1e-2
    plain = build_method("convpass", epochs=1, batch_size=4, lr=lr, scales=[1.0])
    plain.fit(world.ctx)
    anchored = build_method("convpass", epochs=1, batch_size=4, lr=lr, scales=[1.0], l2sp=1e8)
    anchored.fit(world.ctx)
    for method, moved in ((plain, True), (anchored, False)):
        theta0, theta1 = method.interpolation_endpoints()
        drift = max(float((theta1[n] - theta0[n]).abs().max()) for n in theta0)
        assert (drift > 2 * lr) if moved else (drift <= lr), (method.config.l2sp, drift)


# ----------------------------------------------------------------------------- frozen head
def test_frozen_head_gets_no_gradient_and_stays_the_text_head_while_adapters_train(world):
    method = build_method("convpass", epochs=1, batch_size=4, lr=1e-2, scales=[1.0], head="frozen")
    classifier = method.build(world.ctx)
    head_before = {n: p.detach().clone() for n, p in classifier.head.named_parameters()}
    adapters_before = {n: p.detach().clone() for n, p in classifier.named_parameters()
                       if p.requires_grad and not n.startswith("head.")}
    method.fit(world.ctx)
    for name, param in classifier.head.named_parameters():
        assert param.grad is None, f"head.{name} received a gradient"
        assert torch.equal(param.detach(), head_before[name]), f"head.{name} changed"
    moved = [n for n, p in classifier.named_parameters() if n in adapters_before
             and not torch.equal(p.detach(), adapters_before[n])]
    assert any(".up." in n for n in moved)
    assert all(p.requires_grad for p in classifier.head.parameters())  # saved with the checkpoint again


def test_trained_head_moves_by_default(world):
    method = build_method("convpass", epochs=1, batch_size=4, lr=1e-2, scales=[1.0])
    classifier = method.build(world.ctx)
    before = classifier.head.weight.detach().clone()
    method.fit(world.ctx)
    assert not torch.equal(classifier.head.weight.detach(), before)


def test_l2sp_resume_is_bit_identical_and_anchors_at_the_start_not_the_checkpoint(tmp_path):
    cfg = TrainConfig(epochs=3, lr=1e-1, l2sp=2.0)
    straight = _linear()
    Trainer.classifier(straight, _batches(), 4, cfg, CPU, log=lambda *_: None).fit()
    first = _linear()
    interrupted = Trainer.classifier(first, _batches(), 4, cfg, CPU, tmp_path, log=lambda *_: None)
    interrupted.history.append(interrupted.train_epoch())
    interrupted.save_state()
    resumed_model = _linear()  # rebuilt at θ₀, as AdapterTuning does before loading the state
    resumed = Trainer.classifier(resumed_model, _batches(), 4, cfg, CPU, tmp_path, log=lambda *_: None)
    resumed.load_state(tmp_path / "train_state.pt")
    resumed.fit()
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed_model.parameters()))


def test_frozen_head_checkpoint_reloads_to_the_same_logits(world, tmp_path):
    from clipconv.methods.finetune import load_classifier

    method = build_method("convpass", epochs=1, batch_size=4, lr=1e-2, scales=[1.0], head="frozen")
    ctx = world.ctx
    original = ctx.output_dir
    try:
        ctx.output_dir = tmp_path
        method.fit(ctx)
    finally:
        ctx.output_dir = original
    reloaded, _ = load_classifier(tmp_path / "adapter.safetensors", world.backbone)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(images), method.classifier(images))
