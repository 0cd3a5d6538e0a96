"""`--split FILE` whose entries were edited: every entry is checked against the train listing before use; a bad
one is one line naming the file and the entry, exit 2, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_world import make_cli_world, refused_line

from clipconv.app.cli import train
from clipconv.data import resolve_run_classes, sample_few_shot, save_split, train_samples


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config):
    made = make_cli_world(tmp_path_factory.mktemp("split-file"), tiny_config)
    classes = resolve_run_classes(made["data"])
    split = sample_few_shot(train_samples(made["data"], classes), 2, 5, val_shots=2, root=made["data"])
    made["split"] = save_split(made["root"] / "split.json", split, {"shots": 2, "seed": 5, "val_shots": 2,
                                                                    "class_ids": list(classes.ids)})
    return made


def _relabel(data: dict) -> str:
    path, label = data["train"][0]
    data["train"][0] = [path, (label + 1) % len(data["class_ids"])]
    return f"entry '{path}' has label {(label + 1) % len(data['class_ids'])} ("


def _val_is_a_shot(data: dict) -> str:
    data["val"][0] = list(data["train"][0])
    return f"validation entry '{data['train'][0][0]}' is also a training shot"


def _repeated(data: dict) -> str:
    data["train"].insert(1, list(data["train"][0]))
    return f"entry '{data['train'][0][0]}' is repeated in train"


def _outside(data: dict) -> str:
    data["train"][0][0] = "../../../../etc/passwd"
    return "entry '../../../../etc/passwd' leaves the data root"


def _missing(data: dict) -> str:
    data["train"][0][0] = str(Path(data["train"][0][0]).with_name("nope.JPEG"))
    return f"entry '{data['train'][0][0]}' does not exist under the data root"


EDITS = [_relabel, _val_is_a_shot, _repeated, _outside, _missing]


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_split_entry_is_refused_naming_the_file_and_entry(world, tmp_path, edit):
    from clipconv.data.fewshot import check_split_entries, load_split

    data = json.loads(Path(world["split"]).read_text())
    needle = edit(data)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    split, meta = load_split(edited)
    classes = resolve_run_classes(world["data"])
    with pytest.raises(ValueError) as caught:
        check_split_entries(split, train_samples(world["data"], classes), world["data"], str(edited), meta["class_ids"])
    assert str(caught.value).startswith(f"split file '{edited}': {needle}"), caught.value


def test_the_run_refuses_an_edited_split_before_writing_anything(world, tmp_path, capsys):
    data = json.loads(Path(world["split"]).read_text())
    needle = _outside(data)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    out = tmp_path / "run"
    line = refused_line(train.main, ["--data-root", str(world["data"]), "--model", str(world["config"]),
                                     "--pretrained", str(world["weights"]), "--shots", "2", "--seed", "5",
                                     "--val-shots", "2", "--epochs", "1", "--workers", "0", "--no-cache",
                                     "--eval-sets", "imagenet", "--split", str(edited), "--output-dir", str(out)],
                        capsys)
    assert line.startswith(f"error: split file '{edited}': {needle}"), line
    assert not out.exists()


def test_an_intact_split_passes_the_entry_check(world):
    from clipconv.data.fewshot import check_split_entries, load_split

    split, meta = load_split(world["split"])
    classes = resolve_run_classes(world["data"])
    check_split_entries(split, train_samples(world["data"], classes), world["data"], "split.json", meta["class_ids"])
