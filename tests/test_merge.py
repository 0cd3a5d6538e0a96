"""Merge for free inference (clipconv/merge.py, scripts/export_merged.py): LoRA and BitFit fold into a plain
open_clip model (loaded with no adapter code) with the same outputs; other kinds are refused, nothing changed."""
from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from baseline_world import make_world
from safetensors import safe_open
from safetensors.torch import load_file
from test_docs import REPO, python_blocks
from tolerance import assert_close_scaled, differs_beyond_tolerance
from torch import nn

from clipconv.adapters import adapter_kinds, adapter_modules, add_adapters, add_lora
from clipconv.adapters.dora import DORA
from clipconv.adapters.lora import LoRA
from clipconv.app.cli.export_merged import head_path
from clipconv.app.cli.export_merged import main as export_main
from clipconv.checkpoint import save_trainable
from clipconv.merge import merge_adapters, merged_state_dict
from clipconv.methods.base import build_method
from clipconv.methods.finetune import AdapterTuning


def _images(visual: nn.Module, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, *visual.image_size, generator=torch.Generator().manual_seed(7))


def _randomize(modules: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in modules.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def _plain_model(tiny_config: Path) -> nn.Module:
    """A fresh open_clip model of the tiny config: no clipconv code involved."""
    open_clip.add_model_config(str(tiny_config))
    return open_clip.create_model(tiny_config.stem, pretrained=None).eval()


@pytest.mark.parametrize("kind, options", [
    ("lora", {"targets": ("q", "k", "v", "o"), "rank": 2, "alpha": 3.0, "scale": 0.7}),
    ("lora", {}),
    ("bitfit", {}),
])
def test_merged_encoder_loads_into_plain_open_clip_and_gives_the_same_output(tiny_backbone, tiny_config, kind,
                                                                             options):
    model = tiny_backbone.model.eval()
    visual = model.visual
    plain_output = visual(_images(visual)).detach()
    _randomize(add_adapters(visual, kind, **options))
    images = _images(visual)
    with torch.no_grad():
        adapted = visual(images)
    assert differs_beyond_tolerance(adapted, plain_output)
    state = merged_state_dict(visual)
    assert adapter_kinds(visual) == [kind]  # merged_state_dict leaves the adapted encoder as it was
    plain = _plain_model(tiny_config).visual
    plain.load_state_dict(state, strict=True)  # the exact key set of a plain open_clip encoder
    with torch.no_grad():
        assert_close_scaled(plain(images), adapted)
    assert merge_adapters(visual) == [kind] and not adapter_kinds(visual)  # in place: the same encoder, plain
    with torch.no_grad():
        assert_close_scaled(visual(images), adapted)


@pytest.mark.parametrize("variant", [LoRA.variant, DORA], ids=lambda v: v.kind)
def test_clip_lora_on_both_encoders_merges_into_one_plain_state_dict(tiny_backbone, tiny_config, variant):
    """LoRA and its DoRA variant on both encoders fold into one plain open_clip state dict."""
    model = tiny_backbone.model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    options = {"dropout": 0.0} if variant is DORA else {}  # DoRA takes no LoRA dropout
    _randomize(add_lora(model.transformer, variant=variant, **options))
    _randomize(add_lora(model.visual.transformer, ("q", "k", "v"), variant=variant, **options), seed=1)
    assert adapter_kinds(model) == [variant.kind]
    images = _images(model.visual)
    text = tiny_backbone.tokenizer(["a photo of a cat.", "a photo of a dog."])
    with torch.no_grad():
        image_features, text_features = model.encode_image(images), model.encode_text(text)
    plain = _plain_model(tiny_config)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    with torch.no_grad():
        assert_close_scaled(plain.encode_image(images), image_features)
        assert_close_scaled(plain.encode_text(text), text_features)


@pytest.mark.parametrize("kinds", [["convpass"], ["vpt_deep"], ["convpass_share"], ["vpt_deep", "lora"]])
def test_kinds_with_their_own_computation_are_refused_and_nothing_changes(tiny_backbone, kinds):
    visual = tiny_backbone.model.visual.eval()
    for kind in kinds:
        _randomize(add_adapters(visual, kind))
    images = _images(visual)
    with torch.no_grad():
        before = visual(images)
    blocked = sorted(set(kinds) - {"lora"})
    with pytest.raises(ValueError, match=r"cannot be merged.*only \['bitfit', 'dora', 'lora'\]") as info:
        merge_adapters(visual)
    assert str(blocked) in str(info.value)
    assert adapter_kinds(visual) == sorted(kinds)
    with torch.no_grad():
        assert torch.equal(visual(images), before)
    with pytest.raises(ValueError, match="no adapters to merge"):
        merge_adapters(nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module", params=["lora", "dora"])
def trained_run(request, tmp_path_factory, tiny_config):
    world = make_world(tmp_path_factory.mktemp("merge"), tiny_config)
    method = build_method(f"adapter:{request.param}", epochs=1, batch_size=4, lr=1e-2, scales=[1.0],
                          targets=("q", "k", "v"))
    assert isinstance(method, AdapterTuning) and method.adapter_kind == request.param
    run = tmp_path_factory.mktemp("run")
    ctx = copy.copy(world.ctx)
    ctx.output_dir = run
    method.fit(ctx)
    return world, method, run


def test_export_merged_cli_writes_a_plain_model_and_head_with_the_same_logits(trained_run, tiny_config, tmp_path):
    world, method, run = trained_run
    output = tmp_path / "merged.safetensors"
    assert export_main(["--checkpoint", str(run), "--output", str(output)]) == 0
    head_file = head_path(output)
    assert head_file == tmp_path / "merged.head.safetensors" and head_file.is_file()
    open_clip.add_model_config(str(tiny_config))
    model = open_clip.create_model(tiny_config.stem, pretrained=str(output)).eval()  # plain open_clip, no clipconv
    head = load_file(str(head_file))
    with safe_open(str(head_file), framework="pt") as handle:
        logit_scale = float(handle.metadata()["logit_scale"])
    images = _images(model.visual)
    with torch.no_grad():
        merged = logit_scale * F.linear(F.normalize(model.encode_image(images), dim=-1), head["head.weight"],
                                        head["head.bias"])
        expected = method.logits(images)
    assert_close_scaled(merged, expected)
    assert differs_beyond_tolerance(expected, world.backbone.model.visual(images) @ head["head.weight"].t())


def test_the_documented_loading_code_rebuilds_a_json_config_model_in_a_new_process(trained_run, tiny_config,
                                                                                   tmp_path, monkeypatch):
    """docs/methods.md's python block, as written, on an export of a model given as a config JSON: open_clip does
    not know the name in a new process (removed here), `load_merged_model` rebuilds it from the recorded config."""
    world, method, run = trained_run
    monkeypatch.chdir(tmp_path)
    assert export_main(["--checkpoint", str(run), "--output", "merged.safetensors"]) == 0
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, tiny_config.stem, raising=False)
    with pytest.raises(RuntimeError, match="not found"):  # what the plain open_clip call meets in a new process
        open_clip.create_model(tiny_config.stem, pretrained="merged.safetensors")
    blocks = [b for b in python_blocks(REPO / "docs" / "methods.md") if "load_merged_model" in b]
    assert len(blocks) == 1, "docs/methods.md should show the merged model's loading code once"
    images = _images(world.backbone.model.visual)
    namespace = {"__name__": "docs_snippet", "images": images}
    with torch.no_grad():
        exec(compile(blocks[0], "docs/methods.md", "exec"), namespace)
        expected = method.logits(images)
    assert_close_scaled(namespace["logits"], expected)
    assert namespace["class_ids"] == list(world.ctx.class_ids)


def test_export_merged_cli_bad_input_is_one_line_exit_2_nothing_written(trained_run, tmp_path, capsys, tiny_backbone):
    _, _, run = trained_run
    output = tmp_path / "merged.safetensors"
    output.write_bytes(b"finished result")

    def refused(args: list[str], message: str) -> None:
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(SystemExit) as info:
            export_main(args)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == before

    refused(["--checkpoint", str(run), "--output", str(output)], "never overwritten")
    assert output.read_bytes() == b"finished result"
    refused(["--checkpoint", str(run), "--output", str(tmp_path / "merged.pt")], "ending in .safetensors")
    refused(["--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "m.safetensors")], "missing")
    visual = tiny_backbone.model.visual
    add_adapters(visual, "convpass")
    convpass = save_trainable(adapter_modules(visual), tmp_path / "convpass.safetensors", {"adapter": {"kind": "convpass"}})
    refused(["--checkpoint", str(convpass), "--output", str(tmp_path / "m.safetensors")],
            "adapter kind 'convpass' cannot be merged")
