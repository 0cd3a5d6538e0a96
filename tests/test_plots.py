"""Table-2 figures: valid PNGs, written atomically, error bars only over several seeds, log2 shots axis."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from baseline_world import make_world
from PIL import Image
from tolerance import assert_close_scaled, scaled_tolerance

from clipconv.app.plot_geometry import alpha_chord_gaps, chord, chord_gaps, label_box, place_labels, seed_spread
from clipconv.app.plots import CHORD_LABEL, accuracy_bars, accuracy_vs_alpha, accuracy_vs_shots, robustness_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLUMNS = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "target_avg")


def _entry(label: str, base: float, seeds=(1, 2, 3), spread: float = 1.5) -> dict:
    mean = {c: base - 3 * i for i, c in enumerate(COLUMNS)}
    return {"label": label, "mean": mean, "std": {c: spread for c in COLUMNS}, "seeds": list(seeds)}


def _table(seeds=(1, 2, 3), offset: float = 0.0) -> dict:
    return {"measured": {"zero_shot": _entry("ZS CLIP", 40 + offset, seeds),
                         "linear_probe": _entry("LP CLIP", 35 + 2 * offset, seeds),
                         "convpass": _entry("Convpass_CLIP", 55 + 3 * offset, seeds)}}


def assert_valid_png(path: Path, min_bytes: int = 8000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is suspiciously small ({len(data)} bytes)"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert width > 400 and height > 250
        low, high = image.convert("L").getextrema()
        assert high - low > 100  # something is drawn, not a blank canvas
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]  # no temp file left


@pytest.fixture()
def measured_world_table(tmp_path, tiny_config) -> dict:
    """A real table: zero-shot and linear-probe top-1 of the tiny CLIP on the baseline world's val set."""
    from clipconv.app.report import results_row
    from clipconv.data import eval_split, resolve_run_classes
    from clipconv.evaluation import evaluate_method
    from clipconv.methods import build_method

    world = make_world(tmp_path, tiny_config)
    split = eval_split(world.root, "imagenet", resolve_run_classes(world.root))
    measured = {}
    for name, label in (("zero_shot", "ZS CLIP"), ("linear_probe", "LP CLIP")):
        method = build_method(name, **({"bisection_steps": 1} if name == "linear_probe" else {}))
        method.fit(world.ctx)
        row = results_row(evaluate_method(method, [split], world.root, "cpu", features=world.store,
                                          log=lambda message: None))
        measured[name] = {"label": label, "mean": row, "std": {k: 0.0 for k in row}, "seeds": [1]}
    return {"measured": measured}


def test_bars_of_a_measured_table_are_a_png(tmp_path, measured_world_table):
    path = accuracy_bars(measured_world_table, tmp_path / "figs" / "bars.png", title="tiny CLIP, tiny world")
    assert path == tmp_path / "figs" / "bars.png"
    assert_valid_png(path)


def test_shots_plot_of_measured_tables_is_a_png(tmp_path, measured_world_table):
    path = accuracy_vs_shots({1: measured_world_table, 2: measured_world_table}, tmp_path / "shots.png",
                             domain_columns=("imagenet",), title="tiny CLIP, tiny world")
    assert_valid_png(path)


def _spy(monkeypatch, name: str) -> list:
    """Record the (args, kwargs) of every call of matplotlib's `Axes.<name>`, still drawing as usual."""
    import matplotlib.axes

    calls, real = [], getattr(matplotlib.axes.Axes, name)

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, name, spy)
    return calls


def test_bars_full_table_and_error_bars_only_with_several_seeds(tmp_path, monkeypatch):
    bars = _spy(monkeypatch, "bar")
    assert_valid_png(accuracy_bars(_table(), tmp_path / "three_seeds.png", title="three seeds"))
    assert len(bars) == 3  # one bar series per method, one bar per domain column
    heights = [list(args[1]) for args, _ in bars]
    assert heights[0] == [_table()["measured"]["zero_shot"]["mean"][c] for c in COLUMNS]
    assert all(len(h) == len(COLUMNS) for h in heights)
    assert all(kwargs["yerr"] == [1.5] * len(COLUMNS) for _, kwargs in bars)
    bars.clear()
    accuracy_bars(_table(seeds=(1,)), tmp_path / "one_seed.png")
    assert len(bars) == 3 and all(kwargs["yerr"] is None for _, kwargs in bars)


def test_bars_skip_columns_no_method_has(tmp_path, monkeypatch):
    table = _table()
    for entry in table["measured"].values():
        entry["mean"] = {"imagenet": entry["mean"]["imagenet"], "target_avg": float("nan")}
    ticks = _spy(monkeypatch, "set_xticks")
    accuracy_bars(table, tmp_path / "bars.png")
    assert [list(args[1]) for args, _ in ticks] == [["ImageNet"]]


def test_shots_plot_uses_a_log2_axis_and_one_panel_per_domain(tmp_path, monkeypatch):
    scales, titles, lines = (_spy(monkeypatch, name) for name in ("set_xscale", "set_title", "plot"))
    results = {k: _table(offset=k) for k in (16, 1, 4, 2, 8)}
    path = accuracy_vs_shots(results, tmp_path / "shots.png", title="miniature benchmark")
    assert_valid_png(path)
    assert [(args[0], kwargs.get("base")) for args, kwargs in scales] == [("log", 2), ("log", 2)]
    assert [args[0] for args, _ in titles] == ["ImageNet (source)", "target avg"]
    assert len(lines) == 2 * 3  # a line per method in each panel
    (xs, ys), kwargs = lines[0]
    assert kwargs["label"] == "ZS CLIP" and list(xs) == [1, 2, 4, 8, 16]
    assert list(ys) == [results[k]["measured"]["zero_shot"]["mean"]["imagenet"] for k in xs]


@pytest.mark.parametrize("call, message", [
    (lambda p: accuracy_bars({"measured": {}}, p), "no measured methods"),
    (lambda p: accuracy_bars({"rows": []}, p), "no measured methods"),
    (lambda p: accuracy_bars(_table(), p, columns=("no_such_column",)), "no_such_column"),
    (lambda p: accuracy_vs_shots({}, p), "no results"),
    (lambda p: accuracy_vs_shots({0: _table()}, p), "positive integers"),
    (lambda p: accuracy_vs_shots({1: {"measured": {}}}, p), "1 shots"),
])
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path / "out.png")
    assert not list(tmp_path.iterdir())


def test_importing_clipconv_does_not_import_matplotlib():
    code = ("import sys, clipconv, clipconv.app.plots, clipconv.app.table2, clipconv.app.cli.run_table2; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported at import time'")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- robustness sweep (WiSE-FT)
SWEEP = {0.5: (61.0, 40.0), 0.0: (55.0, 42.0), 1.0: (64.0, 35.5), 0.25: (59.0, 42.5)}


def test_robustness_sweep_draws_one_labelled_point_per_alpha_on_logit_axes(tmp_path, monkeypatch):
    scales = {name: _spy(monkeypatch, name) for name in ("set_xscale", "set_yscale")}
    lines, notes, placed = _spy(monkeypatch, "plot"), _spy(monkeypatch, "annotate"), _spy_placement(monkeypatch)
    path = robustness_sweep(SWEEP, tmp_path / "sweep.png", title="tiny sweep",
                            references={"zero-shot": (55.0, 42.0), "Tip-Adapter": (60.0, 39.0)})
    assert_valid_png(path, min_bytes=4000)
    assert [args[0] for args, _ in scales["set_xscale"]] == ["logit"]
    assert [args[0] for args, _ in scales["set_yscale"]] == ["logit"]
    (xs, ys), _ = lines[0]  # the sweep, in alpha order, as fractions
    assert list(xs) == pytest.approx([0.55, 0.59, 0.61, 0.64]) and list(ys) == pytest.approx([0.42, 0.425, 0.40, 0.355])
    assert [args[0] for args, _ in notes] == ["α=0", "α=0.25", "α=0.5", "α=1", "zero-shot", "Tip-Adapter"]
    assert [kwargs["label"] for _, kwargs in lines[1:]] == ["zero-shot", "Tip-Adapter", CHORD_LABEL]
    assert list(lines[2][0][0]) == pytest.approx([0.60]) and list(lines[2][0][1]) == pytest.approx([0.39])
    (chord_x, chord_y), _ = lines[3]  # the chord: the α = 0 point to the α = 1 point, straight as drawn
    assert list(chord_x) == pytest.approx([0.55, 0.64]) and list(chord_y) == pytest.approx([0.42, 0.355])
    # the labels: "α=0" and "zero-shot" mark the same point, yet no two label boxes overlap (as measured)
    (anchors, sizes, offsets), = placed
    assert len(anchors) == 6 and anchors[0] == anchors[4]
    boxes = [label_box(a, size, o) for a, size, o in zip(anchors, sizes, offsets)]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if _overlap(a, b)]
    assert [kwargs["xytext"] for _, kwargs in notes] == [(dx * 72 / 100, dy * 72 / 100) for dx, dy in offsets]


def _spy_placement(monkeypatch) -> list:
    import clipconv.app.plots

    calls, real = [], clipconv.app.plots.place_labels

    def spy(anchors, sizes, **kwargs):
        offsets = real(anchors, sizes, **kwargs)
        calls.append((list(anchors), list(sizes), offsets))
        return offsets

    monkeypatch.setattr(clipconv.app.plots, "place_labels", spy)
    return calls


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_the_chord_gaps_are_heights_above_the_straight_line_on_logit_axes():
    # the chord from (20 %, 20 %) to (80 %, 50 %): logit coordinates (-1.386, -1.386) to (1.386, 0)
    points = {0.0: (20.0, 20.0), 0.5: (50.0, 40.0), 1.0: (80.0, 50.0)}
    assert chord(points) == ((20.0, 20.0), (80.0, 50.0)) and chord({0.5: (1.0, 2.0)}) is None
    gaps = chord_gaps(points)
    chord_target = 100 / (1 + math.exp(-(-math.log(4) / 2)))  # halfway in logit x: halfway in logit y
    assert_close_scaled(gaps[0.5], 40.0 - chord_target)
    assert abs(gaps[0.0]) <= scaled_tolerance(20.0) and abs(gaps[1.0]) <= scaled_tolerance(50.0)
    assert math.isnan(chord_gaps({0.0: (30.0, 10.0), 1.0: (30.0, 20.0), 0.5: (30.0, 15.0)})[0.5])  # vertical chord
    assert alpha_chord_gaps({0.0: 10.0, 0.25: 14.0, 1.0: 30.0}) == {0.0: 0.0, 0.25: -1.0, 1.0: 0.0}
    assert alpha_chord_gaps({0.5: 1.0}) == {}


def test_seed_spread_is_the_mean_and_population_std_per_alpha_over_seeds():
    spread = seed_spread([{0.0: (10.0, 20.0), 0.5: (30.0, 40.0)}, {0.0: (20.0, 20.0), 0.5: (50.0, 40.0), 1.0: (1, 1)}])
    assert spread == {0.0: ((15.0, 20.0), (5.0, 0.0)), 0.5: ((40.0, 40.0), (10.0, 0.0))}  # α = 1: not in every seed
    assert seed_spread([{0.5: (30.0, 40.0)}]) == {0.5: ((30.0, 40.0), (0.0, 0.0))} and seed_spread([]) == {}


def test_labels_of_coincident_and_close_points_do_not_overlap():
    anchors = [(100.0, 100.0), (100.0, 100.0), (104.0, 98.0), (300.0, 50.0)]
    sizes = [(40.0, 10.0), (120.0, 24.0), (40.0, 10.0), (40.0, 10.0)]
    offsets = place_labels(anchors, sizes, step=6.0, marker=4.0)
    boxes = [label_box(a, size, o) for a, size, o in zip(anchors, sizes, offsets)]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if _overlap(a, b)]
    markers = [(x - 4, y - 4, x + 4, y + 4) for x, y in anchors]
    assert not [(b, m) for b in boxes for m in markers if _overlap(b, m)]  # no label covers a marker
    assert offsets[3] == (6.0, 6.0)  # a lone point keeps the first choice: up and to the right


def test_robustness_sweep_draws_error_bars_from_the_spread_per_alpha(tmp_path, monkeypatch):
    bars = _spy(monkeypatch, "errorbar")
    assert_valid_png(robustness_sweep(SWEEP, tmp_path / "bars.png", spread={0.0: (1.0, 2.0), 0.5: (0.5, 0.25)}),
                     min_bytes=4000)
    (xs, ys), kwargs = bars[0]
    assert list(xs) == pytest.approx([0.55, 0.61]) and list(ys) == pytest.approx([0.42, 0.40])
    for side in (0, 1):  # ± std (minus, plus), as fractions
        assert kwargs["xerr"][side] == pytest.approx([0.01, 0.005]) and kwargs["yerr"][side] == pytest.approx([0.02, 0.0025])


def test_top1_against_alpha_draws_each_set_with_its_chord(tmp_path, monkeypatch):
    lines = _spy(monkeypatch, "plot")
    per_alpha = {0.0: {"source": 40.0, "target_avg": float("nan")}, 0.5: {"source": 50.0}, 1.0: {"source": 55.0}}
    assert_valid_png(accuracy_vs_alpha(per_alpha, tmp_path / "alpha.png", columns=("source", "v2")), min_bytes=4000)
    assert [list(args[1]) for args, _ in lines] == [[40.0, 50.0, 55.0], [40.0, 55.0]]  # the set, then its chord
    with pytest.raises(ValueError, match="no value"):
        accuracy_vs_alpha(per_alpha, tmp_path / "none.png", columns=("v2",))


def test_robustness_sweep_clips_zero_and_hundred_percent(tmp_path, monkeypatch):
    from clipconv.app.plots import LOGIT_CLIP

    lines = _spy(monkeypatch, "plot")
    assert_valid_png(robustness_sweep({0.0: (0.0, 100.0), 1.0: (50.0, 50.0)}, tmp_path / "edge.png"), min_bytes=4000)
    (xs, ys), _ = lines[0]
    assert (xs[0], ys[0]) == (LOGIT_CLIP, 1 - LOGIT_CLIP)


@pytest.mark.parametrize("points, references, message", [
    ({}, None, "no points"),
    ({0.5: (101.0, 40.0)}, None, r"outside \[0, 100\]"),
    ({0.5: (float("nan"), 40.0)}, None, r"outside \[0, 100\]"),
    ({0.5: (50.0,)}, None, "must be \\(source top-1 %, target average %\\)"),
    ({"half": (50.0, 40.0)}, None, "alpha must be a finite number"),
    ({0.5: (50.0, 40.0)}, {"zero-shot": (50.0, -1.0)}, "reference 'zero-shot'"),
])
def test_robustness_sweep_refuses_bad_input_and_writes_nothing(tmp_path, points, references, message):
    with pytest.raises(ValueError, match=message):
        robustness_sweep(points, tmp_path / "out.png", references=references)
    assert not list(tmp_path.iterdir())
