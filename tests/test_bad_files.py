"""Input files that are not UTF-8 text: the message names the file (not only "'utf-8' codec can't decode")."""
from __future__ import annotations

import pytest

from clipconv.app.cli import train
from clipconv.data.fewshot import load_split
from clipconv.prompts import load_classnames_file, load_templates

NOT_UTF8 = b"n01440764 tench\n\xff\xfe bad \xff\n"


@pytest.mark.parametrize("load, name", [(load_templates, "templates.txt"), (load_classnames_file, "classnames.txt"),
                                        (load_split, "split.json")])
def test_a_file_that_is_not_utf8_is_named(tmp_path, load, name):
    path = tmp_path / name
    path.write_bytes(NOT_UTF8)
    with pytest.raises(ValueError) as info:
        load(path)
    assert f"'{path}'" in str(info.value) and "UTF-8" in str(info.value)


def test_templates_flag_with_a_file_that_is_not_utf8(tmp_path, tiny_config, capsys):
    from clipconv.data import make_image_tree

    data = make_image_tree(tmp_path / "data", train_per_class=2, val_per_class=1, variants=())
    (tmp_path / "templates.txt").write_bytes(b"a photo of a {}.\n\xff\n")
    with pytest.raises(SystemExit) as info:
        train.main(["--data-root", str(data), "--model", str(tiny_config), "--pretrained", "none", "--workers", "0",
                    "--output-dir", str(tmp_path / "run"), "--no-cache", "--templates", str(tmp_path / "templates.txt")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and f"'{tmp_path / 'templates.txt'}'" in errors[0], err
    assert not (tmp_path / "run").exists()
