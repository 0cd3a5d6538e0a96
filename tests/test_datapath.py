"""The data path: reduced-size JPEG decoding (draft), the decoded K-shot cache, loader options, the benchmark."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from clipconv.app.bench_data import model_transforms, write_jpegs
from clipconv.data import ImageListDataset, load_rgb
from clipconv.data.decoded import DecodedImageDataset, decoded_images, decoded_resized, wait_for_writes
from clipconv.data.draft import draft_for, needed_short_side
from clipconv.evaluation import collect_logits, evaluate_method, image_loader

EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- what the transforms need
def test_needed_short_side_of_the_eval_and_train_transforms():
    train, evaluation = model_transforms(224)
    assert needed_short_side(evaluation) == 224  # Resize(224) on the shorter side, then CenterCrop(224)
    # the smallest crop (8 % of the area, aspect 3:4) keeps >= 224 source pixels per side only from d >= 915
    assert needed_short_side(train) == math.ceil(224 / math.sqrt(0.08 * 0.75)) == 915
    from open_clip.transform import PreprocessCfg

    from clipconv.backbone import protocol_train_transform

    assert needed_short_side(protocol_train_transform(PreprocessCfg(size=224), scale=(0.5, 1.0))) == \
        math.ceil(224 / math.sqrt(0.5 * 0.75))


@pytest.mark.parametrize("transform", [
    lambda image: image,  # unknown callable
    T.Compose([T.ColorJitter(0.1), T.Resize(32)]),  # unknown step before the resize
    T.Compose([T.Resize(32, max_size=40)]),  # the longer side may decide
])
def test_transforms_not_understood_are_never_drafted(transform):
    assert needed_short_side(transform) is None
    assert draft_for("all", transform, training=False) is None


def test_draft_modes():
    train, evaluation = model_transforms(64)
    assert draft_for("eval", evaluation, training=False) == 64
    assert draft_for("eval", train, training=True) is None  # the reference training path by default
    assert draft_for("all", train, training=True) == needed_short_side(train)
    assert draft_for("off", evaluation, training=False) is None
    with pytest.raises(ValueError, match="draft must be one of"):
        draft_for("fast", evaluation, training=False)


def test_runtime_config_decodes_full_size_and_caches_decoded_images_by_default():
    from clipconv.config import RuntimeConfig

    # full-size decoding is the reference protocol; drafting is the named speed option
    assert RuntimeConfig().draft == "off" and RuntimeConfig().decoded_cache is True
    with pytest.raises(ValueError, match="draft"):
        RuntimeConfig(draft="sometimes")


# ----------------------------------------------------------------------------- draft decoding
@pytest.fixture()
def decoded_sizes(monkeypatch) -> list:
    """The (width, height) of every image the folder loaders decode, in order."""
    import clipconv.data.folder as folder

    sizes = []

    def recording(path, draft_size=None):
        image = load_rgb(path, draft_size)
        sizes.append(image.size)
        return image

    monkeypatch.setattr(folder, "load_rgb", recording)
    return sizes


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    return root, write_jpegs(root, 4, (400, 300), seed=3)


def test_draft_decodes_at_the_largest_dct_scale_that_keeps_the_needed_side(big_jpegs):
    root, samples = big_jpegs
    path = root / samples[0][0]
    assert load_rgb(path).size == (400, 300)
    assert load_rgb(path, draft_size=64).size == (100, 75)  # 1/4: 1/8 would give 38 < 64 rows
    assert load_rgb(path, draft_size=100).size == (200, 150)  # 1/2: 1/4 would give 75 < 100 rows
    assert load_rgb(path, draft_size=160).size == (400, 300)  # no scale keeps 160 rows but full size
    for side in (16, 37, 64, 75, 76, 150, 151, 299):
        assert min(load_rgb(path, draft_size=side).size) >= side


def test_drafted_eval_images_are_close_to_full_decodes_and_never_smaller_than_needed(big_jpegs):
    root, samples = big_jpegs
    _, evaluation = model_transforms(64)
    size = draft_for("eval", evaluation, training=False)
    drafted = ImageListDataset(root, samples, None, draft_size=size)
    assert [drafted[i][0].size for i in range(len(samples))] == [(100, 75)] * len(samples)  # draft applied
    unnormalized = T.Compose([t for t in evaluation.transforms if not isinstance(t, T.Normalize)])
    full = ImageListDataset(root, samples, unnormalized)
    small = ImageListDataset(root, samples, unnormalized, draft_size=size)
    for index in range(len(samples)):
        a, b = full[index][0], small[index][0]
        assert a.shape == b.shape == (3, 64, 64)
        difference = (a - b).abs()
        # pixel values are in [0, 1]: the DCT-scaled decode differs from the resampled one by under one level
        # of 255 on average (measured 0.65–0.7; the images' noise is 8 levels) and at most a few at edges
        # (measured 5–8): the same picture, not a blurrier or shifted one
        assert 0 < float(difference.mean()) <= 1.5 / 255
        assert float(difference.max()) <= 16 / 255


def test_evaluate_method_drafts_by_option(big_jpegs, decoded_sizes):
    root, samples = big_jpegs
    sizes = decoded_sizes
    _, evaluation = model_transforms(64)

    class Flat:
        frozen_image_encoder = False

        def logits(self, images):
            return images.flatten(1)[:, :2]

    from clipconv.data.imagenet import EvalSplit

    split = EvalSplit(name="val", display_name="val", root=root, samples=samples, subset=None, dropped=0)
    on = evaluate_method(Flat(), [split], root, torch.device("cpu"), eval_transform=evaluation, log=lambda *_: None,
                         draft="eval")
    assert sizes == [(100, 75)] * len(samples)
    sizes.clear()
    off = evaluate_method(Flat(), [split], root, torch.device("cpu"), eval_transform=evaluation, log=lambda *_: None,
                          draft="off")
    assert sizes == [(400, 300)] * len(samples)
    assert on["val"]["n"] == off["val"]["n"] == len(samples)


def test_feature_store_drafts_eval_features_into_their_own_cache_entries(big_jpegs, tiny_backbone, tmp_path,
                                                                        decoded_sizes):
    from clipconv.features import FeatureStore

    root, samples = big_jpegs
    sizes = decoded_sizes
    plain = FeatureStore(tiny_backbone, tmp_path, batch_size=4).encode(root, samples)
    assert set(sizes) == {(400, 300)}
    sizes.clear()
    store = FeatureStore(tiny_backbone, tmp_path, batch_size=4, draft="eval")
    drafted = store.encode(root, samples)
    side = needed_short_side(tiny_backbone.eval_transform)
    assert sizes and all(min(s) >= side and s != (400, 300) for s in sizes)
    assert store.cache_hits == 0  # not served the full-decode entry
    # under one level of 255 per pixel moves the features by ~2 % of their largest magnitude (measured 1.8 %)
    tol = 0.05 * float(plain.abs().max())
    assert float((plain - drafted).abs().max()) <= tol
    sizes.clear()
    store.encode(root, samples)
    assert store.cache_hits == 1 and not sizes
    # training-transform features (Tip-Adapter's augmented keys) are not drafted in "eval" mode
    store.encode(root, samples, transform="train")
    assert set(sizes) == {(400, 300)}


# ----------------------------------------------------------------------------- decoded cache
@pytest.fixture()
def small_jpegs(tmp_path):
    root = tmp_path / "images"
    samples = write_jpegs(root, 10, (48, 40), seed=5)
    (root / "c0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root, samples[:5] + [("c0/broken.jpg", 0)] + samples[5:]


def _batches(root, samples, transform, decoded, epoch_seed):
    torch.manual_seed(epoch_seed)
    loader = image_loader(root, samples, transform, 4, 0, shuffle=True,
                          generator=torch.Generator().manual_seed(epoch_seed), decoded=decoded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [(images.clone(), labels.clone()) for images, labels in loader]
    return batches, [str(w.message) for w in caught]


def test_training_batches_from_the_decoded_cache_equal_the_jpeg_path(small_jpegs, tmp_path):
    root, samples = small_jpegs
    train, _ = model_transforms(32)
    side = needed_short_side(train)
    assert side > 48  # lossless: no image is resized for the cache
    decoded = decoded_images(root, samples, side, cache_dir=tmp_path / "cache")
    assert not decoded.ok[5] and "broken.jpg" in decoded.errors[5]
    for epoch in (1, 2, 3):
        plain, plain_warnings = _batches(root, samples, train, None, epoch)
        cached, cached_warnings = _batches(root, samples, train, decoded, epoch)
        assert len(plain) == len(cached) == 3
        for (a, la), (b, lb) in zip(plain, cached):
            assert torch.equal(a, b) and torch.equal(la, lb)
        assert len(cached_warnings) == len(plain_warnings) == 1  # the broken file, named once per epoch
        assert "broken.jpg" in cached_warnings[0] and "skipped 1" in cached_warnings[0]


def test_decoded_cache_is_reused_across_runs_and_redecoded_after_a_file_changes(small_jpegs, tmp_path, monkeypatch):
    import clipconv.data.decoded as module

    root, samples = small_jpegs
    calls = []
    real = module.load_rgb
    monkeypatch.setattr(module, "load_rgb", lambda path, draft_size=None: calls.append(path) or real(path, draft_size))
    first = decoded_images(root, samples, 915, cache_dir=tmp_path / "cache")
    assert len(calls) == len(samples) and not first.from_disk
    wait_for_writes()  # entries are written by a background thread
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".safetensors"
    calls.clear()
    second = decoded_images(root, samples, 915, cache_dir=tmp_path / "cache")
    assert second.from_disk and not calls
    assert torch.equal(first.pixels, second.pixels) and torch.equal(first.ok, second.ok)
    assert second.errors == first.errors
    changed = root / samples[0][0]
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = decoded_images(root, samples, 915, cache_dir=tmp_path / "cache")
    assert not third.from_disk and len(calls) == len(samples)
    wait_for_writes()
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_decoded_cache_entry_is_detected_and_decoded_again(small_jpegs, tmp_path, damage):
    root, samples = small_jpegs
    first = decoded_images(root, samples, 915, cache_dir=tmp_path / "cache")
    wait_for_writes()
    (entry,) = (tmp_path / "cache").iterdir()
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF  # inside the pixels
    else:
        data = data[: len(data) // 2]
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged|unreadable"):
        again = decoded_images(root, samples, 915, cache_dir=tmp_path / "cache")
    assert not again.from_disk and torch.equal(again.pixels, first.pixels)
    assert decoded_images(root, samples, 915, cache_dir=tmp_path / "cache").from_disk  # rewritten intact


def test_large_images_are_cached_at_the_needed_side_never_smaller(big_jpegs):
    root, samples = big_jpegs
    decoded = decoded_images(root, samples, 100)
    for index in range(len(samples)):
        height, width = (int(v) for v in decoded.shapes[index])
        assert min(height, width) == 100 and (width, height) == (133, 100)
    full = decoded_images(root, samples, 400)  # larger than the images: kept bit-exact
    for index, (path, _) in enumerate(samples):
        assert np.array_equal(full.array(index), np.asarray(load_rgb(root / path)))


@pytest.mark.parametrize("draft", [None, 64])
def test_validation_images_cached_after_the_eval_resize_score_exactly_as_the_files(big_jpegs, draft):
    from clipconv.data.draft import leading_resize

    root, samples = big_jpegs
    _, evaluation = model_transforms(64)
    decoded = decoded_images(root, samples, draft, prepare=leading_resize(evaluation))
    assert [tuple(int(v) for v in decoded.shapes[i]) for i in range(len(samples))] == [(64, 85)] * len(samples)
    score = lambda images: images.flatten(1)  # noqa: E731 — every pixel is compared
    plain, plain_labels = collect_logits(score, root, samples, evaluation, torch.device("cpu"), 4, draft_size=draft)
    cached, cached_labels = collect_logits(score, root, samples, evaluation, torch.device("cpu"), 4, decoded=decoded)
    assert torch.equal(plain, cached) and torch.equal(plain_labels, cached_labels)


class _Pixels:
    """A scorer whose logits are every pixel of the batch (any change of a value shows)."""
    frozen_image_encoder = False

    def logits(self, images):
        return images.flatten(1)


def _scores(root, samples, transform, decoded_dir, draft="off"):
    from clipconv.data.imagenet import EvalSplit

    split = EvalSplit(name="v2", display_name="v2", root=root, samples=samples, subset=None, dropped=0)
    seen = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = evaluate_method(_Pixels(), [split], root, torch.device("cpu"), eval_transform=transform, batch_size=4,
                                  log=lambda *_: None, draft=draft, decoded_dir=decoded_dir,
                                  on_logits=lambda name, logits, labels: seen.update(logits=logits, labels=labels))
    wait_for_writes()
    return metrics, seen, [str(w.message) for w in caught]


@pytest.mark.parametrize("draft", ["off", "eval"])
def test_small_evaluation_sets_are_decoded_once_and_score_exactly_as_the_files(big_jpegs, small_jpegs, tmp_path,
                                                                                decoded_sizes, draft):
    root, samples = small_jpegs  # an undecodable file among them
    (root / "c1" / "big.jpg").write_bytes((big_jpegs[0] / big_jpegs[1][0][0]).read_bytes())  # drafted by "eval"
    samples = samples + [("c1/big.jpg", 1)]
    _, evaluation = model_transforms(32)
    files, file_scores, file_warnings = _scores(root, samples, evaluation, None, draft)
    assert len(decoded_sizes) == len(samples) - 1  # streamed: every file decoded by the loader
    for run in ("decodes", "reads its entry"):
        decoded_sizes.clear()
        cached, cached_scores, cached_warnings = _scores(root, samples, evaluation, tmp_path / "decoded", draft)
        assert not decoded_sizes  # the loader never opened a file
        assert torch.equal(cached_scores["logits"], file_scores["logits"]), run
        assert torch.equal(cached_scores["labels"], file_scores["labels"]) and cached == files
        assert cached_warnings == file_warnings and "broken.jpg" in file_warnings[0]
        assert len(list((tmp_path / "decoded").glob("*.safetensors"))) == 1


def test_damaged_evaluation_entry_is_detected_and_decoded_again(small_jpegs, tmp_path):
    root, samples = small_jpegs
    _, evaluation = model_transforms(32)
    _, first, _ = _scores(root, samples, evaluation, tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-50] ^= 0xFF
    entry.write_bytes(bytes(data))
    _, again, caught = _scores(root, samples, evaluation, tmp_path)
    assert any("damaged" in message for message in caught) and torch.equal(again["logits"], first["logits"])
    assert decoded_resized(root, samples, evaluation, None, tmp_path).from_disk  # rewritten intact


def test_evaluation_sets_over_the_size_budget_stream_from_their_files(tmp_path, monkeypatch):
    import clipconv.data.decoded as module

    root = tmp_path / "wide"
    samples = write_jpegs(root, 6, (96, 32), seed=2)  # 96x32 images: 96·32·3 bytes after the Resize to 32
    _, evaluation = model_transforms(32)
    decodes = []
    real = module.load_rgb
    monkeypatch.setattr(module, "load_rgb", lambda path, draft_size=None: decodes.append(path) or real(path, draft_size))
    least = len(samples) * 32 * 32 * 3  # what the Resize's size alone promises
    assert decoded_resized(root, samples, evaluation, None, tmp_path, budget_bytes=least - 1) is None
    assert not decodes  # nothing decoded
    assert decoded_resized(root, samples, evaluation, None, tmp_path, budget_bytes=least) is None
    assert len(decodes) == 3  # stopped as soon as the pixels passed the budget
    wait_for_writes()
    assert not list(tmp_path.glob("*.safetensors"))  # nothing written
    kept = decoded_resized(root, samples, evaluation, None, tmp_path, budget_bytes=len(samples) * 96 * 32 * 3)
    assert kept is not None and kept.nbytes == len(samples) * 96 * 32 * 3
    assert decoded_resized(root, samples, T.Compose([T.CenterCrop(32), T.ToTensor()]), None, tmp_path) is None


def test_decoded_dataset_raises_naming_the_file_when_strict(small_jpegs):
    from clipconv.data import ImageDecodeError

    root, samples = small_jpegs
    dataset = DecodedImageDataset(decoded_images(root, samples, None), root, samples, None, on_error="raise")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        dataset[5]


def test_unusable_cache_folder_keeps_the_images_in_memory(small_jpegs, tmp_path):
    root, samples = small_jpegs
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="not usable"):
        decoded = decoded_images(root, samples, 915, cache_dir=blocker / "decoded")
    assert len(decoded) == len(samples) and int(decoded.ok.sum()) == len(samples) - 1


def test_adapter_training_with_the_decoded_cache_gives_the_same_weights(tmp_path, tiny_config, monkeypatch):
    from baseline_world import make_world

    import clipconv.data.folder as folder
    from clipconv.methods import build_method

    world = make_world(tmp_path, tiny_config, shots=2, val_shots=1, classes=2)
    file_reads = []
    monkeypatch.setattr(folder, "load_rgb", lambda path, draft_size=None: file_reads.append(path) or load_rgb(path))
    weights = {}
    for cache in (False, True, str(tmp_path / "decoded")):
        file_reads.clear()
        method = build_method("convpass", epochs=2, batch_size=2, lr=1e-2, scales=[1.0])
        method.fit(dataclasses.replace(world.ctx, decoded_cache=cache))
        # without the cache every epoch reads every train file and the validation files are read once (kept for
        # every epoch's pick: ImageBatches); with it the loaders read none
        assert len(file_reads) == (0 if cache else 2 * len(world.ctx.train) + len(world.ctx.val))
        weights[str(cache)] = {n: p.detach().clone() for n, p in method.classifier.named_parameters()
                               if p.requires_grad}
    wait_for_writes()
    assert len(list((tmp_path / "decoded").iterdir())) == 2  # the train and the validation images
    reference = weights["False"]
    for name, tensor in reference.items():
        for other in list(weights)[1:]:
            assert torch.equal(weights[other][name], tensor), (other, name)
    assert any(float((t - 0).abs().max()) > 0 for t in reference.values())


# ----------------------------------------------------------------------------- loader options
def test_loader_pins_memory_and_keeps_workers_only_when_asked(small_jpegs):
    root, samples = small_jpegs
    _, evaluation = model_transforms(32)
    plain = image_loader(root, samples, evaluation, 4, 0).loader
    assert not plain.pin_memory and not plain.persistent_workers
    worked = image_loader(root, samples, evaluation, 4, 1, pin_memory=True).loader
    assert worked.pin_memory and worked.persistent_workers and worked.num_workers == 1


@pytest.mark.filterwarnings("ignore:skipped 1 undecodable")
def test_collect_logits_copies_to_the_device_without_blocking(small_jpegs, monkeypatch):
    root, samples = small_jpegs
    _, evaluation = model_transforms(32)
    seen = []
    real_to = torch.Tensor.to

    def spying_to(self, *args, **kwargs):
        if self.dim() == 4 and "dtype" not in kwargs:  # the copy to the device, not the batch's uint8 → float
            seen.append(kwargs.get("non_blocking"))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spying_to)
    logits, labels = collect_logits(lambda x: x.flatten(1)[:, :3], root, samples, evaluation, torch.device("cpu"),
                                    batch_size=4)
    assert len(labels) == len(samples) - 1 and seen and all(seen)


# ----------------------------------------------------------------------------- benchmark
def test_loader_benchmark_runs_on_a_tiny_setting(tmp_path):
    from clipconv.app.bench_data import LoaderBenchConfig, format_loader_table, run_loader_benchmark

    cfg = LoaderBenchConfig(images=4, source="80x60", size=32, epochs=2, batch=2, repeats=1, check_source="160x120",
                            check_images=2)
    result = run_loader_benchmark(cfg, workdir=tmp_path)
    assert set(result["ratios"]) == {"eval", "eval_repeated", "train_epoch1", "train_later"}
    assert all(r > 0 for r in result["ratios"].values())
    assert len(result["seconds"]["train"]["new"][0]) == 2
    assert result["draft_size_eval"] == 32 and result["draft_check"]["images"] == 2
    assert "training, epochs 2+" in format_loader_table(result)


def test_benchmark_script_refuses_bad_loader_flags(capsys):
    from clipconv.app.bench_data import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--epochs", "1"])
    assert exit_info.value.code == 2 and "--epochs >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", "big"])
    assert exit_info.value.code == 2 and "500x375" in capsys.readouterr().err


def test_zero_shot_check_scores_full_and_drafted_decodes_with_the_mini_clip(tmp_path):
    from clipconv.app.bench_data import draft_zero_shot_check

    check = draft_zero_shot_check(image_size=96, per_class=1, workdir=tmp_path)
    assert check["images"] == 32 and check["draft_size"] == 48
    assert check["decoded_size"] == [48, 48]  # 96 px decoded at 1/2: the draft is applied
    assert 0 < check["max_logit_diff_rel"] < 0.5  # different decodes, the same pictures
    assert check["argmax_agreement"] >= 50 and 0 <= check["top1_draft"] <= 100


def test_session_hands_the_runtime_options_to_the_fit_context(tmp_path, monkeypatch):
    from clipconv.app.session import _decoded_cache, _decoded_dir
    from clipconv.config import RuntimeConfig

    monkeypatch.setenv("CLIPCONV_CACHE", str(tmp_path))
    assert _decoded_cache(RuntimeConfig()) == str(tmp_path / "decoded")
    assert _decoded_cache(RuntimeConfig(cache=False)) is True  # --no-cache: decoded in memory only
    assert _decoded_cache(RuntimeConfig(decoded_cache=False)) is False
    # evaluation sets: kept decoded in the cache folder only
    assert _decoded_dir(RuntimeConfig()) == str(tmp_path / "decoded")
    assert _decoded_dir(RuntimeConfig(cache=False)) is None and _decoded_dir(RuntimeConfig(decoded_cache=False)) is None
