"""AdapterTuning (adapters + text-initialized head): options as a config dataclass, context-provided
seed/workers, a private copy of the image encoder, and options that reach the adapters."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from clipconv.adapters import AdaptedModule, adapted_modules, adapter_modules
from clipconv.methods import FitContext, build_method
from clipconv.methods.finetune import AdapterTuning, AdapterTuningConfig


def _ctx(backbone, tmp_path, seed: int = 1) -> FitContext:
    return FitContext(backbone=backbone, classnames=["cat", "dog"], data_root=tmp_path, train=[], seed=seed,
                      log=lambda *_: None)


def test_every_option_has_help_text_and_defaults_are_the_papers():
    method = build_method("convpass")
    cfg = method.config
    assert isinstance(cfg, AdapterTuningConfig)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.scales) == (50, 64, 1e-5, 0.0, (10.0,))
    assert (cfg.dim, cfg.kernel_size, cfg.conv_init, cfg.dropout, cfg.drop_path) == (8, 3, "identity", 0.1, 0.0)
    helps = type(cfg).help()
    assert {"dim", "kernel_size", "placement", "sequential", "drop_path", "scales", "lr", "resume"} <= set(helps)
    assert "scale" not in helps  # `scales` replaces the adapter's single scale
    assert all(text.strip() for text in helps.values())


@pytest.mark.parametrize("options, match", [
    ({"bogus": 1}, r"unknown option\(s\) \['bogus'\].*known options: .*'dim'"),
    ({"seed": 3}, r"unknown option\(s\) \['seed'\]"),  # the seed comes from FitContext
    ({"workers": 2}, r"unknown option\(s\) \['workers'\]"),
    ({"dim": 0}, "dim.*must be positive"),
    ({"conv_init": "orthogonal"}, "conv_init"),
    ({"drop_path": 1.5}, "drop_path"),
    ({"scales": []}, "at least one adapter scale"),
])
def test_bad_options_are_refused_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        build_method("convpass", **options)


def test_a_config_object_or_options_but_not_both():
    cls = type(build_method("convpass"))
    config = cls.config_class(dim=4, scales=2.0)
    assert config.scales == (2.0,)
    assert cls(config).adapter_config.dim == 4
    with pytest.raises(ValueError, match="not both"):
        cls(config, dim=4)


def test_registered_methods_fix_their_adapter_kind():
    assert build_method("convpass_attn").adapter_config.placement is None
    with pytest.raises(ValueError, match="implies placement 'attn'"):
        build_method("convpass_attn", placement="mlp")
    assert build_method("convpass_share", dim=32).adapter_kind == "convpass_share"
    assert all(issubclass(type(build_method(n)), AdapterTuning) for n in ("convpass", "convpass_attn", "convpass_share"))


def test_build_adapts_a_private_copy_seeded_by_the_context(tiny_backbone, tmp_path):
    method = build_method("convpass", drop_path=0.1, sequential=True, grad_checkpointing=True, scales=[3.0])
    classifier = method.build(_ctx(tiny_backbone, tmp_path, seed=5))
    assert not any(isinstance(m, AdaptedModule) for m in tiny_backbone.model.visual.modules())  # shared one plain
    wrappers = adapted_modules(classifier.visual)
    assert wrappers and all(type(w).__name__ == "SequentialAdapter" and w.scale == 3.0 for w in wrappers)
    assert max(w.drop_rate for w in wrappers) == pytest.approx(0.1)
    assert classifier.visual.transformer.grad_checkpointing is True
    meta = method.metadata(_ctx(tiny_backbone, tmp_path, seed=5), 3.0)["adapter"]
    assert meta["kind"] == "convpass" and meta["scale"] == 3.0 and meta["drop_path"] == 0.1

    def weights(seed):
        built = build_method("convpass").build(_ctx(tiny_backbone, tmp_path, seed=seed))
        return torch.cat([p.detach().flatten() for p in adapter_modules(built.visual).parameters()])

    assert torch.equal(weights(5), weights(5))
    assert not torch.equal(weights(5), weights(6))


def test_config_round_trips_through_its_dict():
    method = build_method("convpass", dim=4, scales=[0.1, 1.0], epochs=3)
    again = build_method("convpass", **method.config.to_dict())
    assert dataclasses.asdict(again.config) == dataclasses.asdict(method.config)
