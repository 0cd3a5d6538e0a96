"""CoOp / CoCoOp: only the context (+ meta-net) learn, the text tower stays bit-identical, steps help."""
from __future__ import annotations

import math

import pytest
import torch
from baseline_world import make_world
from tolerance import assert_close_scaled

from clipconv.methods import build_method
from clipconv.methods.cocoop import CoCoOpConfig
from clipconv.methods.coop import CoOp, CoOpConfig
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
    assert_close_scaled(ours, reference.float())


def test_phrase_length_counts_words_not_tokens(world):
    """CoOp sets n_ctx = len(phrase.split(" ")): "itap of a" is 3 words but 4 BPE tokens (it·ap·of·a). The
    context starts from the first 3 token embeddings; the 4th stays in the fixed part, so the initial
    prompts still encode "itap of a <name>." exactly."""
    model, tokenizer = world.backbone.model, world.backbone.tokenizer
    phrase_tokens = tokenizer.encode("itap of a")
    assert len(phrase_tokens) == 4  # the premise: words and tokens differ
    learner = PromptLearner(model, tokenizer, world.ctx.classnames, init_phrase="itap of a")
    assert learner.n_ctx == 3 and learner.ctx.shape[0] == 3
    with torch.no_grad():
        assert torch.equal(learner.ctx, model.token_embedding(torch.tensor(phrase_tokens[:3])).float())
        ours = FrozenTextEncoder(model)(learner(), learner.tokens)
        reference = model.encode_text(tokenizer([f"itap of a {name}." for name in world.ctx.classnames]))
    assert_close_scaled(ours, reference.float())
    assert PromptLearner(model, tokenizer, world.ctx.classnames, init_phrase="a_photo_of_a").n_ctx == 4
    method = build_method("coop", init_phrase="itap of a", **TINY)
    method.setup(world.ctx)
    assert method.summary()["n_ctx"] == 3


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
    assert_close_scaled(a, b)
    # chunking changes the summation order of the backward: a few hundred ulps of the largest gradient entry
    assert_close_scaled(whole.learner.ctx.grad, chunked.learner.ctx.grad)


def test_cocoop_scoring_in_image_chunks_matches(world):
    world.ctx.eval_batch_size = 3  # images per scoring chunk come from the fit context
    method = build_method("cocoop", **TINY)
    method.fit(world.ctx)
    assert method.eval_batch == 3
    feats = world.store.encode(world.root, world.test_samples)
    with torch.no_grad():
        direct = method.batch_logits(feats)
    assert_close_scaled(method.logits_from_features(feats), direct)


def _dassl_lr(epoch: int, base: float, epochs: int) -> float:
    """Dassl's constant warm-up (1 epoch at 1e-5), then cosine with the count restarted (WARMUP_RECOUNT)."""
    return 1e-5 if epoch == 0 else 0.5 * base * (1 + math.cos(math.pi * (epoch - 1) / epochs))


@pytest.mark.parametrize("name, epochs", [("coop", 50), ("cocoop", 10)])
def test_schedule_is_dassl_warmup_then_restarted_cosine(name, epochs):
    method = build_method(name)
    assert method.config.epochs == epochs and method.config.lr == 0.002
    lrs = [method.epoch_lr(e) for e in range(epochs)]
    expected = [_dassl_lr(e, 0.002, epochs) for e in range(epochs)]
    assert lrs == pytest.approx(expected, rel=4 * 2.0 ** -52)
    assert lrs[0] == 1e-5 and lrs[1] == 0.002  # the first epoch after warm-up runs at the base lr exactly
    half = epochs // 2 + 1  # cos(π/2): half the base lr
    assert lrs[half] == pytest.approx(0.001, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.001 * (1 + math.cos(math.pi * (epochs - 2) / epochs)), rel=1e-12)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))  # decreasing after the warm-up, never reaching 0


def test_schedule_without_recount_continues_the_count():
    assert warmup_cosine_lr(0, 0.002, 50, recount=False) == 1e-5
    assert warmup_cosine_lr(1, 0.002, 50, recount=False) == 0.5 * 0.002 * (1 + math.cos(math.pi / 50))
    assert warmup_cosine_lr(1, 0.002, 50) == 0.002
    assert warmup_cosine_lr(3, 0.002, 10, warmup_epochs=2) == 0.5 * 0.002 * (1 + math.cos(math.pi / 10))


def test_fit_trains_each_epoch_at_the_scheduled_lr(world):
    method = build_method("coop", n_ctx=4, epochs=3, views=1, batch_size=64)
    method.fit(world.ctx)
    assert [record["lr"] for record in method.history] == [1e-5, 0.002, 0.5 * 0.002 * (1 + math.cos(math.pi / 3))]


def test_options_are_config_dataclasses():
    method = CoOp(CoOpConfig(n_ctx=4, epochs=2))
    assert method.config.n_ctx == 4 and method.config.epochs == 2
    assert build_method("coop", n_ctx=4).config == CoOpConfig(n_ctx=4)
    assert build_method("cocoop").config == CoCoOpConfig() and CoCoOpConfig().init_phrase == "a photo of a"
    assert (CoCoOpConfig().n_ctx, CoCoOpConfig().batch_size, CoCoOpConfig().epochs) == (4, 1, 10)
    assert set(CoOpConfig.help()) == set(CoCoOpConfig.help()) and all(CoOpConfig.help().values())
    with pytest.raises(ValueError, match="unknown option.*eval_batch"):
        build_method("cocoop", eval_batch=3)  # scoring chunk size is FitContext.eval_batch_size now
    with pytest.raises(ValueError, match="not both"):
        CoOp(CoOpConfig(), n_ctx=3)


def test_bad_options_fail_clearly(world):
    with pytest.raises(ValueError, match="n_ctx"):
        build_method("coop", n_ctx=16).setup(world.ctx)  # tiny text context holds 16 tokens in all
    with pytest.raises(ValueError, match="epochs"):
        build_method("coop", epochs=0)
    with pytest.raises(ValueError, match="class_chunk"):
        build_method("cocoop", class_chunk=0)
    with pytest.raises(RuntimeError, match="fitted"):
        build_method("coop").logits_from_features(torch.zeros(1, 16))
