"""The committed prompts/ and datasets/ files agree with open_clip's and timm's metadata."""
from __future__ import annotations

import importlib.util

import pytest

from clipconv import prompts
from clipconv.prompts import DATASETS_DIR, REPO_ROOT, imagenet_classes, load_classnames_file, load_templates


def _make_metadata_module():
    spec = importlib.util.spec_from_file_location("make_metadata", REPO_ROOT / "scripts" / "make_metadata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wnids(name: str) -> list[str]:
    return (DATASETS_DIR / name).read_text().split()


def test_committed_files_match_packages():
    module = _make_metadata_module()
    rendered = module.render_metadata()
    assert len(rendered) == 8
    for rel, text in rendered.items():
        assert (REPO_ROOT / rel).read_text(encoding="utf-8") == text, f"{rel} differs: rerun scripts/make_metadata.py"


def test_make_metadata_check_flags_hand_edits(tmp_path):
    module = _make_metadata_module()
    for rel, text in module.render_metadata().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert module.stale_files(tmp_path) == []
    (tmp_path / "prompts/templates/photo.txt").write_text("a picture of a {}.\n")
    assert module.stale_files(tmp_path) == ["prompts/templates/photo.txt"]


def test_imagenet_classes_are_1000_sorted_unique_wnids_with_clip_names():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    classes = imagenet_classes()
    wnids = [wnid for wnid, _ in classes]
    assert len(wnids) == 1000 == len(set(wnids))
    assert wnids == sorted(wnids) == _wnids("imagenet_wnids.txt")
    assert [name for _, name in classes] == list(IMAGENET_CLASSNAMES)


def test_duplicated_clip_names_are_the_known_pairs():
    names = [name for _, name in imagenet_classes()]
    duplicates = {name: [i for i, n in enumerate(names) if n == name] for name in names if names.count(name) > 1}
    assert duplicates == {"missile": [657, 744], "sunglasses": [836, 837]}
    assert "crane bird" in names and "construction crane" in names


@pytest.mark.parametrize("name", ["imagenet_a_wnids.txt", "imagenet_r_wnids.txt"])
def test_a_and_r_are_200_sorted_wnids_inside_the_1000(name):
    wnids = _wnids(name)
    assert len(wnids) == 200 == len(set(wnids))
    assert wnids == sorted(wnids)
    assert set(wnids) <= set(_wnids("imagenet_wnids.txt"))


def test_template_sets_sizes_and_format():
    assert load_templates("photo") == ["a photo of a {}."]
    assert len(load_templates("clip80")) == 80
    tip = load_templates("tip")
    assert len(tip) == 7 and "itap of a {}." in tip
    assert set(prompts.TEMPLATE_SETS) == {"photo", "clip80", "tip"}
    for name in prompts.TEMPLATE_SETS:
        assert all(t.count("{}") == 1 for t in load_templates(name))


def test_templates_from_file_and_errors(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text("a {} in the wild.\n\nart of {}.\n")
    assert load_templates(good) == ["a {} in the wild.", "art of {}."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo without a slot.\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        load_templates(bad)
    twice = tmp_path / "twice.txt"
    twice.write_text("{} and {}\n")
    with pytest.raises(ValueError, match=r"twice\.txt:1"):
        load_templates(twice)
    stray = tmp_path / "stray.txt"
    stray.write_text("a {} of {name}\n")
    with pytest.raises(ValueError, match=r"stray\.txt:1"):
        load_templates(stray)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt.*empty"):
        load_templates(empty)
    with pytest.raises(FileNotFoundError, match="clip80"):
        load_templates("no-such-set")


def test_classnames_file_parsing_and_errors(tmp_path):
    path = tmp_path / "classnames.txt"
    path.write_text("m000 red square\nm001   blue circle \n\n")
    assert load_classnames_file(path) == [("m000", "red square"), ("m001", "blue circle")]
    path.write_text("m000 red square\nm001\n")
    with pytest.raises(ValueError, match=r"classnames\.txt:2"):
        load_classnames_file(path)
    path.write_text("m000 red square\nm001 blue\nm000 again\n")
    with pytest.raises(ValueError, match=r"classnames\.txt:3.*duplicate.*m000.*line 1"):
        load_classnames_file(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_classnames_file(tmp_path / "missing.txt")
