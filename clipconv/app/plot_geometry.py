"""The numbers behind the sweep figures, without matplotlib: logit coordinates, the chord from θ(0) to θ(1) and
each point's height above it, mean ± std over seeds per α, and label positions that do not overlap.

A sweep point is (source top-1 %, target-average top-1 %). On the logit axes of the robustness view (Taori et
al., 2020) the chord is the straight segment joining the α = 0 and α = 1 points as drawn; a point above it is
the gain of weight-space interpolation over joining the two ends (WiSE-FT, Wortsman et al., 2022, Figure 1).
`plots.py` draws these; tests check them here.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

__all__ = ["LOGIT_CLIP", "Point", "logit_fraction", "logit", "chord", "chord_gaps", "alpha_chord_gaps",
           "seed_spread", "label_box", "overlap_area", "marker_box", "place_labels", "LABEL_OFFSETS", "Box"]

#: accuracies (fractions) are clipped into [LOGIT_CLIP, 1 − LOGIT_CLIP] for the logit axes (0 % and 100 % are ±∞)
LOGIT_CLIP = 1e-3
Point = tuple[float, float]
Box = tuple[float, float, float, float]
#: candidate label offsets around an anchor, in units of the step (right/left × up/down, then further out)
LABEL_OFFSETS: tuple[Point, ...] = tuple((sx * r, sy * r) for r in (1.0, 2.0, 3.5, 5.0, 7.0)
                                         for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0)))


def logit_fraction(percent: float) -> float:
    """An accuracy in % as the fraction drawn on a logit axis (clipped LOGIT_CLIP from 0 and 1)."""
    return min(max(percent / 100.0, LOGIT_CLIP), 1.0 - LOGIT_CLIP)


def logit(percent: float) -> float:
    """log(p / (1 − p)) of `logit_fraction(percent)`: the coordinate a logit axis places the accuracy at."""
    p = logit_fraction(percent)
    return math.log(p / (1.0 - p))


def _percent(value: float) -> float:
    return 100.0 / (1.0 + math.exp(-value))


def chord(points: Mapping[float, Point]) -> Optional[tuple[Point, Point]]:
    """(the α = 0 point, the α = 1 point) of a sweep {α: (source %, target %)}; None unless both were evaluated."""
    ends = [points.get(0.0), points.get(1.0)]
    return (tuple(ends[0]), tuple(ends[1])) if all(end is not None for end in ends) else None


def chord_gaps(points: Mapping[float, Point]) -> dict[float, float]:
    """{α: target % − the chord's target % at that α's source accuracy}: the height above the chord as drawn on
    the logit axes (percentage points; > 0 is a gain over joining the two ends). NaN where the chord is vertical
    (both ends at the same source accuracy); {} without a chord."""
    ends = chord(points)
    if ends is None:
        return {}
    (s0, t0), (s1, t1) = ends
    x0, x1, y0, y1 = logit(s0), logit(s1), logit(t0), logit(t1)
    gaps = {}
    for alpha, (source, target) in sorted(points.items()):
        if x0 == x1:
            gaps[alpha] = float("nan")
            continue
        u = (logit(source) - x0) / (x1 - x0)
        gaps[alpha] = target - _percent(y0 + u * (y1 - y0))
    return gaps


def alpha_chord_gaps(values: Mapping[float, float]) -> dict[float, float]:
    """{α: value − ((1 − α)·value(0) + α·value(1))} of one accuracy against α (the top-1-against-α view, e.g.
    when there is no target average); {} unless α = 0 and α = 1 were evaluated."""
    if 0.0 not in values or 1.0 not in values:
        return {}
    return {alpha: value - ((1.0 - alpha) * values[0.0] + alpha * values[1.0]) for alpha, value in sorted(values.items())}


def seed_spread(per_seed: Sequence[Mapping[float, Point]]) -> dict[float, tuple[Point, Point]]:
    """{α: ((mean source, mean target), (std source, std target))} over the seeds' sweeps, for the α every seed
    has; the population std (as Table 2 reports it), 0 for one seed."""
    if not per_seed:
        return {}
    common = set(per_seed[0]).intersection(*per_seed[1:])
    spread = {}
    for alpha in sorted(common):
        pairs = [tuple(sweep[alpha]) for sweep in per_seed]
        means = tuple(sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        stds = tuple(math.sqrt(sum((p[i] - means[i]) ** 2 for p in pairs) / len(pairs)) for i in (0, 1))
        spread[alpha] = (means, stds)
    return spread


def label_box(anchor: Point, size: Point, offset: Point) -> Box:
    """(x0, y0, x1, y1) of a label of `size` (w, h) placed at `offset` from `anchor`: to the right of the offset
    point when dx ≥ 0 (left-aligned), else to its left; above it when dy ≥ 0, else below (display units)."""
    x, y = anchor[0] + offset[0], anchor[1] + offset[1]
    width, height = size
    x0, x1 = (x, x + width) if offset[0] >= 0 else (x - width, x)
    y0, y1 = (y, y + height) if offset[1] >= 0 else (y - height, y)
    return x0, y0, x1, y1


def overlap_area(a: Box, b: Box) -> float:
    """The area two boxes (x0, y0, x1, y1) share (0 when they only touch or are apart)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


def marker_box(center: Point, half: float) -> Box:
    """The square of half-side `half` around `center`: where a marker is drawn."""
    return center[0] - half, center[1] - half, center[0] + half, center[1] + half


def place_labels(anchors: Sequence[Point], sizes: Sequence[Point], step: float, marker: float = 0.0,
                 offsets: Sequence[Point] = LABEL_OFFSETS, bounds: Optional[Box] = None,
                 obstacles: Sequence[Box] = ()) -> list[Point]:
    """Offsets (dx, dy) for labels of `sizes` at `anchors` (display units, e.g. pixels), chosen in order: the first
    candidate (`offsets` × `step`) whose box overlaps no label placed before, no marker (a square of half-side
    `marker` around every anchor) and none of `obstacles` (boxes, e.g. the markers of unlabelled points) and stays
    inside `bounds` (x0, y0, x1, y1; e.g. the axes); when none is free, the candidate with the least overlap (and
    area outside)."""
    markers = [*(marker_box(anchor, marker) for anchor in anchors), *obstacles]
    placed: list[Box] = []
    chosen: list[Point] = []
    for anchor, size in zip(anchors, sizes):
        best, best_cost = None, math.inf
        for dx, dy in offsets:
            offset = (dx * step, dy * step)
            box = label_box(anchor, size, offset)
            cost = sum(overlap_area(box, other) for other in placed) + sum(overlap_area(box, m) for m in markers)
            if bounds is not None:
                cost += (box[2] - box[0]) * (box[3] - box[1]) - overlap_area(box, bounds)  # the area outside
            if cost < best_cost:
                best, best_cost = offset, cost
            if cost == 0.0:
                break
        chosen.append(best)
        placed.append(label_box(anchor, size, best))
    return chosen
