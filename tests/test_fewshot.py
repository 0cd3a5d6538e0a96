"""Seeded K-shot splits: exact counts, determinism, disjoint val, bad files, save/load."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from clipconv.data import FewShotSplit, load_split, make_image_tree, sample_few_shot, save_split


def _samples(per_class: dict[int, int]) -> list[tuple[str, int]]:
    return [(f"train/c{label}/img_{i:03d}.JPEG", label) for label, count in per_class.items() for i in range(count)]


def test_exactly_k_per_class():
    samples = _samples({0: 20, 1: 30, 2: 17})
    split = sample_few_shot(samples, shots=16, seed=1, verify=False)
    assert Counter(label for _, label in split.train) == {0: 16, 1: 16, 2: 16}
    assert len(set(split.train)) == 48 and set(split.train) <= set(samples)
    assert split.val == [] and split.shots == 16 and split.seed == 1


def test_same_seed_same_split_whatever_the_listing_order():
    samples = _samples({0: 40, 1: 40, 2: 40})
    shuffled = list(samples)
    random.Random(123).shuffle(shuffled)
    first = sample_few_shot(samples, shots=4, seed=2, verify=False)
    assert first.train == sample_few_shot(shuffled, shots=4, seed=2, verify=False).train
    assert first.train != sample_few_shot(samples, shots=4, seed=3, verify=False).train
    assert first.train == sorted(first.train)


def test_known_draw_is_pinned():
    """Guards against an accidental change of the sampling algorithm (splits must stay reproducible)."""
    split = sample_few_shot(_samples({0: 10}), shots=3, seed=1, verify=False)
    assert [p for p, _ in split.train] == [f"train/c0/img_{i:03d}.JPEG" for i in (6, 8, 9)]


def test_fewer_images_gives_all_with_one_warning_naming_the_class():
    samples = _samples({0: 20, 1: 5, 2: 3})
    with pytest.warns(UserWarning, match=r"2 class\(es\) have fewer than 16.*n002 \(5\), n003 \(3\)") as record:
        split = sample_few_shot(samples, shots=16, seed=1, verify=False, class_names=["n001", "n002", "n003"])
    assert len(record) == 1
    assert Counter(label for _, label in split.train) == {0: 16, 1: 5, 2: 3}


def test_val_is_disjoint_and_drawn_from_the_rest():
    samples = _samples({0: 12, 1: 12})
    split = sample_few_shot(samples, shots=8, seed=1, val_shots=4, verify=False)
    assert Counter(label for _, label in split.val) == {0: 4, 1: 4}
    assert not set(split.train) & set(split.val)
    assert sorted(split.train + split.val) == sorted(samples)
    train_only = sample_few_shot(samples, shots=8, seed=1, verify=False)
    assert train_only.train == split.train


def test_bad_arguments():
    with pytest.raises(ValueError, match="shots"):
        sample_few_shot(_samples({0: 3}), shots=0, seed=1)
    with pytest.raises(ValueError, match="shots"):
        sample_few_shot(_samples({0: 3}), shots=-2, seed=1)
    with pytest.raises(ValueError, match="val_shots"):
        sample_few_shot(_samples({0: 3}), shots=1, seed=1, val_shots=-1)


def test_verify_replaces_undecodable_draws(tmp_path):
    root = make_image_tree(tmp_path, train_per_class=6, val_per_class=1, variants=())
    from clipconv.data import resolve_run_classes, train_samples

    samples = train_samples(root, resolve_run_classes(root))
    unverified = sample_few_shot(samples, shots=3, seed=5, verify=False)
    broken = [path for path, _ in unverified.train[::3]]  # one drawn file in each class
    for path in broken:
        (root / path).write_bytes(b"")
    with pytest.warns(UserWarning, match="undecodable"):
        split = sample_few_shot(samples, shots=3, seed=5, val_shots=2, root=root)
    assert Counter(label for _, label in split.train) == {0: 3, 1: 3, 2: 3, 3: 3}
    drawn = {path for path, _ in split.train + split.val}
    assert not drawn & set(broken)
    kept = set(unverified.train) - {s for s in unverified.train if s[0] in broken}
    assert kept <= set(split.train)  # good draws stay; only the bad ones are replaced


def test_save_and_load_round_trip(tmp_path):
    split = sample_few_shot(_samples({0: 10, 1: 10}), shots=2, seed=7, val_shots=1, verify=False)
    path = save_split(tmp_path / "run" / "split.json", split, {"class_ids": ["a", "b"], "data_root": "/data"})
    loaded, meta = load_split(path)
    assert loaded == split
    assert meta["class_ids"] == ["a", "b"] and meta["shots"] == 2 and meta["seed"] == 7
    assert meta["data_root"] == "/data"
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temp file left behind
    payload = json.loads(path.read_text())
    assert payload["train"][0][0].startswith("train/")


def test_save_refuses_absolute_paths_and_reserved_keys(tmp_path):
    split = FewShotSplit([("/abs/x.jpg", 0)], [], 1, 0)
    with pytest.raises(ValueError, match="absolute"):
        save_split(tmp_path / "s.json", split, {"class_ids": ["a"]})
    with pytest.raises(ValueError, match="reserved"):
        save_split(tmp_path / "s.json", FewShotSplit([("x.jpg", 0)]), {"train": []})


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_split(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        load_split(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"train": []}))
    with pytest.raises(ValueError, match="other.json.*not a clipconv few-shot split"):
        load_split(other)
    split = FewShotSplit([("x.jpg", 3)], [], 1, 0)
    path = save_split(tmp_path / "labels.json", split, {"class_ids": ["a", "b"]})
    with pytest.raises(ValueError, match=r"labels.json.*labels \[3\]"):
        load_split(path)


def test_shortfall_is_recorded_in_the_split_and_in_split_json(tmp_path):
    samples = _samples({0: 20, 1: 5, 2: 3})
    with pytest.warns(UserWarning):
        split = sample_few_shot(samples, shots=8, seed=1, val_shots=4, verify=False, class_names=["a", "b", "c"])
    assert split.shortfall == {"b": 5, "c": 3}
    assert split.val_shortfall == {"b": 0, "c": 0}
    path = save_split(tmp_path / "split.json", split, {"class_ids": ["a", "b", "c"]})
    written = json.loads(path.read_text())
    assert written["shortfall"] == {"b": 5, "c": 3} and written["val_shortfall"] == {"b": 0, "c": 0}
    loaded, meta = load_split(path)
    assert loaded.shortfall == split.shortfall and loaded.val_shortfall == split.val_shortfall
    assert "shortfall" not in meta
    full = sample_few_shot(samples, shots=3, seed=1, verify=False)
    assert full.shortfall == {} and json.loads(save_split(tmp_path / "s2.json", full, {}).read_text())["shortfall"] == {}


def test_shortfall_keys_tell_apart_classes_sharing_a_name():
    with pytest.warns(UserWarning, match=r"missile \(label 0\) \(1\), missile \(label 1\) \(2\)"):
        split = sample_few_shot(_samples({0: 1, 1: 2}), shots=4, seed=1, verify=False,
                                class_names=["missile", "missile"])
    assert split.shortfall == {"missile (label 0)": 1, "missile (label 1)": 2}
    without_names = sample_few_shot(_samples({0: 1}), shots=2, seed=1, verify=False)
    assert without_names.shortfall == {"0": 1}
