"""`python -m clipconv.app.cache info|clear`: reports and removes clipconv's cache files, and nothing else."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from cli_world import run_cli

from clipconv.app.cache import main


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    features = root / "features"
    features.mkdir(parents=True)
    (features / ("a" * 40 + ".safetensors")).write_bytes(b"x" * 1000)
    (features / ("b" * 40 + ".safetensors")).write_bytes(b"x" * 3000)
    (features / (".{}.safetensors.k2j3.tmp".format("c" * 40))).write_bytes(b"x" * 10)
    (features / "notes.txt").write_text("mine")  # not clipconv's: must survive
    world = root / "demo-world-0123456789ab"
    (world / "imagenet").mkdir(parents=True)
    (world / "imagenet" / "img.jpg").write_bytes(b"x" * 500)
    (root / "demo-world-mine").mkdir()  # not a world name clipconv makes
    (root / "other.bin").write_bytes(b"keep")
    monkeypatch.setenv("CLIPCONV_CACHE", str(root))
    return root


def test_info_lists_location_entries_and_sizes(cache, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"cache folder: {cache}\n" in out
    assert f"feature entries: 2 (3.9 KB) in {cache / 'features'}" in out
    assert "demo worlds: 1 (500 B)" in out and "leftover temporary files: 1 (10 B)" in out


def test_clear_removes_only_clipconvs_files_and_says_what(cache, capsys):
    assert main(["clear"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"removed 2 feature entries (3.9 KB) from {cache / 'features'}",
                   f"removed 1 leftover temporary files (10 B) from {cache / 'features'}",
                   f"removed 1 demo worlds (500 B) from {cache}: demo-world-0123456789ab"]
    remaining = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    assert remaining == [".clipconv-cache.lock", "demo-world-mine", "features", "features/notes.txt", "other.bin"]
    assert main(["clear"]) == 0
    assert capsys.readouterr().out == f"nothing to clear in {cache}\n"


def test_clear_can_keep_worlds_and_removes_an_emptied_features_folder(cache, capsys):
    (cache / "features" / "notes.txt").unlink()
    assert main(["clear", "--keep-worlds"]) == 0
    assert not (cache / "features").exists() and (cache / "demo-world-0123456789ab").is_dir()


def test_a_real_feature_cache_is_found_and_cleared(cache, tiny_backbone, tmp_path):
    from clipconv.app.cache import scan
    from clipconv.data import make_image_tree, resolve_run_classes, train_samples
    from clipconv.features import FeatureStore

    root = make_image_tree(tmp_path / "data", train_per_class=2, val_per_class=1, variants=())
    store = FeatureStore(tiny_backbone)  # the default folder: $CLIPCONV_CACHE/features
    store.encode(root, train_samples(root, resolve_run_classes(root)))
    assert len(scan().entries) == 3
    assert main(["clear", "--keep-worlds"]) == 0
    assert scan().entries == []


def test_script_and_bad_folder(cache, tmp_path, monkeypatch, capsys):
    script = Path(__file__).parents[1] / "scripts" / "cache.py"
    monkeypatch.setattr(sys, "argv", [str(script), "info"])
    with pytest.raises(SystemExit) as done:  # the script as `python scripts/cache.py info` runs it
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0 and "feature entries: 2" in capsys.readouterr().out
    (tmp_path / "file").write_text("")
    bad = run_cli(main, ["clear", "--dir", str(tmp_path / "file")])
    assert bad.returncode == 2 and bad.stderr.startswith("error: cache folder") and "Traceback" not in bad.stderr
    assert (tmp_path / "file").exists()


def test_decoded_image_entries_are_listed_and_cleared(cache, capsys):
    decoded = cache / "decoded"
    decoded.mkdir()
    (decoded / ("d" * 40 + ".safetensors")).write_bytes(b"x" * 2048)
    (decoded / "mine.txt").write_text("not clipconv's")
    assert main(["info"]) == 0
    assert f"decoded-image entries: 1 (2.0 KB) in {decoded}" in capsys.readouterr().out
    assert main(["clear", "--keep-worlds"]) == 0
    assert f"removed 1 decoded-image entries (2.0 KB) from {decoded}" in capsys.readouterr().out.splitlines()
    assert sorted(p.name for p in decoded.iterdir()) == ["mine.txt"]


def test_webdataset_listings_and_samples_are_listed_and_cleared(cache, capsys):
    for name in ("wds-index", "wds-samples"):
        (cache / name / "x").mkdir(parents=True)
        (cache / name / "x" / "entry").write_bytes(b"x" * 1024)
    assert main(["info"]) == 0
    assert f"webdataset listings and samples: 2.0 KB in {cache / 'wds-index'}, {cache / 'wds-samples'}" in \
        capsys.readouterr().out
    assert main(["clear", "--keep-worlds"]) == 0
    assert "removed 2 webdataset cache folders (2.0 KB)" in capsys.readouterr().out
    assert not (cache / "wds-index").exists() and not (cache / "wds-samples").exists()
    assert (cache / "other.bin").exists()
