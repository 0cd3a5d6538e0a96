"""Trainable-parameter counts (clipconv.params + each method's `trainable_count` hook): exact ViT-B/16 /
ImageNet numbers, the hook equal to what a fitted method really trains, the Table-2 columns, and the
`adapter:<kind>` methods."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from baseline_world import make_world

from clipconv.adapters import ADAPTERS, count_trainable
from clipconv.methods.base import METHODS, build_method, method_config_class, method_names
from clipconv.params import ParamSpec, count_elements, meta_copy, reference_model, reference_spec

L, D, E, T = 12, 768, 512, 512  # ViT-B/16: layers, vision width, embed dim, text width
HEAD = 1000 * (E + 1)  # text-initialized head over ImageNet's classes
CONVPASS = 2 * L * ((2 * 8 + 1) * D + 9 * 8 * 8 + 2 * 8)
VIT_B16 = {  # 16 shots, default options
    "zero_shot": 0,
    "tip_adapter": 0,
    "linear_probe": 1000 * (E + 1),  # C·(D+1)
    "coop": 16 * T,  # 16 context vectors of the text width
    "cocoop": 4 * T + (E * (E // 16) + E // 16) + ((E // 16) * T + T),  # "a photo of a" + meta-net
    "tip_adapter_f": 1000 * 16 * E,  # one key per training image
    "convpass": CONVPASS + HEAD,
    "adaptformer": L * (2 * D * 64 + 64 + D) + HEAD,
    "adapter": L * (2 * D * 8 + 8 + D) + HEAD,  # Pfeiffer
    "lora": L * 2 * 8 * (D + D) + HEAD,  # q, v; r = 8
    "bitfit": L * 11 * D + 2 * D + HEAD,  # per block ln_1, in_proj (3D), out_proj, ln_2, c_fc (4D), c_proj; ln_pre/post
    "vpt_deep": L * 10 * D + HEAD,  # 10 prompts per layer
    "clip_lora": L * 3 * 2 * (D + D) + L * 3 * 2 * (T + T),  # r = 2 on q, k, v of both encoders; no head
}


def test_reference_model_is_vit_b16_on_the_meta_device():
    model = reference_model()
    assert (len(model.visual.transformer.resblocks), model.visual.transformer.width) == (L, D)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert reference_spec(16).train_images == 16_000


@pytest.mark.parametrize("name", sorted(VIT_B16))
def test_vit_b16_imagenet_counts(name):
    assert build_method(name).trainable_count(reference_spec(16)) == VIT_B16[name]


def test_counts_follow_the_options():
    spec = reference_spec(16)
    assert build_method("convpass", head="frozen").trainable_count(spec) == CONVPASS
    assert build_method("adapter", variant="houlsby").trainable_count(spec) == 2 * L * (2 * D * 8 + 8 + D) + HEAD
    assert build_method("coop", class_specific=True, n_ctx=4).trainable_count(spec) == 1000 * 4 * T
    assert build_method("tip_adapter_f").trainable_count(reference_spec(1)) == 1000 * E


def test_meta_copy_shares_no_storage_and_keeps_requires_grad(tiny_backbone):
    visual = tiny_backbone.visual
    visual.conv1.weight.requires_grad_(False)
    before = {n: t.clone() for n, t in visual.state_dict().items()}
    clone = meta_copy(visual)
    assert all(t.device.type == "meta" for t in clone.state_dict().values())
    assert not clone.conv1.weight.requires_grad and clone.ln_post.weight.requires_grad
    assert all(torch.equal(before[n], t) for n, t in visual.state_dict().items())
    assert count_elements(clone.parameters()) == count_elements(visual.parameters())


def _actual(method) -> int:
    """What the fitted method really trains, read from its trained objects."""
    if getattr(method, "classifier", None) is not None:
        return count_trainable(method.classifier)
    if method.name in ("coop", "cocoop"):
        return count_elements(method.trainable_parameters())
    if method.name == "tip_adapter_f":
        return method.keys.numel()
    if method.name == "clip_lora":
        return count_elements(method.named_trainable().values())
    if method.name == "linear_probe":
        return method.weight.numel() + method.bias.numel()
    return 0


CHEAP = {"epochs": 1, "views": 1, "augment_rounds": 1, "bisection_steps": 1, "search": "small", "batch_size": 8,
         "scales": (1.0,), "n_ctx": 4, "iters_per_shot": 1}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_world(tmp_path_factory.mktemp("params"), tiny_config, shots=2, val_shots=1, classes=3)


@pytest.mark.parametrize("name", [n for n in method_names() if not n.startswith("adapter:")])
def test_the_hook_equals_what_the_fitted_method_trains(name, world):
    fields = {f.name for f in dataclasses.fields(method_config_class(METHODS[name]))}
    method = build_method(name, **{k: v for k, v in CHEAP.items() if k in fields})
    method.fit(world.ctx)
    spec = ParamSpec(world.backbone.model, len(world.ctx.classnames), shots=2)
    assert spec.train_images == len(world.ctx.train)
    assert method.trainable_count(spec) == _actual(method)


def test_every_adapter_kind_is_a_method_with_the_kinds_options():
    from clipconv.app.table2 import row_label
    from clipconv.methods.finetune import AdapterTuning

    for kind in ADAPTERS:
        name = f"adapter:{kind}"
        assert name in method_names()
        spec = METHODS[name]  # resolved by the registry: AdapterTuning of this kind, no class per kind
        method = build_method(name)
        assert type(method) is spec.base and method.adapter_kind == kind and method.name == name
        assert spec.base is (METHODS[kind] if kind in METHODS else AdapterTuning)  # the kind's own method's recipe
        assert spec.data_parallel and not spec.frozen_image_encoder and spec.table2_order is None
        if kind in METHODS:
            assert spec.config_class is METHODS[kind].config_class
    assert build_method("adapter:adaptformer").config.scales == (0.1,)  # the kind's own s
    assert build_method("adapter:convpass").config.scales == build_method("convpass").config.scales
    assert row_label("adapter:adaptformer", None) == "AdaptFormer (adapter:adaptformer)"
    recipe = METHODS["convpass"].presets["demo"]  # every other kind gets convpass's demo training recipe
    assert METHODS["adapter:adaptformer"].presets["demo"] == {"lr": recipe["lr"], "epochs": recipe["epochs"]}
    assert METHODS["adapter:convpass"].presets["demo"] == recipe


def test_table2_prints_both_counts_and_train_seconds(tmp_path, tiny_config):
    from clipconv.app.cli.run_table2 import main
    from clipconv.data import make_image_tree

    tree = make_image_tree(tmp_path / "data", train_per_class=6, val_per_class=2)
    options = {"adapter:adaptformer": {"epochs": 1, "dim": 4}}
    argv = ["--data-root", str(tree), "--model", str(tiny_config), "--pretrained", "none", "--shots", "2",
            "--val-shots", "1", "--seeds", "1", "--workers", "0", "--device", "cpu", "--threads", "1",
            "--output-dir", str(tmp_path / "out"), "--methods", "zero_shot", "adapter:adaptformer",
            "--method-options", json.dumps(options), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "table2.json").read_text())
    classes = result["classes"]
    row = result["measured"]["adapter:adaptformer"]
    assert row["label"] == "AdaptFormer (adapter:adaptformer)"
    assert row["params"]["vit_b16"] == L * (2 * D * 4 + 4 + D) + HEAD  # the row's options (dim 4) on ViT-B/16
    fitted = build_method("adapter:adaptformer", epochs=1, dim=4)
    assert row["params"]["model"] == fitted.trainable_count(ParamSpec(_tiny_model(tiny_config), classes, 2))
    assert result["measured"]["zero_shot"]["params"] == {"vit_b16": 0, "model": 0}
    assert row["train_seconds"] > 0 and (tmp_path / "out" / "adapter-adaptformer_seed1").is_dir()
    assert list((tmp_path / "out" / "adapter-adaptformer_seed1" / "clip_benchmark").glob("*.json"))
    assert not [p.name for p in (tmp_path / "out").iterdir() if ":" in p.name]  # one folder per fit, no ':' names
    markdown = (tmp_path / "out" / "table2.md").read_text()
    assert f"params ViT-B/16 | params here ({classes} classes) | train s |" in markdown
    assert f"| {row['params']['vit_b16']:,} | {row['params']['model']:,} |" in markdown
    header, *lines = [r for r in (tmp_path / "out" / "table2.csv").read_text().splitlines()]
    assert header.endswith(",params_vit_b16,params_model,train_seconds,seeds")
    assert all(len(r.split(",")) == len(header.split(",")) for r in lines if r.startswith("measured"))


def _tiny_model(tiny_config):
    from clipconv.backbone import load_backbone

    return copy.deepcopy(load_backbone(str(tiny_config), pretrained=None, device="cpu").model)
