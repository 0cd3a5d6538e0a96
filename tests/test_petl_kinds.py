"""AdaptFormer and the sequential Adapter (Houlsby / Pfeiffer): placement, wrapper semantics against a
hand-written block formula, reference initialization, counts per variant and bad options."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clipconv.adapters import Bottleneck, ParallelAdapter, SequentialAdapter, add_adapters, count_trainable, make_config


def _tol(*tensors: torch.Tensor) -> float:
    return 256 * torch.finfo(torch.float32).eps * max(float(t.abs().max()) for t in tensors)


def _randomize(modules: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in modules.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _tokens(width: int) -> torch.Tensor:
    return torch.randn(2, 5, width, generator=torch.Generator().manual_seed(7))


def test_adaptformer_is_a_scaled_parallel_bottleneck_beside_the_mlp(tiny_backbone):
    visual = tiny_backbone.visual.eval()
    modules = add_adapters(visual, "adaptformer")
    blocks = visual.transformer.resblocks
    assert len(modules) == len(blocks)
    for block in blocks:
        assert isinstance(block.mlp, ParallelAdapter) and not hasattr(block.attn, "adapter")
        assert block.mlp.scale == 0.1
    _randomize(modules)
    block, width = blocks[0], visual.transformer.width
    x = _tokens(width)
    with torch.no_grad():
        n1 = block.ln_1(x)
        after_attn = x + block.ls_1(block.attn(n1, n1, n1, need_weights=False)[0])  # attn is not wrapped
        got = block(x)
        n2 = block.ln_2(after_attn)
        adapter = block.mlp.adapter
        expected = after_attn + block.ls_2(block.mlp.base_layer(n2) + 0.1 * adapter.up(torch.relu(adapter.down(n2))))
    assert float((got - expected).abs().max()) <= _tol(expected)


def test_adaptformer_reference_initialization():
    torch.manual_seed(0)
    module = Bottleneck(768, 64, "relu", 0.1)
    assert torch.count_nonzero(module.up.weight) == 0 and torch.count_nonzero(module.up.bias) == 0
    assert torch.count_nonzero(module.down.bias) == 0
    bound = 1 / math.sqrt(768)  # kaiming-uniform(a=√5): U(-1/√fan_in, 1/√fan_in)
    assert float(module.down.weight.detach().abs().max()) <= bound
    assert float(module.down.weight.detach().abs().max()) > 0.9 * bound
    assert isinstance(module.dropout, nn.Dropout) and module.dropout.p == 0.1
    config = make_config("adaptformer")
    assert (config.dim, config.scale, config.dropout) == (64, 0.1, 0.1)


@pytest.mark.parametrize("variant, sites", [("pfeiffer", ("mlp",)), ("houlsby", ("attn", "mlp"))])
def test_sequential_adapter_reads_the_sub_block_output_with_its_own_skip(tiny_backbone, variant, sites):
    visual = tiny_backbone.visual.eval()
    modules = add_adapters(visual, "adapter", variant=variant)
    blocks = visual.transformer.resblocks
    assert len(modules) == len(sites) * len(blocks)
    for block in blocks:
        for site in ("attn", "mlp"):
            assert isinstance(getattr(block, site), SequentialAdapter) == (site in sites)
    _randomize(modules)
    wrapper = blocks[0].mlp
    a_in = _tokens(visual.transformer.width)
    with torch.no_grad():
        a = wrapper.base_layer(a_in)
        adapter = wrapper.adapter
        expected = a + adapter.up(torch.relu(adapter.down(a)))  # Houlsby: a + up(act(down(a)))
        got = wrapper(a_in)
    assert float((got - expected).abs().max()) <= _tol(expected)


def test_houlsby_has_twice_the_pfeiffer_count(tiny_backbone):
    import copy

    width, layers = tiny_backbone.visual.transformer.width, len(tiny_backbone.visual.transformer.resblocks)
    counts = {}
    for variant in ("pfeiffer", "houlsby"):
        visual = copy.deepcopy(tiny_backbone.visual)
        add_adapters(visual, "adapter", variant=variant, dim=4)
        counts[variant] = count_trainable(visual)
    assert counts["pfeiffer"] == layers * (2 * width * 4 + 4 + width)
    assert counts["houlsby"] == 2 * counts["pfeiffer"]


@pytest.mark.parametrize("kind, options, message", [
    ("adapter", {"variant": "houlsby", "placement": "mlp"}, "implies placement"),
    ("adapter", {"sequential": False}, "sequential by definition"),
    ("adapter", {"variant": "lora"}, "variant"),
    ("adapter", {"dim": 0}, "dim"),
    ("adaptformer", {"placement": "attn"}, "implies placement 'mlp'"),
    ("adaptformer", {"dim": 2.5}, "dim"),
    ("adaptformer", {"dropout": 1.0}, "dropout"),
])
def test_bad_options_are_refused(kind, options, message):
    with pytest.raises(ValueError, match=message):
        make_config(kind, **options)
