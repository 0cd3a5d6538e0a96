"""Images that vanish or change under a run: the cache lock keeps `cache.py clear` away from running runs, and a
set whose listed images vanished (or changed after they were listed) fails the run with one line instead of
being scored on the rest (never "nan%")."""
from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from cli_world import make_cli_world, run_cli
from torchvision import transforms

from clipconv.data import ImagesChangedError, eval_split, make_image_tree, resolve_run_classes
from clipconv.evaluation import evaluate_method

TRANSFORM = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


class _Scorer:
    frozen_image_encoder = False

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :4]


def _splits(root: Path):
    classes = resolve_run_classes(root)
    return [eval_split(root, name, classes) for name in ("imagenet", "imagenet_sketch")]


def _evaluate(root: Path, splits) -> dict:
    return evaluate_method(_Scorer(), splits, root, torch.device("cpu"), eval_transform=TRANSFORM, batch_size=4,
                           log=lambda line: None)


@pytest.fixture()
def tree(tmp_path) -> Path:
    return make_image_tree(tmp_path / "data", train_per_class=2, val_per_class=3, variants=("sketch",))


def test_images_that_vanish_after_listing_fail_the_set_with_one_line_naming_it_and_the_count(tree):
    splits = _splits(tree)
    sketch = splits[1]
    for rel, _ in sketch.samples[:5]:
        (tree / rel).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-file "undecodable" warning: one error
        with pytest.raises(ImagesChangedError) as caught:
            _evaluate(tree, splits)
    message = str(caught.value)
    assert message.startswith(f"{sketch.name}: 5 of its {len(sketch)} images vanished or changed")
    assert "\n" not in message and str(tree / sketch.samples[0][0]) in message


def test_images_rewritten_undecodable_after_listing_fail_the_set(tree):
    splits = _splits(tree)
    splits[1].listed_at = time.time() - 1.0  # listed a moment ago, whatever the clock's resolution
    (tree / splits[1].samples[2][0]).write_bytes(b"no longer an image")
    with pytest.raises(ImagesChangedError, match=r": 1 of its \d+ images vanished or changed"):
        _evaluate(tree, splits)


def test_a_file_undecodable_before_listing_is_still_skipped_with_one_warning(tree):
    sketch = _splits(tree)[1]
    (tree / sketch.samples[0][0]).write_bytes(b"broken from the start")
    splits = _splits(tree)  # listed after the damage: the documented skip
    with pytest.warns(UserWarning, match="skipped 1 undecodable file"):
        results = _evaluate(tree, splits)
    assert results["imagenet_sketch"]["n"] == len(sketch) - 1


def test_a_set_none_of_whose_images_decode_is_an_error_not_nan(tree):
    splits = _splits(tree)
    for rel, _ in splits[1].samples:
        (tree / rel).write_bytes(b"")
    splits = _splits(tree)
    with pytest.raises(ValueError, match="none of its .* images could be decoded"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _evaluate(tree, splits)


def test_a_run_whose_images_vanish_mid_run_exits_with_one_line(tmp_path, tiny_config, monkeypatch):
    """The zero-shot CLI on a tree whose sketch images are removed after listing (as `cache.py clear` did to the
    demo world): exit 2, one line naming the set and the count, no result written."""
    from clipconv.app.cli import zero_shot
    from clipconv.data.family import TreeFamily

    world = make_cli_world(tmp_path, tiny_config)
    listed = TreeFamily.eval_splits

    def list_then_remove(self, names, classes):
        splits = listed(self, names, classes)
        for split in splits:
            if split.name == "imagenet_sketch":
                for rel, _ in split.samples:
                    (self.data_root / rel).unlink()
        return splits

    monkeypatch.setattr(TreeFamily, "eval_splits", list_then_remove)
    out = tmp_path / "out"
    result = run_cli(zero_shot.main, ["--data-root", str(world["data"]), "--model", str(tiny_config), "--pretrained",
                                      str(world["weights"]), "--workers", "0", "--device", "cpu", "--no-cache",
                                      "--output-dir", str(out)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "imagenet_sketch: 12 of its 12 images vanished" in errors[0]
    assert "undecodable" not in result.stderr and "nan" not in result.stdout + result.stderr
    assert not (out / "zero_shot.json").exists()


# ------------------------------------------------------------------------------------------ the cache lock
def test_clear_refuses_at_once_while_a_run_holds_the_cache(tmp_path, monkeypatch):
    """flock locks belong to open files, so a lock this process holds through another descriptor stands for a
    run in another process."""
    from clipconv.app.cache import main
    from clipconv.runtime import cache as runtime_cache

    cache = tmp_path / "cache"
    (cache / "features").mkdir(parents=True)
    entry = cache / "features" / ("a" * 40 + ".safetensors")
    entry.write_bytes(b"x")
    monkeypatch.setattr(runtime_cache, "_HELD", {})  # this test's own record of held folders
    runtime_cache.hold_cache(cache)
    try:
        result = run_cli(main, ["clear", "--dir", str(cache)])
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.splitlines() == [f"error: cache folder '{cache}' is in use by a running clipconv process "
                                              f"(it holds {runtime_cache.CACHE_LOCK}); clear it once no run uses it"]
        assert entry.exists()
    finally:
        os.close(runtime_cache._HELD.pop(os.path.abspath(cache)))
    assert run_cli(main, ["clear", "--dir", str(cache)]).returncode == 0 and not entry.exists()  # the run ended


def test_a_run_holds_its_feature_cache_given_as_cache_dir_and_clear_refuses_it(tmp_path, tiny_backbone,
                                                                                monkeypatch):
    """`--cache-dir R/features` with `$CLIPCONV_CACHE` elsewhere: `clear --dir R` would empty that folder, so it
    refuses (one line naming it, nothing removed) while the run lives; once the run ended it clears it all."""
    from clipconv.app.cache import main
    from clipconv.app.session import open_session
    from clipconv.config import BackboneConfig, DataConfig, RuntimeConfig
    from clipconv.runtime import cache as runtime_cache

    monkeypatch.setenv("CLIPCONV_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(runtime_cache, "_HELD", {})  # this test's own record of held folders
    features = tmp_path / "cache" / "features"
    features.mkdir(parents=True)
    entry = features / ("a" * 40 + ".safetensors")
    entry.write_bytes(b"x")
    root = make_image_tree(tmp_path / "data", train_per_class=2, val_per_class=1, variants=())
    open_session(DataConfig(data_root=str(root)), BackboneConfig(),
                 RuntimeConfig(device="cpu", cache_dir=str(features)), loaded=tiny_backbone)
    try:
        result = run_cli(main, ["clear", "--dir", str(tmp_path / "cache")])
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.splitlines() == [f"error: cache folder '{features}' is in use by a running clipconv "
                                              f"process (it holds {runtime_cache.CACHE_LOCK}); clear it once no "
                                              "run uses it"]
        assert entry.exists()
    finally:
        for fd in runtime_cache._HELD.values():
            os.close(fd)
    assert run_cli(main, ["clear", "--dir", str(tmp_path / "cache")]).returncode == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [runtime_cache.CACHE_LOCK]  # features/ went


def test_a_run_waiting_on_a_clear_holds_the_lock_file_that_outlives_it(tmp_path, monkeypatch):
    """The clear removes an inner folder's lock file before releasing it; a run that was waiting on it locks the
    file at that path afterwards (a later clear must see it), not the removed one."""
    from clipconv.runtime import cache as runtime_cache

    monkeypatch.setattr(runtime_cache, "_HELD", {})
    inner = tmp_path / "cache" / "features"
    inner.mkdir(parents=True)
    with runtime_cache.cache_exclusively(tmp_path / "cache", inner=(inner,)):
        waiting = threading.Thread(target=runtime_cache.hold_cache, args=(inner,))
        waiting.start()
        waiting.join(0.2)
        assert waiting.is_alive()  # waits while the clear is under way
    waiting.join(5)
    fd = runtime_cache._HELD.pop(os.path.abspath(inner))
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(inner / runtime_cache.CACHE_LOCK))
        with pytest.raises(runtime_cache.CacheInUseError, match="features"):
            with runtime_cache.cache_exclusively(tmp_path / "cache", inner=(inner,)):
                pass
    finally:
        os.close(fd)


def test_a_session_holds_the_cache_for_the_life_of_the_process(tmp_path, tiny_backbone, monkeypatch):
    from clipconv.app.cache import main
    from clipconv.app.session import open_session
    from clipconv.config import BackboneConfig, DataConfig, RuntimeConfig
    from clipconv.runtime import cache as runtime_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIPCONV_CACHE", str(cache))
    monkeypatch.setattr(runtime_cache, "_HELD", {})  # this test's own record of held folders
    root = make_image_tree(tmp_path / "data", train_per_class=2, val_per_class=1, variants=())
    open_session(DataConfig(data_root=str(root)), BackboneConfig(), RuntimeConfig(device="cpu", cache=False),
                 loaded=tiny_backbone)
    try:
        result = run_cli(main, ["clear"])
        assert result.returncode == 2 and "is in use by a running clipconv process" in result.stderr
    finally:
        for fd in runtime_cache._HELD.values():
            os.close(fd)
