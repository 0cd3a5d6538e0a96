"""The fused adapter path (Convpass.add_into: up-projection + bias + scale + trunk sum in one addmm) equals the
unfused `trunk + s·adapter(x)`, in outputs and gradients, and is taken exactly when it may be."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clipconv.adapters import Convpass, SharedProjections, TokenLayout, adapted_modules, add_adapters

SCALE = 0.7
EPS = torch.finfo(torch.float32).eps


def _tol(*tensors: torch.Tensor, eps: float = EPS) -> float:
    """A few hundred ulps of the largest magnitude compared."""
    return 256 * eps * max(float(t.detach().abs().max()) for t in tensors)


def _close(actual: torch.Tensor, expected: torch.Tensor, eps: float = EPS) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=_tol(actual, expected, eps=eps))


def _randomize(modules: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in modules.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _images(visual: nn.Module, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, *visual.image_size, generator=generator)


ADAPTERS = {
    "full": lambda: Convpass(12, 4),
    "kernel-1": lambda: Convpass(12, 4, kernel_size=1),
    "share": lambda: Convpass(12, 4, share=SharedProjections(12, 4)),
    "prompts-before-and-after": lambda: Convpass(12, 4, layout=TokenLayout(grid=(3, 3), prefix=3, suffix=2)),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize("mode", ["eval", "train-dropout"])
@pytest.mark.parametrize("out_layout", ["contiguous", "token-major"])
def test_add_into_equals_out_plus_scaled_adapter_output_and_gradients(name, mode, out_layout):
    torch.manual_seed(0)
    adapter = ADAPTERS[name]()
    params = list(adapter.parameters()) + (list(adapter.shared.parameters()) if adapter.shared else [])
    _randomize(nn.ParameterList(params))
    if mode == "eval":
        adapter.eval()
    else:
        adapter.train()
        adapter.dropout.p = 0.5
    tokens = 3 + 9 + 2 if name.startswith("prompts") else 1 + 9
    x = torch.randn(2, tokens, 12, requires_grad=True)
    out = torch.randn(2, tokens, 12, requires_grad=True)
    if out_layout == "token-major":  # as nn.MultiheadAttention(batch_first=True) returns it
        out = torch.randn(tokens, 2, 12).transpose(0, 1).requires_grad_(True)

    def run(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(5)  # the same dropout mask both ways
        result = adapter.add_into(out, x, SCALE) if fused else out + SCALE * adapter(x)
        grads = torch.autograd.grad((result * torch.linspace(-1, 1, result.numel()).view_as(result)).sum(),
                                    [x, out, *params])
        return result, list(grads)

    fused, fused_grads = run(True)
    plain, plain_grads = run(False)
    _close(fused, plain)
    assert fused.shape == out.shape and fused.stride() == out.stride()
    assert not torch.equal(fused, out)  # the adapter term is really there
    for got, expected in zip(fused_grads, plain_grads):
        _close(got, expected)


@pytest.mark.parametrize("options", [dict(kind="convpass"), dict(kind="convpass", sequential=True),
                                     dict(kind="convpass_share", dim=4)], ids=["parallel", "sequential", "share"])
def test_encoder_with_fused_path_equals_unfused_outputs_and_gradients(tiny_backbone, options, monkeypatch):
    visual = tiny_backbone.visual
    modules = add_adapters(visual, scale=SCALE, dropout=0.0, **options)
    _randomize(modules)
    visual.train()
    calls = []
    original = Convpass.add_into
    monkeypatch.setattr(Convpass, "add_into", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    images = _images(visual)

    def run(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for wrapper in adapted_modules(visual):
            wrapper.fused = fused
        out = visual(images)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    list(modules.parameters()))
        return out, list(grads)

    fused, fused_grads = run(True)
    assert len(calls) == len(adapted_modules(visual))  # every wrapper took the fused path
    plain, plain_grads = run(False)
    assert len(calls) == len(adapted_modules(visual))  # ... and none with fused = False
    _close(fused, plain)
    for got, expected in zip(fused_grads, plain_grads):
        _close(got, expected)


def test_fused_path_is_skipped_for_drop_path_in_training_hooks_and_mixed_dtypes(tiny_backbone, monkeypatch):
    visual = tiny_backbone.visual
    add_adapters(visual, "convpass", drop_path=0.5)
    calls = []
    original = Convpass.add_into
    monkeypatch.setattr(Convpass, "add_into", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    wrappers = adapted_modules(visual)
    images = _images(visual)
    with torch.no_grad():
        visual.train()
        visual(images)
        undropped = sum(w.drop_rate == 0.0 for w in wrappers)
        assert undropped == 2 and len(calls) == undropped  # only block 0's two, whose stochastic-depth rate is 0
        visual.eval()
        visual(images)
        assert len(calls) == undropped + len(wrappers)  # nothing is dropped in eval
        handle = wrappers[0].adapter.register_forward_pre_hook(lambda module, args: None)
        visual(images)
        assert len(calls) == undropped + 2 * len(wrappers) - 1  # a hooked adapter is called as a module
        handle.remove()
        trunk = torch.randn(2, 17, wrappers[0].adapter.width, dtype=torch.bfloat16)
        before = len(calls)
        result = wrappers[0]._add(trunk, trunk)  # bf16 tokens into an fp32 adapter, no autocast
        assert len(calls) == before and result.dtype == torch.bfloat16


def test_fused_path_under_bf16_autocast_matches_the_unfused_one(tiny_backbone):
    visual = tiny_backbone.visual.eval()
    modules = add_adapters(visual, "convpass", scale=SCALE)
    _randomize(modules)
    unfused = copy.deepcopy(visual)
    for wrapper in adapted_modules(unfused):
        wrapper.fused = False
    images = _images(visual)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused_out, plain_out = visual(images).float(), unfused(images).float()
    # bf16 keeps 8 bits: a few ulps of bf16 per layer of the tiny model
    _close(fused_out, plain_out, eps=torch.finfo(torch.bfloat16).eps / 16)


def test_attention_inputs_are_relaid_only_off_the_fast_path_and_give_the_same_attention():
    from clipconv.adapters.wrappers import _attention_inputs

    torch.manual_seed(0)
    attention = nn.MultiheadAttention(12, 3, batch_first=True).requires_grad_(False)
    x = torch.randn(2, 5, 12)
    attention.eval()
    assert _attention_inputs(attention, x, (x, x), {}) == (x, (x, x), {})  # inference: the fast path takes x
    attention.train()
    query, (key, value), kwargs = _attention_inputs(attention, x, (x, x), {"need_weights": False})
    assert query is not x and torch.equal(query, x) and query.transpose(0, 1).is_contiguous()
    assert key is not query and value is not key and torch.equal(key, x) and torch.equal(value, x)
    assert key.data_ptr() == value.data_ptr() == query.data_ptr()  # views of one copy
    assert kwargs == {"need_weights": False}
    other = torch.randn(2, 5, 12)
    assert _attention_inputs(attention, x, (other, other), {})[1] == (other, other)  # cross-attention untouched
    assert _attention_inputs(nn.Linear(12, 12).train(), x, (), {})[0] is x  # only attention is relaid
    attention.eval()
    needs_grad = x.clone().requires_grad_(True)
    assert _attention_inputs(attention, needs_grad, (needs_grad, needs_grad), {})[0] is not needs_grad
    # the relaid call computes the plain self-attention, outputs and input gradients
    attention.train()
    inputs = x.clone().requires_grad_(True)
    plain = attention(inputs, inputs, inputs, need_weights=False)[0]
    query, args, kwargs = _attention_inputs(attention, inputs, (inputs, inputs), {"need_weights": False})
    relaid = attention(query, *args, **kwargs)[0]
    _close(relaid, plain)
    weights = torch.linspace(-1, 1, plain.numel()).view_as(plain)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), inputs)
    (grad_relaid,) = torch.autograd.grad((relaid * weights).sum(), inputs)
    _close(grad_relaid, grad_plain)
