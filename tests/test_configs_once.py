"""A method's typed config is built once (preset ← flags ← --method-options) and reaches the method as is;
presets are declared by each method; options are type-strict."""
from __future__ import annotations

import dataclasses
import json

import pytest
from cli_world import make_cli_world

from clipconv.app.cli import run_table2, train
from clipconv.methods.base import METHODS, build_method, method_config, method_names


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    return make_cli_world(tmp_path_factory.mktemp("once"), tiny_config)


def _argv(world, out, *extra):
    return ["--data-root", str(world["data"]), "--model", str(world["config"]), "--pretrained", str(world["weights"]),
            "--shots", "2", "--val-shots", "0", "--workers", "0", "--no-cache", "--output-dir", str(out), *extra]


# ----- presets -------------------------------------------------------------------------------------------
def test_the_demo_preset_is_the_demo_recipe_of_before():
    convpass = method_config("convpass", "demo")
    assert (convpass.dim, convpass.lr, convpass.scales, convpass.epochs) == (32, 3e-3, (1.0,), 30)
    for name in ("adaptformer", "lora", "convpass_attn", "adapter:bitfit"):  # convpass's training recipe only
        demo, paper = method_config(name, "demo"), method_config(name, "paper")
        assert (demo.lr, demo.epochs) == (3e-3, 30), name
        assert dataclasses.replace(demo, lr=paper.lr, epochs=paper.epochs) == paper, name  # nothing else
    for name in ("coop", "cocoop"):
        demo = method_config(name, "demo")
        assert (demo.n_ctx, demo.init_phrase) == (4, "a photo of a"), name
    for name in ("zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "clip_lora"):
        assert method_config(name, "demo") == method_config(name, "paper"), name


def test_the_paper_preset_is_the_reference_defaults():
    for name in method_names():
        assert method_config(name, "paper") == METHODS[name].config_class(), name
    with pytest.raises(ValueError, match="unknown preset 'fast'.*'demo', 'paper'"):
        method_config("convpass", "fast")


def test_help_shows_the_preset_and_its_values(capsys):
    for main in (train.main, run_table2.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        assert "--preset {paper,demo,robust,demo+robust}" in text, main
    assert "--preset demo: 32" in train.build_parser("convpass").format_help()  # beside --dim


def test_demo_selects_the_demo_preset_and_preset_paper_overrides_it(tmp_path):
    parser = train.build_parser("convpass")
    args = parser.parse_args(["--demo", "--data-root", str(tmp_path)])
    args.method = "convpass"
    cfg = train.config_from_args(args, parser)
    assert cfg.preset == "demo" and cfg.method_config == method_config("convpass", "demo")
    assert cfg.backbone.crop_scale == 0.9  # the demo preset's run setting
    args = parser.parse_args(["--demo", "--preset", "paper", "--data-root", str(tmp_path)])
    args.method = "convpass"
    assert train.config_from_args(args, parser).method_config.lr == method_config("convpass").lr


# ----- type-strict options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options, kind", [({"epochs": 1.5}, "an integer"), ({"epochs": True}, "an integer"),
                                           ({"compile": 1}, "true or false"), ({"lr": "fast"}, "a number"),
                                           ({"scales": [True]}, "a list of a number")])
def test_options_of_the_wrong_type_are_refused(options, kind):
    with pytest.raises(ValueError, match=f"option '{next(iter(options))}' of .* must be {kind}"):
        build_method("convpass", **options)


def test_a_float_option_takes_an_int_and_holds_a_float():
    config = method_config("convpass", options={"lr": 1, "scales": [1, 10]})
    assert type(config.lr) is float and config.scales == (1.0, 10.0)


@pytest.mark.parametrize("text", ['{"epochs": 1.5}', '{"epochs": true}', '{"grad_checkpointing": 0}'])
def test_the_cli_refuses_a_wrongly_typed_option_with_one_line(world, tmp_path, capsys, text):
    with pytest.raises(SystemExit) as info:
        train.main(_argv(world, tmp_path / "run", "--method-options", text))
    err = capsys.readouterr().err
    key = next(iter(json.loads(text)))  # the line names the --method-options key
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: --method-options {key}: must be")
    assert not (tmp_path / "run").exists()


def test_a_flag_and_a_method_options_key_that_disagree_are_refused(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(_argv(world, tmp_path / "run", "--epochs", "2", "--method-options", '{"epochs": 3}'))
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--epochs 2" in err and '"epochs": 3' in err
    parser = train.build_parser("convpass")  # the same value both ways is one option
    args = parser.parse_args(_argv(world, tmp_path / "run", "--epochs", "2", "--method-options", '{"epochs": 2}'))
    args.method = "convpass"
    assert train.config_from_args(args, parser).method_config.epochs == 2


# ----- one config object, from the CLI to the method -------------------------------------------------------
def _capture(monkeypatch, module):
    """Record the configs `module.build_method_config` returns and those the methods are built with."""
    import clipconv.app.session as session

    built, used = [], []
    original_build, original_method = module.build_method_config, session.build_method

    def build(*args, **kwargs):
        built.append(original_build(*args, **kwargs))
        return built[-1]

    def method(name, config=None, **options):
        made = original_method(name, config, **options)
        used.append((config, made.config))
        return made

    monkeypatch.setattr(module, "build_method_config", build)
    monkeypatch.setattr(session, "build_method", method)
    return built, used


def test_the_method_gets_the_config_object_the_cli_built(world, tmp_path, monkeypatch):
    built, used = _capture(monkeypatch, train)
    assert train.main(_argv(world, tmp_path / "run", "--method", "zero_shot")) == 0
    assert len(built) == 1 and used  # built once; checked against the backbone, then fitted, with that object
    assert all(config is built[0] and made is built[0] for config, made in used)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method_options"] == built[0].to_dict()  # config.json records the whole config


def test_table2_methods_get_the_config_objects_the_cli_built(world, tmp_path, monkeypatch):
    built, used = _capture(monkeypatch, run_table2)
    argv = _argv(world, tmp_path / "t2", "--methods", "zero_shot", "linear_probe", "--seeds", "1", "2",
                 "--method-options", '{"linear_probe": {"bisection_steps": 1}}')
    assert run_table2.main(argv) == 0
    assert len(built) == 2 and built[1].bisection_steps == 1
    fitted = [config for config, _ in used if config is not None]
    assert fitted and all(any(config is b for b in built) for config in fitted)
    assert all(made is config for config, made in used if config is not None)
