"""CoOp / CoCoOp: only the context (+ meta-net) learn, the text tower stays bit-identical, steps help."""
from __future__ import annotations

import pytest
import torch

from baseline_world import make_world
from clipconv.methods import build_method
from clipconv.methods.prompt_learner import FrozenTextEncoder, PromptLearner, frozen_parameters, warmup_cosine_lr

TINY = dict(epochs=1, views=1, batch_size=4)


@pytest.fixture()
def world(tmp_path, tiny_config):
    return make_world(tmp_path, tiny_config)


def _snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _batch(world):
    return world.store.encode(world.root, world.ctx.train, with_labels=True)


def test_phrase_prompts_reproduce_encode_text(world):
    model, tokenizer = world.backbone.model, world.backbone.tokenizer
    learner = PromptLearner(model, tokenizer, world.ctx.classnames, init_phrase="a photo of a")
    assert learner.n_ctx == 4 and learner.ctx.shape == (4, model.token_embedding.weight.shape[1])
    with torch.no_grad():
        ours = FrozenTextEncoder(model)(learner(), learner.tokens)
        reference = model.encode_text(tokenizer([f"a photo of a {name}." for name in world.ctx.classnames]))
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=1e-5)


def test_text_encoder_is_not_a_submodule(world):
    encoder = FrozenTextEncoder(world.backbone.model)
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}


@pytest.mark.parametrize("name, options, trainable", [
    ("coop", dict(n_ctx=4), {"ctx"}),
    ("coop", dict(n_ctx=4, class_specific=True), {"ctx"}),
    ("cocoop", dict(), {"ctx", "meta.linear1.weight", "meta.linear1.bias", "meta.linear2.weight", "meta.linear2.bias"}),
])
def test_only_context_and_meta_net_get_gradients(world, name, options, trainable):
    method = build_method(name, **options, **TINY)
    method.setup(world.ctx)
    feats, labels = _batch(world)
    model = world.backbone.model
    with frozen_parameters(model):
        method.loss(feats[:4], labels[:4]).backward()
    assert all(p.grad is None for p in model.parameters())
    named = {"ctx": method.learner.ctx}
    if name == "cocoop":
        named.update({f"meta.{k}": v for k, v in method.meta_net.named_parameters()})
    assert set(named) == trainable
    assert [id(p) for p in method.trainable_parameters()] == [id(p) for p in named.values()]
    assert all(p.grad is not None for p in named.values())
    assert method.learner.ctx.grad.abs().sum() > 0
    if name == "cocoop":  # (the tiny meta-net's single hidden ReLU unit may be inactive: check the output bias)
        assert method.meta_net.linear2.bias.grad.abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the block


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_text_tower_bit_identical_after_fit(world, name):
    model = world.backbone.model
    before = _snapshot(model)
    method = build_method(name, **({"n_ctx": 4} if name == "coop" else {}), **TINY)
    summary = method.fit(world.ctx)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(p.grad is None for p in model.parameters())
    assert summary["epochs"] == 1 and "val_top1" in summary
    logits = method.logits_from_features(world.store.encode(world.root, world.test_samples))
    assert logits.shape == (len(world.test_samples), len(world.ctx.classnames))


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_a_training_step_lowers_the_loss(world, name):
    method = build_method(name, **({"n_ctx": 4} if name == "coop" else {}), **TINY)
    method.setup(world.ctx)
    feats, labels = _batch(world)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05)
    with frozen_parameters(world.backbone.model):
        first = method.loss(feats, labels)
        first.backward()
        optimizer.step()
        with torch.no_grad():
            second = method.loss(feats, labels)
    assert second < first


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_class_chunks_change_nothing(world, name):
    base = {"n_ctx": 4} if name == "coop" else {}
    whole, chunked = build_method(name, **base, **TINY), build_method(name, **base, class_chunk=3, **TINY)
    whole.setup(world.ctx)
    chunked.setup(world.ctx)  # same seed → same initial context and meta-net
    feats, labels = _batch(world)
    with frozen_parameters(world.backbone.model):
        a, b = whole.loss(feats, labels), chunked.loss(feats, labels)
        a.backward()
        b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(whole.learner.ctx.grad, chunked.learner.ctx.grad, rtol=1e-4, atol=1e-6)


def test_cocoop_scoring_in_image_chunks_matches(world):
    method = build_method("cocoop", eval_batch=3, **TINY)
    method.fit(world.ctx)
    feats = world.store.encode(world.root, world.test_samples)
    with torch.no_grad():
        direct = method.batch_logits(feats)
    torch.testing.assert_close(method.logits_from_features(feats), direct)


def test_schedule_is_warmup_then_cosine():
    assert warmup_cosine_lr(0, 0.002, 50) == 1e-5
    assert warmup_cosine_lr(1, 0.002, 50) == pytest.approx(0.001 * (1 + torch.cos(torch.tensor(torch.pi / 50)).item()))
    assert warmup_cosine_lr(25, 0.002, 50) == pytest.approx(0.001)


def test_bad_options_fail_clearly(world):
    with pytest.raises(ValueError, match="n_ctx"):
        build_method("coop", n_ctx=16).setup(world.ctx)  # tiny text context holds 16 tokens in all
    with pytest.raises(ValueError, match="epochs"):
        build_method("coop", epochs=0)
    with pytest.raises(ValueError, match="class_chunk"):
        build_method("cocoop", class_chunk=0)
    with pytest.raises(RuntimeError, match="fitted"):
        build_method("coop").logits_from_features(torch.zeros(1, 16))
