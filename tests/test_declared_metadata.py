"""Methods, adapter kinds and dataset families declare their own metadata; one `Registry` class holds all three
and resolves `adapter:<kind>` without generating a class per kind."""
from __future__ import annotations

import pytest

from clipconv.adapters import ADAPTERS, AdapterConfig, AdapterFactory, get_adapter, mergeable_kinds, register_adapter
from clipconv.app.clip_benchmark import benchmark_task
from clipconv.app.table2 import TABLE2_METHODS, row_label
from clipconv.data import FAMILIES
from clipconv.methods.base import METHODS, build_method, default_method, method_names, table2_methods
from clipconv.methods.finetune import AdapterKindMethod, AdapterTuning
from clipconv.registry import Registry

#: the labels Table 2 printed before the methods declared them (kept exactly)
LABELS = {
    "zero_shot": "ZS CLIP", "linear_probe": "LP CLIP", "coop": "CoOp", "cocoop": "CoCoOp",
    "tip_adapter": "Tip-Adapter", "tip_adapter_f": "Tip-Adapter-F", "convpass": "Convpass_CLIP",
    "convpass_attn": "Convpass (attn only)", "convpass_share": "Convpass-share", "adaptformer": "AdaptFormer",
    "adapter": "Adapter", "lora": "LoRA", "bitfit": "BitFit", "vpt_deep": "VPT-deep", "clip_lora": "CLIP-LoRA",
}
#: Convpass paper, Table 2 (ViT-B/16 CLIP, 16 shots): ImageNet / -V2 / -Sketch / -A / -R
PAPER = {
    "zero_shot": (66.73, 60.83, 46.15, 47.77, 73.96),
    "linear_probe": (65.85, 56.26, 34.77, 35.68, 58.43),
    "coop": (71.51, 64.20, 47.99, 49.71, 75.21),
    "cocoop": (71.02, 64.07, 48.75, 50.63, 76.18),
    "tip_adapter_f": (73.41, 65.39, 48.58, 49.23, 77.54),
    "convpass": (74.23, 66.61, 49.10, 49.27, 78.17),
}
SETS = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def test_the_default_table2_and_its_labels_are_declared_by_the_methods():
    assert TABLE2_METHODS == table2_methods() == (
        "zero_shot", "linear_probe", "coop", "cocoop", "tip_adapter", "tip_adapter_f", "convpass")
    assert {name: row_label(name, None) for name in LABELS} == LABELS
    assert row_label("zero_shot", ("photo", 1)) == "ZS CLIP (1 template)"
    assert row_label("convpass", ("clip80", 80)) == "Convpass_CLIP"  # only zero-shot says its templates
    assert row_label("adapter:lora", None) == "LoRA (adapter:lora)"
    assert row_label("adapter:dora", None) == "DoRA (adapter:dora)"
    assert default_method() == "convpass"


def test_published_numbers_are_the_methods_own():
    assert {name: tuple(METHODS[name].published[s] for s in SETS) for name in method_names()
            if METHODS[name].published} == PAPER
    assert METHODS["adapter:convpass"].published == {}  # the named method's row only


def test_clip_benchmark_task_and_torchrun_support_are_declared():
    assert benchmark_task("zero_shot") == "zeroshot_classification"
    assert benchmark_task("linear_probe") == "linear_probe"
    assert benchmark_task("coop") == "fewshot_coop"
    assert benchmark_task("adapter:lora") == "fewshot_adapter:lora"
    parallel = {name for name in method_names() if METHODS[name].data_parallel}
    adapters = {name for name in method_names() if name in ADAPTERS or name.startswith("adapter:")}
    assert parallel == adapters | {f"robust:{name}" for name in adapters if f"robust:{name}" in method_names()}


def test_adapter_kinds_declare_mergeability_and_labels():
    assert mergeable_kinds() == ["bitfit", "dora", "lora"]
    assert get_adapter("convpass").label == "Convpass_CLIP" and not get_adapter("convpass").mergeable


@pytest.fixture()
def temporary_kind():
    name = "test_identity_kind"

    @register_adapter(name, config=AdapterConfig, placement="mlp", label="Nothing")
    def build(config, target):
        raise AssertionError("not built in this test")

    try:
        yield name
    finally:
        ADAPTERS.remove(name)


def test_a_registered_kind_is_a_method_at_once_without_a_generated_class(temporary_kind):
    name = f"adapter:{temporary_kind}"
    assert name in method_names() and name in METHODS
    spec = METHODS[name]
    assert isinstance(spec, AdapterKindMethod) and spec is METHODS[name]  # resolved once, then kept
    assert spec.label == f"Nothing ({name})" and spec.table2_order is None and spec.data_parallel
    method = build_method(name, epochs=1)
    assert type(method) is AdapterTuning and method.adapter_kind == temporary_kind and method.name == name
    assert not [c for c in AdapterTuning.__subclasses__() if temporary_kind in c.__name__]


def test_a_removed_kind_is_no_method_any_more(temporary_kind):
    METHODS[f"adapter:{temporary_kind}"]
    ADAPTERS.remove(temporary_kind)
    try:
        assert f"adapter:{temporary_kind}" not in method_names()
        with pytest.raises(ValueError, match="unknown method"):
            build_method(f"adapter:{temporary_kind}")
    finally:
        register_adapter(temporary_kind, config=AdapterConfig)(lambda config, target: AdapterFactory(inject=list))


def test_one_registry_class_for_methods_kinds_and_families():
    assert type(METHODS) is type(ADAPTERS) is type(FAMILIES) is Registry
    registry: Registry[int] = Registry("thing")
    registry.add("a", 1)
    registry.resolver("n:", lambda suffix: len(suffix), lambda: ["xy", "xyz"])
    assert list(registry) == ["a", "n:xy", "n:xyz"] and registry["n:xyz"] == 3 and len(registry) == 3
    assert "n:q" not in registry and registry.get("n:q") is None
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.add("a", 2)
    with pytest.raises(ValueError, match=r"thing 'n:xy' is already registered"):
        registry.add("n:xy", 2)
    with pytest.raises(ValueError, match=r"unknown thing 'b'; choose one of \['a', 'n:xy', 'n:xyz'\]"):
        registry.lookup("b")

    @registry.register("k")
    class Thing:
        pass

    assert Thing.name == "k" and registry["k"] is Thing


def test_families_declare_what_check_data_says(tmp_path):
    imagenet, wds = FAMILIES["imagenet"], FAMILIES["wds"]
    assert imagenet.default and not FAMILIES["demo"].default and not wds.default
    assert [name for name, family in FAMILIES.items() if family.selected_by_name] == ["wds"]
    assert "--demo" in imagenet.check_hint and not FAMILIES["folder"].check_hint
    assert "no ImageNet train split" in imagenet(tmp_path).missing_train_error()
