"""run_table2 end to end on a generated tree with a tiny model; option handling; seed aggregation."""
from __future__ import annotations

import csv
import json
import math
from collections import Counter

import pytest

from clipconv.app.cli.run_table2 import main
from clipconv.app.session import build_method_config
from clipconv.app.table2 import PUBLISHED_LABEL, aggregate_seeds
from clipconv.data import load_split, make_image_tree

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TINY_OPTIONS = {
    "linear_probe": {"bisection_steps": 1},
    "coop": {"epochs": 2, "views": 1, "n_ctx": 4},
    "cocoop": {"epochs": 1, "views": 1},
    "tip_adapter": {"search": "small", "augment_rounds": 2},
    "tip_adapter_f": {"search": "small", "augment_rounds": 2, "epochs": 2},
    "convpass": {"epochs": 1},
}


@pytest.fixture()
def tree(tmp_path):
    return make_image_tree(tmp_path / "data", train_per_class=6, val_per_class=2)


def _run(tmp_path, tree, tiny_config, methods, out="out", extra=(), shots=("2",), seeds=("1", "2"),
         cache=True):
    options = {m: TINY_OPTIONS[m] for m in methods if m in TINY_OPTIONS}
    argv = ["--data-root", str(tree), "--model", str(tiny_config), "--pretrained", "none", "--shots", *shots,
            "--val-shots", "2", "--seeds", *seeds, "--workers", "0", "--device", "cpu",
            "--output-dir", str(tmp_path / out), "--methods", *methods, "--method-options", json.dumps(options),
            *(["--cache-dir", str(tmp_path / "cache")] if cache else ["--no-cache"]), *extra]
    assert main(argv) == 0
    return json.loads((tmp_path / out / "table2.json").read_text())


def test_all_methods_two_seeds_end_to_end(tmp_path, tree, tiny_config):
    methods = ["zero_shot", "linear_probe", "coop", "cocoop", "tip_adapter", "tip_adapter_f", "convpass"]
    result = _run(tmp_path, tree, tiny_config, methods)
    out = tmp_path / "out"
    for seed in (1, 2):
        split, meta = load_split(out / f"split_seed{seed}.json")
        assert set(Counter(label for _, label in split.train).values()) == {2}
        assert not {p for p, _ in split.train} & {p for p, _ in split.val}
        assert meta["class_ids"] and len(split.val) == 2 * len(meta["class_ids"])
    ran = [m for m in methods if m in result["measured"]]
    assert ran == methods
    for name in ran:
        per_seed = result["per_seed"][name]
        assert sorted(per_seed) == ["1", "2"]
        mean = result["measured"][name]["mean"]
        assert set(mean) == {"imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "target_avg"}
        expected = sum(per_seed[s]["row"]["imagenet"] for s in ("1", "2")) / 2
        assert mean["imagenet"] == pytest.approx(expected)
    # the eval sets are encoded once (by the first method); later frozen-encoder methods only add train views
    seed_images = sum(len(load_split(out / f"split_seed{s}.json")[0].train) +
                      len(load_split(out / f"split_seed{s}.json")[0].val) for s in (1, 2))
    assert result["timing"]["linear_probe"]["images_encoded"] == seed_images
    # Tip-Adapter-F reuses Tip-Adapter's cache keys and val features: it encodes only its 2 epoch views per seed
    train_size = len(load_split(out / "split_seed1.json")[0].train)
    assert result["timing"]["tip_adapter_f"]["images_encoded"] == 2 * 2 * train_size
    markdown = (out / "table2.md").read_text()
    assert PUBLISHED_LABEL in markdown and "| Tip-Adapter-F | 73.41 |" in markdown
    assert "| ZS CLIP (1 template) | 66.73 |" in markdown  # the paper's ZS row is the single prompt
    # every row says which template set it used: each method's reference by default
    templates = markdown[markdown.index("## prompt templates per row"):]
    for row in ("| ZS CLIP (1 template) | photo (1) |", "| Tip-Adapter | tip (7) |", "| Tip-Adapter-F | tip (7) |",
                "| LP CLIP | none |", "| CoOp | none |", "| CoCoOp | none |"):
        assert row in templates, row
    if "convpass" in ran:
        assert "| Convpass_CLIP | photo (1) |" in templates
    assert result["measured"]["tip_adapter"]["template_set"] == "tip" and result["measured"]["tip_adapter"]["templates"] == 7
    assert result["per_seed"]["zero_shot"]["1"]["fit"]["template_set"] == "photo"
    assert markdown.index("measured (this run)") < markdown.index(PUBLISHED_LABEL)
    with open(out / "table2.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:4] == ["origin", "method", "top1_imagenet", "top1_imagenet_std"]
    assert sum(r[0] == "measured" for r in rows) == len(ran) + 1  # + "Convpass_CLIP + WiSE (α = 0.5)"
    assert all(len(r) == len(rows[0]) for r in rows)
    assert [r for r in rows if r[0] == PUBLISHED_LABEL]  # the quoted label with its commas is one cell
    assert (out / "table2_bars.png").read_bytes()[:8] == PNG_SIGNATURE
    assert result["config"]["val_shots"] == 2 and result["config"]["runtime"]["workers"] == 0
    assert result["environment"]["world_size"] == 1 and result["environment"]["device"] == "cpu"
    assert not list(out.glob("shots_*")) and not (out / "accuracy_vs_shots.png").exists()  # single K: flat layout
    recall = markdown[markdown.index("## mean per-class recall (%)"):markdown.index("## prompt templates per row")]
    assert sum(line.startswith("| ") for line in recall.splitlines()) == 2 + len(ran)  # header + a row per method + the WiSE row
    # one CLIP_benchmark JSON per fit and set, under the ImageNet names CLIP_benchmark uses
    for name in ran:
        for seed in ("1", "2"):
            records = [json.loads(f.read_text()) for f in (out / f"{name}_seed{seed}" / "clip_benchmark").glob("*.json")]
            assert sorted(r["dataset"] for r in records) == ["imagenet-a", "imagenet-r", "imagenet1k", "imagenet_sketch",
                                                             "imagenetv2"]
            ours = {"imagenet1k": "imagenet", "imagenetv2": "imagenet_v2", "imagenet_sketch": "imagenet_sketch",
                    "imagenet-a": "imagenet_a", "imagenet-r": "imagenet_r"}
            for record in records:
                metrics = result["per_seed"][name][seed]["metrics"][ours[record["dataset"]]]
                assert record["metrics"]["acc1"] == pytest.approx(metrics["top1"] / 100, rel=1e-12)
                assert record["metrics"]["mean_per_class_recall"] == pytest.approx(
                    metrics["mean_per_class_recall"] / 100, rel=1e-12)
                assert (record["seed"], record["fewshot_k"], record["method"]) == (int(seed), 2, name)
                assert record["model"] == tiny_config.stem and record["pretrained"] == "none"  # no local path
                assert record.get("templates") == {"zero_shot": "photo", "tip_adapter": "tip"}.get(name, record.get(
                    "templates")) and ("templates" in record) == (name != "linear_probe" and name != "coop"
                                                                 and name != "cocoop")
                assert record["task"] == {"zero_shot": "zeroshot_classification",
                                          "linear_probe": "linear_probe"}.get(name, f"fewshot_{name}")


def test_shots_sweep_writes_per_k_tables_and_the_plot_and_encodes_test_sets_once(tmp_path, tree, tiny_config):
    from test_plots import assert_valid_png

    methods = ["zero_shot", "linear_probe"]
    result = _run(tmp_path, tree, tiny_config, methods, shots=("2", "1"), seeds=("1",), cache=False)
    out = tmp_path / "out"
    per_k = {k: json.loads((out / f"shots_{k}" / "table2.json").read_text()) for k in (1, 2)}
    for k, table in per_k.items():
        assert table["config"]["shots"] == k and list(table["measured"]) == methods
        assert (out / f"shots_{k}" / "table2.md").read_text().startswith(f"# Table 2: {k}-shot")
        assert (out / f"shots_{k}" / "table2.csv").is_file()
        assert_valid_png(out / f"shots_{k}" / "table2_bars.png", min_bytes=5000)
        split, _ = load_split(out / f"shots_{k}" / "split_seed1.json")
        assert set(Counter(label for _, label in split.train).values()) == {k}
    assert result == per_k[2]  # the top-level table is the largest K's
    assert (out / "table2.md").read_text() == (out / "shots_2" / "table2.md").read_text()
    assert_valid_png(out / "table2_bars.png", min_bytes=5000)
    # same seed for every K: the 1-shot set is inside the 2-shot set
    one, two = (set(load_split(out / f"shots_{k}" / "split_seed1.json")[0].train) for k in (1, 2))
    assert one < two
    # the test sets are encoded once for the whole sweep (no disk cache: the sweep keeps a temporary one)
    test_images = sum(per_k[1]["eval_sets"].values())
    assert per_k[1]["timing"]["zero_shot"]["images_encoded"] == test_images
    assert per_k[2]["timing"]["zero_shot"]["images_encoded"] == 0
    split2, _ = load_split(out / "shots_2" / "split_seed1.json")
    assert per_k[2]["timing"]["linear_probe"]["images_encoded"] == len(split2.train) + len(split2.val)
    sweep = json.loads((out / "accuracy_vs_shots.json").read_text())
    assert sweep["shots"] == [1, 2] and set(sweep["methods"]) == {"ZS CLIP (1 template)", "LP CLIP"}
    assert sweep["timing"]["2"]["zero_shot"]["images_encoded"] == 0
    for k in (1, 2):
        assert sweep["methods"]["LP CLIP"]["imagenet"][str(k)]["mean"] == \
            per_k[k]["measured"]["linear_probe"]["mean"]["imagenet"]
    markdown = (out / "accuracy_vs_shots.md").read_text()
    assert "| method | 1-shot | 2-shot |" in markdown and "| LP CLIP |" in markdown
    assert_valid_png(out / "accuracy_vs_shots.png")


def test_rerun_reads_the_cache_and_reproduces(tmp_path, tree, tiny_config):
    methods = ["zero_shot", "linear_probe", "tip_adapter"]
    first = _run(tmp_path, tree, tiny_config, methods, out="a")
    second = _run(tmp_path, tree, tiny_config, methods, out="b")
    assert all(second["timing"][m]["images_encoded"] == 0 for m in methods)
    assert first["timing"]["zero_shot"]["images_encoded"] > 0
    for name in methods:
        assert second["measured"][name]["mean"] == first["measured"][name]["mean"]


def test_run_templates_override_every_method_and_label_the_ensemble(tmp_path, tree, tiny_config):
    result = _run(tmp_path, tree, tiny_config, ["zero_shot", "tip_adapter"], seeds=("1",),
                  extra=("--templates", "clip80"))
    assert result["measured"]["zero_shot"]["label"] == "ZS CLIP (80-template ensemble)"
    markdown = (tmp_path / "out" / "table2.md").read_text()
    assert "| ZS CLIP (80-template ensemble) | clip80 (80) |" in markdown and "| Tip-Adapter | clip80 (80) |" in markdown
    assert "templates: clip80 for every method" in markdown
    assert "| ZS CLIP (1 template) | 66.73 |" in markdown  # the published row stays the single prompt


@pytest.mark.parametrize("extra, message", [
    (["--methods", "no_such_method"], "unknown method"),
    (["--methods", "adapter:no_such_kind"], "unknown method(s) ['adapter:no_such_kind']"),
    (["--methods", "adapter:adaptformer", "--method-options", '{"adapter:adaptformer": {"rank": 2}}'], "rank"),
    (["--methods", "zero_shot", "--method-options", "{not json"], "not valid JSON"),
    (["--methods", "coop", "--method-options", '{"coop": {"epochz": 1}}'], "epochz"),
    (["--methods", "zero_shot", "--method-options", '{"coop": {"epochs": 1}}'], "not in --methods"),
    (["--methods", "zero_shot", "--shots", "0"], "--shots: must be a positive integer"),
    (["--methods", "zero_shot", "--shots", "1", "0", "4"], "--shots: must be a positive integer"),
    (["--methods", "zero_shot", "--shots", "two"], "--shots: expected an integer"),
    (["--methods", "zero_shot", "--seeds", "1", "1"], "--seeds: 1 is given twice"),
    (["--methods", "zero_shot", "zero_shot"], "--methods: zero_shot is given twice"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, tree, tiny_config, capsys, extra, message):
    argv = ["--data-root", str(tree), "--model", str(tiny_config), "--pretrained", "none", "--workers", "0",
            "--output-dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "table2.json").exists()


def test_no_data_root_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "--data-root" in capsys.readouterr().err


def test_aggregate_is_mean_and_population_std():
    mean, std = aggregate_seeds([{"imagenet": 10.0, "imagenet_v2": 1.0}, {"imagenet": 20.0, "imagenet_v2": 3.0}])
    assert mean["imagenet"] == 15.0 and std["imagenet"] == 5.0 and std["imagenet_v2"] == 1.0
    assert math.isnan(mean["target_avg"])  # -Sketch/-A/-R missing


def test_epochs_scale_uses_each_methods_default():
    assert build_method_config("coop", epochs_scale=0.1).epochs == 5
    assert build_method_config("cocoop", epochs_scale=0.1).epochs == 1
    assert build_method_config("coop", options={"epochs": 3}, epochs_scale=0.1).epochs == 3
    assert build_method_config("coop", "demo", epochs_scale=0.1).epochs == 5  # the demo preset leaves epochs
    assert build_method_config("convpass", "demo", epochs_scale=0.1).epochs == 30  # a preset's epochs win
    assert build_method_config("zero_shot", epochs_scale=0.1) == build_method_config("zero_shot")
    config = build_method_config("convpass", epochs_scale=0.1, precision="fp32")
    assert (config.epochs, config.precision) == (5, "fp32")


def test_option_filters_see_every_config_option():
    """The one config builder (session.build_method_config, used by every entry point) accepts exactly the
    options of each method's config dataclass; runtime values (seed, workers, eval batch size) are not options."""
    import dataclasses

    from clipconv.methods.base import METHODS, method_names

    method_names()
    for name in ("zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "coop", "cocoop"):
        fields = {f.name for f in dataclasses.fields(METHODS[name].config_class)}
        given = {field: getattr(METHODS[name].config_class(), field) for field in fields}
        assert build_method_config(name, options=given) == METHODS[name].config_class(**given)
        for generic in ("seed", "workers", "eval_batch_size"):  # runtime values come from FitContext
            with pytest.raises(ValueError, match=f"unknown option.*{generic}"):
                build_method_config(name, options={generic: 1})
    fields = lambda name: {f.name for f in dataclasses.fields(METHODS[name].config_class)}  # noqa: E731
    assert fields("tip_adapter") < fields("tip_adapter_f")
    assert fields("coop") == fields("cocoop")


def test_a_method_that_alters_the_shared_backbone_is_stopped(tmp_path, tree, tiny_config, monkeypatch, capsys):
    from tampering import make_zero_shot_tamper

    make_zero_shot_tamper(monkeypatch)
    with pytest.raises(RuntimeError, match="zero_shot.*in place"):
        _run(tmp_path, tree, tiny_config, ["zero_shot"])


# ---- output folders, interruption and --resume (issue 10) ----

def _argv(tmp_path, tree, tiny_config, methods, *extra, out="out"):
    return ["--data-root", str(tree), "--model", str(tiny_config), "--pretrained", "none", "--shots", "2",
            "--val-shots", "2", "--seeds", "1", "--workers", "0", "--device", "cpu", "--no-cache",
            "--eval-sets", "imagenet", "--methods", *methods,
            "--method-options", json.dumps({m: TINY_OPTIONS[m] for m in methods if m in TINY_OPTIONS}),
            *(["--output-dir", str(tmp_path / out)] if out else []), *extra]


def test_interrupted_table_is_marked_incomplete_and_resume_runs_only_the_missing_fits(tmp_path, tree, tiny_config,
                                                                                       monkeypatch, capsys):
    import clipconv.app.table2

    real = clipconv.app.table2.fit_and_evaluate
    calls = []

    def interrupt_second(session, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(session, name, *args, **kwargs)

    monkeypatch.setattr(clipconv.app.table2, "fit_and_evaluate", interrupt_second)
    out = tmp_path / "out"
    assert main(_argv(tmp_path, tree, tiny_config, ["zero_shot", "linear_probe"])) == 130
    err = capsys.readouterr().err
    assert f"--resume {out}" in err and "Traceback" not in err
    partial = json.loads((out / "table2.json").read_text())
    assert partial["complete"] is False and partial["missing"] == ["linear_probe seed 1"]
    assert list(partial["per_seed"]) == ["zero_shot"]
    assert "INCOMPLETE" in (out / "table2.md").read_text() and f"--resume {out}" in (out / "table2.md").read_text()
    zero_shot_row = partial["per_seed"]["zero_shot"]["1"]["row"]

    calls.clear()
    monkeypatch.setattr(clipconv.app.table2, "fit_and_evaluate",
                        lambda session, name, *a, **k: calls.append(name) or real(session, name, *a, **k))
    assert main(["--resume", str(out), "--workers", "0"]) == 0
    assert calls == ["linear_probe"]  # zero-shot was not re-run
    final = json.loads((out / "table2.json").read_text())
    assert final["complete"] is True and sorted(final["per_seed"]) == ["linear_probe", "zero_shot"]
    assert final["per_seed"]["zero_shot"]["1"]["row"] == zero_shot_row
    assert "INCOMPLETE" not in (out / "table2.md").read_text()
    n = final["per_seed"]["zero_shot"]["1"]["metrics"]["imagenet"]
    assert f"images / classes per set: ImageNet {n['n']} / {n['classes']}" in (out / "table2.md").read_text()
    assert (out / "table2_bars.png").read_bytes().startswith(PNG_SIGNATURE)


def test_resume_refuses_changed_settings_and_a_folder_without_a_table(tmp_path, tree, tiny_config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--resume", str(tmp_path), "--seeds", "4"])
    assert info.value.code == 2 and "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--resume", str(tmp_path)])
    assert info.value.code == 2 and "table2_config.json" in capsys.readouterr().err


def test_a_finished_table_is_never_replaced_without_overwrite(tmp_path, tree, tiny_config, capsys):
    out = tmp_path / "out"
    assert main(_argv(tmp_path, tree, tiny_config, ["zero_shot"])) == 0
    before = (out / "table2.json").read_bytes()
    (out / "stale_seed9").mkdir()  # a per-method folder of the old table: --overwrite removes it
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(_argv(tmp_path, tree, tiny_config, ["zero_shot"]))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--overwrite" in err and f"--resume {out}" in err
    assert (out / "table2.json").read_bytes() == before
    assert main(_argv(tmp_path, tree, tiny_config, ["zero_shot"], "--overwrite")) == 0
    assert not (out / "stale_seed9").exists() and (out / "split_seed1.json").is_file()


def test_default_table_folders_are_new_and_unique(tmp_path, tree, tiny_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20260101-000000")
    assert main(_argv(tmp_path, tree, tiny_config, ["zero_shot"], out=None)) == 0
    assert main(_argv(tmp_path, tree, tiny_config, ["zero_shot"], out=None)) == 0
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert made == ["table2_2shot_20260101-000000", "table2_2shot_20260101-000000-2"]
    assert all((tmp_path / "runs" / m / "table2.json").is_file() for m in made)


def test_an_output_dir_under_a_file_is_refused_before_any_work(tmp_path, tree, tiny_config, capsys, monkeypatch):
    # tests run as root: a path through a file is how "not writable" is simulated
    import clipconv.app.table2

    monkeypatch.setattr(clipconv.app.table2, "open_session", lambda *a, **k: pytest.fail("session opened first"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as info:
        main(_argv(tmp_path, tree, tiny_config, ["zero_shot"], out="afile/out"))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--output-dir" in err and "afile" in err and len(err.strip().splitlines()) == 1


def test_sigterm_stops_the_table_like_ctrl_c_with_exit_143(tmp_path, tree, tiny_config, monkeypatch, capsys):
    import os
    import signal
    import time

    import clipconv.app.table2

    before = signal.getsignal(signal.SIGTERM)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        pytest.fail("SIGTERM did not stop the fit")

    monkeypatch.setattr(clipconv.app.table2, "fit_and_evaluate", terminated)
    out = tmp_path / "out"
    assert main(_argv(tmp_path, tree, tiny_config, ["zero_shot"])) == 143
    err = capsys.readouterr().err
    assert "terminated" in err and f"--resume {out}" in err
    assert json.loads((out / "table2.json").read_text())["complete"] is False
    assert signal.getsignal(signal.SIGTERM) is before


def test_resume_continues_an_interrupted_training_from_its_saved_epoch(tmp_path, tree, tiny_config, monkeypatch):
    import clipconv.app.table2

    real = clipconv.app.table2.fit_and_evaluate

    def trained_then_interrupted(*args, **kwargs):  # the epochs are saved, the table row is not
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(clipconv.app.table2, "fit_and_evaluate", trained_then_interrupted)
    out = tmp_path / "out"
    assert main(_argv(tmp_path, tree, tiny_config, ["convpass"])) == 130
    assert (out / "convpass_seed1" / "train_state.pt").is_file()
    monkeypatch.setattr(clipconv.app.table2, "fit_and_evaluate", real)
    lines = []
    import clipconv.app.run

    monkeypatch.setattr(clipconv.app.run.log, "info", lambda message, *a, **k: lines.append(str(message)))
    assert main(["--resume", str(out)]) == 0
    assert any(line.startswith(f"resumed from {out / 'convpass_seed1' / 'train_state.pt'} after epoch 1")
               for line in lines), lines
    assert json.loads((out / "table2.json").read_text())["complete"] is True


def test_own_folders_table_uses_their_names_and_prints_no_published_section(tmp_path, tiny_config):
    """Table 2 on the folder family: columns are the user's set names, and the paper's ImageNet numbers
    (which would be meaningless beside them) are left out."""
    from clipconv.data.synthetic import make_class_folders

    classes = ["cat", "dog", "fox"]
    train = make_class_folders(tmp_path / "mine" / "train", classes, per_class=5)
    photos = make_class_folders(tmp_path / "mine" / "photos", classes, per_class=2)
    sketch = make_class_folders(tmp_path / "mine" / "sketch", classes[:2], per_class=2, style="sketch",
                                all_classes=classes)
    out = tmp_path / "table"
    assert main(["--train-root", str(train), "--eval-set", f"photos={photos}", "--eval-set", f"sketch={sketch}",
                 "--model", str(tiny_config), "--pretrained", "none", "--shots", "2", "--val-shots", "1",
                 "--seeds", "1", "--workers", "0", "--device", "cpu", "--no-cache", "--output-dir", str(out),
                 "--methods", "zero_shot", "linear_probe",
                 "--method-options", json.dumps({"linear_probe": TINY_OPTIONS["linear_probe"]})]) == 0
    markdown = (out / "table2.md").read_text()
    assert "| method | photos | sketch | target avg |" in markdown
    assert "Numbers printed in the Convpass paper" not in markdown and "66.73" not in markdown
    assert "\n## \n" not in markdown  # no section without a title
    assert "data None" not in markdown and f"data {tmp_path / 'mine'}" in markdown
    result = json.loads((out / "table2.json").read_text())
    assert result["published"] == {"label": "", "rows": {}}
    assert set(result["measured"]["zero_shot"]["mean"]) == {"photos", "sketch", "target_avg"}


def _measured_line(markdown: str, label: str) -> str:
    section = markdown[markdown.index("## measured"):]
    return next(line for line in section.splitlines() if line.startswith(f"| {label} |"))


def test_one_seed_shows_no_std_and_rows_over_different_seed_counts_say_so(tmp_path, tree, tiny_config, monkeypatch):
    import clipconv.app.table2

    result = _run(tmp_path, tree, tiny_config, ["zero_shot"], seeds=("1",))
    markdown = (tmp_path / "out" / "table2.md").read_text()
    assert "±" not in _measured_line(markdown, "ZS CLIP (1 template)") and "mean ± std" not in markdown
    assert result["measured"]["zero_shot"]["std"] == {}  # no spread from a single fit

    real = clipconv.app.table2.fit_and_evaluate

    def interrupt_linear_probe_seed_2(session, name, *args, seed, **kwargs):
        if name == "linear_probe" and seed == 2:
            raise KeyboardInterrupt
        return real(session, name, *args, seed=seed, **kwargs)

    monkeypatch.setattr(clipconv.app.table2, "fit_and_evaluate", interrupt_linear_probe_seed_2)
    argv = ["--data-root", str(tree), "--model", str(tiny_config), "--pretrained", "none", "--shots", "2",
            "--val-shots", "2", "--seeds", "1", "2", "--workers", "0", "--output-dir", str(tmp_path / "part"),
            "--methods", "zero_shot", "linear_probe", "--method-options", json.dumps({"linear_probe":
                                                                                       TINY_OPTIONS["linear_probe"]}),
            "--no-cache"]
    assert main(argv) == 130
    markdown = (tmp_path / "part" / "table2.md").read_text()
    zero_shot, probe = _measured_line(markdown, "ZS CLIP (1 template)"), _measured_line(markdown, "LP CLIP")
    assert "±" in zero_shot and "| 2 |" in zero_shot  # two seeds: mean ± std, and the count
    assert "±" not in probe and "| 1 |" in probe  # one seed so far: the value alone


def test_quiet_table_still_shows_the_final_table(tmp_path, tree, tiny_config, capsys):
    _run(tmp_path, tree, tiny_config, ["zero_shot"], seeds=("1",), extra=("--quiet",))
    err = capsys.readouterr().err
    assert "| method |" in err and "\n| ZS CLIP (1 template) |" in err, err
    assert "== 2-shot" not in err  # the progress lines stay quiet


def test_a_set_named_source_gives_unique_csv_columns_and_the_target_rule_is_stated(tmp_path, tiny_config):
    """The folder family with a set called `source` (as the demo's): every table2.csv column name is unique;
    table2.md says which sets its target average is over."""
    from clipconv.data.synthetic import make_class_folders

    classes = ["cat", "dog"]
    train = make_class_folders(tmp_path / "mine" / "train", classes, per_class=3)
    photos = make_class_folders(tmp_path / "mine" / "photos", classes, per_class=1)
    sketch = make_class_folders(tmp_path / "mine" / "sketch", classes, per_class=1, style="sketch")
    out = tmp_path / "table"
    assert main(["--train-root", str(train), "--eval-set", f"source={photos}", "--eval-set", f"sketch={sketch}",
                 "--model", str(tiny_config), "--pretrained", "none", "--shots", "1", "--val-shots", "1",
                 "--seeds", "1", "--workers", "0", "--device", "cpu", "--no-cache", "--output-dir", str(out),
                 "--methods", "zero_shot"]) == 0
    with open(out / "table2.csv", newline="") as handle:
        header, row = list(csv.reader(handle))
    assert len(set(header)) == len(header) and header[:4] == ["origin", "method", "top1_source", "top1_source_std"]
    result = json.loads((out / "table2.json").read_text())
    mean = result["measured"]["zero_shot"]["mean"]
    assert dict(zip(header, row))["top1_target_avg"] == f"{mean['sketch']:.4f}"  # one target set: its own score
    assert dict(zip(header, row))["top1_source_std"] == "" and dict(zip(header, row))["seeds"] == "1"
    assert "target avg: the mean of sketch (every target set)." in (out / "table2.md").read_text()


def test_target_average_is_over_the_asked_sets_in_every_family(tmp_path, tree, tiny_config):
    """ImageNet's suite with --eval-sets naming two of its sets: the average is over the one target asked for
    (as the folder family's is over the sets given), and the table says so."""
    result = _run(tmp_path, tree, tiny_config, ["zero_shot"], seeds=("1",),
                  extra=("--eval-sets", "imagenet", "imagenet_sketch"))
    mean = result["measured"]["zero_shot"]["mean"]
    assert mean["target_avg"] == mean["imagenet_sketch"] and "imagenet_v2" not in mean
    markdown = (tmp_path / "out" / "table2.md").read_text()
    assert "target avg: the mean of -Sketch (the sets --eval-sets asked for; not asked: -V2, -A, -R)." in markdown
    assert result["target_note"] in markdown


def test_the_target_note_names_a_missing_set_and_the_rule():
    from clipconv.app.report import averaged_targets, results_row, target_note

    targets = ("v2", "sketch", "rendition")
    assert averaged_targets(targets, None) == targets and averaged_targets(targets, ["source", "sketch"]) == ("sketch",)
    note = target_note(targets, None, ["source", "v2", "sketch"])
    assert note.startswith("target avg: – because rendition was not evaluated") and "--eval-sets" in note
    assert target_note(targets, ["source"], ["source"]).startswith("target avg: – (no target set: --eval-sets asks")
    assert target_note((), None, ["photos"]).startswith("target avg: – (no target set: the suite has no target set)")
    metrics = {name: {"top1": value} for name, value in (("source", 50.0), ("v2", 30.0), ("sketch", 20.0))}
    assert math.isnan(results_row(metrics, suite=("source", *targets))["target_avg"])  # rendition asked, missing
    assert results_row(metrics, suite=("source", *targets), asked=("source", "v2", "sketch"))["target_avg"] == 25.0
