"""LoRA (clipconv/adapters/lora.py): the update lands on the right rows of the packed in_proj_weight, the
dropout route equals the folded route, linear-children attention (timm) works, the text encoder too."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from torch import nn

from clipconv.adapters import (
    LoRAConfig, adapter_modules, add_adapters, add_lora, count_trainable, lora_attention, lora_wrappers,
    remove_adapters, set_adapter_scale
)


def _tol(*tensors: torch.Tensor) -> float:
    return 256 * torch.finfo(torch.float32).eps * max(float(t.abs().max()) for t in tensors)


def _images(visual: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *visual.image_size, generator=torch.Generator().manual_seed(5))


def _randomize(module: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


class FixedMask(nn.Module):
    """Stands in for the LoRA dropout: a fixed multiplier, so the dropout route can be compared exactly."""

    def __init__(self, value: float, p: float = 0.5) -> None:
        super().__init__()
        self.value, self.p = value, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value


@pytest.fixture()
def visual(tiny_backbone) -> nn.Module:
    return tiny_backbone.visual.eval()


def test_lora_equals_editing_the_packed_q_and_v_rows_by_hand(visual):
    plain = copy.deepcopy(visual)
    modules = add_adapters(visual, "lora", rank=3, alpha=6.0, scale=0.5)
    _randomize(modules)
    width = visual.transformer.width
    with torch.no_grad():
        original = plain(_images(visual))
        for block, ref_block in zip(visual.transformer.resblocks, plain.transformer.resblocks):
            lora = block.attn.adapter.in_proj
            weight = ref_block.attn.in_proj_weight
            for part, target in ((0, "q"), (2, "v")):  # k rows (part 1) untouched
                delta = 0.5 * (6.0 / 3) * lora.B[target] @ lora.A[target]
                weight[part * width:(part + 1) * width] += delta
        expected, got = plain(_images(visual)), visual(_images(visual))
    assert float((got - expected).abs().max()) <= _tol(expected)
    assert float((got - original).abs().max()) > 1e3 * _tol(original)  # the update is not negligible


def test_state_dict_keys_and_order_survive_forward_calls(visual):
    keys = list(visual.state_dict())
    _randomize(add_adapters(visual, "lora", targets=("q", "k", "v", "o")))
    with torch.no_grad():
        visual(_images(visual))
    after = list(visual.state_dict())
    assert [k for k in after if "adapter" not in k] == keys
    assert {k for k in after if "adapter" in k} == {
        f"transformer.resblocks.{i}.attn.adapter.{proj}.{ab}.{t}"
        for i in range(len(visual.transformer.resblocks)) for ab in "AB"
        for proj, ts in (("in_proj", "qkv"), ("out_proj", "o")) for t in ts}


def test_dropout_route_equals_the_folded_route_and_drops_only_the_branch(visual):
    modules = add_adapters(visual, "lora", targets=("q", "k", "v"), dropout=0.3)
    _randomize(modules)
    images = _images(visual)
    with torch.no_grad():
        folded = visual.eval()(images)  # eval: dropout off, ΔW folded into in_proj_weight
        for module in modules:
            module.in_proj.dropout = FixedMask(1.0)  # p > 0: the projecting route, keeping every input
        kept = visual.train()(images)
        for module in modules:
            module.in_proj.dropout = FixedMask(0.0)  # every LoRA input dropped: the plain encoder
        dropped = visual(images)
        remove_adapters(visual)
        plain = visual.eval()(images)
    assert float((kept - folded).abs().max()) <= _tol(folded)
    assert float((dropped - plain).abs().max()) <= _tol(plain)
    assert float((folded - plain).abs().max()) > 1e3 * _tol(plain)


def test_real_dropout_trains_and_differs_between_steps(visual):
    modules = add_adapters(visual, "lora", dropout=0.5)
    _randomize(modules)
    visual.train()
    images = _images(visual)
    first, second = visual(images), visual(images)
    assert not torch.equal(first, second)
    first.square().sum().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) for p in modules.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(visual):
    modules = add_adapters(visual, "lora")
    _randomize(modules)
    grads = []
    for checkpointing in (False, True):
        visual.set_grad_checkpointing(checkpointing)
        visual.zero_grad()
        visual(_images(visual)).square().sum().backward()
        grads.append([p.grad.clone() for p in modules.parameters()])
    for plain, ckpt in zip(*grads):
        assert float((plain - ckpt).abs().max()) <= _tol(plain)


def test_scale_multiplies_the_update(visual):
    modules = add_adapters(visual, "lora")
    _randomize(modules)
    images = _images(visual)
    with torch.no_grad():
        set_adapter_scale(visual, 0.0)
        zero = visual(images)
        remove_adapters(visual)
        assert torch.equal(visual(images), zero)


class TimmLikeBlockHolder(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn


@pytest.mark.parametrize("targets", [("q", "v"), ("k", "o"), ("q", "k", "v", "o")])
def test_lora_on_linear_children_timm_attention(targets):
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    holder = TimmLikeBlockHolder(Attention(16, num_heads=2, qkv_bias=True)).eval()
    original = copy.deepcopy(holder)
    edited = copy.deepcopy(holder)
    keys = list(holder.state_dict())
    modules = lora_attention(holder, "attn", targets, rank=2, alpha=4.0, dropout=0.0, scale=0.5)
    _randomize(modules, seed=1)
    tokens = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for wrapper in lora_wrappers(holder):
            name = "qkv" if wrapper is holder.attn.qkv else "proj"
            getattr(edited.attn, name).weight += 0.5 * wrapper.adapter.delta_weight()
        expected, got = edited.attn(tokens), holder.attn(tokens)
        assert float((got - expected).abs().max()) <= _tol(expected)
        assert float((got - original.attn(tokens)).abs().max()) > 1e3 * _tol(expected)
    assert [k for k in holder.state_dict() if "adapter" not in k] == keys
    names = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "proj"}
    assert {type(getattr(holder.attn, names[t])).__name__ for t in targets} == {"LoRALinear"}
    # the dropout route of a linear is PEFT's formula base(x) + s·ΔW·drop(x): all inputs dropped = the original
    for wrapper in lora_wrappers(holder):
        wrapper.adapter.dropout = FixedMask(0.0)
    with torch.no_grad():
        assert float((holder.attn(tokens) - original.attn(tokens)).abs().max()) <= _tol(expected)


def test_add_lora_on_the_text_encoder(tiny_backbone):
    model = tiny_backbone.model.eval()
    tokens = tiny_backbone.tokenizer(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        before = model.encode_text(tokens)
    for param in model.parameters():
        param.requires_grad_(False)
    modules = add_lora(model.transformer)  # CLIP-LoRA defaults: q, k, v, r = 2
    assert all(m.in_proj.rank == 2 and set(m.in_proj.rows) == {"q", "k", "v"} for m in modules)
    assert len(modules) == len(model.transformer.resblocks)
    with torch.no_grad():
        assert float((model.encode_text(tokens) - before).abs().max()) <= _tol(before)
    _randomize(modules)
    model.train()
    model.encode_text(tokens).square().sum().backward()
    own = {id(p) for p in modules.parameters()}
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (id(param) in own), name
    with pytest.raises(ValueError, match="already carries adapters"):
        add_lora(model.transformer)


def test_vit_b16_lora_count_formula():
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual
    layers, width = len(visual.transformer.resblocks), visual.transformer.width
    assert (layers, width) == (12, 768)
    add_adapters(visual, "lora", rank=8, targets=("q", "v"))
    assert count_trainable(visual) == layers * 2 * 8 * (width + width) == 294_912
    remove_adapters(visual)
    add_adapters(visual, "lora", rank=2, targets=("q", "k", "v", "o"))
    assert count_trainable(visual) == layers * 4 * 2 * (width + width)


@pytest.mark.parametrize("options, message", [
    ({"targets": ("q", "x")}, "targets"),
    ({"targets": ()}, "targets"),
    ({"rank": 0}, "rank"),
    ({"alpha": -1.0}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"sequential": True}, "sequential"),
    ({"drop_path": 0.1}, "drop_path"),
    ({"placement": "mlp"}, "placement"),
])
def test_bad_lora_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        from clipconv.adapters import make_config

        make_config("lora", **options)


def test_dropout_on_o_of_packed_attention_is_refused_before_any_change(visual):
    keys = list(visual.state_dict())
    with pytest.raises(ValueError, match="target 'o'"):
        add_adapters(visual, "lora", targets=("q", "o"), dropout=0.1)
    assert list(visual.state_dict()) == keys and not adapter_modules(visual)


def test_config_defaults_are_pefts():
    config = LoRAConfig()
    assert (config.targets, config.rank, config.alpha, config.dropout) == (("q", "v"), 8, 8.0, 0.0)
