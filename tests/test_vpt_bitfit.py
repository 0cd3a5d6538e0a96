"""VPT-deep (insert/drop per block = the reference's insert-once/replace-per-layer/remove-at-end; convpass after
it keeps its 3×3 locality on patches only) and BitFit (exactly the encoder's biases, restored on removal),
and one AdapterTuning fit per kind of this branch (lora, bitfit, vpt_deep)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from baseline_world import make_world
from tolerance import assert_close_scaled, differs_beyond_tolerance
from torch import nn

from clipconv.adapters import (
    Convpass, adapted_modules, adapter_kinds, adapter_modules, add_adapters, encoder_biases, get_adapter_scale,
    prompt_tokens, remove_adapters, set_adapter_scale, vpt_init_bound
)
from clipconv.checkpoint import trainable_state_dict
from clipconv.methods import build_method
from clipconv.methods.finetune import AdapterTuning, load_classifier


def _tol(*tensors: torch.Tensor) -> float:
    return 256 * torch.finfo(torch.float32).eps * max(float(t.abs().max()) for t in tensors)


def _images(visual: nn.Module, batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, *visual.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def visual(tiny_backbone) -> nn.Module:
    return tiny_backbone.visual.eval()


# ----------------------------------------------------------------------------------------- VPT-deep
def _vpt_reference(plain: nn.Module, prompts: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """VPT's own formulation on the plain encoder: insert the first prompts after [cls] once, *replace* the
    prompt positions before every later block, remove them after the last one."""
    count = prompts[0].shape[0]
    x = plain.conv1(images).flatten(2).transpose(1, 2)
    cls = plain.class_embedding.expand(x.shape[0], 1, -1)
    x = plain.ln_pre(torch.cat([cls, x], dim=1) + plain.positional_embedding)
    for index, block in enumerate(plain.transformer.resblocks):
        own = prompts[index].expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], own, x[:, 1:]], 1) if index == 0 else torch.cat([x[:, :1], own, x[:, 1 + count:]], 1)
        x = block(x)
    x = torch.cat([x[:, :1], x[:, 1 + count:]], dim=1)
    pooled, _ = plain._global_pool(x)
    return plain.ln_post(pooled) @ plain.proj


def test_vpt_deep_equals_the_reference_formulation(visual):
    plain = copy.deepcopy(visual)
    modules = add_adapters(visual, "vpt_deep", tokens=3)
    assert prompt_tokens(visual) == 3 and adapter_kinds(visual) == ["vpt_deep"]
    images = _images(visual)
    with torch.no_grad():
        expected = _vpt_reference(plain, [m.prompts for m in modules], images)
        got = visual(images)
    assert float((got - expected).abs().max()) <= _tol(expected)


def test_vpt_init_is_the_references_uniform_bound(visual):
    modules = add_adapters(visual, "vpt_deep", tokens=50)
    bound = vpt_init_bound(tuple(visual.patch_size), visual.transformer.width)
    values = torch.cat([m.prompts.detach().flatten() for m in modules])
    assert float(values.abs().max()) <= bound and float(values.abs().max()) > 0.9 * bound
    assert bound == pytest.approx((6.0 / (3 * visual.patch_size[0] * visual.patch_size[1]
                                          + visual.transformer.width)) ** 0.5)


def test_vpt_keeps_block_keys_and_gradient_checkpointing(visual):
    keys = list(visual.state_dict())
    modules = add_adapters(visual, "vpt_deep", tokens=2)
    assert [k for k in visual.state_dict() if ".adapter." not in k] == keys
    images = _images(visual)
    grads = []
    for checkpointing in (False, True):
        visual.set_grad_checkpointing(checkpointing)
        visual.zero_grad()
        visual(images).square().sum().backward()
        grads.append([p.grad.clone() for p in modules.parameters()])
    for plain, ckpt in zip(*grads):
        assert float((plain - ckpt).abs().max()) <= _tol(plain)


def test_vpt_has_no_scale_and_refuses_to_come_second(visual):
    add_adapters(visual, "vpt_deep")
    set_adapter_scale(visual, 1.0)
    assert get_adapter_scale(visual) == 1.0
    with pytest.raises(ValueError, match="no branch to scale"):
        set_adapter_scale(visual, 10.0)
    with pytest.raises(ValueError, match="scale must be 1"):
        add_adapters(copy.deepcopy(visual), "bitfit", scale=2.0)
    remove_adapters(visual)
    add_adapters(visual, "convpass")
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(visual, "vpt_deep")


def _convpass_hidden(visual: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The first block's Convpass (attn site) outputs, captured by a forward hook."""
    outputs = []
    convpass = next(m for m in adapter_modules(visual) if isinstance(m, Convpass))
    handle = convpass.register_forward_hook(lambda module, inputs, output: outputs.append((inputs[0], output)))
    with torch.no_grad():
        visual(images)
    handle.remove()
    return outputs


def test_convpass_after_vpt_skips_the_prompts_and_keeps_3x3_locality(visual):
    prompts = 3
    add_adapters(visual, "vpt_deep", tokens=prompts)
    modules = add_adapters(visual, "convpass", dim=4)
    assert adapter_kinds(visual) == ["convpass", "vpt_deep"]
    convpass = next(m for m in modules if isinstance(m, Convpass))
    assert convpass.layout.prefix == 1 + prompts
    with torch.no_grad():  # a non-zero, non-identity adapter so that locality is visible
        for module in modules:
            for param in module.parameters():
                param.copy_(torch.randn_like(param) * 0.3)
    height, width = visual.grid_size
    tokens = torch.randn(2, 1 + prompts + height * width, visual.transformer.width,
                         generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = convpass(tokens)
        row, col = 1, 2  # perturb one patch token: only its 3×3 neighbourhood changes (and nothing else)
        patch = 1 + prompts + row * width + col
        poked = tokens.clone()
        poked[:, patch] += 1.0
        changed = (convpass(poked) - base).abs().amax(dim=(0, 2)) > _tol(base)
        expected = torch.zeros_like(changed)
        for r in range(height):
            for c in range(width):
                expected[1 + prompts + r * width + c] = abs(r - row) <= 1 and abs(c - col) <= 1
        assert torch.equal(changed, expected)
        for prompt in range(1, 1 + prompts):  # a prompt token behaves like [cls]: it changes only itself
            poked = tokens.clone()
            poked[:, prompt] += 1.0
            changed = (convpass(poked) - base).abs().amax(dim=(0, 2)) > _tol(base)
            assert changed.nonzero().flatten().tolist() == [prompt]
    # end to end: the composed encoder runs, both kinds train, removal restores the plain encoder
    images = _images(visual)
    visual(images).square().sum().backward()
    assert all(p.grad is not None for p in adapter_modules(visual).parameters())
    remove_adapters(visual)
    assert not adapted_modules(visual) and prompt_tokens(visual) == 0


def test_lora_after_vpt_reaches_the_wrapped_blocks_attention(visual):
    images = _images(visual)
    add_adapters(visual, "vpt_deep", tokens=2)
    with torch.no_grad():
        prompted = visual(images)
        lora = add_adapters(visual, "lora")
        assert torch.equal(visual(images), prompted)  # zero B: still VPT alone
        for module in lora:
            for param in module.in_proj.B.values():
                param.fill_(0.1)
        assert differs_beyond_tolerance(visual(images), prompted)  # the block's own forward calls the LoRA wrapper
    assert all(type(block.base_layer.attn).__name__ == "LoRAAttention" for block in visual.transformer.resblocks)
    remove_adapters(visual)
    assert all(type(block.attn).__name__ == "MultiheadAttention" for block in visual.transformer.resblocks)


# ----------------------------------------------------------------------------------------- BitFit
def test_bitfit_trains_exactly_the_encoders_biases(visual):
    names = {n for n, _ in visual.named_parameters() if n.endswith("bias")}
    assert any(n.startswith("ln_post") for n in names) and any("in_proj_bias" in n for n in names)
    keys = list(visual.state_dict())
    add_adapters(visual, "bitfit")
    assert {n for n, p in visual.named_parameters() if p.requires_grad} == names
    assert list(visual.state_dict()) == keys  # nothing added: the state dict is a plain open_clip one
    assert len(encoder_biases(visual)) == len(names)
    assert set(trainable_state_dict(visual)) == names
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(visual, "lora")


def test_bitfit_removal_restores_the_original_biases(visual):
    images = _images(visual)
    with torch.no_grad():
        before = visual(images)
        original = {n: p.clone() for n, p in visual.named_parameters()}
        for param in add_adapters(visual, "bitfit").parameters():
            param.add_(0.5)
        assert differs_beyond_tolerance(visual(images), before)
        remove_adapters(visual)
        assert all(torch.equal(p, original[n]) for n, p in visual.named_parameters())
        assert torch.equal(visual(images), before)
    assert not adapter_kinds(visual)


@pytest.mark.parametrize("options, message", [({"placement": "attn"}, "placement"), ({"sequential": True}, "sequential"),
                                              ({"drop_path": 0.1}, "drop_path"), ({"scale": 10.0}, "scale must be 1")])
def test_bitfit_refuses_options_it_would_ignore(visual, options, message):
    with pytest.raises(ValueError, match=message):
        add_adapters(visual, "bitfit", **options)
    assert not adapter_kinds(visual)


# ----------------------------------------------------------------------------------------- AdapterTuning
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_world(tmp_path_factory.mktemp("petl"), tiny_config)


def _tuning(kind: str) -> type[AdapterTuning]:
    return type(f"Tuning_{kind}", (AdapterTuning,), {"adapter_kind": kind, "name": f"adapter_{kind}"})


def _world_images(world, count: int = 6) -> torch.Tensor:
    from clipconv.evaluation import image_loader

    loader = image_loader(world.root, world.test_samples[:count], world.backbone.eval_transform, count, 0)
    return next(iter(loader))[0]


@pytest.mark.parametrize("kind", ["lora", "bitfit", "vpt_deep"])
def test_adapter_tuning_fits_each_kind_and_alpha0_is_its_start(world, tmp_path, kind):
    from clipconv.wise import interpolate

    if kind == "lora":
        method = _tuning(kind)(epochs=1, batch_size=4, lr=1e-2, scales=[1.0])
    else:
        method = _tuning(kind)(epochs=1, batch_size=4, lr=1e-2)
        assert method.scales == [1.0]  # kinds without a branch to scale default to s = 1
    images = _world_images(world)
    zero_shot = build_method("zero_shot")
    zero_shot.fit(world.ctx)
    reference = zero_shot.logits(images)
    ctx = copy.copy(world.ctx)
    ctx.output_dir = tmp_path
    method.fit(ctx)
    trained = method.logits(images)
    assert differs_beyond_tolerance(trained, reference)
    saved = trainable_state_dict(method.classifier)
    reloaded, _ = load_classifier(Path(tmp_path) / "adapter.safetensors", world.backbone)
    with torch.no_grad():
        assert torch.equal(reloaded(images), trained)  # the checkpoint's metadata rebuilds the same kind
    if kind == "bitfit":  # the checkpoint holds exactly the encoder's biases and the head
        biases = {f"visual.{n}" for n, _ in world.backbone.model.visual.named_parameters() if n.endswith("bias")}
        assert set(saved) == biases | {"head.weight", "head.bias"}
    interpolate(method, 0.0)
    start = method.logits(images)
    if kind == "vpt_deep":  # VPT starts from random prompts, not from zero-shot CLIP (identity_at_init=False)
        assert differs_beyond_tolerance(start, reference)
    else:
        assert_close_scaled(start, reference)
