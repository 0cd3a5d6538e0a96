"""Real-world mess: corrupt, mislabelled, empty and hidden files; bad layouts; clear errors and warnings."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from clipconv.data import (
    DataLayoutError, ImageDecodeError, ImageListDataset, SkipTracker, collate_skip_bad, eval_split, list_images,
    load_rgb, make_image_tree, resolve_run_classes, sample_few_shot, train_samples
)
from clipconv.prompts import imagenet_classes

WNIDS = [wnid for wnid, _ in imagenet_classes()][:4]
TRANSFORM = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])
GOOD = ["cmyk.JPEG", "grey.JPEG", "rgba_png.JPEG", "palette.png", "upper.JPG", "lower.jpeg", "mixed.Png",
        "plain.bmp", "plain.webp"]
BAD = ["truncated.JPEG", "zero.JPEG", "text.JPEG"]


def _write_messy_folder(folder: Path) -> None:
    """A class folder with every kind of file seen in the wild."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.new("RGB", (40, 30), (200, 30, 60))
    rgb.convert("CMYK").save(folder / "cmyk.JPEG", format="JPEG")
    rgb.convert("L").save(folder / "grey.JPEG", format="JPEG")
    Image.new("RGBA", (40, 30), (0, 0, 255, 128)).save(folder / "rgba_png.JPEG", format="PNG")
    rgb.convert("P").save(folder / "palette.png")
    for name in ("upper.JPG", "lower.jpeg"):
        rgb.save(folder / name, format="JPEG")
    rgb.save(folder / "mixed.Png", format="PNG")
    rgb.save(folder / "plain.bmp", format="BMP")
    rgb.save(folder / "plain.webp", format="WEBP")
    data = (folder / "upper.JPG").read_bytes()
    (folder / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (folder / "zero.JPEG").write_bytes(b"")
    (folder / "text.JPEG").write_text("this is not an image\n")
    (folder / "notes.txt").write_text("notes\n")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._upper.JPG").write_bytes(b"\0\5\26\7")


@pytest.fixture()
def messy_root(tmp_path) -> Path:
    root = make_image_tree(tmp_path / "data", train_per_class=2, val_per_class=1, variants=())
    _write_messy_folder(root / "imagenet/images/train" / WNIDS[0])
    return root


def test_listing_accepts_image_extensions_and_skips_hidden_and_other_files(messy_root):
    names = list_images(messy_root / "imagenet/images/train" / WNIDS[0])
    assert set(names) == set(GOOD) | set(BAD) | {f"{WNIDS[0]}_0.JPEG", f"{WNIDS[0]}_1.JPEG"}
    assert "notes.txt" not in names and ".DS_Store" not in names and "._upper.JPG" not in names


@pytest.mark.parametrize("name", GOOD)
def test_decodable_files_load_as_rgb(messy_root, name):
    image = load_rgb(messy_root / "imagenet/images/train" / WNIDS[0] / name)
    assert image.mode == "RGB"
    tensor = TRANSFORM(image)
    assert tensor.shape == (3, 16, 16)


@pytest.mark.parametrize("name", BAD)
def test_undecodable_files_raise_naming_the_file(messy_root, name):
    with pytest.raises(ImageDecodeError, match=name):
        load_rgb(messy_root / "imagenet/images/train" / WNIDS[0] / name)


def test_zero_byte_file_is_called_empty(messy_root):
    with pytest.raises(ImageDecodeError, match="empty file"):
        load_rgb(messy_root / "imagenet/images/train" / WNIDS[0] / "zero.JPEG")


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_skips_bad_files_with_one_warning(messy_root, workers):
    classes = resolve_run_classes(messy_root)
    samples = train_samples(messy_root, classes)
    dataset = ImageListDataset(messy_root, samples, TRANSFORM)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_skip_bad, num_workers=workers)
    tracker = SkipTracker(loader, what="train")
    with pytest.warns(UserWarning) as record:
        batches = list(tracker)
    messages = [str(w.message) for w in record if "undecodable" in str(w.message)]
    assert len(messages) == 1
    assert "skipped 3 undecodable file(s) while reading train" in messages[0]
    for name in BAD:
        assert name in messages[0]
    assert sorted(Path(p).name for p in tracker.skipped) == sorted(BAD)
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (len(samples) - 3, 3, 16, 16)
    assert sum(len(b[1]) for b in batches) == len(samples) - 3


def test_all_bad_batch_is_dropped_not_crashed(messy_root):
    folder = f"imagenet/images/train/{WNIDS[0]}"
    samples = [(f"{folder}/{name}", 0) for name in BAD]
    tracker = SkipTracker(DataLoader(ImageListDataset(messy_root, samples, TRANSFORM), batch_size=3,
                                     collate_fn=collate_skip_bad))
    with pytest.warns(UserWarning, match="skipped 3"):
        assert list(tracker) == []


def test_strict_mode_raises_naming_the_file(messy_root):
    folder = f"imagenet/images/train/{WNIDS[0]}"
    dataset = ImageListDataset(messy_root, [(f"{folder}/grey.JPEG", 0), (f"{folder}/truncated.JPEG", 0)],
                               TRANSFORM, on_error="raise")
    assert dataset[0][0].shape == (3, 16, 16)
    with pytest.raises(ImageDecodeError, match="truncated.JPEG"):
        dataset[1]


def test_few_shot_never_draws_an_undecodable_file(messy_root):
    classes = resolve_run_classes(messy_root)
    samples = train_samples(messy_root, classes)
    good_count = len(GOOD) + 2
    for seed in range(5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            split = sample_few_shot(samples, shots=good_count, seed=seed, root=messy_root)
        drawn = [Path(p).name for p, label in split.train if label == 0]
        assert len(drawn) == good_count
        assert not set(drawn) & set(BAD)


def test_symlinked_split_folder_is_followed(tmp_path):
    real = make_image_tree(tmp_path / "real", train_per_class=2, val_per_class=1, variants=())
    root = tmp_path / "linked"
    (root / "imagenet/images").mkdir(parents=True)
    os.symlink(real / "imagenet/images/train", root / "imagenet/images/train", target_is_directory=True)
    os.symlink(real / "imagenet/images/val" / WNIDS[0], root / "val_class", target_is_directory=True)
    (root / "imagenet/images/val").mkdir()
    os.symlink(root / "val_class", root / "imagenet/images/val" / WNIDS[0], target_is_directory=True)
    classes = resolve_run_classes(root)
    samples = train_samples(root, classes)
    assert len(samples) == 8 and samples[0][0].startswith("imagenet/images/train/")
    assert len(eval_split(root, "imagenet", classes)) == 1


def test_wrong_data_root_explains_the_layout(tmp_path):
    with pytest.raises(DataLayoutError, match=r"does not exist.*datasets/README.md"):
        resolve_run_classes(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataLayoutError, match=r"no ImageNet train split.*imagenet/images/train.*datasets/README.md"):
        resolve_run_classes(tmp_path / "empty")


def test_train_split_without_class_folders_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "loose.JPEG")
    with pytest.raises(DataLayoutError, match=r"train.*has no class folders"):
        resolve_run_classes(tmp_path)


def test_unsorted_val_is_a_clear_error(tmp_path):
    root = make_image_tree(tmp_path, layout="raw", train_per_class=1, val_per_class=1, variants=())
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(DataLayoutError, match=r"val has 3 images directly inside.*sorted into class folders"):
        eval_split(root, "imagenet", resolve_run_classes(root))


def test_unknown_eval_folder_and_out_of_range_v2_folders_warn_with_names(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=("v2",))
    classes = resolve_run_classes(root)
    (root / "imagenet/images/val/n99999999").mkdir()
    Image.new("RGB", (8, 8)).save(root / "imagenet/images/val/n99999999/x.JPEG")
    with pytest.warns(UserWarning, match=r"ImageNet:.*1 folder\(s\) are not class-id folders.*n99999999"):
        val = eval_split(root, "imagenet", classes)
    assert len(val) == 4 and val.dropped == 1
    v2_root = root / "imagenetv2/imagenetv2-matched-frequency-format-val"
    for folder in ("1000", "abc"):
        (v2_root / folder).mkdir()
        Image.new("RGB", (8, 8)).save(v2_root / folder / "y.jpeg")
    with pytest.warns(UserWarning) as record:
        v2 = eval_split(root, "imagenet_v2", classes)
    message = " ".join(str(w.message) for w in record)
    assert "outside 0..999" in message and "1000" in message and "abc" in message
    assert len(v2) == 4 and v2.dropped == 2


def test_variant_without_run_classes_gives_none_and_warning(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=("a",), subset_wnids=[WNIDS[1]])
    shutil.rmtree(root / "imagenet/images/train" / WNIDS[1])
    classes = resolve_run_classes(root)
    with pytest.warns(UserWarning, match=r"-A:.*imagenet-a has no images of the run's classes"):
        assert eval_split(root, "imagenet_a", classes) is None


def test_empty_eval_set_warns(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=())
    (root / "imagenet-r").mkdir()
    (root / "imagenet-r" / "README.txt").write_text("readme")
    with pytest.warns(UserWarning, match=r"imagenet-r has no images"):
        assert eval_split(root, "imagenet_r", resolve_run_classes(root)) is None


# ------------------------------------------------------------------ issue 10: class entries, names, subsets
OTHER = [wnid for wnid, _ in imagenet_classes()][4:8]  # universe ids that are not class folders of the tree


def _break_class_entries(folder: Path) -> None:
    """A symlink loop, a dangling symlink, an un-extracted class archive and a file named like a class id."""
    os.symlink(folder / OTHER[0], folder / OTHER[0])  # points at itself
    os.symlink(folder / "gone", folder / OTHER[1])
    (folder / f"{OTHER[2]}.tar").write_bytes(b"tar")
    (folder / OTHER[3]).write_text("not a folder")
    (folder / "README.txt").write_text("an ordinary file: not reported")


def test_broken_train_class_entries_are_skipped_with_one_warning_naming_them(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=())
    _break_class_entries(root / "imagenet/images/train")
    with pytest.warns(UserWarning) as record:
        classes = resolve_run_classes(root)
    assert classes.ids == tuple(WNIDS)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    for expected in (f"{OTHER[0]} (symlink loop)", f"{OTHER[1]} (dangling symlink)",
                     f"{OTHER[2]}.tar (archive, not a folder", f"{OTHER[3]} (file, not a folder)"):
        assert expected in messages[0]
    assert "README.txt" not in messages[0] and "4 entries of" in messages[0]
    assert len(train_samples(root, classes)) == 4


def test_broken_eval_class_entries_warn_naming_them(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=("sketch",))
    classes = resolve_run_classes(root)
    _break_class_entries(root / "imagenet-sketch/images")
    with pytest.warns(UserWarning, match=rf"imagenet-sketch/images' cannot be used as class folders.*{OTHER[0]} "
                                         r"\(symlink loop\)"):
        assert len(eval_split(root, "imagenet_sketch", classes)) == 4


def test_shared_class_names_warn_once_naming_them(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=())
    names = tmp_path / "names.txt"
    names.write_text(f"{WNIDS[0]} missile\n{WNIDS[1]} tench\n{WNIDS[2]} missile\n{WNIDS[3]} shark\n")
    with pytest.warns(UserWarning) as record:
        classes = resolve_run_classes(root, names)
    assert len(classes) == 4 and len(record) == 1
    assert str(record[0].message).startswith("1 class name(s) are shared by several classes")
    assert f"'missile' ({WNIDS[0]}, {WNIDS[2]})" in str(record[0].message)


def test_full_imagenet_names_warn_about_missile_and_sunglasses_only():
    from clipconv.data.imagenet import duplicate_names, load_universe

    shared = duplicate_names(load_universe("/nonexistent"))
    assert sorted(shared) == ["missile", "sunglasses"] and all(len(ids) == 2 for ids in shared.values())


def test_classnames_file_with_a_bom_is_read(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=())
    names = tmp_path / "names.txt"
    names.write_bytes(("\ufeff" + "".join(f"{w} thing {i}\n" for i, w in enumerate(WNIDS))).encode("utf-8"))
    classes = resolve_run_classes(root, names)
    assert classes.ids == tuple(WNIDS) and classes.names[0] == "thing 0"


def test_restricted_set_records_its_class_count_and_warns_when_small(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=1, val_per_class=1, variants=("a", "sketch"),
                           subset_wnids=[WNIDS[1]])
    classes = resolve_run_classes(root)
    with pytest.warns(UserWarning, match=r"-A is scored over only 1 class\(es\).*every prediction is right") as record:
        split = eval_split(root, "imagenet_a", classes)
    assert len(record) == 1
    assert split.subset == [1] and split.num_classes == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sketch = eval_split(root, "imagenet_sketch", classes)
    assert sketch.subset is None and sketch.num_classes == 4
