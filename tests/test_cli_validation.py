"""Every option checked before anything is written (issue 18): ranges declared with the options, the methods'
options against the backbone before the first fit, resume comparisons on normalized values, the world size of
a resumed run, a checkpoint's model, and warnings in clipconv's one message format."""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
import warnings
from pathlib import Path

import pytest
from cli_world import refused_line, run_cli

from clipconv.app import bench, bench_data, cache, pretrain_mini_clip
from clipconv.app import run as run_module
from clipconv.app import table2
from clipconv.app.cli import check_data, eval_robustness, export_merged, run_table2
from clipconv.app.cli import train
from clipconv.app.cli import train as train_cli
from clipconv.app.cli import zero_shot
from clipconv.app.run import check_resume_world_size
from clipconv.data import make_image_tree
from clipconv.data.fewshot import sample_few_shot
from clipconv.methods.base import METHODS, method_names


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_tree(tmp_path_factory.mktemp("validation") / "data", train_per_class=3, val_per_class=1,
                           variants=())


def _base(data, out, tiny_config, *extra):
    return ["--data-root", str(data), "--model", str(tiny_config), "--pretrained", "none", "--epochs", "1",
            "--shots", "2", "--eval-sets", "imagenet", "--workers", "0", "--no-cache", "--output-dir", str(out),
            *extra]


@pytest.fixture(scope="module")
def finished_run(data, tiny_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert run_cli(train.main, _base(data, run, tiny_config)).returncode == 0
    return run


@pytest.fixture()
def no_backbone(monkeypatch):
    """Fails a test whose command line gets as far as opening a session (loading the backbone)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the bad option was refused")

    monkeypatch.setattr(run_module, "open_session", refuse)


def _numeric(tp: object) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return any(a in (int, float) or _numeric(a) for a in args if a is not tp) or tp in (int, float)


def test_every_numeric_method_option_declares_its_range():
    """Ranges are declared once, with the option: the config, the generated flags and --method-options all
    enforce them (an option the value of which was only checked when fitting is refused too late)."""
    undeclared = []
    for name in method_names():
        config = METHODS[name].config_class
        hints = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            if _numeric(hints[f.name]) and f.metadata.get("check") is None and f.metadata.get("choices") is None:
                undeclared.append(f"{name}.{f.name}")
    assert not undeclared, undeclared


@pytest.mark.parametrize("flag, value", [("--dim", "0"), ("--dropout", "1.5"), ("--kernel-size", "2")])
def test_bad_method_flag_is_refused_before_the_backbone_loads(data, tiny_config, tmp_path, capsys, no_backbone,
                                                               flag, value):
    out = tmp_path / "run"
    result = run_cli(train.main, _base(data, out, tiny_config, flag, value))
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and flag in errors[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("method, options, line", [
    ("lora", {"rank": 0}, "error: --method-options rank: must be positive, got 0"),
    ("convpass", {"dropout": 1.5}, "error: --method-options dropout: must be in [0, 1), got 1.5"),
    ("vpt_deep", {"tokens": -1}, "error: --method-options tokens: must be positive, got -1"),
    ("coop", {"momentum": 1.0}, "error: --method-options momentum: must be in [0, 1), got 1.0"),
])
def test_bad_method_options_are_refused_naming_the_key(data, tiny_config, tmp_path, capsys, no_backbone, method,
                                                        options, line):
    out = tmp_path / "run"
    argv = _base(data, out, tiny_config, "--method", method, "--method-options", json.dumps(options))
    assert refused_line(train.main, argv, capsys) == line
    assert not out.exists()


def test_a_refused_run_leaves_no_run_behind_and_the_corrected_rerun_goes_into_the_same_folder(
        data, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # an existing, empty --output-dir
    bad = _base(data, out, tiny_config, "--method", "lora", "--method-options", '{"rank": 0}')
    assert "--method-options rank" in refused_line(train.main, bad, capsys)
    assert [p.name for p in out.iterdir()] == []
    fixed = _base(data, out, tiny_config, "--method", "lora", "--method-options", '{"rank": 2}', "--quiet")
    assert run_cli(train.main, fixed).returncode == 0 and (out / "metrics.json").is_file()


def test_a_run_that_stops_on_bad_input_before_training_counts_as_no_run(data, tiny_config, tmp_path, capsys,
                                                                         monkeypatch):
    """Whatever a fit refuses before it trains (here: a stand-in ValueError), config.json, split.json and
    log.txt go again: the folder holds no run, and the same command into it is not refused."""
    def refuse(*args, **kwargs):
        raise ValueError("refused by the method")

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "fit_and_evaluate", refuse)
        assert refused_line(train.main, _base(data, out, tiny_config), capsys) == "error: refused by the method"
    assert not [p.name for p in out.iterdir() if not p.name.startswith(".")]
    assert run_cli(train.main, _base(data, out, tiny_config, "--quiet")).returncode == 0


def test_table2_names_the_method_and_key_of_a_bad_option(data, tiny_config, tmp_path, capsys):
    out = tmp_path / "table"
    argv = ["--data-root", str(data), "--model", str(tiny_config), "--pretrained", "none", "--workers", "0",
            "--output-dir", str(out), "--methods", "zero_shot", "lora", "--method-options",
            '{"lora": {"rank": 0}}']
    assert refused_line(run_table2.main, argv, capsys) == "error: --method-options lora.rank: must be positive, got 0"
    assert not out.exists()


def test_table2_checks_every_method_against_the_backbone_before_the_first_fit(data, tiny_config, tmp_path, capsys,
                                                                            monkeypatch):
    """The tiny CLIP's text context is 16 tokens: CoOp's reference 16 context tokens cannot fit. It is
    refused before zero-shot runs, and nothing is written."""

    def no_fit(*args, **kwargs):
        raise AssertionError("a method was fitted before the CoOp options were checked")

    monkeypatch.setattr(table2, "fit_and_evaluate", no_fit)
    out = tmp_path / "table"
    argv = ["--data-root", str(data), "--model", str(tiny_config), "--pretrained", "none", "--workers", "0",
            "--no-cache", "--output-dir", str(out), "--methods", "zero_shot", "coop"]
    line = refused_line(run_table2.main, argv, capsys)
    assert "method 'coop'" in line and "text context length 16" in line and "n_ctx" in line, line
    assert not out.exists()


def test_table2_resume_under_another_world_size_is_refused(data, tiny_config, tmp_path, capsys, monkeypatch):
    out = tmp_path / "table"
    argv = ["--data-root", str(data), "--model", str(tiny_config), "--pretrained", "none", "--workers", "0",
            "--no-cache", "--output-dir", str(out), "--methods", "zero_shot", "--eval-sets", "imagenet", "--quiet"]
    assert run_cli(run_table2.main, argv).returncode == 0
    record = json.loads((out / "table2_config.json").read_text())
    assert record["environment"] == {"world_size": 1}
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(run_table2, "join_process_group", lambda device: 2)  # as under torchrun --nproc_per_node 2
    reads = []

    def counted(read):
        def read_json_object(path, *args, **kwargs):
            reads.append(Path(path).name)
            return read(path, *args, **kwargs)
        return read_json_object

    for module in (table2, run_table2):  # wherever the record may be read
        if hasattr(module, "read_json_object"):
            monkeypatch.setattr(module, "read_json_object", counted(module.read_json_object))
    line = refused_line(run_table2.main, ["--resume", str(out), "--workers", "0"], capsys)
    assert "started as 1 process(es), this is 2" in line and "plain python" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert reads == ["table2_config.json"]  # read once: the config and the world size it started with


def test_train_checks_the_method_against_the_backbone_before_writing(data, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    line = refused_line(train.main, _base(data, out, tiny_config, "--method", "coop"), capsys)
    assert "method 'coop'" in line and "n_ctx" in line, line
    assert not out.exists()


def test_resume_with_the_saved_values_is_no_conflict(finished_run):
    result = run_cli(train.main, ["--resume", str(finished_run), "--eval-sets", "imagenet", "--shots", "2",
                                  "--dim", "8", "--lr", "1e-5", "--workers", "0", "--quiet"])
    assert result.returncode == 0, result.stderr


def test_resume_comparison_is_on_normalized_values(finished_run):
    saved = train_cli.RunConfig.from_dict(json.loads((finished_run / "config.json").read_text()))
    assert not train_cli._differs(saved.data, "eval_sets", ["imagenet"])  # a list flag vs the saved tuple
    assert not train_cli._differs(saved.method_config, "scales", [10])  # 10 vs 10.0
    assert train_cli._differs(saved.data, "eval_sets", ["imagenet", "imagenet_v2"])
    assert train_cli._differs(saved.method_config, "dim", 0)  # a value the option refuses differs


def test_resume_under_another_world_size_is_refused(finished_run, capsys, monkeypatch):
    saved = json.loads((finished_run / "config.json").read_text())
    assert saved["environment"]["world_size"] == 1
    check_resume_world_size(saved, 1, "RUN")
    with pytest.raises(ValueError, match=r"started as 1 process\(es\), this is 2; .*plain python"):
        check_resume_world_size(saved, 2, "RUN")
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        check_resume_world_size({"environment": {"world_size": 2}}, 1, "RUN")
    before = {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file() and p.name != "log.txt"}
    monkeypatch.setattr(train_cli, "join_process_group", lambda device: 2)  # as under torchrun --nproc_per_node 2
    line = refused_line(train.main, ["--resume", str(finished_run), "--workers", "0"], capsys)
    assert "started as 1 process(es), this is 2" in line
    assert {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file() and p.name != "log.txt"} == before


def test_eval_of_a_checkpoint_with_another_model_is_refused_before_loading(finished_run, tmp_path, capsys):
    """`eval_robustness.py --demo --model ViT-B-16` on a mini-CLIP run used to load ViT-B-16 and fail inside torch
    ("compute_index_ranges_weights" not implemented for 'Half'); the checkpoint names its model."""
    out = tmp_path / "eval"
    line = refused_line(eval_robustness.main, ["--checkpoint", str(finished_run), "--demo", "--model", "ViT-B-16",
                                               "--output-dir", str(out)], capsys)
    assert line.startswith("error: --model ViT-B-16:") and "trained on model 'tiny-clip'" in line, line
    assert not out.exists()


@pytest.fixture(scope="module")
def one_broken_image(tmp_path_factory):
    """(root, samples): two classes of two train images, one of them undecodable."""
    tree = make_image_tree(tmp_path_factory.mktemp("broken") / "data", wnids=["m000", "m001"], names=["red", "blue"],
                           variants=(), train_per_class=2, val_per_class=1)
    folders = [tree / "imagenet" / "images" / "train" / wnid for wnid in ("m000", "m001")]
    next(folders[0].iterdir()).write_bytes(b"not an image")
    return tree, [(str(p.relative_to(tree)), label) for label, folder in enumerate(folders)
                  for p in sorted(folder.iterdir())]


def _python_display(message, category, filename, lineno, file=None, line=None):
    """What Python's own `warnings.showwarning` does outside pytest (which records warnings instead)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@pytest.mark.parametrize("main", [train.main, run_table2.main, eval_robustness.main, zero_shot.main, check_data.main,
                                  export_merged.main, cache.main, bench.main, bench_data.main, pretrain_mini_clip.main])
def test_warnings_print_in_clipconvs_format(main, one_broken_image, capsys):
    """A warning raised in library code (here: the few-shot draw skipping an undecodable image) prints as
    `warning: message` on stderr, not Python's `file.py:NNN: UserWarning: message`."""
    tree, samples = one_broken_image
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _python_display
        with pytest.raises(SystemExit):
            main(["--no-such-flag"])
        capsys.readouterr()
        sample_few_shot(samples, 2, 1, root=tree, verify=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert any("undecodable" in line for line in lines), err
    assert all(line.startswith("warning: ") for line in lines), err
    assert "UserWarning" not in err and ".py:" not in err
