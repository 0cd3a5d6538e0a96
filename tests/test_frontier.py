"""The robustness frontier (`run_table2.py --frontier`): the numbers behind the plot — every row's mean ± std,
the WiSE curves from the Table-2 rows or from the sweeps of the fits, the chords — and the command's files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_world import refused_line

from clipconv.app.cli.run_table2 import main
from clipconv.app.frontier import frontier_data, starts_at_zero_shot


def _row(source: float, target: float) -> dict[str, float]:
    return {"source": source, "v2": target, "target_avg": target}


def _table(folder: Path, rows: dict[str, tuple[str, tuple[float, float], tuple[float, float], dict]]) -> Path:
    """A table2.json: {key: (label, mean (source, target), std (source, target), per-seed extras)}."""
    folder.mkdir(parents=True, exist_ok=True)
    measured, per_seed = {}, {}
    for key, (label, mean, std, extra) in rows.items():
        measured[key] = {"label": label, "mean": _row(*mean), "std": _row(*std), "seeds": [1, 2]}
        per_seed[key] = {"1": {"row": _row(*mean), **extra}, "2": {"row": _row(*mean), **extra}}
    (folder / "table2.json").write_text(json.dumps({"columns": {"source": "source", "v2": "v2", "target_avg": "t"},
                                                    "measured": measured, "per_seed": per_seed}))
    return folder


ROWS = {"zero_shot": ("ZS CLIP", (52.0, 26.0), (0.0, 0.0), {}),
        "convpass": ("Convpass_CLIP", (64.0, 20.0), (1.2, 1.0), {}),
        "convpass+wise": ("Convpass_CLIP + WiSE (α = 0.5)", (58.0, 24.0), (0.4, 0.3), {"alpha": 0.5, "of": "convpass"}),
        "robust:convpass": ("Convpass_CLIP (robust)", (59.0, 24.5), (0.5, 0.2), {})}


def test_points_carry_mean_std_seeds_and_kind(tmp_path):
    data = frontier_data([_table(tmp_path / "t", ROWS)])
    by_label = {p["label"]: p for p in data["points"]}
    assert by_label["Convpass_CLIP"] | {} == {**by_label["Convpass_CLIP"], "source": 64.0, "source_std": 1.2,
                                              "target": 20.0, "target_std": 1.0, "seeds": [1, 2], "kind": "method"}
    assert by_label["Convpass_CLIP (robust)"]["kind"] == "robust"
    assert by_label["Convpass_CLIP + WiSE (α = 0.5)"]["kind"] == "wise"
    assert data["source"] == "source"


def test_wise_curve_from_table_rows_with_its_chord(tmp_path):
    (curve,) = frontier_data([_table(tmp_path / "t", ROWS)])["curves"]
    assert curve["of"] == "convpass" and curve["alphas"] == [0.0, 0.5, 1.0] and curve["chord"]
    assert curve["source"] == [52.0, 58.0, 64.0] and curve["target"] == [26.0, 24.0, 20.0]
    without_zero_shot = {k: v for k, v in ROWS.items() if k != "zero_shot"}
    (curve,) = frontier_data([_table(tmp_path / "u", without_zero_shot)])["curves"]
    assert curve["alphas"] == [0.5, 1.0] and not curve["chord"]  # θ(0) unknown: no chord


def test_wise_curve_from_sweeps_is_their_mean_over_fits(tmp_path):
    folder = _table(tmp_path / "t", ROWS)
    for seed, shift in ((1, 0.0), (2, 2.0)):
        sweep = folder / f"convpass_seed{seed}" / "wise-20260101-000000"
        sweep.mkdir(parents=True)
        per_alpha = {"0.5": {"row": _row(57.0 + shift, 24.0)}, "1": {"row": _row(64.0 + shift, 20.0)}}
        if seed == 1:
            per_alpha["0.25"] = {"row": _row(55.0, 25.0)}  # only one fit has it: left out
        (sweep / "wise_sweep.json").write_text(json.dumps({"per_alpha": per_alpha,
                                                           "zero_shot": {"row": _row(52.0, 26.0)}}))
    (curve,) = frontier_data([folder])["curves"]
    assert curve["alphas"] == [0.0, 0.5, 1.0] and curve["source"] == [52.0, 58.0, 65.0]
    assert curve["from"] == "wise sweeps of 2 fit(s)" and curve["chord"]


def test_several_folders_keep_the_first_row_of_a_label(tmp_path):
    first = _table(tmp_path / "a", ROWS)
    second = _table(tmp_path / "b", {"zero_shot": ("ZS CLIP", (10.0, 10.0), (0.0, 0.0), {}),
                                     "coop": ("CoOp", (53.0, 26.0), (0.1, 0.1), {})})
    points = frontier_data([first, second])["points"]
    assert [p["label"] for p in points] == [*(v[0] for v in ROWS.values()), "CoOp"]
    assert points[0]["source"] == 52.0


def test_alpha_labels_clear_every_marker_and_each_other_in_their_curves_colour(tmp_path, monkeypatch):
    """CoOp's row just above and right of θ(0) (zero-shot), where a label at a fixed offset lands on its marker, and
    the robust star close to the α = 0.5 point: the "α=…" labels are placed (plots.draw_labels) so that no label
    box covers a marker or another label, as drawn, and each is in its curve's colour."""
    from matplotlib.colors import to_rgba

    from clipconv.app import frontier, plot_geometry

    first = _table(tmp_path / "a", ROWS)
    second = _table(tmp_path / "b", {"coop": ("CoOp", (52.3, 26.2), (0.1, 0.1), {})})
    data = frontier_data([first, second])
    seen = {}

    def inspect(fig, path):  # the figure as it would be saved
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        seen["labels"] = [(note.get_text(), note.get_color(), tuple(note.get_window_extent(renderer).extents))
                          for note in ax.texts]
        seen["markers"] = [plot_geometry.marker_box(tuple(map(float, ax.transData.transform(xy))),
                                                    line.get_markersize() * fig.dpi / 72.0 / 2)
                           for line in ax.lines if line.get_marker() in ("o", "D", "*", ".")
                           for xy in line.get_xydata()]
        seen["curve"] = next(line.get_color() for line in ax.lines if line.get_label() == data["curves"][0]["label"])
        return path  # (not written: the geometry is what this test is about)

    monkeypatch.setattr(frontier, "_save", inspect)
    frontier.frontier_plot(data, tmp_path / "frontier.png")
    labels, markers = seen["labels"], seen["markers"]
    assert [text for text, _, _ in labels] == ["α=0", "α=0.5", "α=1"] and len(markers) == 3 + len(data["points"])
    assert all(to_rgba(color) == to_rgba(seen["curve"]) for _, color, _ in labels)
    boxes = [box for _, _, box in labels]
    assert not [(a, m) for a in boxes for m in markers if plot_geometry.overlap_area(a, m) > 0]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if plot_geometry.overlap_area(a, b) > 0]


def test_which_methods_start_at_zero_shot():
    assert starts_at_zero_shot("convpass") and starts_at_zero_shot("robust:convpass")
    assert starts_at_zero_shot("clip_lora") and starts_at_zero_shot("linear_probe")
    assert not starts_at_zero_shot("vpt_deep") and not starts_at_zero_shot("coop")


def test_command_writes_both_files_and_refuses_to_replace_them(tmp_path, capsys):
    folder = _table(tmp_path / "t", ROWS)
    assert main(["--frontier", str(folder)]) == 0
    data = json.loads((folder / "frontier.json").read_text())
    assert (folder / "frontier.png").stat().st_size > 0 and len(data["points"]) == len(ROWS)
    before = (folder / "frontier.png").read_bytes()
    assert "already holds frontier.json, frontier.png" in refused_line(main, ["--frontier", str(folder)], capsys)
    assert (folder / "frontier.png").read_bytes() == before
    assert "no table2.json" in refused_line(main, ["--frontier", str(tmp_path / "none"), "--output-dir",
                                                   str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "table2.json").write_text("{not json")
    assert "damaged" in refused_line(main, ["--frontier", str(tmp_path / "bad"), "--output-dir", str(tmp_path / "p")],
                                     capsys).lower()


@pytest.mark.parametrize("extra", [["--resume", "x"]])
def test_frontier_takes_no_table_run_flags(tmp_path, capsys, extra):
    assert "drop --resume" in refused_line(main, ["--frontier", str(tmp_path), *extra], capsys)
