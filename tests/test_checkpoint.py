"""Adapter checkpoints hold only trainable tensors, reload exactly and refuse mismatched models."""
from __future__ import annotations

import pytest
import torch

from clipconv.checkpoint import (
    CheckpointMismatchError, load_trainable, read_metadata, save_trainable, trainable_state_dict
)
from clipconv.head import ImageClassifier, text_head

META = {
    "backbone": {"model": "tiny-clip", "weights_id": "random-init", "quick_gelu": False},
    "adapter": {"method": "convpass", "dim": 8, "scale": 1.0},
    "classes": {"count": 2, "hash": "abc"},
}


def _classifier(backbone):
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    head = text_head(backbone.model, backbone.tokenizer, ["cat", "dog"], ["a photo of a {}."])
    return ImageClassifier(backbone.model.visual, head, backbone.logit_scale)


def test_only_trainable_tensors_are_saved_and_reload_reproduces_logits(tmp_path, tiny_backbone):
    clf = _classifier(tiny_backbone)
    with torch.no_grad():
        clf.head.weight.add_(torch.randn_like(clf.head.weight))
        clf.head.bias.fill_(0.25)
    images = torch.randn(3, 3, 32, 32)
    expected = clf(images).detach()
    path = save_trainable(clf, tmp_path / "adapter.safetensors", META)
    assert set(trainable_state_dict(clf)) == {"head.weight", "head.bias"}
    assert read_metadata(path)["adapter"] == META["adapter"]

    fresh = _classifier(tiny_backbone)
    load_trainable(fresh, path, expected=META)
    torch.testing.assert_close(fresh(images), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "field, change, needle",
    [
        ("backbone", {"quick_gelu": True}, "backbone.quick_gelu"),
        ("backbone", {"weights_id": "sha256:ff"}, "backbone.weights_id"),
        ("classes", {"hash": "other"}, "classes.hash"),
        ("adapter", {"dim": 16}, "adapter.dim"),
    ],
)
def test_mismatched_metadata_is_refused_and_nothing_is_loaded(tmp_path, tiny_backbone, field, change, needle):
    clf = _classifier(tiny_backbone)
    path = save_trainable(clf, tmp_path / "adapter.safetensors", META)
    other = {**META, field: {**META[field], **change}}
    target = _classifier(tiny_backbone)
    before = target.head.weight.detach().clone().add_(1.0)
    with torch.no_grad():
        target.head.weight.copy_(before)
    with pytest.raises(CheckpointMismatchError, match=needle):
        load_trainable(target, path, expected=other)
    torch.testing.assert_close(target.head.weight, before, rtol=0, atol=0)


def test_wrong_shapes_are_refused(tmp_path, tiny_backbone):
    clf = _classifier(tiny_backbone)
    path = save_trainable(clf, tmp_path / "adapter.safetensors", META)
    for p in tiny_backbone.model.parameters():
        p.requires_grad_(False)
    three = text_head(tiny_backbone.model, tiny_backbone.tokenizer, ["a", "b", "c"], ["{}"])
    with pytest.raises(CheckpointMismatchError, match="head.weight"):
        load_trainable(ImageClassifier(tiny_backbone.model.visual, three, 1.0), path)


def test_non_safetensors_and_foreign_files_are_refused(tmp_path, tiny_backbone):
    pickle_file = tmp_path / "adapter.safetensors"
    torch.save({"head.weight": torch.zeros(2, 2)}, pickle_file)
    with pytest.raises(ValueError, match="not a safetensors adapter checkpoint"):
        read_metadata(pickle_file)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="no clipconv metadata"):
        read_metadata(foreign)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metadata(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_values_is_refused_naming_file_and_tensor(tmp_path, tiny_backbone, bad):
    from safetensors.torch import load_file, save_file

    from clipconv.checkpoint import METADATA_KEY, DamagedCheckpointError

    clf = _classifier(tiny_backbone)
    path = save_trainable(clf, tmp_path / "adapter.safetensors", META)
    tensors = load_file(str(path))
    tensors["head.bias"][1] = bad
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(path), metadata=metadata)
    assert METADATA_KEY in metadata
    target = _classifier(tiny_backbone)
    before = {n: p.detach().clone() for n, p in target.named_parameters() if p.requires_grad}
    with pytest.raises(DamagedCheckpointError, match=r"adapter\.safetensors': tensor 'head\.bias' has 1 non-finite"):
        load_trainable(target, path, expected=META)
    for name, param in target.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, before[name]), f"{name} was modified"


def test_non_finite_weights_are_not_written(tmp_path, tiny_backbone):
    from clipconv.checkpoint import DamagedCheckpointError

    clf = _classifier(tiny_backbone)
    with torch.no_grad():
        clf.head.weight[0, 0] = float("nan")
    with pytest.raises(DamagedCheckpointError, match="head.weight"):
        save_trainable(clf, tmp_path / "adapter.safetensors", META)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_format_version_is_refused(tmp_path, tiny_backbone):
    clf = _classifier(tiny_backbone)
    path = save_trainable(clf, tmp_path / "adapter.safetensors", {**META, "format_version": 1})
    with pytest.raises(ValueError, match="format version 1"):
        read_metadata(path)


def test_eval_cli_refuses_a_checkpoint_with_nan_with_exit_2(tmp_path, tiny_config, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from clipconv.app.cli import eval_robustness
    from clipconv.backbone import load_backbone
    from clipconv.data import make_image_tree, resolve_run_classes
    from clipconv.methods import FitContext, build_method

    data = make_image_tree(tmp_path / "data", train_per_class=1, val_per_class=1, variants=())
    classes = resolve_run_classes(data)
    backbone = load_backbone(str(tiny_config), pretrained=None, device="cpu")
    ctx = FitContext(backbone=backbone, classnames=classes.names, data_root=data, train=[], class_ids=classes.ids,
                     class_hash=classes.hash(), log=lambda *_: None)
    method = build_method("convpass")
    path = save_trainable(method.build(ctx), tmp_path / "run" / "adapter.safetensors", method.metadata(ctx, 10.0))
    tensors = load_file(str(path))
    name = next(k for k in tensors if ".attn.adapter.up." in k)
    tensors[name].view(-1)[0] = float("nan")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(path), metadata=metadata)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_info:
        eval_robustness.main(["--checkpoint", str(path), "--data-root", str(data), "--workers", "0",
                              "--output-dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and name in err and "non-finite" in err
    assert not out.exists()
