"""DoRA (clipconv/adapters/dora.py), the `dora` variant of LoRA: identity at init, equal to a hand-written
W' = m·(W + s·ΔW)/||W + s·ΔW||_c on packed and separate projections, the norm detached in the gradients,
merged into a plain open_clip model, exact trainable counts, bad options refused, the `adapter:dora` method."""
from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from tolerance import EPS32, assert_close_scaled, differs_beyond_tolerance
from torch import nn

from clipconv.adapters import (
    ADAPTERS, DORA, DoRAConfig, LoRAAttention, LoRALinear, adapter_kinds, adapter_modules, add_adapters, add_lora,
    count_trainable, lora_attention, mergeable_kinds, remove_adapters
)
from clipconv.merge import merge_adapters, merged_state_dict
from clipconv.methods.base import build_method
from clipconv.params import reference_spec

QKV = ("q", "k", "v")


def _images(visual: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *visual.image_size, generator=torch.Generator().manual_seed(5))


def _randomize(modules: nn.Module, seed: int = 0) -> None:
    """A and B random; each magnitude m moved ±20 % off its init ||W||_c (so m matters, stays positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in modules.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            if ".magnitude." in f".{name}":
                param.mul_(1 + noise)
            else:
                param.copy_(noise)


def _reference_rows(weight: torch.Tensor, m: torch.Tensor, a: torch.Tensor, b: torch.Tensor, factor: float,
                    detach: bool = True) -> torch.Tensor:
    """The paper's W' = m·V/||V||_c, V = W + factor·B·A, written out independently of clipconv."""
    direction = weight + factor * (b @ a)
    norm = torch.sqrt((direction * direction).sum(dim=1, keepdim=True))
    return m[:, None] * direction / (norm.detach() if detach else norm)


class SeparateAttention(nn.Module):
    """Self-attention with separate q/k/v/out `nn.Linear` projections (the `LoRALinear` path)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Holder(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn


@pytest.fixture()
def visual(tiny_backbone) -> nn.Module:
    return tiny_backbone.visual.eval()


def _plain_model(tiny_config: Path) -> nn.Module:
    """A fresh open_clip model of the tiny config: no clipconv code involved."""
    open_clip.add_model_config(str(tiny_config))
    return open_clip.create_model(tiny_config.stem, pretrained=None).eval()


# --- identity at init -------------------------------------------------------------------------------------------


def test_dora_is_registered_as_a_lora_variant_with_loras_defaults():
    config = DoRAConfig()
    assert ADAPTERS["dora"].config is DoRAConfig and ADAPTERS["dora"].placement == "attn"
    assert (config.rank, config.alpha, config.targets, config.dropout) == (8, 8.0, ("q", "v"), 0.0)


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "o")])
def test_fresh_dora_is_the_identity_and_m_is_the_row_norm(visual, targets):
    images = _images(visual)
    with torch.no_grad():
        before = visual(images)
        modules = add_adapters(visual, "dora", targets=targets)
        after = visual(images)
    atol = 64 * EPS32 * float(before.abs().max())
    assert float((after - before).abs().max()) <= atol
    width = visual.transformer.width
    for block, module in zip(visual.transformer.resblocks, modules):
        assert isinstance(block.attn, LoRAAttention) and block.attn.kind == "dora"
        lora = module.in_proj
        for part, target in enumerate(QKV):
            if target in targets:
                rows = block.attn.in_proj_weight[part * width:(part + 1) * width]
                assert lora.magnitude[target].shape == (width,)
                assert_close_scaled(lora.magnitude[target], torch.sqrt((rows * rows).sum(dim=1)), ulps=64)
        assert set(lora.magnitude) == set(targets) - {"o"}
        assert (module.out_proj is not None) == ("o" in targets)


def test_fresh_dora_on_separate_linear_projections_is_the_identity():
    torch.manual_seed(0)
    holder = Holder(SeparateAttention(16, heads=2)).eval()
    tokens = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = holder.attn(tokens)
        lora_attention(holder, "attn", ("q", "k", "v", "o"), rank=2, alpha=4.0, dropout=0.0, variant=DORA)
        after = holder.attn(tokens)
    assert all(isinstance(getattr(holder.attn, n), LoRALinear) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert float((after - before).abs().max()) <= 64 * EPS32 * float(before.abs().max())


# --- the formula ------------------------------------------------------------------------------------------------


def test_dora_equals_the_hand_written_w_prime_on_the_packed_rows(visual):
    """q and v rows of the packed in_proj_weight replaced by m·V/||V||_c, k rows untouched."""
    plain = copy.deepcopy(visual)
    rank, alpha, scale = 3, 6.0, 0.5
    modules = add_adapters(visual, "dora", rank=rank, alpha=alpha, scale=scale)
    _randomize(modules)
    width = visual.transformer.width
    images = _images(visual)
    with torch.no_grad():
        original = plain(images)
        for module, ref_block in zip(modules, plain.transformer.resblocks):
            lora, weight = module.in_proj, ref_block.attn.in_proj_weight
            for part, target in ((0, "q"), (2, "v")):
                rows = slice(part * width, (part + 1) * width)
                weight[rows] = _reference_rows(weight[rows].clone(), lora.magnitude[target], lora.A[target],
                                               lora.B[target], scale * alpha / rank)
        expected, got = plain(images), visual(images)
    assert_close_scaled(got, expected)
    assert differs_beyond_tolerance(got, original, ulps=1e3)  # the update is not negligible


@pytest.mark.parametrize("targets", [("q", "v"), ("k", "o"), ("q", "k", "v", "o")])
def test_dora_on_separate_linears_equals_the_hand_written_w_prime(targets):
    torch.manual_seed(0)
    holder = Holder(SeparateAttention(16, heads=2)).eval()
    reference = copy.deepcopy(holder)
    rank, alpha, scale = 2, 4.0, 0.5
    modules = lora_attention(holder, "attn", targets, rank=rank, alpha=alpha, dropout=0.0, scale=scale,
                             variant=DORA)
    _randomize(modules, seed=1)
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
    tokens = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for target in targets:
            lora = getattr(holder.attn, names[target]).adapter
            linear = getattr(reference.attn, names[target])
            linear.weight.copy_(_reference_rows(linear.weight.clone(), lora.magnitude[target], lora.A[target],
                                                lora.B[target], scale * alpha / rank))
        assert_close_scaled(holder.attn(tokens), reference.attn(tokens))


def test_dora_on_timm_packed_qkv_linear_decomposes_only_the_target_rows():
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    holder = Holder(Attention(16, num_heads=2, qkv_bias=True)).eval()
    reference = copy.deepcopy(holder)
    modules = lora_attention(holder, "attn", ("q", "v"), rank=2, alpha=4.0, dropout=0.0, variant=DORA)
    _randomize(modules, seed=1)
    lora = holder.attn.qkv.adapter
    tokens = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        weight = reference.attn.qkv.weight
        for part, target in ((0, "q"), (2, "v")):
            rows = slice(part * 16, (part + 1) * 16)
            weight[rows] = _reference_rows(weight[rows].clone(), lora.magnitude[target], lora.A[target],
                                           lora.B[target], 4.0 / 2)
        assert_close_scaled(holder.attn(tokens), reference.attn(tokens))


# --- gradients: the norm is detached ----------------------------------------------------------------------------


def test_gradients_equal_the_reference_with_a_detached_norm(visual):
    rank, alpha, scale = 2, 3.0, 0.7
    plain_attn = copy.deepcopy(visual.transformer.resblocks[0].attn)
    modules = add_adapters(visual, "dora", targets=("q", "k", "v"), rank=rank, alpha=alpha, scale=scale)
    _randomize(modules)
    wrapper, lora = visual.transformer.resblocks[0].attn, modules[0].in_proj
    width = visual.transformer.width
    tokens = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(3))
    probe = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(4))

    own = [lora.magnitude[t] for t in QKV] + [lora.B[t] for t in QKV] + [lora.A[t] for t in QKV]
    got = torch.autograd.grad((wrapper(tokens, tokens, tokens, need_weights=False)[0] * probe).sum(), own)

    def reference(detach: bool) -> tuple[torch.Tensor, ...]:
        leaves = [p.detach().clone().requires_grad_() for p in own]
        m, b, a = leaves[:3], leaves[3:6], leaves[6:]
        weight = plain_attn.in_proj_weight.detach()
        rows = [_reference_rows(weight[i * width:(i + 1) * width], m[i], a[i], b[i], scale * alpha / rank, detach)
                for i in range(3)]
        out = torch.func.functional_call(plain_attn, {"in_proj_weight": torch.cat(rows)}, (tokens, tokens, tokens),
                                         {"need_weights": False})[0]
        return torch.autograd.grad((out * probe).sum(), leaves)

    expected = reference(detach=True)
    for g, e in zip(got, expected):
        assert_close_scaled(g, e)
    # d/dm does not see the norm; d/dB and d/dA do: with the norm differentiated they would differ
    undetached = reference(detach=False)
    assert all(differs_beyond_tolerance(g, u) for g, u in zip(got[3:], undetached[3:]))


def test_only_magnitudes_a_and_b_train_and_all_get_gradients(visual):
    modules = add_adapters(visual, "dora", targets=("q", "v", "o"))
    _randomize(modules)
    names = {n for n, p in visual.named_parameters() if p.requires_grad}
    assert names == {n for n in names if ".adapter." in n}
    assert {n.split(".adapter.")[1].split(".")[1] for n in names} == {"A", "B", "magnitude"}
    visual(_images(visual)).square().sum().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) for p in modules.parameters())


# --- merge ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"targets": ("q", "k", "v", "o"), "rank": 2, "alpha": 3.0, "scale": 0.7}])
def test_merged_dora_loads_into_plain_open_clip_with_the_same_output(tiny_backbone, tiny_config, options):
    visual = tiny_backbone.model.visual.eval()
    images = _images(visual)
    with torch.no_grad():
        original = visual(images)
    _randomize(add_adapters(visual, "dora", **options))
    with torch.no_grad():
        adapted = visual(images)
    assert differs_beyond_tolerance(adapted, original)
    state = merged_state_dict(visual)
    assert adapter_kinds(visual) == ["dora"]  # merged_state_dict leaves the adapted encoder as it was
    plain = _plain_model(tiny_config).visual
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert_close_scaled(plain(images), adapted)
    assert merge_adapters(visual) == ["dora"] and not adapter_kinds(visual)
    with torch.no_grad():
        assert_close_scaled(visual(images), adapted)


@pytest.mark.parametrize("attention", ["separate", "timm"])
def test_merged_dora_on_linear_projections_gives_the_same_output(attention):
    """`LoRALinear.fold_` writes W' (separate q/k/v/out linears, timm's packed qkv + proj)."""
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    attn = SeparateAttention(16, heads=2) if attention == "separate" else Attention(16, num_heads=2, qkv_bias=True)
    holder = Holder(attn).eval()
    keys = set(holder.state_dict())
    _randomize(lora_attention(holder, "attn", ("q", "v", "o"), rank=2, alpha=4.0, dropout=0.0, scale=0.5,
                              variant=DORA), seed=1)
    tokens = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = holder.attn(tokens)
        assert merge_adapters(holder) == ["dora"] and not adapter_kinds(holder)
        assert set(holder.state_dict()) == keys
        assert_close_scaled(holder.attn(tokens), adapted)


def test_dora_is_a_mergeable_kind():
    """clipconv-export-merged refuses checkpoints whose kind does not declare itself mergeable."""
    assert ADAPTERS["dora"].mergeable and "dora" in mergeable_kinds()


def _dora_count(layers: int, width: int, targets: int, rank: int) -> int:
    """LoRA's r(d + d) per target plus d magnitudes per target, in every layer."""
    return layers * targets * (rank * (width + width) + width)


def test_exact_trainable_count_on_the_tiny_config(visual):
    layers, width = len(visual.transformer.resblocks), visual.transformer.width
    assert (layers, width) == (2, 32)
    assert _dora_count(layers, width, 2, 8) == 2_176
    modules = add_adapters(visual, "dora")
    assert count_trainable(visual) == count_trainable(modules) == 2_176
    remove_adapters(visual)
    add_adapters(visual, "dora", targets=("q", "k", "v", "o"), rank=4)
    assert count_trainable(visual) == _dora_count(layers, width, 4, 4) == 2_304


def test_exact_trainable_count_on_vit_b16():
    visual = open_clip.create_model("ViT-B-16", pretrained=None, device="meta").visual
    assert (len(visual.transformer.resblocks), visual.transformer.width) == (12, 768)
    lora = 12 * 2 * 8 * (768 + 768)
    assert lora == 294_912 and lora + 2 * 768 * 12 == _dora_count(12, 768, 2, 8) == 313_344
    modules = add_adapters(visual, "dora")
    assert count_trainable(visual) == count_trainable(modules) == 313_344


def test_adapter_dora_method_reports_the_count():
    method = build_method("adapter:dora")
    assert method.adapter_kind == "dora"
    head = 1000 * (512 + 1)  # text-initialized head over ImageNet's classes, ViT-B/16 embed dim 512
    assert method.trainable_count(reference_spec(16)) == 313_344 + head
    assert build_method("adapter:dora", rank=4).trainable_count(reference_spec(16)) == _dora_count(12, 768, 2, 4) + head


# --- bad options ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, match", [
    ({"rank": 0}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"alpha": 0}, "alpha"),
    ({"dropout": 0.1}, "dropout"),
    ({"targets": ("q", "x")}, "targets"),
    ({"sequential": True}, "'dora'.*sequential"),
    ({"drop_path": 0.1}, "'dora'.*drop_path"),
    ({"placement": "mlp"}, "placement"),
])
def test_bad_options_raise_naming_the_option(visual, options, match):
    keys = set(visual.state_dict())
    with pytest.raises(ValueError, match=match):
        add_adapters(visual, "dora", **options)
    assert set(visual.state_dict()) == keys and not adapter_kinds(visual)


def test_dora_variant_refuses_lora_dropout_before_any_change(visual):
    keys = set(visual.state_dict())
    with pytest.raises(ValueError, match="dropout"):
        add_lora(visual.transformer, dropout=0.25, variant=DORA)
    assert set(visual.state_dict()) == keys and not adapter_kinds(visual)
    assert not len(adapter_modules(visual))
