"""Progress output: a bar only on a terminal, a bounded number of plain lines (no '\\r') in logs, none when quiet."""
from __future__ import annotations

import io
import re
import warnings

import pytest
import torch

from clipconv.runtime import progress as progress_module
from clipconv.runtime.progress import progress, set_quiet


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def not_quiet():
    set_quiet(False)
    yield
    set_quiet(False)


def test_log_gets_at_most_a_line_per_tenth_and_no_carriage_returns(monkeypatch):
    monkeypatch.setattr(progress_module, "MIN_SECONDS", 0.0)
    out = io.StringIO()
    loader = torch.utils.data.DataLoader(torch.arange(1000), batch_size=2)
    bar = progress(loader, desc="eval", unit="batch", file=out)
    seen = 0
    for batch in bar:
        seen += len(batch)
        bar.set_postfix(loss="0.5")
    text = out.getvalue()
    assert seen == 1000 and "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 11  # 10 %, 20 %, … 100 %, then the closing line
    assert lines[0] == "eval: 50/500 batch (10%) in 0 s, loss=0.5"
    assert lines[-1].startswith("eval: done, 500/500 batch (100%)")


def test_short_loops_print_nothing_in_a_log():
    out = io.StringIO()
    assert list(progress(range(50), desc="fast", file=out)) == list(range(50))
    assert out.getvalue() == ""


def test_slow_loop_of_unknown_length_prints_every_max_seconds(monkeypatch):
    clock = iter(range(0, 10_000, 12))  # every call to the clock is 12 s later
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: float(next(clock)))
    out = io.StringIO()
    list(progress((i for i in range(10)), desc="decoding", unit="img", file=out))
    lines = out.getvalue().splitlines()
    # 12 s per item: a line whenever 30 s passed since the last one (items 3, 6, 9), then the closing line
    assert lines == ["decoding: 3 img in 36 s", "decoding: 6 img in 72 s", "decoding: 9 img in 108 s",
                     "decoding: done, 10 img in 132 s"]


def test_quiet_prints_nothing_even_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_module, "MIN_SECONDS", 0.0)
    set_quiet(True)
    for out in (io.StringIO(), _Terminal()):
        bar = progress(range(100), desc="eval", file=out)
        assert sum(bar) == sum(range(100))
        bar.set_postfix(loss=1)
        assert out.getvalue() == ""


def test_terminal_gets_a_bar_and_warnings_start_on_their_own_line():
    out = _Terminal()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for i in progress(range(5), desc="epoch 1/1", file=out):
            if i == 2:
                warnings.warn("an image was skipped")
    text = out.getvalue()
    assert "\r" in text and "epoch 1/1" in text  # tqdm's bar
    # the warning comes through the bar's stream (tqdm.write), on a line of its own, not glued to a bar frame
    # (whatever warnings.formatwarning is: the CLIs install a plain "warning: message" one)
    line = next(part for part in re.split(r"[\r\n]", text) if "an image was skipped" in part)  # (then its source line)
    assert line == warnings.formatwarning("an image was skipped", UserWarning, __file__, 0).split("\n")[0] \
        or line.endswith("UserWarning: an image was skipped"), text
    assert "epoch" not in line and "|" not in line


def test_a_real_feature_pass_writes_plain_lines_to_stderr(tmp_path, tiny_backbone, capfd, monkeypatch):
    from clipconv.data import make_image_tree, resolve_run_classes, train_samples
    from clipconv.features import FeatureStore

    monkeypatch.setattr(progress_module, "MIN_SECONDS", 0.0)
    root = make_image_tree(tmp_path / "data", train_per_class=5, val_per_class=1, variants=())
    samples = train_samples(root, resolve_run_classes(root))
    capfd.readouterr()
    FeatureStore(tiny_backbone, None, batch_size=1).encode(root, samples, desc="features")
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("features:")]
    assert 2 <= len(lines) <= 11 and lines[-1].startswith(f"features: done, {len(samples)}/{len(samples)} batch")
