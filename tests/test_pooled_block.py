"""The adapted encoder's last block computed for [cls] only (clipconv/adapters/pooled.py): the same mathematics as
the full block (outputs and gradients equal up to matmul rounding), the same random stream, fewer FLOPs, and the
full block wherever the pooled one would not be exact."""
from __future__ import annotations

import copy

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from tolerance import assert_close_scaled
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clipconv.adapters import (
    PooledLastBlock, adapter_parameters, add_adapters, pool_last_block, remove_adapters, unpool_last_block
)
from clipconv.adapters.pooled import PooledVisionTransformer

POOLED_KINDS = [
    dict(kind="convpass"),
    dict(kind="convpass_share"),
    dict(kind="convpass_attn"),
    dict(kind="convpass", sequential=True),
    dict(kind="adaptformer"),
    dict(kind="adapter", variant="houlsby", dropout=0.1),
    dict(kind="bitfit"),
]


def _ids(options: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items())


def _images(visual: nn.Module, batch: int = 3) -> torch.Tensor:
    size = visual.image_size
    return torch.randn(batch, 3, size[0], size[1], generator=torch.Generator().manual_seed(1))


def _adapted_pair(visual: nn.Module, options: dict) -> tuple[nn.Module, nn.Module]:
    """(pooled, full): the same adapted encoder with random non-zero adapter weights, with and without the
    pooled last block."""
    options = dict(options)
    add_adapters(visual, options.pop("kind"), **options)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter_parameters(visual):
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    full = copy.deepcopy(visual)
    unpool_last_block(full)
    return visual, full


def _run(visual: nn.Module, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(output, gradients of the trainable tensors, RNG state afterwards) of one training forward + backward."""
    torch.manual_seed(seed)
    out = visual(images)
    state = torch.get_rng_state()
    params = [p for p in visual.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), params)
    return out, list(grads), state


@pytest.mark.parametrize("options", POOLED_KINDS, ids=_ids)
def test_pooled_last_block_trains_like_the_full_block(tiny_backbone, options):
    pooled, full = _adapted_pair(tiny_backbone.visual, options)
    assert type(pooled.transformer.resblocks[-1]) is PooledLastBlock
    assert type(full.transformer.resblocks[-1]) is ResidualAttentionBlock
    images = _images(pooled)
    pooled.train(), full.train()
    out, grads, state = _run(pooled, images, seed=5)
    ref_out, ref_grads, ref_state = _run(full, images, seed=5)
    assert torch.equal(state, ref_state)  # dropout drew the same masks: the run's random stream is unchanged
    assert_close_scaled(out, ref_out)
    assert len(grads) == len(ref_grads) and any(g.abs().max() > 0 for g in grads)
    for grad, ref in zip(grads, ref_grads):
        assert_close_scaled(grad, ref, scale=max(r.abs().max() for r in ref_grads))
    pooled.eval(), full.eval()
    with torch.no_grad():
        assert_close_scaled(pooled(images), full(images))


def test_pooled_last_block_costs_fewer_flops(tiny_backbone):
    pooled, full = _adapted_pair(tiny_backbone.visual, dict(kind="convpass"))
    images = _images(pooled, batch=4)

    def flops(visual: nn.Module) -> int:
        with FlopCounterMode(display=False) as counter:
            visual(images).sum().backward()
        return counter.get_total_flops()

    block = full.transformer.resblocks[-1]
    tokens = 1 + pooled.grid_size[0] * pooled.grid_size[1]
    width, hidden = block.mlp.c_fc.in_features, block.mlp.c_fc.out_features
    # at least the last MLP's two matmuls on the non-[cls] rows, forward (and input gradient, backward)
    saved_at_least = 2 * 2 * 4 * (tokens - 1) * width * hidden * 2
    assert flops(pooled) <= flops(full) - saved_at_least


def test_the_transformer_called_on_its_own_returns_every_token(tiny_backbone):
    pooled, full = _adapted_pair(tiny_backbone.visual, dict(kind="convpass"))
    tokens = torch.randn(2, 1 + pooled.grid_size[0] * pooled.grid_size[1], pooled.transformer.width)
    with torch.no_grad():
        assert_close_scaled(pooled.transformer(tokens), full.transformer(tokens))


def test_output_tokens_and_grad_checkpointing_use_the_full_block(tiny_backbone):
    pooled, full = _adapted_pair(tiny_backbone.visual, dict(kind="convpass"))
    images = _images(pooled)
    pooled.eval(), full.eval()
    pooled.output_tokens = full.output_tokens = True
    with torch.no_grad():
        (features, tokens), (ref_features, ref_tokens) = pooled(images), full(images)
    assert tokens.shape == ref_tokens.shape == (3, pooled.grid_size[0] * pooled.grid_size[1], tokens.shape[-1])
    assert torch.equal(tokens, ref_tokens) and torch.equal(features, ref_features)
    pooled.output_tokens = full.output_tokens = False
    pooled.set_grad_checkpointing(True)
    pooled.train(), full.train()
    out, grads, _ = _run(pooled, images, seed=2)
    ref_out, ref_grads, _ = _run(full, images, seed=2)
    assert torch.equal(out, ref_out)  # recomputed in backward: the full block, as without pooling


@pytest.mark.parametrize("options", [dict(kind="lora"), dict(kind="vpt_deep")], ids=_ids)
def test_kinds_that_mix_or_add_tokens_keep_the_full_block(tiny_backbone, options):
    visual = tiny_backbone.visual
    options = dict(options)
    add_adapters(visual, options.pop("kind"), **options)
    assert type(visual) is VisionTransformer
    assert not isinstance(visual.transformer.resblocks[-1], PooledLastBlock)
    assert pool_last_block(visual) is False


def test_removing_the_adapters_restores_open_clip_classes_and_keys(tiny_backbone):
    visual = tiny_backbone.visual
    keys = set(visual.state_dict())
    add_adapters(visual, "convpass")
    assert type(visual) is PooledVisionTransformer and isinstance(visual, VisionTransformer)
    copied = copy.deepcopy(visual)
    assert type(copied.transformer.resblocks[-1]) is PooledLastBlock
    remove_adapters(visual)
    assert type(visual) is VisionTransformer and type(visual.transformer.resblocks[-1]) is ResidualAttentionBlock
    assert set(visual.state_dict()) == keys
    assert type(copied) is PooledVisionTransformer  # the copy keeps its own classes
