"""Settings declared once: config dataclasses, the command line generated from them, shared defaults."""
from __future__ import annotations

import dataclasses

import pytest

from clipconv.config import BackboneConfig, DataConfig, RuntimeConfig


def test_unknown_and_invalid_options_raise_naming_the_option():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['wokers'\].*known options: .*'workers'"):
        RuntimeConfig.from_options({"wokers": 2})
    with pytest.raises(ValueError, match="option 'crop_scale' of BackboneConfig must be in"):
        BackboneConfig(crop_scale=0.0)
    with pytest.raises(ValueError, match="option 'precision' of BackboneConfig must be one of"):
        BackboneConfig(precision="fp8")
    with pytest.raises(ValueError, match="finite"):
        BackboneConfig(crop_scale=float("nan"))


def test_train_and_table2_share_every_default():
    from clipconv.app.cli import run_table2, train
    from clipconv.app.run import VAL_SHOTS, RunConfig
    from clipconv.app.table2 import Table2Config

    assert RunConfig().val_shots == Table2Config().val_shots == VAL_SHOTS == 4
    for parser in (train.build_parser("convpass"), run_table2.build_parser()):
        assert parser.parse_args(["--data-root", "x"]).__dict__.get("workers", "unset") == "unset"  # from config
        text = parser.format_help()
        assert "default: 4)" in text.split("  --val-shots VAL_SHOTS")[1][:400]
        assert "(default: None)" not in text
    for section in (DataConfig, BackboneConfig, RuntimeConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(section)), section


def test_method_flags_are_generated_with_the_old_aliases():
    from clipconv.app.cli.options import given
    from clipconv.app.cli.train import METHOD_PREFIX, build_parser

    parser = build_parser("convpass")
    args = parser.parse_args(["--scale", "1", "10", "--wd", "0.1", "--sequential", "--kernel-size", "1",
                              "--conv-init", "xavier", "--epochs", "3", "--warmup-epochs", "0.5"])
    assert given(args, args._method_fields, METHOD_PREFIX) == {
        "scales": [1.0, 10.0], "weight_decay": 0.1, "sequential": True, "kernel_size": 1, "conv_init": "xavier",
        "epochs": 3, "warmup_epochs": 0.5}
    text = parser.format_help()
    assert "--lr LR" in text and "--preset demo: 0.003" in text and "--crop-scale 0.9" in text
    assert text.count("--lr LR ") + text.count("--lr LR\n") == 1


def test_demo_fills_only_what_no_flag_gave(tmp_path):
    from clipconv.app.cli.options import shared_configs
    from clipconv.app.cli.train import build_parser, config_from_args
    from clipconv.mini_clip import MINI_CLIP_CONFIG

    parser = build_parser("convpass")
    args = parser.parse_args(["--demo", "--data-root", str(tmp_path), "--crop-scale", "0.5", "--lr", "0.1"])
    configs = shared_configs(args, args._fields, parser)
    assert configs["backbone"].model == str(MINI_CLIP_CONFIG) and configs["backbone"].crop_scale == 0.5
    assert configs["data"].data_root == str(tmp_path.resolve())
    args.method = "convpass"
    cfg = config_from_args(args, parser)
    assert cfg.preset == "demo" and cfg.method_config.lr == 0.1  # the flag over the demo preset's 3e-3
    assert cfg.method_config.dim == 32 and cfg.method_config.epochs == 30  # the rest of the demo preset


def test_the_dataset_family_is_chosen_in_one_place(tmp_path):
    from clipconv.app.session import open_data_family
    from clipconv.data.family import ImageNetFamily

    family = open_data_family(DataConfig(data_root=str(tmp_path)))
    assert isinstance(family, ImageNetFamily) and family.data_root == tmp_path
    with pytest.raises(ValueError, match="unknown dataset family 'nope'; choose one of .*imagenet"):
        open_data_family(DataConfig(family="nope", data_root=str(tmp_path)))
