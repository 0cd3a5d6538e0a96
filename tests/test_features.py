"""FeatureStore: correctness, cache hits, invalidation, interrupted writes, undecodable images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from baseline_world import make_world
from tolerance import assert_close_scaled, differs_beyond_tolerance
from torchvision import transforms as T

from clipconv.backbone import load_backbone
from clipconv.features import FeatureStore, default_cache_dir
from clipconv.methods import build_method
from clipconv.runtime.cache import transform_id


@pytest.fixture()
def world(tmp_path, tiny_config):
    return make_world(tmp_path, tiny_config)


def _direct_features(backbone, root, samples):
    from PIL import Image

    images = torch.stack([backbone.eval_transform(Image.open(root / path).convert("RGB")) for path, _ in samples])
    with torch.no_grad():
        return backbone.model.encode_image(images).float()


def test_features_equal_direct_encode_image(world):
    feats, labels = world.store.encode(world.root, world.test_samples, with_labels=True)
    assert feats.dtype == torch.float32 and feats.shape == (len(world.test_samples), 16)
    assert labels.tolist() == [label for _, label in world.test_samples]
    assert_close_scaled(feats, _direct_features(world.backbone, world.root, world.test_samples))


def test_second_method_encodes_zero_images(world):
    build_method("zero_shot").fit(world.ctx)
    build_method("linear_probe", bisection_steps=1).fit(world.ctx)
    first = world.store.encoder_calls
    assert first == len(world.ctx.train) + len(world.ctx.val)
    fresh = FeatureStore(world.backbone, world.store.cache_dir)  # a new process would see the same files
    world.ctx.features = fresh
    build_method("linear_probe", bisection_steps=1).fit(world.ctx)
    assert fresh.encoder_calls == 0 and fresh.cache_hits == 2


def test_sample_order_does_not_matter(world):
    samples = world.test_samples
    forward = world.store.encode(world.root, samples)
    calls = world.store.encoder_calls
    backward, labels = world.store.encode(world.root, samples[::-1], with_labels=True)
    assert world.store.encoder_calls == calls
    assert torch.equal(backward, forward.flip(0))  # read back from the cache, not re-encoded
    assert labels.tolist() == [label for _, label in samples[::-1]]


def test_changed_transform_invalidates(world):
    world.store.encode(world.root, world.test_samples)
    calls = world.store.encoder_calls
    other = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor()])
    world.store.encode(world.root, world.test_samples, transform=other)
    assert world.store.encoder_calls == calls + len(world.test_samples)
    world.store.encode(world.root, world.test_samples, transform=other)
    assert world.store.encoder_calls == calls + len(world.test_samples)


def test_changed_weights_file_invalidates(world, tmp_path, tiny_config):
    weights = tmp_path / "weights.pt"
    torch.save(world.backbone.model.state_dict(), weights)
    loaded = load_backbone(str(tiny_config), pretrained=str(weights), device="cpu")
    store = FeatureStore(loaded, world.store.cache_dir)
    first = store.encode(world.root, world.test_samples)
    store.encode(world.root, world.test_samples)
    assert store.encoder_calls == len(world.test_samples)
    state = world.backbone.model.state_dict()
    state["visual.proj"] = state["visual.proj"] * 2
    torch.save(state, weights)
    changed = FeatureStore(load_backbone(str(tiny_config), pretrained=str(weights), device="cpu"),
                           world.store.cache_dir)
    second = changed.encode(world.root, world.test_samples)
    assert changed.encoder_calls == len(world.test_samples)
    assert_close_scaled(second, first * 2)


def test_random_init_weights_are_part_of_the_key(world, tiny_config):
    world.store.encode(world.root, world.test_samples)
    changed = load_backbone(str(tiny_config), pretrained=None, device="cpu")
    with torch.no_grad():
        changed.model.visual.proj.mul_(2)  # same "random-init" id, different numbers
    other = FeatureStore(changed, world.store.cache_dir)
    other.encode(world.root, world.test_samples)
    assert other.encoder_calls == len(world.test_samples)


def test_interrupted_write_leaves_nothing_readable(world, monkeypatch):
    import safetensors.torch

    def killed(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 10)  # a partial file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        world.store.encode(world.root, world.test_samples)
    assert list(world.store.cache_dir.iterdir()) == []
    monkeypatch.undo()
    world.store.encode(world.root, world.test_samples)
    assert world.store.encoder_calls == 2 * len(world.test_samples)


def test_corrupt_entry_is_recomputed_not_read(world):
    expected = world.store.encode(world.root, world.test_samples)
    (entry,) = list(world.store.cache_dir.glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    with pytest.warns(UserWarning, match="unreadable"):
        again = world.store.encode(world.root, world.test_samples)
    assert world.store.encoder_calls == 2 * len(world.test_samples)
    assert_close_scaled(again, expected)


def test_undecodable_images_are_skipped_consistently(world):
    bad_path, _ = world.test_samples[1]
    (world.root / bad_path).write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="undecodable"):
        feats, labels = world.store.encode(world.root, world.test_samples, with_labels=True)
    kept = [s for i, s in enumerate(world.test_samples) if i != 1]
    assert world.store.last_kept.tolist() == [i for i in range(len(world.test_samples)) if i != 1]
    assert labels.tolist() == [label for _, label in kept]
    assert_close_scaled(feats, _direct_features(world.backbone, world.root, kept))
    cached, cached_labels = world.store.encode(world.root, world.test_samples, with_labels=True)
    assert torch.equal(cached, feats) and torch.equal(cached_labels, labels)


def test_augmented_rounds_are_seeded_and_averaged(world):
    augment = T.Compose([T.RandomResizedCrop(32, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    store = FeatureStore(world.backbone, None)
    one = store.encode(world.root, world.test_samples, transform=augment, rounds=1, seed=3)
    three = store.encode(world.root, world.test_samples, transform=augment, rounds=3, seed=3)
    again = store.encode(world.root, world.test_samples, transform=augment, rounds=3, seed=3)
    assert store.encoder_calls == 7 * len(world.test_samples)  # no cache: everything encoded
    assert_close_scaled(three, again)
    assert differs_beyond_tolerance(one, three)
    other_seed = store.encode(world.root, world.test_samples, transform=augment, rounds=3, seed=4)
    assert differs_beyond_tolerance(three, other_seed)


def test_augmentation_does_not_depend_on_workers_or_batch_size(world):
    augment = T.Compose([T.RandomResizedCrop(32, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    serial = FeatureStore(world.backbone, None, batch_size=3, workers=0)
    parallel = FeatureStore(world.backbone, None, batch_size=5, workers=2)
    assert_close_scaled(serial.encode(world.root, world.test_samples, transform=augment, seed=7),
                        parallel.encode(world.root, world.test_samples, transform=augment, seed=7))


def test_no_cache_writes_nothing(world, tmp_path):
    store = FeatureStore(world.backbone, None)
    store.encode(world.root, world.test_samples)
    store.encode(world.root, world.test_samples)
    assert store.encoder_calls == 2 * len(world.test_samples)
    assert not (tmp_path / "cache").exists()


def test_bad_arguments(world):
    with pytest.raises(ValueError, match="transform"):
        world.store.encode(world.root, world.test_samples, transform="weird")
    with pytest.raises(ValueError, match="rounds"):
        world.store.encode(world.root, world.test_samples, rounds=0)
    with pytest.raises(ValueError, match="batch_size"):
        FeatureStore(world.backbone, None, batch_size=0)


def test_default_cache_dir_and_transform_id(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPCONV_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "features"

    def helper(x):
        return x

    assert "0x" not in transform_id(T.Compose([T.Lambda(helper), helper]))


def _flip_payload_bytes(entry, count: int = 8) -> None:
    """Flip `count` bytes inside the tensor payload (after the safetensors header), keeping the size."""
    import struct

    data = bytearray(entry.read_bytes())
    payload_start = 8 + struct.unpack("<Q", data[:8])[0]
    for offset in range(count):
        data[payload_start + 16 + offset * 4] ^= 0x5A
    entry.write_bytes(bytes(data))


def test_entry_with_damaged_payload_bytes_is_detected_recomputed_and_repaired(world):
    expected = world.store.encode(world.root, world.test_samples)
    (entry,) = list(world.store.cache_dir.glob("*.safetensors"))
    size = entry.stat().st_size
    _flip_payload_bytes(entry)
    assert entry.stat().st_size == size
    with pytest.warns(UserWarning, match=f"feature cache entry '{entry}' is damaged") as caught:
        again = world.store.encode(world.root, world.test_samples)
    assert len(caught) == 1
    assert world.store.encoder_calls == 2 * len(world.test_samples)
    assert torch.equal(again, expected)  # recomputed, not the damaged numbers
    fresh = FeatureStore(world.backbone, world.store.cache_dir)  # the file was rewritten: a clean hit
    assert torch.equal(fresh.encode(world.root, world.test_samples), expected)
    assert fresh.encoder_calls == 0 and fresh.cache_hits == 1


def _single_warning(caught) -> str:
    messages = [str(w.message) for w in caught if "feature cache" in str(w.message)]
    assert len(messages) == 1, messages
    return messages[0]


def test_cache_folder_that_is_a_file_runs_uncached_with_one_warning(world, tmp_path, monkeypatch):
    import warnings

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("CLIPCONV_CACHE", str(blocker))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = FeatureStore(world.backbone)  # "default": $CLIPCONV_CACHE/features
        assert store.cache_dir == blocker / "features"  # probed on first use, not on construction
        first = store.encode(world.root, world.test_samples)
        FeatureStore(world.backbone).encode(world.root, world.test_samples)  # same folder: no second warning
    message = _single_warning(caught)
    assert f"'{blocker}' is a file, not a folder" in message and "CLIPCONV_CACHE" in message
    assert store.cache_dir is None and store.encoder_calls == len(world.test_samples)
    torch.testing.assert_close(first, _direct_features(world.backbone, world.root, world.test_samples))
    assert blocker.read_text() == ""


def test_cache_folder_that_cannot_be_written_runs_uncached_with_one_warning(world, tmp_path, monkeypatch):
    """Tests run as root, whom chmod 0555 does not stop; the probe (creating a temp file in the folder) is
    made to fail as it does for a normal user in a read-only folder. A real chmod is checked when not root."""
    import errno
    import os
    import tempfile
    import warnings

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_mkstemp = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = FeatureStore(world.backbone, folder)
        store.encode(world.root, world.test_samples)
    message = _single_warning(caught)
    assert f"cannot write in '{folder}' (Permission denied)" in message
    assert store.cache_dir is None and list(folder.iterdir()) == []
    folder.chmod(0o755)


def test_a_failed_cache_write_warns_and_still_returns_the_features(world, monkeypatch):
    import errno
    import os

    import safetensors.torch

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.warns(UserWarning, match="feature cache entry not saved: could not write .*No space left"):
        feats = world.store.encode(world.root, world.test_samples)
    assert feats.shape[0] == len(world.test_samples)
    assert list(world.store.cache_dir.iterdir()) == []
