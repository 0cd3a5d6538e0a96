"""CLIP-LoRA as a method: the reference recipe's numbers, zero-shot at initialization (and at α = 0),
gradients into the text encoder's LoRA, a short fit, and the merged plain model."""
from __future__ import annotations

import pytest
import torch
from baseline_world import make_world

from clipconv.adapters import AdaptedModule
from clipconv.app.session import backbone_fingerprint
from clipconv.methods.base import build_method
from clipconv.methods.clip_lora import ClipLoRAConfig, cosine_lr
from clipconv.params import reference_spec


def _tol(*tensors: torch.Tensor) -> float:
    return 256 * torch.finfo(torch.float32).eps * max(float(t.abs().max()) for t in tensors)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_world(tmp_path_factory.mktemp("clip_lora"), tiny_config, shots=2, val_shots=1, classes=3)


def _images(world, count: int = 4) -> torch.Tensor:
    from PIL import Image

    return torch.stack([world.backbone.eval_transform(Image.open(world.root / path).convert("RGB"))
                        for path, _ in world.test_samples[:count]])


def _zero_shot_logits(world, images):
    zero_shot = build_method("zero_shot")
    zero_shot.fit(world.ctx)
    with torch.no_grad():
        return zero_shot.logits_from_features(world.backbone.model.encode_image(images))


def test_defaults_are_the_reference_recipe():
    cfg = ClipLoRAConfig()
    assert (cfg.encoder, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout) == ("both", ("q", "k", "v"), 2, 1.0, 0.25)
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.min_lr, cfg.batch_size) == (2e-4, (0.9, 0.999), 1e-2, 1e-6, 32)
    assert cfg.total_iterations(16) == 8000 and cfg.total_iterations(1) == 500


def test_schedule_is_torchs_cosine_annealing_to_the_reference_floor():
    total, param = 8000, torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=1e-6)
    for step in range(total):
        if step in (0, 1, 2000, 4000, 7999):
            assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine_lr(step, total, 2e-4, 1e-6), rel=1e-9)
        optimizer.step()
        scheduler.step()
    assert cosine_lr(total, total, 2e-4, 1e-6) == pytest.approx(1e-6)
    assert cosine_lr(total // 2, total, 2e-4, 1e-6) == pytest.approx((2e-4 + 1e-6) / 2)


def test_vit_b16_count_is_lora_on_qkv_of_both_encoders():
    vision, text, layers, r = 768, 512, 12, 2
    expected = layers * 3 * r * (vision + vision) + layers * 3 * r * (text + text)
    assert build_method("clip_lora").trainable_count(reference_spec(16)) == expected == 184_320


def test_fresh_method_equals_zero_shot_a_photo_of_a(world):
    images = _images(world)
    expected = _zero_shot_logits(world, images)
    method = build_method("clip_lora")
    method.build(world.ctx)
    assert method._prompts == ["a photo of a {}."]
    # the LoRA attention runs through torch.func.functional_call, the plain one through nn.MultiheadAttention's
    # own kernel: the same math, rounded in another order on some CPUs
    logits = method.logits(images)
    assert float((logits - expected).abs().max()) <= _tol(expected)


def test_both_encoders_lora_receive_gradients(world):
    method = build_method("clip_lora")
    model = method.build(world.ctx)
    model.train()
    images = _images(world)
    labels = torch.tensor([label for _, label in world.test_samples[:4]])
    text = method.train_class_weights()
    assert float((text.detach() - method.class_weights()).abs().max()) <= _tol(text.detach())
    logits = method.logit_scale * torch.nn.functional.normalize(model.encode_image(images), dim=-1) @ text.t()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    named = method.named_trainable()
    text_b = [p for n, p in named.items() if n.startswith("transformer.") and ".B." in n]
    vision_b = [p for n, p in named.items() if n.startswith("visual.") and ".B." in n]
    assert text_b and vision_b
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in text_b + vision_b)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen


def test_short_fit_runs_and_alpha_zero_is_zero_shot(world):
    images = _images(world)
    expected = _zero_shot_logits(world, images)
    before = backbone_fingerprint(world.backbone.model)
    method = build_method("clip_lora", iters_per_shot=2, batch_size=4, lr=1e-2)
    summary = method.fit(world.ctx)
    assert summary["iterations"] == 2 * 2  # iters_per_shot × K (K = 2 shots)
    assert backbone_fingerprint(world.backbone.model) == before
    trained = method.logits(images)
    assert torch.isfinite(trained).all() and not torch.equal(trained, expected)
    theta0, theta1 = method.interpolation_endpoints()
    assert any(not torch.equal(theta0[n], theta1[n]) for n in theta0)
    method.load_interpolated(theta0)
    assert float((method.logits(images) - expected).abs().max()) <= _tol(expected)


def test_merged_model_equals_the_adapted_one_without_adapter_code(world):
    method = build_method("clip_lora")
    method.build(world.ctx)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in method.named_trainable().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    method._refresh_weights()
    images = _images(world)
    merged = method.merged_model()
    assert not any(isinstance(m, AdaptedModule) for m in merged.modules())
    assert set(merged.state_dict()) == set(world.backbone.model.state_dict())
    with torch.no_grad():
        adapted_image, merged_image = method.model.encode_image(images), merged.encode_image(images)
        tokens = world.backbone.tokenizer(["a photo of a cat."])
        adapted_text, merged_text = method.model.encode_text(tokens), merged.encode_text(tokens)
    assert not torch.allclose(adapted_image, world.backbone.model.encode_image(images))
    assert float((merged_image - adapted_image).abs().max()) <= _tol(adapted_image)
    assert float((merged_text - adapted_text).abs().max()) <= _tol(adapted_text)


def test_bad_options_are_refused():
    for options, message in (({"encoder": "audio"}, "encoder"), ({"dropout": 1.0}, "dropout"),
                             ({"rank": 0}, "rank"), ({"betas": (0.9,)}, "betas"), ({"iters_per_shot": 0}, "iters")):
        with pytest.raises(ValueError, match=message):
            build_method("clip_lora", **options)
    with pytest.raises(ValueError, match="targets"):
        build_method("clip_lora", targets=("q", "x")).trainable_count(reference_spec(1))
