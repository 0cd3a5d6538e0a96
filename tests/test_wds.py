"""The wds family: CLIP_benchmark's webdataset shards written by the test, read with `webdataset`.

The shards hold the very bytes of a folder tree, so scores from shards must equal scores from folders
exactly; plus the ImageNet-A/-R label mapping, the streaming reader, K-shot training end to end, the
CLIP_benchmark result files and bad input (one line, exit 2, nothing written).
"""
from __future__ import annotations

import configparser
import json
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from cli_world import save_tiny_weights

from clipconv.data.family import IMAGENET_PUBLISHED_LABEL

REPO = Path(__file__).resolve().parents[1]

webdataset = pytest.importorskip("webdataset")

CLASSES = ["eel", "goldfish", "shark", "tench"]  # sorted: the folder family's label order too
SKETCH_CLASSES = CLASSES
A_CLASSES = ["goldfish", "tench"]  # a restricted set, numbered 0..1 like CLIP_benchmark's ImageFolder


def _files(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(file, label) of a class-folder tree, interleaved across classes (shards mix classes)."""
    per_class = [sorted((folder / name).iterdir()) for name in classes]
    out = []
    for i in range(max(len(files) for files in per_class)):
        out += [(files[i], label) for label, files in enumerate(per_class) if i < len(files)]
    return out


def write_shards(split_dir: Path, files: list[tuple[Path, int]], per_shard: int, nshards_file: bool = True) -> int:
    """CLIP_benchmark's layout: split_dir/{0..n-1}.tar (+ nshards.txt), keys s%07d, .jpg + .cls."""
    split_dir.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(split_dir / "%d.tar"), maxcount=per_shard, verbose=0) as sink:
        for index, (path, label) in enumerate(files):
            sink.write({"__key__": "s%07d" % index, "jpg": path.read_bytes(), "cls": label})
        count = sink.shard
    if nshards_file:
        (split_dir / "nshards.txt").write_text(f"{count}\n")
    return count


def make_wds_world(root: Path) -> dict:
    from clipconv.data import make_class_folders

    folders = {
        "train": make_class_folders(root / "folders" / "train", CLASSES, per_class=5, seed=1),
        "imagenet": make_class_folders(root / "folders" / "test", CLASSES, per_class=3, seed=2),
        "imagenet_sketch": make_class_folders(root / "folders" / "sketch", SKETCH_CLASSES, per_class=2,
                                              style="sketch", seed=3),
        "imagenet_a": make_class_folders(root / "folders" / "a", A_CLASSES, per_class=3, style="clutter", seed=4,
                                         all_classes=CLASSES),
    }
    shards = root / "wds"
    source = shards / "wds_imagenet1k"
    write_shards(source / "train", _files(folders["train"], CLASSES), per_shard=3)
    write_shards(source / "test", _files(folders["imagenet"], CLASSES), per_shard=1)  # 12 shards: 10.tar after 9.tar
    (source / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (source / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of the {c}.\n")
    write_shards(shards / "wds_imagenet_sketch" / "test", _files(folders["imagenet_sketch"], SKETCH_CLASSES),
                 per_shard=5, nshards_file=False)
    (shards / "wds_imagenet_sketch" / "classnames.txt").write_text("\n".join(SKETCH_CLASSES) + "\n")
    write_shards(shards / "wds_imagenet-a" / "test", _files(folders["imagenet_a"], A_CLASSES), per_shard=4)
    (shards / "wds_imagenet-a" / "classnames.txt").write_text("\n".join(A_CLASSES) + "\n")
    return {"shards": shards, "folders": folders}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("wds")
    made = make_wds_world(root)
    return {"root": root, "config": tiny_config, "weights": save_tiny_weights(root, tiny_config, seed=11), **made}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPCONV_CACHE", str(tmp_path / "cache"))  # shard index and extracted samples


def _model(world):
    return ["--model", str(world["config"]), "--pretrained", str(world["weights"]), "--workers", "0", "--device", "cpu",
            "--no-cache"]


def _folder_data(world):
    folders = world["folders"]
    return ["--family", "folder", "--train-root", str(folders["train"]),
            *[arg for name in ("imagenet", "imagenet_sketch", "imagenet_a")
              for arg in ("--eval-set", f"{name}={folders[name]}")]]


def _wds_data(world):
    return ["--family", "wds", "--data-root", str(world["shards"])]


# ------------------------------------------------------------------------------------------ listing
def test_listing_maps_labels_orders_shards_numerically_and_counts_every_sample(world):
    from clipconv.data import open_family

    family = open_family("wds", data_root=str(world["shards"]))
    classes = family.classes()
    assert classes.names == tuple(CLASSES)
    with pytest.warns(UserWarning, match="not found"):  # -V2 and -R are absent
        splits = {s.name: s for s in family.eval_splits(family.suite, classes)}
    assert set(splits) == {"imagenet", "imagenet_sketch", "imagenet_a"}
    source = splits["imagenet"]
    shards = [p.partition("#")[0].rsplit("/", 1)[1] for p, _ in source.samples]
    assert shards == [f"{i}.tar" for i in range(12)]  # numeric, not string, order
    assert [label for _, label in source.samples] == [0, 1, 2, 3] * 3 and source.subset is None
    a = splits["imagenet_a"]
    assert a.subset == [1, 3] and [label for _, label in a.samples] == [1, 3, 1, 3, 1, 3]  # 0..1 -> goldfish, tench
    assert len(splits["imagenet_sketch"]) == 8
    train = family.train_samples(classes)
    assert len(train) == 20 and sorted({label for _, label in train}) == [0, 1, 2, 3]


def test_imagenet_a_and_r_labels_0_to_199_are_their_sorted_wnids(tmp_path):
    """CLIP_benchmark numbers -A/-R 0..199 (ImageFolder over their wnid folders): label j = j-th sorted wnid."""
    from clipconv.data import open_family
    from clipconv.data.wds import subset_wnids
    from clipconv.prompts import imagenet_classes

    canonical = imagenet_classes()
    source = tmp_path / "wds_imagenet1k"
    source.mkdir()
    (source / "classnames.txt").write_text("".join(f"{name}\n" for _, name in canonical))
    image = next(iter(_files(make_folder(tmp_path), ["x"])))[0]
    for name, folder in (("imagenet_a", "wds_imagenet-a"), ("imagenet_r", "wds_imagenet-r")):
        wnids = subset_wnids(name)
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "classnames.txt").write_text("".join(f"{canonical[[w for w, _ in canonical].index(w)][1]}\n"
                                                                  for w in wnids))
        write_shards(tmp_path / folder / "test", [(image, 0), (image, 5), (image, 199)], per_shard=10)
    family = open_family("wds", data_root=str(tmp_path))
    classes = family.classes()
    assert len(classes) == 1000 and family.is_imagenet and family.published_label == IMAGENET_PUBLISHED_LABEL
    index = {w: i for i, (w, _) in enumerate(canonical)}
    for split in family.eval_splits(["imagenet_a", "imagenet_r"], classes):
        wnids = subset_wnids(split.name)
        assert wnids == sorted(wnids) and len(wnids) == 200
        assert [label for _, label in split.samples] == [index[wnids[0]], index[wnids[5]], index[wnids[199]]]
        assert split.subset == sorted(index[w] for w in wnids) and split.num_classes == 200
    a = subset_wnids("imagenet_a")
    assert a[0] == "n01498041" and index["n01498041"] == 6  # ImageNet-A's first class, ImageNet index 6


def make_folder(root: Path) -> Path:
    from clipconv.data import make_class_folders

    return make_class_folders(root / "one", ["x"], per_class=1)


def test_stream_yields_every_sample_once_across_workers(world):
    from clipconv.data import image_dataset, open_family
    from clipconv.data.wds import ShardStream

    family = open_family("wds", data_root=str(world["shards"]))
    split = family.eval_splits(["imagenet"], family.classes())[0]
    indexed = [(path, position) for position, (path, _) in enumerate(split.samples)]
    dataset = image_dataset(family.data_root, indexed, lambda image: torch.tensor(image.size))
    assert isinstance(dataset, ShardStream) and len(dataset) == 12
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=workers)
        positions = torch.cat([labels for _, labels in loader]).tolist()
        assert sorted(positions) == list(range(12)), workers
    # a subset of the samples reads only their shards and yields only them
    some = image_dataset(family.data_root, indexed[3:5], None)
    assert sorted(label for _, label in some) == [3, 4]


def test_streamed_augmentations_are_seeded_per_item_like_the_map_style_path(world):
    """FeatureStore's rounds: item i is transformed after seeding with item_seed(round seed, i), streamed or not;
    a slice read with seed_offset gets the same augmentations as inside the whole list (one rank's share)."""
    from torchvision import transforms

    from clipconv.data import open_family
    from clipconv.data.folder import ImageListDataset
    from clipconv.data.wds import ShardStream, as_files
    from clipconv.features import _SeededItems

    family = open_family("wds", data_root=str(world["shards"]))
    samples = family.eval_splits(["imagenet"], family.classes())[0].samples
    indexed = [(path, position) for position, (path, _) in enumerate(samples)]
    augment = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.2, 1.0)), transforms.PILToTensor()])
    streamed = {label: image for image, label in ShardStream(family.data_root, indexed, augment, round_seed=5)}
    mapped = _SeededItems(ImageListDataset(*as_files(family.data_root, indexed), augment), 5)
    assert len(streamed) == 12
    assert all(torch.equal(streamed[i], mapped[i][0]) for i in range(12))
    other_round = _SeededItems(ImageListDataset(*as_files(family.data_root, indexed), augment), 6)
    assert not all(torch.equal(streamed[i], other_round[i][0]) for i in range(12))  # the seed matters
    tail = {label: image for image, label in ShardStream(family.data_root, indexed[7:], augment, round_seed=5,
                                                          seed_offset=7)}
    assert sorted(tail) == list(range(7, 12)) and all(torch.equal(tail[i], streamed[i]) for i in tail)


def test_streamed_pixels_equal_the_files(world):
    from clipconv.data import image_dataset, load_rgb, open_family

    family = open_family("wds", data_root=str(world["shards"]))
    split = family.eval_splits(["imagenet"], family.classes())[0]
    files = _files(world["folders"]["imagenet"], CLASSES)
    for (image, label), (path, file_label) in zip(image_dataset(family.data_root, split.samples), files):
        assert label == file_label and list(image.getdata()) == list(load_rgb(path).getdata())


# ------------------------------------------------------------------------------------------ end to end
def test_zero_shot_from_shards_equals_zero_shot_from_folders(world, tmp_path):
    from clipconv.app.cli import zero_shot

    assert zero_shot.main([*_folder_data(world), *_model(world), "--output-dir", str(tmp_path / "folders")]) == 0
    with pytest.warns(UserWarning, match="not found"):
        assert zero_shot.main([*_wds_data(world), *_model(world), "--output-dir", str(tmp_path / "shards")]) == 0
    folders = json.loads((tmp_path / "folders" / "zero_shot.json").read_text())["results"][0]["metrics"]
    shards = json.loads((tmp_path / "shards" / "zero_shot.json").read_text())["results"][0]["metrics"]
    assert shards == folders  # identical bytes, identical scores (top-1/5, recall, per class, counts)
    assert shards["imagenet_a"]["classes"] == 2 and shards["imagenet"]["n"] == 12

    files = sorted((tmp_path / "shards" / "clip_benchmark").glob("*.json"))
    assert [f.name for f in files] == [f"{name}_tiny.pt_tiny-clip_en_zeroshot_classification.json"
                                       for name in ("imagenet-a", "imagenet1k", "imagenet_sketch")]
    for file in files:
        record = json.loads(file.read_text())
        ours = shards[{"wds/imagenet1k": "imagenet", "wds/imagenet_sketch": "imagenet_sketch",
                       "wds/imagenet-a": "imagenet_a"}[record["dataset"]]]
        assert record["task"] == "zeroshot_classification" and record["language"] == "en"
        # portable names (no local path in the model's name); the files' paths apart; the templates used
        assert (record["model"], record["pretrained"]) == ("tiny-clip", "tiny.pt")
        assert (record["model_path"], record["pretrained_path"]) == (str(world["config"].resolve()),
                                                                     str(world["weights"].resolve()))
        assert (record["templates"], record["n_templates"]) == ("photo", 1)
        assert math.isclose(record["metrics"]["acc1"], ours["top1"] / 100, rel_tol=256 * 2**-52)
        assert math.isclose(record["metrics"]["mean_per_class_recall"], ours["mean_per_class_recall"] / 100,
                            rel_tol=256 * 2**-52)
        assert record["metrics"]["acc5"] is None  # fewer than 5 classes: undefined, null in strict JSON
    # the folder family names the files by its own set names
    assert {json.loads(f.read_text())["dataset"] for f in (tmp_path / "folders" / "clip_benchmark").glob("*.json")} == \
        {"imagenet", "imagenet_sketch", "imagenet_a"}


def test_webdataset_is_the_optional_extra_the_readme_says_and_its_absence_is_one_line(monkeypatch):
    from clipconv.data import DataLayoutError
    from clipconv.data.wds import _iterate

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg", encoding="utf-8")
    extras = {name: cfg.get("options.extras_require", name).split() for name in ("wds", "test")}
    assert [r.split(">")[0] for r in extras["wds"]] == ["webdataset"]
    assert any(r.startswith("webdataset") for r in extras["test"])
    assert "webdataset" not in cfg.get("options", "install_requires")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "Plain `pip install -e .` does not install `webdataset`: `.[wds]` adds it" in readme
    for name in ("webdataset", "webdataset.tariterators"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(DataLayoutError, match=r"not installed: pip install -e \"\.\[wds\]\""):
        next(_iterate(REPO / "0.tar"))


def test_result_files_name_models_and_weights_portably(tmp_path):
    from clipconv.app.clip_benchmark import benchmark_record, portable_name

    config, weights = tmp_path / "my-clip.json", tmp_path / "w.safetensors"
    config.write_text("{}")
    weights.write_bytes(b"")
    assert portable_name(str(config)) == ("my-clip", str(config.resolve()))
    assert portable_name(str(weights)) == ("w.safetensors", str(weights.resolve()))
    assert portable_name("ViT-B-16") == ("ViT-B-16", None) and portable_name(None) == ("none", None)
    record = benchmark_record("imagenet1k", "ViT-B-16", "openai", "zeroshot_classification", {"top1": 50.0, "top5": 80.0})
    assert (record["model"], record["pretrained"]) == ("ViT-B-16", "openai")
    assert "model_path" not in record and "pretrained_path" not in record


def _build_rows(folders):
    """What `clip_benchmark build` does with result folders (clip_benchmark/cli.py main_build)."""
    rows = []
    for folder in folders:
        for file in sorted(Path(folder).glob("*.json")):
            data = json.load(open(file))
            row = dict(data["metrics"])
            row.update(data)
            del row["metrics"]
            row["model_fullname"] = row["model"] + " " + row["pretrained"]
            rows.append(row)
    return rows


def test_training_on_shards_end_to_end_then_reevaluation_from_shards_equals_folders(world, tmp_path):
    from clipconv.app.cli import eval_robustness, train

    run = tmp_path / "run"
    argv = [*_wds_data(world), *_model(world), "--shots", "2", "--val-shots", "1", "--epochs", "1", "--batch-size", "4",
            "--output-dir", str(run)]
    with pytest.warns(UserWarning, match="not found"):
        assert train.main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"imagenet", "imagenet_sketch", "imagenet_a"}
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 8 and len(split["val"]) == 4
    assert all(p.startswith("wds_imagenet1k/train/") and ".tar#s" in p for p, _ in split["train"] + split["val"])
    extracted = list((tmp_path / "cache" / "wds-samples").rglob("*.jpg"))
    assert len(extracted) == 12  # the drawn samples only, read once from their shards
    assert "mean per-class recall (%): ImageNet" in (run / "results.md").read_text()

    rows = _build_rows([run / "clip_benchmark"])
    assert sorted(r["dataset"] for r in rows) == ["wds/imagenet-a", "wds/imagenet1k", "wds/imagenet_sketch"]
    for row in rows:
        assert row["task"] == "fewshot_convpass" and row["method"] == "convpass" and row["fewshot_k"] == 2
        assert row["model_fullname"] == "tiny-clip tiny.pt"  # `clip_benchmark build`'s model name: no paths
        assert (row["templates"], row["n_templates"]) == ("photo", 1)  # the head's initial prompts

    # the checkpoint re-scored from the shards (the run's recorded data; images streamed)
    out = tmp_path / "eval-shards"
    assert eval_robustness.main(["--checkpoint", str(run), "--workers", "0", "--output-dir", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert len(list((out / "clip_benchmark").glob("*.json"))) == 3


def test_a_checkpoint_scores_the_same_on_shards_and_on_the_same_images_as_folders(world, tmp_path):
    """Methods that read images (Convpass) stream the test shards: same scores as from the files."""
    from clipconv.app.cli import eval_robustness, train

    run = tmp_path / "run"
    assert train.main([*_folder_data(world), *_model(world), "--shots", "2", "--epochs", "1", "--batch-size", "4",
                       "--output-dir", str(run)]) == 0
    folders = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "eval-shards"
    assert eval_robustness.main(["--checkpoint", str(run), *_wds_data(world), "--workers", "0",
                                 "--output-dir", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text()) == folders
    datasets = sorted(json.loads(f.read_text())["dataset"] for f in (out / "clip_benchmark").glob("*.json"))
    assert datasets == ["wds/imagenet-a", "wds/imagenet1k", "wds/imagenet_sketch"]


def test_dataset_templates_are_read_from_the_templates_file(world, tmp_path):
    from clipconv.data import open_family
    from clipconv.data.wds import read_templates_file

    family = open_family("wds", data_root=str(world["shards"]))
    assert family.dataset_templates() == ["a photo of a {}.", "a drawing of the {}."]
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of {c} and {c}\n")
    with pytest.raises(ValueError, match="exactly one"):
        read_templates_file(bad)


def test_templates_dataset_on_a_family_without_one_is_refused(world, tmp_path, capsys):
    from clipconv.app.cli import zero_shot

    with pytest.raises(SystemExit) as exit_info:
        zero_shot.main([*_folder_data(world), *_model(world), "--templates", "dataset", "--output-dir",
                        str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "ships no templates file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_zero_shot_with_the_dataset_templates_equals_the_same_templates_as_a_file(world, tmp_path):
    from clipconv.app.cli import zero_shot

    file = tmp_path / "templates.txt"
    file.write_text("a photo of a {}.\na drawing of the {}.\n")
    scores = []
    for name, templates in (("dataset", "dataset"), ("file", str(file))):
        with pytest.warns(UserWarning, match="not found"):
            assert zero_shot.main([*_wds_data(world), *_model(world), "--templates", templates,
                                   "--output-dir", str(tmp_path / name)]) == 0
        payload = json.loads((tmp_path / name / "zero_shot.json").read_text())
        assert payload["n_templates"] == 2
        scores.append(payload["results"][0]["metrics"])
    assert scores[0] == scores[1]


# ------------------------------------------------------------------------------------------ bad input
def _damage_missing_root(root):
    import shutil

    shutil.rmtree(root)
    return "does not exist"


def _damage_no_source(root):
    import shutil

    shutil.rmtree(root / "wds_imagenet1k")
    return "wds_imagenet1k' does not exist"


def _damage_no_shards(root):
    for shard in (root / "wds_imagenet_sketch" / "test").glob("*.tar"):
        shard.unlink()
    return "holds no shards"


def _damage_missing_shard(root):
    (root / "wds_imagenet1k" / "test" / "7.tar").unlink()
    return "lacks 1 of the 12 shards"


def _damage_truncated_tar(root):
    shard = root / "wds_imagenet-a" / "test" / "0.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    return "0.tar' is damaged"


def _damage_label_out_of_range(root):
    write_shards(root / "wds_imagenet-a" / "test", [(next((root.parent / "folders" / "a" / "tench").iterdir()), 2)],
                 per_shard=10)
    return "has label 2, outside 0..1"


def _damage_missing_classnames(root):
    (root / "wds_imagenet1k" / "classnames.txt").unlink()
    return "classnames.txt' does not exist"


@pytest.mark.parametrize("damage", [_damage_missing_root, _damage_no_source, _damage_no_shards, _damage_missing_shard,
                                    _damage_truncated_tar, _damage_label_out_of_range, _damage_missing_classnames],
                         ids=lambda f: f.__name__[len("_damage_"):])
def test_bad_shards_stop_with_one_line_and_exit_2_before_writing(world, tmp_path, capsys, damage):
    import shutil

    from clipconv.app.cli import zero_shot

    root = Path(shutil.copytree(world["shards"], tmp_path / "wds"))
    shutil.copytree(world["folders"]["imagenet_a"], tmp_path / "folders" / "a")
    expected = damage(root)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zero_shot.main(["--family", "wds", "--data-root", str(root), *_model(world), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and expected in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_hostile_sample_key_is_extracted_inside_the_cache(tmp_path):
    """Training reads drawn samples as extracted files: a key such as '../../x' must not escape the cache."""
    import tarfile

    from clipconv.data.wds import extract_samples

    image = next(iter(_files(make_folder(tmp_path), ["x"])))[0]
    shard = tmp_path / "wds_imagenet1k" / "train" / "0.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tar:
        tar.add(image, arcname="../../escaped.jpg")
        label = tmp_path / "label.cls"
        label.write_text("0")
        tar.add(label, arcname="../../escaped.cls")
    files = extract_samples(tmp_path, ["wds_imagenet1k/train/0.tar#../../escaped"])
    target = files["wds_imagenet1k/train/0.tar#../../escaped"]
    assert target.read_bytes() == image.read_bytes()
    assert (tmp_path / "cache" / "wds-samples") in target.resolve().parents
    assert not list(tmp_path.parent.glob("escaped*")) and not list((tmp_path / "cache").glob("escaped*"))


def test_changed_shards_are_reindexed(world, tmp_path):
    """The index cache is keyed by the shard's size and time: a rewritten shard is listed again."""
    import os
    import shutil

    from clipconv.data import open_family

    root = Path(shutil.copytree(world["shards"], tmp_path / "wds"))
    family = open_family("wds", data_root=str(root))
    first = family.eval_splits(["imagenet_a"], family.classes())[0]
    files = _files(world["folders"]["imagenet_a"], A_CLASSES)
    write_shards(root / "wds_imagenet-a" / "test", [(path, 1 - label) for path, label in files], per_shard=4)
    for shard in (root / "wds_imagenet-a" / "test").glob("*.tar"):
        os.utime(shard, ns=(1, 1))  # a different modification time even within the clock's resolution
    second = open_family("wds", data_root=str(root)).eval_splits(["imagenet_a"], family.classes())[0]
    assert [label for _, label in first.samples] == [1, 3] * 3
    assert [label for _, label in second.samples] == [3, 1] * 3


def test_check_data_lists_the_shards_and_flags_undecodable_images(world, tmp_path, capsys):
    import shutil

    from clipconv.app.cli import check_data

    root = Path(shutil.copytree(world["shards"], tmp_path / "wds"))
    assert check_data.main(["--family", "wds", "--data-root", str(root), "--shots", "4", "--verify"]) == 0
    report = capsys.readouterr().out
    assert "train       4 classes, 20 images" in report and "ImageNet    12 images in run classes" in report
    assert "-A          6 images in run classes, 0 dropped, scored over 2 class(es)" in report
    assert "-V2         missing" in report and "undecodable" not in report
    files = _files(world["folders"]["imagenet_a"], A_CLASSES)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(files[0][0].read_bytes()[:100])
    write_shards(root / "wds_imagenet-a" / "test", [(broken, 0), *files[1:]], per_shard=10)
    assert check_data.main(["--family", "wds", "--data-root", str(root), "--verify"]) == 0
    report = capsys.readouterr().out
    assert "-A: 1 undecodable image(s) will be skipped" in report and "0.tar#s0000000" in report
    shard = root / "wds_imagenet-a" / "test" / "0.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    assert check_data.main(["--family", "wds", "--data-root", str(root)]) == 1
    assert "0.tar' is damaged" in capsys.readouterr().out


def _one_sample_shard(tmp_path: Path, key: str) -> tuple[Path, str]:
    """A shard `wds_imagenet1k/train/0.tar` holding one sample `key` (a JPEG and its label 0); returns the
    image and the sample's reference."""
    import tarfile

    image = next(iter(_files(make_folder(tmp_path), ["x"])))[0]
    shard = tmp_path / "wds_imagenet1k" / "train" / "0.tar"
    shard.parent.mkdir(parents=True)
    label = tmp_path / "label.cls"
    label.write_text("0")
    with tarfile.open(shard, "w") as tar:
        tar.add(image, arcname=f"{key}.jpg")
        tar.add(label, arcname=f"{key}.cls")
    return image, f"wds_imagenet1k/train/0.tar#{key}"


def test_every_torchrun_rank_gets_the_extracted_files_it_is_handed(tmp_path, monkeypatch):
    """Ranks other than 0 write no run outputs, but they read the extracted train samples at once: the
    extraction must leave the files on every rank (not a scratch copy only rank 0 keeps)."""
    from clipconv.data.wds import extract_samples
    from clipconv.runtime import ranks

    image, sample = _one_sample_shard(tmp_path, "a1")
    monkeypatch.setattr(ranks, "is_main", lambda: False)
    target = extract_samples(tmp_path, [sample])[sample]
    assert target.read_bytes() == image.read_bytes()
    assert not list(target.parent.glob(".*.tmp"))


def test_extracted_samples_get_the_mode_of_any_new_file(tmp_path):
    """Files under $CLIPCONV_CACHE/wds-samples respect the umask like every other clipconv file (not mkstemp's
    private 0600), so a shared cache is readable by the group or others the umask allows."""
    from clipconv.data.wds import extract_samples
    from clipconv.runtime.io import new_file_mode

    _, sample = _one_sample_shard(tmp_path, "s0")
    previous = os.umask(0o022)
    try:
        target = extract_samples(tmp_path, [sample])[sample]
        assert new_file_mode() == 0o644 and target.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def test_a_shard_rewritten_with_other_labels_but_the_same_size_and_mtime_is_listed_again(world, tmp_path):
    """The index is keyed by the shard's bytes: relabelled shards (same size, mtime set back with os.utime) are
    not read through the stale listing (zero-shot would score the old labels)."""
    import shutil

    from clipconv.data import open_family

    root = Path(shutil.copytree(world["shards"], tmp_path / "wds"))
    family = open_family("wds", data_root=str(root))
    first = family.eval_splits(["imagenet_a"], family.classes())[0]
    shards = sorted((root / "wds_imagenet-a" / "test").glob("*.tar"))
    before = {shard: shard.stat() for shard in shards}
    files = _files(world["folders"]["imagenet_a"], A_CLASSES)
    write_shards(root / "wds_imagenet-a" / "test", [(path, 1 - label) for path, label in files], per_shard=4)
    for shard in shards:
        assert shard.stat().st_size == before[shard].st_size
        os.utime(shard, ns=(before[shard].st_atime_ns, before[shard].st_mtime_ns))
    second = open_family("wds", data_root=str(root)).eval_splits(["imagenet_a"], family.classes())[0]
    assert [label for _, label in first.samples] == [1, 3] * 3
    assert [label for _, label in second.samples] == [3, 1] * 3


def test_a_new_shard_is_read_once_to_hash_and_list_it_and_a_known_one_not_at_all(tmp_path, monkeypatch):
    """The first listing of a shard (or of a rewritten one) hashes it while it lists it: one open, and the digest
    it keys the listing by is the SHA-256 of the whole file; a later process lists it from the cache without
    opening it."""
    import builtins
    import hashlib
    import tarfile

    from clipconv.data import wds

    _, reference = _one_sample_shard(tmp_path, "a1")
    shard = tmp_path / reference.partition("#")[0]
    opened = []

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(wds, "open", counting_open, raising=False)  # the module's own opens (listing and hashing)
    monkeypatch.setattr(wds, "_DIGESTS", {})
    assert wds.index_shard(shard) == [("a1", 0)] and opened == [shard]
    assert wds.shard_digest(shard) == hashlib.sha256(shard.read_bytes()).hexdigest() and opened == [shard]
    monkeypatch.setattr(wds, "_DIGESTS", {})  # a later process: the memo and the listing are on disk
    assert wds.index_shard(shard) == [("a1", 0)] and opened == [shard]
    label = tmp_path / "label.cls"
    label.write_text("1")
    with tarfile.open(shard, "w") as tar:  # rewritten: new inode/ctime, other label
        tar.add(label, arcname="b2.cls")
        tar.add(tmp_path / "label.cls", arcname="b2.jpg")
    assert wds.index_shard(shard) == [("b2", 1)] and opened == [shard, shard]
    assert wds.shard_digest(shard) == hashlib.sha256(shard.read_bytes()).hexdigest()
    label_of = wds._label

    def touched_while_listed(sample, where):
        os.utime(where, ns=(1, 1))
        return label_of(sample, where)

    monkeypatch.setattr(wds, "_label", touched_while_listed)
    os.utime(shard, ns=(2, 2))  # a new identity: hashed while listed, and touched meanwhile
    before = wds._shard_identity(shard)
    with pytest.raises(wds.DataLayoutError, match="changed while it was read"):
        wds.index_shard(shard)
    assert before not in wds._DIGESTS and wds._shard_identity(shard) not in wds._DIGESTS  # nothing remembered


def test_a_damaged_or_replaced_extracted_sample_is_extracted_again(tmp_path):
    """Extracted K-shot samples are checked like the other caches' entries: a file whose bytes changed is
    never used; it is extracted again from its shard (one warning)."""
    from clipconv.data.wds import extract_samples

    image, sample = _one_sample_shard(tmp_path, "s0")
    target = extract_samples(tmp_path, [sample])[sample]
    target.write_bytes(b"not the image")
    with pytest.warns(UserWarning, match="damaged or replaced"):
        again = extract_samples(tmp_path, [sample])[sample]
    assert again.read_bytes() == image.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extract_samples(tmp_path, [sample])[sample] == again  # intact now: used as it is


def test_check_data_verify_closes_every_shard_and_counts_only_its_own_findings(world, capsys, monkeypatch):
    """Every shard read is closed (no "unclosed file" ResourceWarning, even after a garbage collection), and the
    report's count holds clipconv's findings only: a library's or Python's warning is not a data problem."""
    import gc

    from clipconv.app.cli import check_data
    from clipconv.data.wds import WdsFamily

    argv = ["--family", "wds", "--data-root", str(world["shards"]), "--shots", "4", "--verify"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_data.main(argv) == 0
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    clean = capsys.readouterr().out
    assert clean.endswith("usable: 0 error(s), 3 warning(s)\n")  # -V2 and -R missing, -A over 2 classes

    listed = WdsFamily.eval_splits

    def noisy(self, names, classes):
        warnings.warn("unclosed file <_io.BufferedReader name='0.tar'>", ResourceWarning)
        return listed(self, names, classes)

    monkeypatch.setattr(WdsFamily, "eval_splits", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        assert check_data.main(argv) == 0
    assert capsys.readouterr().out == clean
