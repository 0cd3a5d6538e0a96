"""check_data: what it prints and its exit codes on good, incomplete and broken data roots."""
from __future__ import annotations

import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from clipconv.app.cli.check_data import check_data_root, main
from clipconv.data import make_image_tree
from clipconv.prompts import REPO_ROOT, imagenet_classes

WNIDS = [wnid for wnid, _ in imagenet_classes()][:4]


@pytest.fixture()
def root(tmp_path) -> Path:
    return make_image_tree(tmp_path / "data", train_per_class=3, val_per_class=2)


def test_good_root_is_usable_and_reports_every_set(root, capsys):
    assert main(["--data-root", str(root), "--shots", "3"]) == 0
    out = capsys.readouterr().out
    assert "train       imagenet/images/train (CoOp layout): 4 classes, 12 images" in out
    assert "-V2         imagenetv2/imagenetv2-matched-frequency-format-val (CoOp layout): 4 classes, 8 images" in out
    assert "-A          imagenet-adversarial/imagenet-a (CoOp layout): 2 classes, 4 images" in out
    assert "expected 200 classes, 7,500 images" in out and "expected 1000 classes, 50,889 images" in out
    assert "usable: 0 error(s), 0 warning(s)" in out


def test_raw_layout_is_named(tmp_path, capsys):
    raw = make_image_tree(tmp_path, layout="raw", train_per_class=1, val_per_class=1, variants=("sketch",))
    assert main(["--data-root", str(raw), "--shots", "1"]) == 0
    out = capsys.readouterr().out
    assert "train       train (raw layout)" in out and "-Sketch     sketch (raw layout)" in out
    assert "-A          missing" in out and "WARNING: -A not found" in out


def test_few_images_missing_sets_and_bad_files_are_warnings(root, capsys):
    shutil.rmtree(root / "imagenet-rendition")
    (root / "imagenet/images/train" / WNIDS[0] / "broken.JPEG").write_bytes(b"")
    assert main(["--data-root", str(root), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "train: 4 class(es) have fewer than 16 images" in out and f"{WNIDS[1]} (3)" in out
    assert f"train: 1 undecodable file(s) will be skipped: imagenet/images/train/{WNIDS[0]}/broken.JPEG" in out
    assert "-R not found (looked for imagenet-rendition/imagenet-r, imagenet-r)" in out


def test_unknown_train_folder_and_unsorted_val_are_errors(root, capsys):
    (root / "imagenet/images/train/n00000000").mkdir()
    shutil.rmtree(root / "imagenet/images/val")
    (root / "imagenet/images/val").mkdir()
    Image.new("RGB", (8, 8)).save(root / "imagenet/images/val/ILSVRC2012_val_00000001.JPEG")
    assert main(["--data-root", str(root), "--shots", "1"]) == 1
    out = capsys.readouterr().out
    assert "ERROR:" in out and "n00000000" in out
    assert "must be sorted into class folders" in out
    assert "NOT usable: 2 error(s)" in out


def test_out_of_range_v2_and_variant_without_run_classes_are_reported(root):
    (root / "imagenetv2/imagenetv2-matched-frequency-format-val/1000").mkdir()
    for wnid in WNIDS[::2]:
        shutil.rmtree(root / "imagenet/images/train" / wnid)  # A/R hold only these two classes
    report = check_data_root(str(root), shots=1)
    text = "\n".join(report.warnings)
    assert "outside 0..999" in text and "1000" in text
    assert "-A: " in text and "has no images of the run's classes" in text
    assert not report.errors


def test_wrong_root_explains_layout_and_demo(tmp_path, capsys):
    assert main(["--data-root", str(tmp_path / "nowhere")]) == 1
    out = capsys.readouterr().out
    assert "does not exist" in out and "datasets/README.md" in out and "--demo" in out
    (tmp_path / "empty").mkdir()
    assert main(["--data-root", str(tmp_path / "empty")]) == 1
    assert "no ImageNet train split" in capsys.readouterr().out


def test_custom_classnames_argument(root, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{w} thing {i}\n" for i, w in enumerate(WNIDS)))
    assert main(["--data-root", str(root), "--classnames", str(names), "--shots", "3"]) == 0
    assert f"class universe: 4 classes from {names}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [[], ["--data-root", "x", "--shots", "0"], ["--data-root", "x", "--classnames", "/no/such/file"]]
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_script_entry_point(root, monkeypatch, capsys):
    script = REPO_ROOT / "scripts" / "check_data.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--data-root", str(root), "--shots", "3"])
    with pytest.raises(SystemExit) as done:  # as `python scripts/check_data.py ...` runs it, without a new interpreter
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None)
    assert "usable: 0 error(s)" in capsys.readouterr().out


# ------------------------------------------------------------------ issue 10 and the other families
def test_broken_class_entries_are_errors_naming_them(root, capsys):
    other = [wnid for wnid, _ in imagenet_classes()][4:7]
    train = root / "imagenet/images/train"
    os.symlink(train / other[0], train / other[0])  # loop
    os.symlink(train / "gone", train / other[1])  # dangling
    (root / "imagenet-sketch/images" / other[2]).write_text("a file where a class folder belongs")
    assert main(["--data-root", str(root), "--shots", "3"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR: 2 entries of '{train}' cannot be used as class folders: {other[0]} (symlink loop), " \
           f"{other[1]} (dangling symlink)" in out
    assert f"ERROR: -Sketch: 1 entry of '{root / 'imagenet-sketch/images'}' cannot be used as class folders: " \
           f"{other[2]} (file, not a folder)" in out
    assert "NOT usable: 2 error(s)" in out


def test_shared_class_names_are_one_warning(root, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{w} {'sunglasses' if i < 2 else f'thing {i}'}\n" for i, w in enumerate(WNIDS)))
    assert main(["--data-root", str(root), "--classnames", str(names), "--shots", "3"]) == 0
    out = capsys.readouterr().out
    assert f"WARNING: 1 class name(s) are shared by several classes (identical prompts): 'sunglasses' " \
           f"({WNIDS[0]}, {WNIDS[1]})" in out
    assert "usable: 0 error(s), 1 warning(s)" in out


@pytest.fixture()
def byod(tmp_path) -> dict[str, Path]:
    from clipconv.data import make_class_folders

    classes = ["bird", "cat", "dog"]
    return {"train": make_class_folders(tmp_path / "train", classes, per_class=3),
            "val": make_class_folders(tmp_path / "val", classes, per_class=1),
            "toon": make_class_folders(tmp_path / "toon", ["cat"], per_class=2, all_classes=classes)}


def test_own_folders_are_checked(byod, capsys):
    argv = ["--train-root", str(byod["train"]), "--eval-set", f"val={byod['val']}", "--eval-set",
            f"toon={byod['toon']}", "--shots", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(folder family)" in out and "class universe: 3 classes from" in out
    assert "train       train: 3 classes, 9 images" in out
    assert "val         val: 3 classes, 3 images, 3 in run classes, 0 dropped" in out
    assert "toon        toon: 1 classes, 2 images, 2 in run classes, 0 dropped, scored over 1 class(es)" in out
    assert "usable: 0 error(s), 0 warning(s)" in out


def test_own_eval_folder_with_an_untrained_class_is_an_error(byod, capsys):
    from clipconv.data import make_class_folders

    make_class_folders(byod["val"], ["wolf"], per_class=1)
    assert main(["--train-root", str(byod["train"]), "--eval-set", f"val={byod['val']}", "--shots", "3"]) == 1
    out = capsys.readouterr().out
    assert "ERROR: val: class folder(s) the train folder lacks: wolf" in out
    assert "--train-root DIR" in out  # the folder family's help, not ImageNet's


@pytest.mark.parametrize("argv, message", [
    (["--train-root", "/no/such/dir", "--eval-set", "val=/tmp"], "--train-root '/no/such/dir' does not exist"),
    (["--train-root", "{train}", "--eval-set", "val"], "argument --eval-set: expected NAME=DIR"),
    (["--train-root", "{train}", "--eval-set", "val={val}", "--eval-set", "val={toon}"], "given twice"),
    (["--train-root", "{train}", "--eval-set", "val={file}"], "is a file, not a folder"),
    (["--data-root", "{train}", "--eval-set", "val={val}"], "--eval-set needs --train-root"),
])
def test_bad_folder_arguments_exit_2_with_one_line(byod, tmp_path, capsys, argv, message):
    (tmp_path / "f.txt").write_text("x")
    paths = {"train": byod["train"], "val": byod["val"], "toon": byod["toon"], "file": tmp_path / "f.txt"}
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**paths) for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_world_is_checked(tmp_path, capsys):
    from clipconv.data.demo_world import generate_world

    world = generate_world(tmp_path / "w", seed=2, train_per_class=2, test_per_class=1, image_size=16)
    assert main(["--demo", "--data-root", str(world), "--shots", "2"]) == 0
    out = capsys.readouterr().out
    assert "train       imagenet/images/train: 32 classes, 64 images (expected 32 classes, 64 images)" in out
    assert "rendition   imagenet-rendition/imagenet-r: 16 classes, 16 images, 16 in run classes, 0 dropped, " \
           "scored over 16 class(es) (expected 16 classes, 16 images)" in out
    assert "usable: 0 error(s), 0 warning(s)" in out
