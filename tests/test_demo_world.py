"""The procedural miniature world: determinism, CoOp layout, counts, manifest and regeneration."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from clipconv.data import demo_world as W

SMALL = dict(train_per_class=2, test_per_class=1, image_size=32)


def _tree_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return W.generate_world(tmp_path_factory.mktemp("world") / "w", seed=3, **SMALL)


def test_classes_are_sorted_words():
    ids = [c.id for c in W.WORLD_CLASSES]
    assert ids == sorted(ids) == [f"m{i:03d}" for i in range(32)]
    assert [c.index for c in W.WORLD_CLASSES] == list(range(32))
    names = [c.name for c in W.WORLD_CLASSES]
    assert len(set(names)) == 32 and "striped star" in names
    assert all(name.replace(" ", "").isalpha() for name in names)


def test_render_is_deterministic_and_seed_dependent():
    for domain in W.STYLES:
        first = np.asarray(W.render(5, domain, np.random.default_rng(7)))
        again = np.asarray(W.render(5, domain, np.random.default_rng(7)))
        other = np.asarray(W.render(5, domain, np.random.default_rng(8)))
        assert first.shape == (64, 64, 3) and first.dtype == np.uint8
        assert np.array_equal(first, again)
        assert not np.array_equal(first, other)


def test_sketch_is_grey():
    image = np.asarray(W.render(9, "sketch", np.random.default_rng(0))).astype(int)
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match="domain"):
        W.render(0, "painting", np.random.default_rng(0))
    with pytest.raises(ValueError, match="class_index"):
        W.render(32, "source", np.random.default_rng(0))


def test_layout_and_counts(small_world):
    root = small_world
    lines = (root / "imagenet/classnames.txt").read_text().splitlines()
    assert lines == [f"{c.id} {c.name}" for c in W.WORLD_CLASSES]
    train = root / "imagenet/images/train"
    assert sorted(p.name for p in train.iterdir()) == [c.id for c in W.WORLD_CLASSES]
    assert all(len(list(d.glob("*.jpg"))) == 2 for d in train.iterdir())
    val = root / "imagenet/images/val"
    assert len(list(val.glob("*/*.jpg"))) == 32
    v2 = root / "imagenetv2/imagenetv2-matched-frequency-format-val"
    assert sorted(int(p.name) for p in v2.iterdir()) == list(range(32))
    assert len(list((root / "imagenet-sketch/images").glob("m*/*.jpg"))) == 32
    r_dirs = sorted(p.name for p in (root / "imagenet-rendition/imagenet-r").iterdir())
    a_dirs = sorted(p.name for p in (root / "imagenet-adversarial/imagenet-a").iterdir())
    assert r_dirs == [W.WORLD_CLASSES[i].id for i in W.RENDITION_CLASSES]
    assert a_dirs == [W.WORLD_CLASSES[i].id for i in W.ADVERSARIAL_CLASSES]
    assert 0 < len(r_dirs) < 32 and 0 < len(a_dirs) < 32 and r_dirs != a_dirs
    assert (root / "imagenet-rendition/README.txt").is_file()
    assert (root / "imagenet-adversarial/README.txt").is_file()
    manifest = W.read_manifest(root)
    assert manifest["params"] == W.world_params(seed=3, **SMALL)
    assert manifest["counts"] == {"train": 64, "source": 32, "v2": 32, "sketch": 32, "rendition": 16,
                                  "adversarial": 16}
    jpgs = list(root.rglob("*.jpg"))
    assert len(jpgs) == sum(manifest["counts"].values())
    from PIL import Image

    with Image.open(jpgs[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_same_seed_same_bytes_other_seed_differs(small_world, tmp_path):
    again = W.generate_world(tmp_path / "again", seed=3, **SMALL)
    other = W.generate_world(tmp_path / "other", seed=4, **SMALL)
    reference = _tree_bytes(small_world)
    assert _tree_bytes(again) == reference
    different = _tree_bytes(other)
    assert different.keys() == reference.keys()
    images = [k for k in reference if k.endswith(".jpg")]
    assert all(different[k] != reference[k] for k in images)


def test_splits_do_not_share_images(small_world):
    blobs = [p.read_bytes() for p in small_world.rglob("*.jpg")]
    assert len(set(blobs)) == len(blobs)


def test_finished_world_is_not_rewritten(small_world):
    manifest = small_world / W.MANIFEST_NAME
    stamp = manifest.stat().st_mtime_ns
    assert W.generate_world(small_world, seed=3, **SMALL) == small_world
    assert manifest.stat().st_mtime_ns == stamp


def test_other_parameters_on_a_finished_world_are_refused(small_world):
    with pytest.raises(ValueError, match="already holds a demo world"):
        W.generate_world(small_world, seed=4, **SMALL)


def test_half_written_world_is_regenerated(tmp_path, monkeypatch):  # serial: counts renders in this process
    root = tmp_path / "w"
    calls = {"n": 0}
    real_render = W.render

    def failing_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(W, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        W.generate_world(root, seed=1, workers=1, **SMALL)
    assert W.read_manifest(root) is None and (root / "imagenet").is_dir()
    (root / "imagenet/images/train/m000/stray.jpg").write_bytes(b"half")
    monkeypatch.setattr(W, "render", real_render)
    W.generate_world(root, seed=1, **SMALL)
    assert W.read_manifest(root) is not None
    assert not (root / "imagenet/images/train/m000/stray.jpg").exists()
    assert _tree_bytes(root) == _tree_bytes(W.generate_world(tmp_path / "fresh", seed=1, **SMALL))


def test_unfinished_manifest_is_not_trusted(tmp_path):
    root = W.generate_world(tmp_path / "w", seed=2, **SMALL)
    (root / W.MANIFEST_NAME).write_text("{ truncated")
    assert W.read_manifest(root) is None


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="not a clipconv demo world"):
        W.generate_world(tmp_path, **SMALL)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_bad_parameters_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="test_per_class"):
        W.generate_world(tmp_path / "w", test_per_class=0)
    with pytest.raises(ValueError, match="image_size"):
        W.ensure_world(tmp_path / "w", image_size=4)


def test_ensure_world_uses_cache_named_by_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPCONV_CACHE", str(tmp_path))
    root = W.ensure_world(**SMALL)
    assert root.parent == tmp_path and root.name.startswith("demo-world-")
    assert W.ensure_world(**SMALL) == root
    other = W.ensure_world(seed=1, **SMALL)
    assert other != root
    assert json.loads((root / W.MANIFEST_NAME).read_text())["params"]["seed"] == 0


def _tree_digests(root) -> dict[str, str]:
    return {name: hashlib.sha256(blob).hexdigest() for name, blob in _tree_bytes(root).items()}


def test_parallel_world_is_byte_identical_to_serial(small_world, tmp_path):
    serial = _tree_digests(W.generate_world(tmp_path / "serial", seed=3, workers=1, **SMALL))
    parallel = _tree_digests(W.generate_world(tmp_path / "parallel", seed=3, workers=3, **SMALL))
    assert W.MANIFEST_NAME in serial and len(serial) == 1 + 3 + sum(W.read_manifest(small_world)["counts"].values())
    assert parallel == serial
    assert _tree_digests(small_world) == serial  # the default worker count


def test_failing_worker_fails_the_generation_and_leaves_no_world(tmp_path, monkeypatch):
    root = tmp_path / "w"
    real_render = W.render

    def render_failing_once(class_index, domain, rng, image_size=64):
        if domain == "sketch" and class_index == 7:
            raise OSError("disk full (simulated)")
        return real_render(class_index, domain, rng, image_size)

    monkeypatch.setattr(W, "render", render_failing_once)  # the forked workers inherit it
    with pytest.raises(RuntimeError, match="failed in a worker process: OSError: disk full") as failure:
        W.generate_world(root, seed=1, workers=2, **SMALL)
    assert str(root) in str(failure.value)
    assert W.read_manifest(root) is None and (root / W._MARKER_NAME).is_file()
    monkeypatch.setattr(W, "render", real_render)  # next use regenerates it
    assert W.read_manifest(W.ensure_world(root, seed=1, **SMALL))["counts"]["sketch"] == 32


def test_worker_count_follows_usable_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(W.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert W.generation_workers() == W.MAX_WORKERS
    monkeypatch.setattr(W.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(W.os, "cpu_count", lambda: 1)
    assert W.generation_workers() == 1

    def no_pool(*args, **kwargs):
        raise AssertionError("one core renders in this process, without a pool")

    monkeypatch.setattr(W, "ProcessPoolExecutor", no_pool)
    assert W.read_manifest(W.generate_world(tmp_path / "w", seed=3, **SMALL)) is not None
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            W.generate_world(tmp_path / "bad", workers=bad, **SMALL)
