"""Table 2's "+ WiSE (α)" rows: the same fit at θ(α), α = 0 is the zero-shot row and α = 1 the plain row
exactly, bad --wise values stop before any work, and resume keeps (or recomputes) the WiSE rows."""
from __future__ import annotations

import json

import pytest

from clipconv.app.cli.run_table2 import main
from clipconv.data import make_image_tree

TINY = {"convpass": {"epochs": 2, "lr": 1e-2, "scales": [1.0], "batch_size": 4},
        "linear_probe": {"bisection_steps": 1}}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_image_tree(tmp_path_factory.mktemp("wise-t2") / "data", train_per_class=6, val_per_class=2)


def _argv(tmp_path, tree, tiny_config, methods, *extra, out="out"):
    return ["--data-root", str(tree), "--model", str(tiny_config), "--pretrained", "none", "--shots", "2",
            "--val-shots", "2", "--seeds", "1", "--workers", "0", "--device", "cpu", "--cache-dir",
            str(tmp_path / "cache"), "--methods", *methods,
            "--method-options", json.dumps({m: TINY[m] for m in methods if m in TINY}),
            "--output-dir", str(tmp_path / out), *extra]


def _table(tmp_path, out="out"):
    return json.loads((tmp_path / out / "table2.json").read_text())


def test_default_wise_row_is_labelled_and_says_alpha_was_fixed_in_advance(tmp_path, tree, tiny_config):
    assert main(_argv(tmp_path, tree, tiny_config, ["zero_shot", "convpass"])) == 0
    table = _table(tmp_path)
    assert list(table["measured"]) == ["zero_shot", "convpass", "convpass+wise"]
    assert table["measured"]["convpass+wise"]["label"] == "Convpass_CLIP + WiSE (α = 0.5)"
    assert table["per_seed"]["convpass+wise"]["1"]["alpha"] == 0.5
    md = (tmp_path / "out" / "table2.md").read_text()
    assert "| Convpass_CLIP + WiSE (α = 0.5) |" in md and "never chosen on a test set" in md
    timing = md[md.index("## wall time"):]
    assert "| Convpass_CLIP + WiSE (α = 0.5) | 0.0 |" in timing  # no fit of its own
    assert "Convpass_CLIP + WiSE (α = 0.5)" in (tmp_path / "out" / "table2.csv").read_text()


@pytest.mark.parametrize("alpha, equals", [("0", "zero_shot"), ("1", "convpass")])
def test_alpha_0_is_the_zero_shot_row_and_alpha_1_the_plain_row(tmp_path, tree, tiny_config, alpha, equals):
    assert main(_argv(tmp_path, tree, tiny_config, ["zero_shot", "convpass"], "--wise-alpha", alpha)) == 0
    per_seed = _table(tmp_path)["per_seed"]
    wise, other = per_seed["convpass+wise"]["1"], per_seed[equals]["1"]
    assert wise["row"] == other["row"]
    assert {k: (m["top1"], m["top5"], m["n"]) for k, m in wise["metrics"].items()} == \
        {k: (m["top1"], m["top5"], m["n"]) for k, m in other["metrics"].items()}
    # the trained and the zero-shot rows differ, so the comparison above tells the two ends apart
    assert per_seed["convpass"]["1"]["row"] != per_seed["zero_shot"]["1"]["row"]


def test_wise_methods_adds_rows_for_other_trained_methods_and_none_removes_them(tmp_path, tree, tiny_config):
    argv = _argv(tmp_path, tree, tiny_config, ["linear_probe", "convpass"], "--wise-methods", "linear_probe",
                 "convpass")
    assert main(argv) == 0
    assert list(_table(tmp_path)["measured"]) == ["linear_probe", "linear_probe+wise", "convpass", "convpass+wise"]
    assert main(_argv(tmp_path, tree, tiny_config, ["convpass"], "--wise-methods", "none", out="none")) == 0
    assert list(_table(tmp_path, "none")["measured"]) == ["convpass"]


@pytest.mark.parametrize("extra, message", [
    (("--wise-alpha", "1.5"), "--wise-alpha: must be a number in [0, 1]"),
    (("--wise-alpha", "-0.1"), "--wise-alpha: must be a number in [0, 1]"),
    (("--wise-alpha", "nan"), "--wise-alpha: must be a finite number"),
    (("--wise-alpha", "half"), "--wise-alpha: expected a number"),
    (("--wise-methods", "zero_shot"), "no trained weights to interpolate"),
    (("--wise-methods", "coop"), "not among --methods"),
])
def test_bad_wise_values_exit_2_and_write_nothing(tmp_path, tree, tiny_config, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        main(_argv(tmp_path, tree, tiny_config, ["zero_shot", "convpass"], *extra))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_resume_keeps_wise_rows_and_refits_a_method_whose_wise_row_is_missing(tmp_path, tree, tiny_config,
                                                                              monkeypatch):
    import clipconv.app.table2

    argv = _argv(tmp_path, tree, tiny_config, ["zero_shot", "convpass"], "--seeds", "1", "2")
    real = clipconv.app.table2.fit_and_evaluate
    calls = []

    def interrupt_fourth(session, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 4:  # seed 2's convpass: seed 1's convpass and its WiSE row are done
            raise KeyboardInterrupt
        return real(session, name, *args, **kwargs)

    monkeypatch.setattr(clipconv.app.table2, "fit_and_evaluate", interrupt_fourth)
    assert main(argv) == 130
    out = tmp_path / "out"
    partial = _table(tmp_path)
    assert partial["missing"] == ["convpass seed 2", "convpass+wise seed 2"]
    kept = partial["per_seed"]["convpass+wise"]["1"]["row"]

    calls.clear()
    monkeypatch.setattr(clipconv.app.table2, "fit_and_evaluate",
                        lambda session, name, *a, **k: calls.append(name) or real(session, name, *a, **k))
    assert main(["--resume", str(out), "--workers", "0"]) == 0
    assert calls == ["convpass"]
    final = _table(tmp_path)
    assert final["complete"] and sorted(final["per_seed"]["convpass+wise"]) == ["1", "2"]
    assert final["per_seed"]["convpass+wise"]["1"]["row"] == kept

    # a table whose WiSE row is lost (e.g. written before it existed): resume fits that method again for it
    saved = json.loads((out / "table2.json").read_text())
    del saved["per_seed"]["convpass+wise"]["2"]
    (out / "table2.json").write_text(json.dumps(saved))
    calls.clear()
    assert main(["--resume", str(out), "--workers", "0"]) == 0
    assert calls == ["convpass"]
    assert sorted(_table(tmp_path)["per_seed"]["convpass+wise"]) == ["1", "2"]
