"""check_data: what it prints and its exit codes on good, incomplete and broken data roots."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clipconv.cli.check_data import check_data_root, main
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


def test_script_entry_point(root):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "check_data.py"), "--data-root", str(root), "--shots", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "usable: 0 error(s)" in result.stdout
