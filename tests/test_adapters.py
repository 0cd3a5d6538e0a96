"""Convpass and its injection into open_clip's image encoder (DESIGN invariants 1–3 and more)."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_config
from open_clip.transformer import ResidualAttentionBlock
from tolerance import assert_close_scaled
from torch import nn

from clipconv.adapters import (
    ADAPTERS, Convpass, ConvpassConfig, ParallelAdapter, PooledLastBlock, SequentialAdapter, SharedProjections,
    TokenLayout, adapter_modules, add_adapters, count_trainable, get_adapter, get_adapter_scale, register_adapter,
    remove_adapters, set_adapter_scale
)
from clipconv.checkpoint import trainable_state_dict

VARIANTS = [
    dict(kind="convpass"),
    dict(kind="convpass", placement="attn"),
    dict(kind="convpass", placement="mlp"),
    dict(kind="convpass_attn"),
    dict(kind="convpass", sequential=True),
    dict(kind="convpass", placement="mlp", sequential=True),
    dict(kind="convpass", kernel_size=1),
    dict(kind="convpass", conv_init="xavier"),
    dict(kind="convpass_share", dim=4),
]


def _ids(variant: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in variant.items())


def _images(visual: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = visual.image_size
    return torch.randn(batch, 3, size[0], size[1], generator=generator)


def _randomize(modules: nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (up-projections included), so adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in modules.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _expected_convpass(layers: int, width: int, dim: int, kernel: int = 3, placements: int = 2) -> int:
    return placements * layers * ((2 * dim + 1) * width + kernel * kernel * dim * dim + 2 * dim)


@pytest.fixture()
def visual(tiny_backbone) -> nn.Module:
    return tiny_backbone.visual.eval()


# ---------------------------------------------------------------- invariant 1: zero-init ⇒ identity
@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_fresh_adapters_leave_encoder_output_unchanged(visual, variant):
    images = _images(visual)
    with torch.no_grad():
        before = visual(images)
    add_adapters(visual, **variant)
    with torch.no_grad():
        after = visual(images)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- invariant 2: parameter counts
# (exact ViT-B/16 counts of every registered kind: tests/test_adapter_contract.py)
def test_remove_adapters_restores_plain_blocks(visual):
    keys = set(visual.state_dict())
    add_adapters(visual, "convpass_share", dim=4)
    remove_adapters(visual)
    assert set(visual.state_dict()) == keys
    assert all(type(b) is ResidualAttentionBlock for b in visual.transformer.resblocks)
    assert all(type(b.attn) is nn.MultiheadAttention and type(b.mlp) is nn.Sequential
               for b in visual.transformer.resblocks)
    assert count_trainable(visual) == 0


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("placement, placements", [("attn+mlp", 2), ("attn", 1), ("mlp", 1)])
def test_tiny_trainable_count_follows_formula(visual, kernel, placement, placements):
    layers, width = len(visual.transformer.resblocks), visual.transformer.width
    add_adapters(visual, "convpass", dim=6, kernel_size=kernel, placement=placement)
    assert count_trainable(visual) == _expected_convpass(layers, width, 6, kernel, placements)


@pytest.mark.parametrize("kernel", [1, 3])
def test_tiny_share_count_follows_formula(visual, kernel):
    layers, width, dim = len(visual.transformer.resblocks), visual.transformer.width, 4
    add_adapters(visual, "convpass_share", dim=dim, kernel_size=kernel)
    assert count_trainable(visual) == 2 * width * dim + 2 * layers * kernel * kernel * dim
    biases = [name for name, _ in adapter_modules(visual).named_parameters() if name.endswith("bias")]
    assert biases == []


def test_share_projections_are_one_object_registered_once(visual):
    modules = add_adapters(visual, "convpass_share", dim=4)
    shared = modules[0]
    assert isinstance(shared, SharedProjections)
    assert all(m.shared is shared for m in modules[1:])
    names = list(trainable_state_dict(visual))
    assert sum(".down.weight" in n for n in names) == 1
    assert all(m.conv.groups == 4 and m.conv.bias is None for m in modules[1:])


# ---------------------------------------------------------------- invariant 3: locality
def _dependency(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(N_out, N_in) bool: does output token n depend on input token m (Jacobian non-zero)?"""
    jacobian = torch.autograd.functional.jacobian(module, tokens)  # (1, N, d, 1, N, d)
    return jacobian[0, :, :, 0].abs().sum(dim=(1, 3)) > 0


def _expected_dependency(side: int, radius: int) -> torch.Tensor:
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    near = ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)
    expected = torch.zeros(1 + side * side, 1 + side * side, dtype=torch.bool)
    expected[0, 0] = True
    expected[1:, 1:] = near
    return expected


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("share", [False, True])
def test_convpass_is_local_on_the_patch_grid_and_cls_stays_apart(kernel, share):
    torch.manual_seed(0)
    width, dim, side = 8, 4, 5
    shared = SharedProjections(width, dim) if share else None
    adapter = Convpass(width, dim, kernel_size=kernel, share=shared).eval()
    _randomize(adapter, seed=kernel)
    if shared is not None:
        _randomize(shared, seed=10 + kernel)
    tokens = torch.randn(1, 1 + side * side, width, dtype=torch.float64)
    adapter.double()
    if shared is not None:
        shared.double()
    found = _dependency(adapter, tokens)
    assert torch.equal(found, _expected_dependency(side, kernel // 2))


def test_cls_path_equals_conv_of_a_one_pixel_image():
    torch.manual_seed(0)
    adapter = Convpass(12, 5, conv_init="xavier", dropout=0.0).eval()
    _randomize(adapter)
    tokens = torch.randn(3, 1 + 4 * 4, 12)
    hidden = adapter.act(adapter.down(tokens[:, :1]))  # (B, 1, h)
    as_image = adapter.conv(hidden.transpose(1, 2).reshape(3, 5, 1, 1)).reshape(3, 1, 5)
    expected = adapter.up(adapter.act(as_image))
    torch.testing.assert_close(adapter(tokens)[:, :1], expected)


def test_patch_path_equals_conv_on_the_row_major_grid():
    torch.manual_seed(0)
    adapter = Convpass(12, 5, dropout=0.0).eval()
    _randomize(adapter)
    tokens = torch.randn(2, 1 + 3 * 3, 12)
    hidden = adapter.act(adapter.down(tokens[:, 1:]))  # (B, 9, h)
    grid = hidden.permute(0, 2, 1).reshape(2, 5, 3, 3)
    conv = F.conv2d(grid, adapter.conv.weight, adapter.conv.bias, padding=1)
    expected = adapter.up(adapter.act(conv.reshape(2, 5, 9).permute(0, 2, 1)))
    torch.testing.assert_close(adapter(tokens)[:, 1:], expected)


def test_fresh_convpass_outputs_zero_and_identity_conv():
    adapter = Convpass(16, 4)
    assert torch.count_nonzero(adapter(torch.randn(2, 17, 16))) == 0
    weight = adapter.conv.weight
    assert torch.equal(weight[:, :, 1, 1], torch.eye(4))
    assert float(weight.detach().abs().sum()) == 4.0 and torch.count_nonzero(adapter.conv.bias) == 0


# ---------------------------------------------------------------- invariant-adjacent: freezing, state dicts
def test_only_adapters_require_grad_and_receive_grads(visual):
    modules = add_adapters(visual, "convpass")
    _randomize(modules)
    adapter_ids = {id(p) for p in modules.parameters()}
    assert {id(p) for p in visual.parameters() if p.requires_grad} == adapter_ids
    visual(_images(visual)).square().sum().backward()
    for name, param in visual.named_parameters():
        if id(param) in adapter_ids:
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
        else:
            assert param.grad is None, name


def test_blocks_stay_open_clip_blocks_with_unchanged_keys(tiny_config, visual):
    before = copy.deepcopy(visual.state_dict())
    add_adapters(visual, "convpass")
    *inner, last = visual.transformer.resblocks
    assert all(type(block) is ResidualAttentionBlock for block in inner)
    assert type(last) is PooledLastBlock and isinstance(last, ResidualAttentionBlock)  # forward for [cls] only
    for block in visual.transformer.resblocks:
        assert isinstance(block.attn, ParallelAdapter) and isinstance(block.attn.base_layer, nn.MultiheadAttention)
        assert isinstance(block.mlp, ParallelAdapter) and isinstance(block.mlp.base_layer, nn.Sequential)
        assert block.attn.in_proj_weight is block.attn.base_layer.in_proj_weight  # aliased, not copied
        assert block.attn.embed_dim == visual.transformer.width  # attributes read through
    assert visual.transformer.get_cast_dtype() == torch.float32  # reads resblocks[0].mlp.c_fc
    adapted = visual.state_dict()
    adapter_keys = set(trainable_state_dict(visual))
    assert set(adapted) - adapter_keys == set(before)
    assert adapter_keys and all(".attn.adapter." in k or ".mlp.adapter." in k for k in adapter_keys)
    assert not any("cp_" in k for k in adapted)

    fresh = open_clip.create_model(tiny_config.stem, pretrained=None).visual
    fresh.load_state_dict(before, strict=True)
    fresh.load_state_dict({k: v for k, v in adapted.items() if k not in adapter_keys}, strict=True)
    shifted = {k: v + 1.0 for k, v in before.items()}  # an "original checkpoint" loads into the adapted model
    result = visual.load_state_dict(shifted, strict=False)
    assert set(result.missing_keys) == adapter_keys and result.unexpected_keys == []
    block = visual.transformer.resblocks[0]
    assert torch.equal(block.attn.base_layer.in_proj_weight, shifted["transformer.resblocks.0.attn.in_proj_weight"])


def test_freezing_by_identity_and_device_moves_keep_the_alias(visual):
    modules = add_adapters(visual, "convpass")
    block = visual.transformer.resblocks[0]
    visual.double()
    assert block.attn.base_layer.in_proj_weight.dtype == torch.float64
    assert block.attn.in_proj_weight is block.attn.base_layer.in_proj_weight
    visual.float()
    backbone_ids = {id(p) for p in visual.parameters()} - {id(p) for p in modules.parameters()}
    assert id(block.attn.base_layer.in_proj_weight) in backbone_ids
    assert id(block.mlp.base_layer.c_fc.weight) in backbone_ids
    assert not any(p.requires_grad for p in block.attn.base_layer.parameters())


def test_gradient_checkpointing_gives_same_output_and_grads(visual):
    modules = add_adapters(visual, "convpass", dropout=0.1)
    _randomize(modules)
    visual.train()
    images = _images(visual)

    def run(checkpointing: bool):
        visual.set_grad_checkpointing(checkpointing)
        visual.zero_grad(set_to_none=True)
        torch.manual_seed(123)  # same dropout masks
        out = visual(images)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in modules.parameters()]

    plain_out, plain_grads = run(False)
    ckpt_out, ckpt_grads = run(True)
    torch.testing.assert_close(ckpt_out, plain_out)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_block_keeps_open_clip_call_signature_and_shares_layer_norm(visual):
    add_adapters(visual, "convpass")
    block = visual.transformer.resblocks[0]
    calls = []
    block.ln_1.register_forward_hook(lambda *args: calls.append("ln_1"))
    block.ln_2.register_forward_hook(lambda *args: calls.append("ln_2"))
    seen = []
    block.attn.adapter.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    block.ln_1.register_forward_hook(lambda module, args, out: seen.append(out))
    tokens = torch.randn(2, 17, visual.transformer.width)
    torch.testing.assert_close(block(tokens, None, None, None), block(tokens))
    assert calls == ["ln_1", "ln_2", "ln_1", "ln_2"]  # each LayerNorm once per call, shared by both branches
    assert seen[1] is seen[0]  # the adapter reads the very tensor ln_1 produced


def test_sequential_adapter_reads_sub_block_output():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(8, 2).eval()
    reference = copy.deepcopy(block)
    adapter = Convpass(8, 4, dropout=0.0)
    _randomize(adapter)
    block.attn = SequentialAdapter(block.attn, adapter, scale=0.5)
    x = torch.randn(2, 10, 8)
    a = reference.ls_1(reference.attention(reference.ln_1(x)))
    y = x + a + 0.5 * adapter(a)
    expected = y + reference.ls_2(reference.mlp(reference.ln_2(y)))
    torch.testing.assert_close(block(x), expected)


def test_parallel_adapter_reads_normalized_input_and_handles_tuple_and_tensor_outputs():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(8, 2).eval()
    reference = copy.deepcopy(block)
    cp_attn, cp_mlp = Convpass(8, 4, dropout=0.0), Convpass(8, 4, dropout=0.0)
    _randomize(nn.ModuleList([cp_attn, cp_mlp]))
    block.attn = ParallelAdapter(block.attn, cp_attn, scale=2.0)  # nn.MultiheadAttention: a tuple
    block.mlp = ParallelAdapter(block.mlp, cp_mlp, scale=2.0)  # nn.Sequential: a tensor
    x = torch.randn(2, 10, 8)
    n1 = reference.ln_1(x)
    y = x + reference.attention(n1) + 2.0 * cp_attn(n1)
    n2 = reference.ln_2(y)
    torch.testing.assert_close(block(x), y + reference.mlp(n2) + 2.0 * cp_mlp(n2))
    out, weights = block.attn(n1, n1, n1, need_weights=True)
    assert weights.shape == (2, 10, 10)
    torch.testing.assert_close(out, reference.attn(n1, n1, n1)[0] + 2.0 * cp_attn(n1))


def test_wrapper_of_a_tensor_returning_attention_module():
    from open_clip.transformer import Attention

    torch.manual_seed(0)
    attention = Attention(8, 2).eval()
    adapter = Convpass(8, 4, dropout=0.0)
    _randomize(adapter)
    wrapped = ParallelAdapter(attention, adapter, scale=3.0)
    x = torch.randn(2, 10, 8)
    torch.testing.assert_close(wrapped(x), attention(x) + 3.0 * adapter(x))
    assert set(wrapped.state_dict()) == set(attention.state_dict()) | {f"adapter.{k}" for k in adapter.state_dict()}


# ---------------------------------------------------------------- bad input and dtypes
def test_non_square_token_count_is_refused():
    with pytest.raises(ValueError, match="not a perfect square"):
        Convpass(8, 4)(torch.randn(1, 1 + 12, 8))
    with pytest.raises(ValueError, match="3×4 grid"):
        Convpass(8, 4, layout=TokenLayout(grid=(3, 4)))(torch.randn(1, 1 + 16, 8))
    assert Convpass(8, 4, layout=TokenLayout(grid=(3, 4)))(torch.randn(1, 1 + 12, 8)).shape == (1, 13, 8)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"kind": "lora_nope"}, "unknown adapter kind 'lora_nope'; choose one of .*convpass"),
        ({"placement": "ffn"}, "placement"),
        ({"kind": "convpass_attn", "placement": "mlp"}, "implies placement 'attn'"),
        ({"rank": 4}, r"unknown option\(s\) \['rank'\] for ConvpassConfig; known options: .*'dim'"),
        ({"drop_path": 1.0}, "drop_path"),
        ({"dim": 0}, "dim.*must be positive"),
        ({"dim": -3}, "dim.*must be positive"),
        ({"kernel_size": 2}, "positive odd"),
        ({"conv_init": "orthogonal"}, "conv_init"),
        ({"scale": float("nan")}, "finite"),
    ],
)
def test_bad_arguments_are_refused_before_touching_the_encoder(visual, options, match):
    keys = set(visual.state_dict())
    with pytest.raises(ValueError, match=match):
        add_adapters(visual, **options)
    assert set(visual.state_dict()) == keys
    assert all(type(b) is ResidualAttentionBlock and type(b.attn) is nn.MultiheadAttention
               for b in visual.transformer.resblocks)


def test_second_call_is_refused_until_adapters_are_removed(visual):
    add_adapters(visual, "convpass")
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(visual, "convpass_share")
    removed = remove_adapters(visual)
    assert len(removed) == 2 * len(visual.transformer.resblocks)
    add_adapters(visual, "convpass_share", dim=4)


def test_patch_dropout_encoder_is_refused(tmp_path):
    from clipconv.backbone import load_backbone

    path = write_tiny_config(tmp_path, "tiny-patch-dropout", vision_cfg={"patch_dropout": 0.5})
    with pytest.raises(ValueError, match="patch dropout"):
        load_backbone(str(path), pretrained=None, device="cpu")
    open_clip.add_model_config(path)
    raw = open_clip.create_model(path.stem, pretrained=None)
    with pytest.raises(ValueError, match="patch dropout"):
        add_adapters(raw.visual)


def test_encoders_without_residual_attention_blocks_are_refused(tmp_path):
    with pytest.raises(TypeError, match="open_clip VisionTransformer"):
        add_adapters(nn.Sequential(nn.Linear(4, 4)))
    path = write_tiny_config(tmp_path, "tiny-scale-attn", vision_cfg={"scale_attn": True})
    open_clip.add_model_config(path)
    custom = open_clip.create_model(path.stem, pretrained=None).visual
    with pytest.raises(TypeError, match="ln_attn"):
        add_adapters(custom)


def test_custom_blocks_with_open_clips_attention_module_are_wrapped(tmp_path):
    """qk_norm builds CustomResidualAttentionBlocks whose `attn` is open_clip's `Attention` (a tensor output)."""
    path = write_tiny_config(tmp_path, "tiny-qknorm", vision_cfg={"qk_norm": True})
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    custom = open_clip.create_model(path.stem, pretrained=None).visual.eval()
    images = _images(custom)
    with torch.no_grad():
        before = custom(images)
    modules = add_adapters(custom, "convpass")
    with torch.no_grad():
        torch.testing.assert_close(custom(images), before, atol=0, rtol=0)
        _randomize(modules)
        assert not torch.allclose(custom(images), before, atol=1e-3)


def test_registry_lists_kinds_and_refuses_unknown_or_duplicate_names():
    assert {"convpass", "convpass_attn", "convpass_share"} <= set(ADAPTERS)
    assert get_adapter("convpass_attn").placement == "attn"
    with pytest.raises(ValueError, match="unknown adapter kind 'nope'; choose one of"):
        get_adapter("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("convpass", config=ConvpassConfig)(lambda config, target: None)
    with pytest.raises(TypeError, match="AdapterConfig subclass"):
        register_adapter("other", config=dict)


def test_fp32_adapters_run_in_a_bf16_trunk(tiny_config):
    from clipconv.backbone import load_backbone

    torch.manual_seed(0)
    visual = load_backbone(str(tiny_config), pretrained=None, device="cpu", precision="bf16").visual
    modules = add_adapters(visual, "convpass")
    _randomize(modules)
    assert {p.dtype for p in modules.parameters()} == {torch.float32}
    assert visual.conv1.weight.dtype == torch.bfloat16
    images = _images(visual).to(torch.bfloat16)
    out = visual(images)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in modules.parameters())


def test_adapters_under_bf16_autocast(visual):
    modules = add_adapters(visual, "convpass")
    _randomize(modules)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = visual(_images(visual))
    out.float().sum().backward()
    assert all(p.grad is not None for p in modules.parameters())


# ---------------------------------------------------------------- scale
def test_scale_changes_output_and_zero_scale_restores_the_encoder(visual):
    images = _images(visual)
    with torch.no_grad():
        plain = visual(images)
    modules = add_adapters(visual, "convpass", scale=0.1)
    _randomize(modules)
    assert get_adapter_scale(visual) == 0.1
    with torch.no_grad():
        small = visual(images)
        set_adapter_scale(visual, 10.0)
        large = visual(images)
        set_adapter_scale(visual, 0.0)
        off = visual(images)
    assert not torch.allclose(small, plain, atol=1e-4)
    assert not torch.allclose(large, small, atol=1e-4)
    # the adapted encoder computes its last block for [cls] only (adapters/pooled.py): equal up to matmul rounding
    assert_close_scaled(off, plain)
    assert get_adapter_scale(visual) == 0.0


def test_scale_helpers_refuse_an_encoder_without_adapters(visual):
    with pytest.raises(ValueError, match="no adapters"):
        set_adapter_scale(visual, 1.0)
    with pytest.raises(ValueError, match="no adapters to remove"):
        remove_adapters(visual)


def test_adapters_follow_the_encoder_train_eval_mode(visual):
    visual.train()
    modules = add_adapters(visual, "convpass")
    assert all(m.training for m in modules)
    visual.eval()
    assert not any(m.training for m in modules)


# ---------------------------------------------------------------- drop_path (stochastic depth, issue 8)
def test_drop_path_zero_changes_nothing_and_draws_no_random_numbers(visual):
    """Train mode, drop_path=0: equal to the block computed by hand, and no random number drawn. The wrapper
    may fuse `trunk + s·adapter` into one addmm, which rounds differently from the two-step sum on some CPUs:
    the tolerance is a few float32 ulps of the largest value per layer."""
    modules = add_adapters(visual, "convpass", dropout=0.0, drop_path=0.0, scale=0.5)
    _randomize(modules)
    visual.train()
    tokens = torch.randn(2, 1 + 16, visual.transformer.width)
    expected = tokens
    for block in visual.transformer.resblocks:
        n1 = block.ln_1(expected)
        expected = expected + block.ls_1(block.attn.base_layer(n1, n1, n1, need_weights=False)[0]
                                         + 0.5 * block.attn.adapter(n1))
        n2 = block.ln_2(expected)
        expected = expected + block.ls_2(block.mlp.base_layer(n2) + 0.5 * block.mlp.adapter(n2))
    state = torch.get_rng_state()
    out = visual.transformer(tokens)
    assert torch.equal(torch.get_rng_state(), state)
    layers = len(visual.transformer.resblocks)
    atol = 64 * layers * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)


def test_drop_path_rates_grow_linearly_over_depth(tiny_backbone):
    from clipconv.adapters import adapted_modules

    path = tiny_backbone.visual
    add_adapters(path, "convpass", drop_path=0.2)
    rates = [w.drop_rate for w in adapted_modules(path)]
    layers = len(path.transformer.resblocks)
    expected = [0.2 * i / (layers - 1) for i in range(layers) for _ in ("attn", "mlp")]
    assert rates == pytest.approx(expected) and rates[-1] == pytest.approx(0.2)


def _constant_wrapper(rate: float, sequential: bool = False) -> nn.Module:
    """Trunk returns 1 everywhere, the adapter 10: every combination of kept/dropped terms is recognizable."""

    class Constant(nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = nn.Parameter(torch.tensor(value))

        def forward(self, x):
            return torch.ones_like(x) * self.value

    wrapper = SequentialAdapter if sequential else ParallelAdapter
    return wrapper(Constant(1.0), Constant(10.0), scale=1.0, drop_rate=rate)


def test_drop_path_drops_trunk_and_adapter_per_sample_with_independent_masks():
    torch.manual_seed(0)
    rate = 0.5
    wrapped = _constant_wrapper(rate).train()
    out = wrapped(torch.zeros(400, 5, 3))
    per_sample = out[:, 0, 0]
    assert torch.equal(out, per_sample[:, None, None].expand_as(out))  # one decision per sample, all tokens
    values = {round(float(v), 4) for v in per_sample.detach()}
    assert values == {0.0, 1.0 / rate, 10.0 / rate, 11.0 / rate}  # both, trunk only, adapter only, none dropped
    assert wrapped.eval()(torch.zeros(4, 5, 3)).eq(11.0).all()  # eval: nothing dropped, nothing rescaled


def test_drop_path_in_train_mode_changes_the_encoder_output_and_eval_does_not(visual):
    modules = add_adapters(visual, "convpass", dropout=0.0, drop_path=0.9)
    _randomize(modules)
    images = _images(visual, batch=8)
    with torch.no_grad():
        evaluated = visual.eval()(images)
        again = visual(images)
        visual.train()
        torch.manual_seed(0)
        trained = visual(images)
    assert torch.equal(evaluated, again)
    assert not torch.allclose(trained, evaluated, atol=1e-3)


def test_a_deep_copy_of_an_adapted_encoder_keeps_its_aliases_and_is_independent(visual):
    _randomize(add_adapters(visual, "convpass"))
    clone = copy.deepcopy(visual)
    block, twin = visual.transformer.resblocks[0], clone.transformer.resblocks[0]
    assert twin.attn.in_proj_weight is twin.attn.base_layer.in_proj_weight
    assert twin.mlp.c_fc is twin.mlp.base_layer.c_fc
    assert twin.attn.in_proj_weight is not block.attn.in_proj_weight
    images = _images(visual)
    with torch.no_grad():
        assert torch.equal(clone(images), visual(images))
        twin.attn.base_layer.in_proj_weight.add_(1.0)
        assert torch.equal(twin.attn.in_proj_weight, twin.attn.base_layer.in_proj_weight)
        assert not torch.equal(clone(images), visual(images))


def test_prompt_tokens_are_skipped_by_the_grid_and_go_through_the_centre_tap():
    """Layout [cls, 2 prompts, 3×3 patches, 1 appended prompt]: non-patch tokens only see themselves."""
    torch.manual_seed(0)
    side, prefix, suffix = 3, 3, 1
    adapter = Convpass(8, 4, layout=TokenLayout(grid=(side, side), prefix=prefix, suffix=suffix)).eval().double()
    _randomize(adapter)
    tokens = torch.randn(1, prefix + side * side + suffix, 8, dtype=torch.float64)
    found = _dependency(adapter, tokens)
    grid = _expected_dependency(side, 1)[1:, 1:]
    expected = torch.eye(tokens.shape[1], dtype=torch.bool)
    expected[prefix:prefix + side * side, prefix:prefix + side * side] = grid
    assert torch.equal(found, expected)
    hidden = adapter.act(adapter.down(tokens[:, 1:2]))  # a prompt token = [cls]'s 1×1-image path
    centre = adapter.conv.weight[:, :, 1, 1]
    want = adapter.up(adapter.act(hidden @ centre.t() + adapter.conv.bias))
    torch.testing.assert_close(adapter(tokens)[:, 1:2], want)
    with pytest.raises(ValueError, match="3 \\+ 9 \\+ 1 tokens"):
        adapter(tokens[:, :-2])


def test_encoder_layout_comes_from_the_model(visual):
    from clipconv.adapters import encoder_layout

    assert encoder_layout(visual) == TokenLayout(grid=tuple(visual.grid_size), prefix=1)
    assert encoder_layout(visual, prompt_tokens=4).prefix == 5
