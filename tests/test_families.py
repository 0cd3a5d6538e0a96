"""Dataset families: the registry, ImageNet's published numbers, the demo world and bring-your-own folders."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch

from clipconv.data import (
    DataLayoutError, FolderFamily, ImageNetFamily, family_from_args, family_names, make_class_folders, open_family,
    sample_few_shot
)
from clipconv.methods.base import METHODS

CLASSES = ["bird", "cat", "dog", "red_fox"]  # sorted folder order = label order
CARTOON = ["cat", "red_fox"]  # the shifted set holding only some classes


@pytest.fixture()
def byod(tmp_path) -> dict[str, Path]:
    """A user's own data: train folder with 4 classes, 'sketch' with all of them, 'cartoon' with two."""
    base = tmp_path / "mydata"
    train = make_class_folders(base / "train", CLASSES, per_class=5)
    sketch = make_class_folders(base / "tests" / "sketch", CLASSES, per_class=2, style="sketch")
    cartoon = make_class_folders(base / "tests" / "cartoon", CARTOON, per_class=3, style="cartoon",
                                 all_classes=CLASSES)
    return {"train": train, "sketch": sketch, "cartoon": cartoon}


def _open(byod, **kwargs) -> FolderFamily:
    return open_family("folder", train_root=byod["train"],
                       eval_roots={"sketch": byod["sketch"], "cartoon": byod["cartoon"]}, **kwargs)


def test_registry_holds_the_four_families_and_refuses_unknown_names():
    assert family_names() == ["demo", "folder", "imagenet", "wds"]
    with pytest.raises(ValueError, match="unknown dataset family 'cifar'.*imagenet"):
        open_family("cifar")


def test_imagenet_family_carries_the_suite_and_the_paper_numbers(tmp_path):
    from clipconv.app import report

    family = open_family("imagenet", data_root=tmp_path)
    assert family.suite == ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    assert family.targets == family.suite[1:] == report.TARGETS
    assert [family.display[s] for s in family.suite] == ["ImageNet", "-V2", "-Sketch", "-A", "-R"]
    # the paper's numbers are the methods' own, keyed by this family's set names; the family says they apply
    assert family.published_label == "published (paper, ImageNet, ViT-B/16)"
    assert METHODS["convpass"].published == {"imagenet": 74.23, "imagenet_v2": 66.61, "imagenet_sketch": 49.10,
                                             "imagenet_a": 49.27, "imagenet_r": 78.17}
    published = {name for name, spec in METHODS.items() if spec.published}
    assert published == {"zero_shot", "linear_probe", "coop", "cocoop", "tip_adapter_f", "convpass"}
    assert all(set(METHODS[name].published) == set(family.suite) for name in published)
    # report.py keeps its names as aliases of the family's values (existing callers)
    assert report.SUITE == family.suite and dict(report.DISPLAY) == dict(family.display)
    assert family.describe() == {"family": "imagenet", "data_root": str(tmp_path), "classnames": None}


def test_folder_family_classes_train_samples_and_few_shot(byod):
    family = _open(byod)
    assert family.suite == ("sketch", "cartoon") and family.targets == ("cartoon",)
    assert family.display == {"sketch": "sketch", "cartoon": "cartoon"}
    assert family.published_label == ""
    classes = family.classes()
    assert classes.ids == tuple(CLASSES)
    assert classes.names == ("bird", "cat", "dog", "red fox")
    samples = family.train_samples(classes)
    assert len(samples) == 20 and samples == sorted(samples)
    assert all(Path(family.data_root, path).is_file() for path, _ in samples)
    assert all(Path(path).parts[-2] == CLASSES[label] for path, label in samples)
    split = sample_few_shot(samples, 3, seed=1, root=family.data_root)
    assert len(split.train) == 12 and split.shortfall == {}
    assert sorted(label for _, label in split.train) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_folder_family_eval_splits_carry_subsets_labels_and_class_counts(byod):
    family = _open(byod)
    classes = family.classes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sketch, cartoon = family.eval_splits(family.suite, classes)
    assert (sketch.name, cartoon.name) == ("sketch", "cartoon")
    assert sketch.subset is None and sketch.num_classes == 4 and len(sketch) == 8
    assert cartoon.subset == [1, 3] and cartoon.num_classes == 2 and len(cartoon) == 6
    for split in (sketch, cartoon):
        assert all(Path(family.data_root, p).is_file() for p, _ in split.samples)
        assert all(classes.ids[label] == Path(p).parts[-2] for p, label in split.samples)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "cartoon is scored over only 2 class(es)" in messages[0]
    assert [s.name for s in family.eval_splits(["cartoon"], classes)] == ["cartoon"]  # the order asked for
    with pytest.raises(ValueError, match=r"unknown evaluation set\(s\) \['photo'\]"):
        family.eval_splits(["photo"], classes)


def test_folder_family_describe_records_every_folder(byod):
    described = _open(byod).describe()
    assert described["family"] == "folder" and described["train_root"] == str(byod["train"])
    assert described["eval_roots"] == {"sketch": str(byod["sketch"]), "cartoon": str(byod["cartoon"])}
    assert Path(described["data_root"]) == byod["train"].parent


def test_classnames_file_sets_names_and_label_order_and_may_have_a_bom(byod, tmp_path):
    names = tmp_path / "names.txt"
    names.write_bytes("\ufeffred_fox Vulpes vulpes\ndog good dog\ncat house cat\nbird small bird\nowl unused\n"
                      .encode("utf-8"))
    classes = _open(byod, classnames=names).classes()
    assert classes.ids == ("red_fox", "dog", "cat", "bird")  # the file's order, the BOM stripped
    assert classes.names == ("Vulpes vulpes", "good dog", "house cat", "small bird")


def test_classnames_file_missing_a_class_folder_names_it(byod, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("bird a bird\ncat a cat\ndog a dog\n")  # red_fox missing
    with pytest.raises(DataLayoutError, match=r"missing from --classnames .*: red_fox"):
        _open(byod, classnames=names).classes()


def test_eval_folder_with_a_class_the_train_folder_lacks_is_an_error_naming_it(byod):
    make_class_folders(byod["sketch"], ["wolf"], per_class=1)
    family = _open(byod)
    with pytest.raises(DataLayoutError, match=r"--eval-set sketch=.* lacks: wolf"):
        family.eval_splits(["sketch"], family.classes())


@pytest.mark.parametrize("case", ["missing_train", "train_is_file", "eval_is_file", "eval_missing", "no_eval_set",
                                  "duplicate", "bad_name"])
def test_bad_folder_arguments_name_the_flag_and_path(byod, tmp_path, case):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    train, evals = byod["train"], [("sketch", byod["sketch"])]
    expected = {
        "missing_train": r"--train-root '.*nowhere' does not exist",
        "train_is_file": r"--train-root '.*file.txt' is a file, not a folder",
        "eval_is_file": r"--eval-set photos '.*file.txt' is a file, not a folder",
        "eval_missing": r"--eval-set photos '.*nowhere' does not exist",
        "no_eval_set": r"at least one --eval-set NAME=DIR",
        "duplicate": r"--eval-set name 'sketch' is given twice",
        "bad_name": r"evaluation-set name 'my/set' must start",
    }[case]
    if case == "missing_train":
        train = tmp_path / "nowhere"
    elif case == "train_is_file":
        train = a_file
    elif case == "eval_is_file":
        evals.append(("photos", a_file))
    elif case == "eval_missing":
        evals.append(("photos", tmp_path / "nowhere"))
    elif case == "no_eval_set":
        evals = []
    elif case == "duplicate":
        evals.append(("sketch", byod["cartoon"]))
    elif case == "bad_name":
        evals.append(("my/set", byod["cartoon"]))
    with pytest.raises(ValueError, match=expected):
        family_from_args(train_root=train, eval_roots=evals)


def test_family_from_args_picks_the_family_and_refuses_conflicts(byod, tmp_path):
    assert isinstance(family_from_args(data_root=tmp_path), ImageNetFamily)
    assert isinstance(family_from_args(train_root=byod["train"], eval_roots=[("s", byod["sketch"])]), FolderFamily)
    assert family_from_args(demo=True, data_root=tmp_path / "w").name == "demo"
    with pytest.raises(ValueError, match="--eval-set needs --train-root"):
        family_from_args(data_root=tmp_path, eval_roots=[("s", byod["sketch"])])
    with pytest.raises(ValueError, match="--train-root cannot be combined with --data-root"):
        family_from_args(data_root=tmp_path, train_root=byod["train"], eval_roots=[("s", byod["sketch"])])
    with pytest.raises(ValueError, match="no data given"):
        family_from_args()


@pytest.mark.parametrize("value", ["sketch", "=dir", "sketch=", "a b=dir"])
def test_eval_set_flag_parsing_exits_2_naming_the_flag(value, capsys):
    from clipconv.app.cli.options import add_shared_args

    parser = argparse.ArgumentParser()
    add_shared_args(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--train-root", "x", "--eval-set", value])
    assert exit_info.value.code == 2
    assert "argument --eval-set" in capsys.readouterr().err


def test_eval_set_flag_is_repeatable_and_ordered():
    from clipconv.app.cli.options import add_shared_args

    parser = argparse.ArgumentParser()
    add_shared_args(parser)
    args = parser.parse_args(["--train-root", "t", "--eval-set", "val=/a", "--eval-set", "sketch=/b=c"])
    assert args.train_root == "t" and args.eval_set == [("val", "/a"), ("sketch", "/b=c")]


def test_folder_flags_select_the_folder_family(byod):
    """--train-root/--eval-set reach DataConfig (in order) and the one family resolver picks `folder`."""
    from clipconv.app.cli.options import add_shared_args, shared_configs
    from clipconv.app.session import open_data_family

    parser = argparse.ArgumentParser()
    fields = add_shared_args(parser)
    args = parser.parse_args(["--train-root", str(byod["train"]), "--eval-set", f"sketch={byod['sketch']}",
                              "--eval-set", f"cartoon={byod['cartoon']}"])
    configs = shared_configs(args, fields, parser)
    data = configs["data"]
    assert list(data.eval_roots) == ["sketch", "cartoon"]
    family = open_data_family(data)
    assert family.name == "folder" and family.suite == ("sketch", "cartoon")


def test_folder_data_through_a_method_and_the_suite(byod, tiny_backbone):
    """End to end at library level: folder family → K-shot split → zero-shot and linear probe → metrics per set."""
    from clipconv.app.report import markdown_table, results_row
    from clipconv.evaluation import evaluate_method
    from clipconv.features import FeatureStore
    from clipconv.methods import FitContext, build_method

    family = _open(byod)
    classes = family.classes()
    split = sample_few_shot(family.train_samples(classes), 2, seed=1, root=family.data_root)
    store = FeatureStore(tiny_backbone, cache_dir=None, batch_size=16, workers=0, device=torch.device("cpu"))
    ctx = FitContext(backbone=tiny_backbone, classnames=list(classes.names), data_root=family.data_root,
                     train=split.train, features=store, class_ids=list(classes.ids), log=lambda _: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = family.eval_splits(family.suite, classes)
    for name in ("zero_shot", "linear_probe"):
        method = build_method(name)
        method.fit(ctx)
        metrics = evaluate_method(method, splits, family.data_root, torch.device("cpu"), features=store,
                                  log=lambda _: None)
        assert list(metrics) == ["sketch", "cartoon"]
        assert metrics["sketch"]["n"] == 8 and metrics["cartoon"]["n"] == 6
        # cartoon is scored over its own 2 classes: recompute from the logits
        feats, labels = store.encode(family.data_root, splits[1].samples, with_labels=True)
        logits = method.logits_from_features(feats)
        restricted = torch.tensor(splits[1].subset)[logits[:, splits[1].subset].argmax(1)]
        assert metrics["cartoon"]["top1"] == pytest.approx(100.0 * (restricted == labels).float().mean().item())
        row = results_row(metrics, suite=family.suite)
        assert row["target_avg"] == pytest.approx(metrics["cartoon"]["top1"])
        table = markdown_table([(name, row)], columns=family.suite, display=family.display)
        assert table.splitlines()[0] == "| method | sketch | cartoon | target avg |"


# ----------------------------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from clipconv.data.demo_world import generate_world

    return generate_world(tmp_path_factory.mktemp("world") / "w", seed=5, train_per_class=2, test_per_class=1,
                          image_size=32)


def test_demo_family_reads_the_world_with_its_own_names(small_world):
    family = open_family("demo", data_root=small_world)
    assert family.suite == ("source", "v2", "sketch", "adversarial", "rendition")
    assert [family.display[s] for s in family.suite] == list(family.suite)
    assert family.published_label == "" and family.targets == family.suite[1:]
    classes = family.classes()
    assert len(classes) == 32 and classes.names[0] == "plain circle"
    assert len(family.train_samples(classes)) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 16-class subsets: no few-classes warning
        splits = {s.name: s for s in family.eval_splits(family.suite, classes)}
    assert list(splits) == list(family.suite)
    assert {n: len(s) for n, s in splits.items()} == {"source": 32, "v2": 32, "sketch": 32, "adversarial": 16,
                                                      "rendition": 16}
    assert splits["source"].subset is None and splits["source"].num_classes == 32
    assert splits["rendition"].num_classes == 16 and splits["rendition"].display_name == "rendition"
    assert family.describe()["world"]["train_per_class"] == 2


def test_demo_family_generates_the_world_on_first_use(tmp_path):
    from clipconv.data.demo_world import MANIFEST_NAME

    family = open_family("demo", data_root=tmp_path / "new", train_per_class=1, test_per_class=1, image_size=16)
    assert not (tmp_path / "new").exists()  # nothing until the data is needed
    assert len(family.train_samples(family.classes())) == 32
    assert (tmp_path / "new" / MANIFEST_NAME).is_file()
    with pytest.raises(ValueError, match="train_per_class must be an integer"):
        open_family("demo", train_per_class=0)


def test_own_folders_run_end_to_end_through_the_train_cli(byod, tiny_config, tmp_path):
    """scripts/train_imagenet_fs.py on a user's folders: Convpass trains, every named set is scored, the
    results table uses the user's set names and the -A/-R-style restricted scoring for the partial set."""
    import json

    from clipconv.app.cli import train

    out = tmp_path / "run"
    code = train.main(["--train-root", str(byod["train"]), "--eval-set", f"sketch={byod['sketch']}",
                       "--eval-set", f"cartoon={byod['cartoon']}", "--model", str(tiny_config),
                       "--pretrained", "none", "--shots", "2", "--val-shots", "1", "--epochs", "1",
                       "--batch-size", "4", "--workers", "0", "--no-cache", "--output-dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["sketch", "cartoon"]
    assert metrics["sketch"]["n"] == 8 and metrics["cartoon"]["n"] == 6
    table = (out / "results.md").read_text()
    assert "| sketch | cartoon | target avg |" in table
    assert "target avg: the mean of cartoon (every target set)." in table  # the rule, stated under the table
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["train_root"] == str(byod["train"])

    from clipconv.app.cli import eval_robustness  # re-evaluation from the run folder alone, folder family too

    again = tmp_path / "again"
    assert eval_robustness.main(["--checkpoint", str(out), "--output-dir", str(again), "--workers", "0",
                                 "--no-cache"]) == 0
    reloaded = json.loads((again / "metrics.json").read_text())
    assert {k: v["top1"] for k, v in reloaded.items()} == {k: v["top1"] for k, v in metrics.items()}
