"""The registry's extension points (clipconv/adapters/registry.py): a kind that names its own wrapper class,
and the AdapterFactory rules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clipconv.adapters import (
    ADAPTERS, AdaptedModule, AdapterConfig, AdapterFactory, adapted_modules, add_adapters, register_adapter,
    remove_adapters, set_adapter_scale
)


class GatedOutput(AdaptedModule):
    """A wrapper with its own forward, still delegating: base(x) · (1 + s·tanh(gate))."""

    def forward(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        trunk = out[0] if isinstance(out, tuple) else out
        gated = trunk * (1 + self.scale * torch.tanh(self.adapter.gate))
        return (gated, *out[1:]) if isinstance(out, tuple) else gated


class Gate(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(width))


@pytest.fixture()
def gated_kind():
    name = "test_gated_output"

    @register_adapter(name, config=AdapterConfig, placement="mlp")
    def build(config, target):
        return AdapterFactory(make=lambda site: Gate(target.width), wrapper=GatedOutput)

    try:
        yield name
    finally:
        del ADAPTERS[name]


def test_a_kind_can_name_its_own_wrapper_class(tiny_backbone, gated_kind):
    visual = tiny_backbone.visual.eval()
    images = torch.randn(2, 3, *visual.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = visual(images)
        modules = add_adapters(visual, gated_kind, scale=2.0)
        wrappers = adapted_modules(visual)
        assert len(wrappers) == len(visual.transformer.resblocks)
        assert all(type(w) is GatedOutput and w.kind == gated_kind and w.scale == 2.0 for w in wrappers)
        assert torch.equal(visual(images), before)  # zero gate: identity
        for module in modules:
            module.gate.fill_(0.5)
        changed = visual(images)
        set_adapter_scale(visual, 0.0)
        assert torch.equal(visual(images), before)
        assert not torch.equal(changed, before)
    remove_adapters(visual)
    assert not adapted_modules(visual)


def test_an_adapter_factory_takes_make_or_inject_not_both():
    with pytest.raises(ValueError, match="exactly one of make"):
        AdapterFactory()
    with pytest.raises(ValueError, match="exactly one of make"):
        AdapterFactory(make=lambda site: nn.Identity(), inject=lambda visual: [])
    with pytest.raises(ValueError, match="no shared module or wrapper"):
        AdapterFactory(inject=lambda visual: [], wrapper=GatedOutput)
