"""Zero-shot through the method equals a direct encode_image / encode_text computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from baseline_world import make_world
from PIL import Image
from tolerance import assert_close_scaled

from clipconv.methods import build_method


@pytest.fixture()
def world(tmp_path, tiny_config):
    return make_world(tmp_path, tiny_config)


def _images(world):
    return torch.stack([world.backbone.eval_transform(Image.open(world.root / p).convert("RGB"))
                        for p, _ in world.test_samples])


def _direct_logits(world, templates):
    model, tokenizer = world.backbone.model, world.backbone.tokenizer
    with torch.no_grad():
        image = F.normalize(model.encode_image(_images(world)), dim=-1)
        per_class = []
        for name in world.ctx.classnames:
            text = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
            per_class.append(F.normalize(text.mean(0), dim=-1))
        return model.logit_scale.exp() * image @ torch.stack(per_class).t()


def test_zero_shot_equals_direct_computation(world):
    method = build_method("zero_shot")
    summary = method.fit(world.ctx)
    assert (summary["template_set"], summary["templates"]) == ("photo", 1)  # the reference single prompt
    feats = world.store.encode(world.root, world.test_samples)
    expected = _direct_logits(world, ["a photo of a {}."])
    assert_close_scaled(method.logits_from_features(feats), expected)
    assert_close_scaled(method.logits(_images(world)), expected)


def test_named_template_set_is_an_ensemble(world):
    from clipconv.prompts import load_templates

    method = build_method("zero_shot", templates="tip")
    summary = method.fit(world.ctx)
    templates = load_templates("tip")
    assert summary["templates"] == len(templates) > 1 and summary["template_set"] == "tip"
    feats = world.store.encode(world.root, world.test_samples)
    assert_close_scaled(method.logits_from_features(feats), _direct_logits(world, templates))


def test_run_level_templates_override_the_reference(world):
    from clipconv.prompts import load_templates

    world.ctx.templates, world.ctx.templates_name = load_templates("clip80"), "clip80"
    summary = build_method("zero_shot").fit(world.ctx)
    assert (summary["template_set"], summary["templates"]) == ("clip80", 80)
    world.ctx.templates_name = ""
    assert build_method("zero_shot").fit(world.ctx)["template_set"] == "custom"  # an unnamed list
    assert build_method("zero_shot", templates="photo").fit(world.ctx)["templates"] == 1  # option beats the run


def test_unknown_template_set_and_unfitted_use_fail_clearly(world):
    with pytest.raises(FileNotFoundError, match="no_such_set"):
        build_method("zero_shot", templates="no_such_set").fit(world.ctx)
    with pytest.raises(RuntimeError, match="fitted"):
        build_method("zero_shot").logits_from_features(torch.zeros(1, 16))


def test_cli_compares_several_backbones_in_one_table(tmp_path, tiny_config):
    from clipconv.app.cli.zero_shot import main
    from clipconv.data import make_image_tree

    tree = make_image_tree(tmp_path / "data", train_per_class=1, val_per_class=2)
    torch.manual_seed(5)
    from clipconv.backbone import load_backbone

    other = load_backbone(str(tiny_config), pretrained=None, device="cpu")
    with torch.no_grad():
        other.model.visual.proj.mul_(-1)
    weights = tmp_path / "other.pt"
    torch.save(other.model.state_dict(), weights)
    out = tmp_path / "out"
    argv = ["--data-root", str(tree), "--model", str(tiny_config), "--pretrained", "none",
            "--model", str(tiny_config), "--pretrained", str(weights), "--workers", "0", "--device", "cpu",
            "--output-dir", str(out), "--no-cache"]
    assert main(argv) == 0
    import json

    payload = json.loads((out / "zero_shot.json").read_text())
    assert [r["pretrained"] for r in payload["results"]] == ["none", str(weights)]
    assert set(payload["results"][0]["metrics"]) == {"imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a",
                                                     "imagenet_r"}
    table = (out / "zero_shot.md").read_text()
    assert "tiny-clip (none)" in table and "tiny-clip (other.pt)" in table
    a = payload["results"][0]["metrics"]["imagenet_a"]
    assert a["classes"] < payload["classes"] and f"-A {a['n']} / {a['classes']}" in table  # -A over its own classes
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_cli_pairs_must_match(tmp_path, tiny_config, capsys):
    from clipconv.app.cli.zero_shot import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data-root", str(tmp_path), "--model", "a", "--model", "b", "--pretrained", "x",
              "--pretrained", "y", "--pretrained", "z"])
    assert exit_info.value.code == 2 and "--pretrained" in capsys.readouterr().err


def test_each_method_declares_its_reference_templates():
    """zero_shot and Convpass's head: the single "photo" prompt; Tip-Adapter(-F): the 7 "tip" templates;
    methods without a text classifier from templates: None."""
    from clipconv.methods.base import METHODS, method_names

    method_names()
    expected = {"zero_shot": "photo", "tip_adapter": "tip", "tip_adapter_f": "tip", "linear_probe": None,
                "coop": None, "cocoop": None, "convpass": "photo"}
    assert {name: METHODS[name].reference_templates for name in expected if name in METHODS} == \
        {name: ref for name, ref in expected.items() if name in METHODS}


def _zs_argv(tree, tiny_config, *extra):
    return ["--data-root", str(tree), "--model", str(tiny_config), "--pretrained", "none", "--workers", "0",
            "--device", "cpu", "--no-cache", "--eval-sets", "imagenet", *extra]


@pytest.mark.parametrize("kind", ["file", "under_file", "too_long"])
def test_cli_refuses_an_unusable_output_dir_before_evaluating(tmp_path, tiny_config, capsys, monkeypatch, kind):
    # run as root, a chmod'ed folder stays writable: a path through a file stands for "cannot be written"
    import clipconv.app.session
    from clipconv.app.cli.zero_shot import main
    from clipconv.data import make_image_tree

    tree = make_image_tree(tmp_path / "data", train_per_class=1, val_per_class=1)
    monkeypatch.setattr(clipconv.app.session, "fit_and_evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = {"file": blocker, "under_file": blocker / "out", "too_long": tmp_path / ("z" * 300)}[kind]
    with pytest.raises(SystemExit) as info:
        main(_zs_argv(tree, tiny_config, "--output-dir", str(out)))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--output-dir" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "data"]


def test_cli_never_replaces_a_comparison_and_defaults_to_a_new_folder(tmp_path, tiny_config, capsys, monkeypatch):
    import json

    from clipconv.app.cli.zero_shot import main
    from clipconv.data import make_image_tree

    tree = make_image_tree(tmp_path / "data", train_per_class=1, val_per_class=1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20260101-000000")
    assert main(_zs_argv(tree, tiny_config)) == 0
    assert main(_zs_argv(tree, tiny_config)) == 0
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert made == ["zero_shot_20260101-000000", "zero_shot_20260101-000000-2"]
    first = tmp_path / "runs" / made[0]
    before = (first / "zero_shot.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(_zs_argv(tree, tiny_config, "--output-dir", str(first)))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--overwrite" in err and str(first) in err
    assert (first / "zero_shot.json").read_bytes() == before
    assert main(_zs_argv(tree, tiny_config, "--output-dir", str(first), "--overwrite")) == 0
    assert json.loads((first / "zero_shot.json").read_text())["output_dir"] == str(first)
