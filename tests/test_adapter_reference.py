"""The adapted encoder equals an explicit reference computation of the Convpass block, outputs and grads.

The reference is written here from each block's sub-modules (ln_1, attn, ls_1, ln_2, mlp, ls_2) and its
adapter modules, as in the paper (§3.2) and the authors' code:
    parallel:    x = x + ls_1(attn(n1)) + s·a1(n1),   n1 = ln_1(x);  then the same with ln_2 / mlp / a2
    sequential:  t = ls_1(attn(n1));  x = x + t + s·a1(t);            then the same with ln_2 / mlp / a2
It is spliced into a plain copy of the encoder by a forward hook on `transformer` (the stem, ln_post and
the projection are open_clip's own), so any change of the injection's numerics makes this test fail.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clipconv.adapters import add_adapters

VARIANTS = {
    "parallel": dict(kind="convpass"),
    "sequential": dict(kind="convpass", sequential=True),
    "attention-only": dict(kind="convpass_attn"),
    "mlp-only-sequential": dict(kind="convpass", placement="mlp", sequential=True),
    "kernel-1": dict(kind="convpass", kernel_size=1),
    "share": dict(kind="convpass_share", dim=4),
}
SCALE = 0.7


def block_adapters(block: nn.Module) -> tuple:
    """(adapter beside/after attention, adapter beside/after the MLP) of an adapted block, None if absent."""
    return tuple(getattr(getattr(block, site), "adapter", None) for site in ("attn", "mlp"))


def _reference_blocks(blocks, x: torch.Tensor, sequential: bool) -> torch.Tensor:
    for block in blocks:
        a1, a2 = block_adapters(block)
        base_attn = getattr(block.attn, "base_layer", block.attn)
        base_mlp = getattr(block.mlp, "base_layer", block.mlp)
        n1 = block.ln_1(x)
        t = block.ls_1(base_attn(n1, n1, n1, need_weights=False)[0])
        x = x + t + (SCALE * a1(t if sequential else n1) if a1 is not None else 0)
        n2 = block.ln_2(x)
        t = block.ls_2(base_mlp(n2))
        x = x + t + (SCALE * a2(t if sequential else n2) if a2 is not None else 0)
    return x


def _randomize(modules: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in modules.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _tol(*tensors: torch.Tensor) -> float:
    return 256 * torch.finfo(torch.float32).eps * max(float(t.abs().max()) for t in tensors)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("mode", ["eval", "train-no-dropout"])
def test_adapted_encoder_equals_the_explicit_reference(tiny_backbone, name, mode):
    options = dict(VARIANTS[name])
    if mode == "train-no-dropout":
        options["dropout"] = 0.0
    plain = copy.deepcopy(tiny_backbone.visual)
    bare = copy.deepcopy(tiny_backbone.visual).eval()
    adapted = tiny_backbone.visual
    modules = add_adapters(adapted, scale=SCALE, **options)
    _randomize(modules)
    adapted.train(mode != "eval")
    plain.train(mode != "eval")
    sequential = bool(options.get("sequential"))
    reference_blocks = adapted.transformer.resblocks  # same sub-modules, same adapter parameters

    def splice(module, args, output):
        return _reference_blocks(reference_blocks, args[0], sequential)

    plain.transformer.register_forward_hook(splice)
    images = torch.randn(3, 3, *adapted.image_size, generator=torch.Generator().manual_seed(2))

    def run(encoder):
        adapted.zero_grad(set_to_none=True)
        out = encoder(images)
        (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
        return out.detach(), [p.grad.clone() for p in modules.parameters()]

    out, grads = run(adapted)
    ref_out, ref_grads = run(plain)
    assert float((out - ref_out).abs().max()) <= _tol(out, ref_out)
    assert float((out - bare(images).detach()).abs().max()) > 100 * _tol(out)  # the adapters act
    for got, want in zip(grads, ref_grads):
        assert torch.count_nonzero(want) > 0
        assert float((got - want).abs().max()) <= _tol(got, want)
