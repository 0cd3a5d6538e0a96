"""Names from the user's world: evaluation sets named in any script (`fötos`), class folders whose names hold
spaces (listed in `--classnames` as `<folder><TAB><class name>`)."""
from __future__ import annotations

import unicodedata

import pytest

from clipconv.data import make_class_folders, open_family, parse_eval_set
from clipconv.prompts import load_classnames_file


@pytest.mark.parametrize("name", ["fötos", "Ölbilder", "фото", "写真", "set_2", "v2.1+a-b"])
def test_set_names_may_use_letters_and_digits_of_any_script(name):
    assert parse_eval_set(f"{name}=/data/x") == (name, "/data/x")


def test_a_decomposed_set_name_is_the_same_name():
    assert parse_eval_set(unicodedata.normalize("NFD", "fötos") + "=/x") == ("fötos", "/x")


@pytest.mark.parametrize("name", ["_x", "two words", "a/b", "target_avg", "-x"])
def test_other_set_names_are_refused(name):
    with pytest.raises(ValueError, match="evaluation-set name"):
        parse_eval_set(f"{name}=/x")


def test_classnames_lines_with_a_tab_take_ids_with_spaces(tmp_path):
    file = tmp_path / "names.txt"
    file.write_text("red fox\tRed fox\narctic wolf\t  Arctic wolf \nn01440764 tench fish\n", encoding="utf-8")
    assert load_classnames_file(file) == [("red fox", "Red fox"), ("arctic wolf", "Arctic wolf"),
                                          ("n01440764", "tench fish")]
    file.write_text("lonely\n")
    with pytest.raises(ValueError, match=r"names.txt:1: expected '<id> <class name>' \(or '<id><TAB><class name>'"):
        load_classnames_file(file)


def test_folder_family_with_spaced_class_folders_and_a_unicode_set_name(tmp_path, capsys):
    from clipconv.app.cli import check_data

    classes = ["arctic wolf", "red fox"]
    train = make_class_folders(tmp_path / "train", classes, per_class=3, seed=1)
    photos = make_class_folders(tmp_path / "fötos", classes, per_class=2, seed=2)
    names = tmp_path / "names.txt"
    names.write_text("red fox\tfox\narctic wolf\twolf\n", encoding="utf-8")
    family = open_family("folder", train_root=str(train), eval_roots=[f"fötos={photos}"], classnames=str(names))
    universe = family.classes()
    assert universe.ids == ("red fox", "arctic wolf") and universe.names == ("fox", "wolf")
    split = family.eval_splits(["fötos"], universe)[0]
    assert split.name == "fötos" and len(split) == 4
    assert check_data.main(["--train-root", str(train), "--eval-set", f"fötos={photos}", "--classnames", str(names),
                            "--shots", "3"]) == 0
    assert "usable: 0 error(s)" in capsys.readouterr().out
