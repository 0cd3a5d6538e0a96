"""ImageNet-family layouts, class universe and mapping, the dataset and the synthetic trees."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from clipconv.data import (
    EVAL_SET_SPECS, EVAL_SETS, ClassList, DataLayoutError, ImageListDataset, SkipTracker, collate_skip_bad, eval_split,
    load_rgb, make_image_tree, resolve_run_classes, train_samples
)
from clipconv.prompts import imagenet_classes

CANONICAL = [wnid for wnid, _ in imagenet_classes()]
TO_TENSOR = transforms.ToTensor()


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("coop"), train_per_class=3, val_per_class=2)


def test_eval_set_constants():
    assert EVAL_SETS == ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    assert [EVAL_SET_SPECS[n].display_name for n in EVAL_SETS] == ["ImageNet", "-V2", "-Sketch", "-A", "-R"]
    assert [EVAL_SET_SPECS[n].expected_images for n in EVAL_SETS] == [50_000, 10_000, 50_889, 7_500, 30_000]
    assert [EVAL_SET_SPECS[n].expected_classes for n in EVAL_SETS] == [1000, 1000, 1000, 200, 200]


@pytest.mark.parametrize("layout", ["coop", "raw"])
def test_layouts_give_the_same_classes_and_samples(tmp_path, layout):
    root = make_image_tree(tmp_path, layout=layout, train_per_class=3, val_per_class=2)
    classes = resolve_run_classes(root)
    assert classes.ids == tuple(CANONICAL[:4])
    assert classes.names == ("tench", "goldfish", "great white shark", "tiger shark")
    samples = train_samples(root, classes)
    assert len(samples) == 12 and [label for _, label in samples].count(2) == 3
    assert all((root / path).is_file() and not Path(path).is_absolute() for path, _ in samples)
    sizes = {name: len(eval_split(root, name, classes)) for name in EVAL_SETS}
    assert sizes == {"imagenet": 8, "imagenet_v2": 8, "imagenet_sketch": 8, "imagenet_a": 4, "imagenet_r": 4}


def test_train_samples_are_sorted_and_labelled_by_folder(coop_root):
    classes = resolve_run_classes(coop_root)
    samples = train_samples(coop_root, classes)
    assert samples == sorted(samples)
    for path, label in samples:
        assert Path(path).parent.name == classes.ids[label]


def test_class_list_hash_is_stable_and_order_sensitive():
    a = ClassList(["x", "y"], ["ex", "why"])
    assert a.hash() == ClassList(["x", "y"], ["other", "names"]).hash()
    assert a.hash() != ClassList(["y", "x"], ["why", "ex"]).hash()
    assert len(a.hash()) == 64 and a.index == {"x": 0, "y": 1}
    with pytest.raises(ValueError, match="duplicate"):
        ClassList(["x", "x"], ["a", "b"])
    with pytest.raises(ValueError, match="names"):
        ClassList(["x"], [])


def test_v2_labels_come_from_int_folder_names_not_string_order(tmp_path):
    wnids = [CANONICAL[i] for i in (2, 10, 100, 999)]
    root = make_image_tree(tmp_path, wnids=wnids, train_per_class=1, val_per_class=1, variants=("v2",))
    classes = resolve_run_classes(root)
    assert classes.universe_indices == [2, 10, 100, 999]
    split = eval_split(root, "imagenet_v2", classes)
    folder_to_label = {Path(path).parent.name: label for path, label in split.samples}
    assert folder_to_label == {"2": 0, "10": 1, "100": 2, "999": 3}


def test_subset_run_drops_other_classes_and_counts_them(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=2, val_per_class=2)
    shutil.rmtree(root / "imagenet/images/train" / CANONICAL[1])
    classes = resolve_run_classes(root)
    assert classes.ids == (CANONICAL[0], CANONICAL[2], CANONICAL[3])
    assert classes.universe_indices == [0, 2, 3]
    val = eval_split(root, "imagenet", classes)
    assert len(val) == 6 and val.dropped == 2 and val.subset is None
    v2 = eval_split(root, "imagenet_v2", classes)
    assert sorted({label for _, label in v2.samples}) == [0, 1, 2] and v2.dropped == 2
    for path, label in v2.samples:
        assert int(Path(path).parent.name) == classes.universe_indices[label]


def test_a_and_r_subset_is_the_run_indices_of_their_folders(coop_root):
    classes = resolve_run_classes(coop_root)
    for name in ("imagenet_a", "imagenet_r"):
        split = eval_split(coop_root, name, classes)
        assert split.subset == [0, 2]
        assert {label for _, label in split.samples} == {0, 2}
    assert eval_split(coop_root, "imagenet_sketch", classes).subset is None


def test_a_subset_with_explicit_wnids(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=("a",),
                           subset_wnids=[CANONICAL[3], CANONICAL[1]])
    split = eval_split(root, "imagenet_a", resolve_run_classes(root))
    assert split.subset == [1, 3]


def test_custom_universe_from_data_root_classnames(tmp_path):
    root = make_image_tree(tmp_path, layout="raw", wnids=["m002", "m000", "m001"],
                           names=["blue triangle", "red square", "green circle"], train_per_class=1,
                           val_per_class=1)
    classes = resolve_run_classes(root)
    assert classes.ids == ("m002", "m000", "m001")  # file order = index order
    assert classes.names == ("blue triangle", "red square", "green circle")
    v2 = eval_split(root, "imagenet_v2", classes)
    assert {Path(p).parent.name: label for p, label in v2.samples} == {"0": 0, "1": 1, "2": 2}


def test_coop_classnames_with_imagenet_wnids_keeps_canonical_universe(coop_root):
    (coop_root / "imagenet" / "classnames.txt").write_text(f"{CANONICAL[1]} gold fish\n{CANONICAL[0]} tench fish\n")
    try:
        classes = resolve_run_classes(coop_root)
        assert classes.ids == tuple(CANONICAL[:4]) and classes.names[1] == "goldfish"
        assert len(classes.universe) == 1000
    finally:
        (coop_root / "imagenet" / "classnames.txt").unlink()


def test_explicit_classnames_file_overrides(coop_root, tmp_path):
    override = tmp_path / "names.txt"
    override.write_text("".join(f"{w} my {i}\n" for i, w in enumerate(reversed(CANONICAL[:4]))))
    classes = resolve_run_classes(coop_root, classnames_file=override)
    assert classes.ids == tuple(reversed(CANONICAL[:4]))
    assert classes.names == ("my 0", "my 1", "my 2", "my 3")
    assert classes.universe == classes.ids


def test_unknown_train_folder_is_an_error_or_skipped(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=())
    (root / "imagenet/images/train/not_a_wnid").mkdir()
    with pytest.raises(DataLayoutError, match="not_a_wnid"):
        resolve_run_classes(root)
    with pytest.warns(UserWarning, match="not_a_wnid"):
        classes = resolve_run_classes(root, strict=False)
    assert len(classes) == 4


def test_missing_eval_set_gives_none_and_one_warning(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=("v2",))
    classes = resolve_run_classes(root)
    with pytest.warns(UserWarning, match=r"-Sketch not found.*imagenet-sketch/images") as record:
        assert eval_split(root, "imagenet_sketch", classes) is None
    assert len(record) == 1
    with pytest.raises(ValueError, match="imagenet_b"):
        eval_split(root, "imagenet_b", classes)


def test_dataset_returns_rgb_tensors_and_labels(coop_root):
    classes = resolve_run_classes(coop_root)
    samples = train_samples(coop_root, classes)
    dataset = ImageListDataset(coop_root, samples, TO_TENSOR)
    image, label = dataset[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == samples[4][1]
    batches = list(SkipTracker(DataLoader(dataset, batch_size=5, collate_fn=collate_skip_bad)))
    assert sum(len(labels) for _, labels in batches) == len(samples)
    with pytest.raises(ValueError, match="on_error"):
        ImageListDataset(coop_root, samples, TO_TENSOR, on_error="ignore")


def test_draft_decoding_keeps_at_least_the_requested_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (640, 480), (10, 200, 30)).save(path)
    assert load_rgb(path, draft_size=224).size == (320, 240)
    assert load_rgb(path, draft_size=100).size == (160, 120)
    assert load_rgb(path).size == (640, 480)


def test_synthetic_tree_is_deterministic_and_classes_differ(tmp_path):
    a = make_image_tree(tmp_path / "a", train_per_class=2, val_per_class=1, variants=("sketch",), seed=3)
    b = make_image_tree(tmp_path / "b", train_per_class=2, val_per_class=1, variants=("sketch",), seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    train = a / "imagenet/images/train"
    mean_colour = [
        TO_TENSOR(load_rgb(train / w / f"{w}_0.JPEG")).mean(dim=(1, 2)) for w in CANONICAL[:4]
    ]
    for i in range(4):
        for j in range(i + 1, 4):
            assert (mean_colour[i] - mean_colour[j]).abs().max() > 0.03
    with pytest.raises(ValueError, match="layout"):
        make_image_tree(tmp_path / "c", layout="zip")
    with pytest.raises(ValueError, match="variants"):
        make_image_tree(tmp_path / "d", variants=("b",))
