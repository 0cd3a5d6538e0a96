"""The contract every registered adapter kind keeps (parametrized over the registry: a new kind is checked
at once): zero-init identity, gradients only in its own weights, exact checkpoint round trip, the backbone
untouched by training, exact trainable counts on ViT-B/16, clean removal."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from torch import nn

from clipconv.adapters import ADAPTERS, adapter_modules, add_adapters, count_trainable, remove_adapters
from clipconv.checkpoint import load_trainable, save_trainable, trainable_state_dict
from clipconv.head import ImageClassifier

KINDS = sorted(ADAPTERS)
# Trainable parameters on ViT-B/16 (12 layers, width 768): DESIGN.md's formulas, with the options given.
VIT_B16_COUNTS = {
    "convpass": ({"dim": 8}, 327_552),  # 2L((2h+1)d + 9h² + 2h)
    "convpass_attn": ({"dim": 8}, 163_776),  # half of that
    "convpass_share": ({"dim": 32}, 56_064),  # 2dh + 2L·9h
    "adaptformer": ({}, 1_189_632),  # L(2dh + h + d), h = 64 beside the MLP
    "adapter": ({}, 156_768),  # Pfeiffer: L(2dh + h + d), h = 8 after the MLP
    "lora": ({}, 294_912),  # L · 2 targets (q, v) · r(d + d), r = 8
    "dora": ({}, 313_344),  # LoRA's + one magnitude per adapted row: L · 2 targets · d
    "bitfit": ({}, 102_912),  # L(7d + 4d) + 2d: ln_1, in_proj (3d), out_proj, ln_2, c_fc (4d), c_proj; ln_pre, ln_post
    "vpt_deep": ({}, 92_160),  # L · P · d, P = 10
}


def _tol(*tensors: torch.Tensor) -> float:
    return 256 * torch.finfo(torch.float32).eps * max(float(t.abs().max()) for t in tensors)


def _images(visual: nn.Module, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *visual.image_size, generator=torch.Generator().manual_seed(seed))


def _randomize(modules: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in modules.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.fixture()
def visual(tiny_backbone) -> nn.Module:
    return tiny_backbone.visual.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapters_are_the_identity(visual, kind):
    """Every kind equals the plain encoder at init, except those registered with identity_at_init=False
    (VPT: prompts take attention mass), which must then really differ — the flag stays truthful."""
    images = _images(visual)
    with torch.no_grad():
        before = visual(images)
        add_adapters(visual, kind)
        after = visual(images)
    if ADAPTERS[kind].identity_at_init:
        assert float((after - before).abs().max()) <= _tol(before)
    else:
        assert float((after - before).abs().max()) > 1e3 * _tol(before)


def test_only_vpt_is_exempt_from_identity_at_init():
    assert sorted(k for k in KINDS if not ADAPTERS[k].identity_at_init) == ["vpt_deep"]


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_kinds_own_weights_get_gradients(visual, kind):
    modules = add_adapters(visual, kind)
    _randomize(modules)
    own = {id(p) for p in modules.parameters()}
    assert own and {id(p) for p in visual.parameters() if p.requires_grad} == own
    visual(_images(visual)).square().sum().backward()
    for name, param in visual.named_parameters():
        if id(param) in own:
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
        else:
            assert param.grad is None, f"backbone tensor {name} got a gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_reproduces_logits_exactly(tmp_path, tiny_backbone, kind):
    plain = copy.deepcopy(tiny_backbone.visual)

    def classifier(seed: int) -> ImageClassifier:
        visual = copy.deepcopy(plain)
        for param in visual.parameters():
            param.requires_grad_(False)
        torch.manual_seed(seed)
        add_adapters(visual, kind, **({"scale": 0.5} if ADAPTERS[kind].config.scaled else {}))
        head = nn.Linear(visual.output_dim, 4)
        return ImageClassifier(visual, head, 100.0).eval()

    trained = classifier(seed=1)
    _randomize(adapter_modules(trained.visual), seed=3)
    _randomize(trained.head, seed=4)
    images = _images(plain)
    with torch.no_grad():
        expected = trained(images)
    path = save_trainable(trained, tmp_path / "adapter.safetensors", {"adapter": {"kind": kind}})
    assert set(trainable_state_dict(trained)) == {n for n, p in trained.named_parameters() if p.requires_grad}
    fresh = classifier(seed=2)
    with torch.no_grad():
        assert not torch.equal(fresh(images), expected)
        load_trainable(fresh, path, expected={"adapter": {"kind": kind}})
        assert torch.equal(fresh(images), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_a_training_step_leaves_the_backbone_bit_identical(visual, kind):
    state = {name: tensor.clone() for name, tensor in visual.state_dict().items()}
    modules = add_adapters(visual, kind)
    own = {id(p) for p in modules.parameters()}
    own_names = {name for name, p in visual.named_parameters() if id(p) in own}  # bitfit trains backbone biases
    frozen = {name: tensor for name, tensor in state.items() if name not in own_names}
    assert len(frozen) > len(state) // 2
    _randomize(modules)
    before = [p.detach().clone() for p in modules.parameters()]
    visual.train()
    optimizer = torch.optim.AdamW([p for p in visual.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    visual(_images(visual)).square().mean().backward()
    optimizer.step()
    after = visual.state_dict()
    for name, tensor in frozen.items():
        assert torch.equal(after[name], tensor), f"backbone tensor {name} changed"
    assert all(not torch.equal(p, b) for p, b in zip(modules.parameters(), before))


@pytest.mark.parametrize("kind", KINDS)
def test_removal_restores_the_plain_encoder(visual, kind):
    keys = set(visual.state_dict())
    images = _images(visual)
    with torch.no_grad():
        before = visual(images)
        _randomize(add_adapters(visual, kind))
        remove_adapters(visual)
        assert torch.equal(visual(images), before)
    assert set(visual.state_dict()) == keys


@pytest.fixture(scope="module")
def vit_b16() -> nn.Module:
    """The ViT-B/16 image encoder, random init (parameter counts only)."""
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None).visual


@pytest.mark.parametrize("kind", KINDS)
def test_exact_trainable_count_on_vit_b16(vit_b16, kind):
    assert kind in VIT_B16_COUNTS, f"add the ViT-B/16 trainable count of adapter kind '{kind}' to VIT_B16_COUNTS"
    options, expected = VIT_B16_COUNTS[kind]
    assert (len(vit_b16.transformer.resblocks), vit_b16.transformer.width) == (12, 768)
    try:
        modules = add_adapters(vit_b16, kind, **options)
        assert count_trainable(vit_b16) == expected
        assert count_trainable(modules) == expected
    finally:
        remove_adapters(vit_b16)


def test_vit_b16_bitfit_and_vpt_formulas(vit_b16):
    layers, width = 12, 768
    mlp = int(vit_b16.transformer.resblocks[0].mlp.c_fc.out_features)
    assert mlp == 4 * width
    assert layers * (7 * width + mlp) + 2 * width == VIT_B16_COUNTS["bitfit"][1]
    assert layers * 10 * width == VIT_B16_COUNTS["vpt_deep"][1]


def test_vit_b16_mlp_only_count_and_the_convpass_formula(vit_b16):
    layers, width, dim = 12, 768, 8
    formula = 2 * layers * ((2 * dim + 1) * width + 9 * dim * dim + 2 * dim)
    assert formula == VIT_B16_COUNTS["convpass"][1]
    try:
        add_adapters(vit_b16, "convpass", dim=dim, placement="mlp")
        assert count_trainable(vit_b16) == formula // 2
    finally:
        remove_adapters(vit_b16)
