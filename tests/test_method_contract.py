"""The contract every registered method keeps (parametrized over the registry: a new method is covered
automatically): options round-trip through its config, unknown options raise listing the known ones,
fit + logits work on a tiny generated world, the shared backbone is untouched, and its command-line
options are generated without clashes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from baseline_world import make_world

from clipconv.app.session import backbone_fingerprint
from clipconv.methods.base import METHODS, build_method, method_config_class, method_names

#: the cheapest value of common options (applied where a method has the option)
TINY = {"epochs": 1, "views": 1, "augment_rounds": 1, "bisection_steps": 1, "n_ctx": 4, "search": "small",
        "dim": 4, "batch_size": 8, "scales": (1.0,), "iters_per_shot": 1}
NAMES = method_names()


def tiny_options(name: str) -> dict:
    fields = {f.name for f in dataclasses.fields(method_config_class(METHODS[name]))}
    return {k: v for k, v in TINY.items() if k in fields}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_world(tmp_path_factory.mktemp("contract"), tiny_config, shots=2, val_shots=1, classes=3)


@pytest.mark.parametrize("name", NAMES)
def test_options_round_trip_through_the_config(name):
    config_class = method_config_class(METHODS[name])
    config = config_class.from_options(tiny_options(name))
    assert config_class.from_options(config.to_dict()) == config
    build_method(name, **config.to_dict())  # every config field is a constructor option


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_raises_listing_the_known_ones(name):
    known = sorted(f.name for f in dataclasses.fields(method_config_class(METHODS[name])))
    with pytest.raises(ValueError, match="no_such_option") as info:
        build_method(name, no_such_option=1)
    assert str(known) in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_fit_and_logits_leave_the_shared_backbone_untouched(name, world):
    method = build_method(name, **tiny_options(name))
    before = backbone_fingerprint(world.backbone.model)
    summary = method.fit(world.ctx)
    assert isinstance(summary, dict)
    assert backbone_fingerprint(world.backbone.model) == before, f"{name} changed the shared backbone"
    images = torch.stack([world.backbone.eval_transform(_image(world, path)) for path, _ in world.test_samples[:3]])
    logits = method.logits(images)
    assert logits.shape == (3, len(world.ctx.classnames)) and torch.isfinite(logits).all()
    if method.frozen_image_encoder:
        with torch.no_grad():
            feats = world.backbone.model.encode_image(images).float()
        scale = float(logits.abs().max())
        tol = 256 * torch.finfo(torch.float32).eps * max(scale, 1.0)
        torch.testing.assert_close(method.logits_from_features(feats).float(), logits.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_generated_help_shows_each_option_once_and_no_none_default(name):
    from clipconv.app.cli.train import build_parser

    parser = build_parser(name)
    text = parser.format_help()
    assert "(default: None)" not in text and "default: None" not in text
    assert text.count(f"{name} options:") == (1 if parser.get_default("_method_fields") else 0)
    listed = [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  --")]
    for field in parser.get_default("_method_fields"):
        flag = field.replace("_", "-")
        assert listed.count(f"--{flag}") + listed.count(f"--no-{flag}") == 1, flag


def _image(world, path):
    from PIL import Image

    return Image.open(world.root / path).convert("RGB")


def test_every_preset_is_valid_options_of_its_method():
    """Each method declares its paper (= its reference defaults) and demo presets, as valid options."""
    from clipconv.methods.base import PRESETS, method_config

    for name in NAMES:
        presets = METHODS[name].presets
        assert set(PRESETS) <= set(presets), name
        assert presets["paper"] == {}, name  # the paper preset is the reference defaults themselves
        assert method_config(name, "paper") == method_config_class(METHODS[name])(), name
        method_config_class(METHODS[name]).from_options(presets["demo"])
