"""Geometry of the inline SVG charts (templates draw them; no chart library, no JavaScript needed):
a unit's activation histogram and the heat map of its activation over a dataset crop."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

from ..display.figures import crop_box
from .histograms import Histogram

HIST_WIDTH, HIST_HEIGHT = 320, 120      # SVG user units of the plot area
HIST_LEFT, HIST_BOTTOM = 6, 22


def histogram_chart(hist: Histogram, top_threshold: Optional[float], mean: Optional[float]) -> dict:
    """Bars on a log(1 + count) scale (the top-activation tail stays visible next to the bulk), with the
    bin edges and counts as data for tooltips and tests; `top` marks bins at or above the k-th top value."""
    peak = math.log1p(float(hist.counts.max())) if hist.counts.size and hist.counts.max() > 0 else 1.0
    bins = len(hist.counts)
    step = HIST_WIDTH / max(bins, 1)
    lo, hi = float(hist.edges[0]), float(hist.edges[-1])
    span = (hi - lo) or 1.0

    def x_of(value: float) -> float:
        return HIST_LEFT + (min(max(value, lo), hi) - lo) / span * HIST_WIDTH

    bars = []
    for i, count in enumerate(hist.counts):
        height = (math.log1p(float(count)) / peak) * (HIST_HEIGHT - 8) if count else 0.0
        left, right = float(hist.edges[i]), float(hist.edges[i + 1])
        bars.append({"x": HIST_LEFT + i * step, "y": HIST_HEIGHT - height, "w": max(step - 1, 0.5), "h": height,
                     "lo": left, "hi": right, "count": int(count),
                     "top": top_threshold is not None and right > top_threshold})
    return {"width": HIST_LEFT * 2 + HIST_WIDTH, "height": HIST_HEIGHT + HIST_BOTTOM, "base": HIST_HEIGHT,
            "bars": bars, "lo": lo, "hi": hi, "count": hist.count, "left": HIST_LEFT, "plot_width": HIST_WIDTH,
            "threshold_x": x_of(top_threshold) if top_threshold is not None else None,
            "mean_x": x_of(mean) if mean is not None and np.isfinite(mean) else None}


MAX_OPACITY = 0.6
MIN_CELLS_FOR_OVERLAY = 1.5     # a crop narrower than this many cells would only get a uniform tint


def heatmap_cells(activation_map: np.ndarray, cell: Sequence[int], grid: Sequence[int], image_size: int,
                  vmax: float) -> dict:
    """The unit's H x W map for one dataset crop, twice:

    - `rects`: the cells under the crop, in input-image pixels, with `view` = the crop's window
      (crop_around_cell's), so an overlay lines up with the crop exactly; empty when the crop spans fewer
      than MIN_CELLS_FOR_OVERLAY cells (a coarse map, e.g. 2 x 2: the overlay would be one flat tint);
    - `mini`: every cell in grid units, and `window` = the crop's place on the grid, for a small map of the
      whole image beside the crop.

    Opacity = activation / vmax (the unit's top activation), clipped to [0, MAX_OPACITY]; negatives are clear."""
    height, width = int(grid[0]), int(grid[1])
    left, top, side = crop_box((image_size, image_size), cell, grid)
    cell_w, cell_h = image_size / width, image_size / height
    overlay = side / max(cell_w, cell_h) >= MIN_CELLS_FOR_OVERLAY
    scale = vmax if vmax > 0 else 1.0
    rects, mini = [], []
    for row in range(height):
        for col in range(width):
            value = float(activation_map[row, col])
            if not np.isfinite(value):
                continue
            opacity = round(min(max(value / scale, 0.0), 1.0) * MAX_OPACITY, 3)
            peak = row == int(cell[0]) and col == int(cell[1])
            mini.append({"x": col, "y": row, "o": opacity, "v": value, "peak": peak})
            x, y = col * cell_w, row * cell_h
            if overlay and not (x + cell_w <= left or x >= left + side or y + cell_h <= top or y >= top + side):
                rects.append({"x": round(x, 2), "y": round(y, 2), "w": round(cell_w, 2), "h": round(cell_h, 2),
                              "o": opacity, "v": value, "peak": peak})
    window = {"x": round(left / cell_w, 3), "y": round(top / cell_h, 3), "w": round(side / cell_w, 3),
              "h": round(side / cell_h, 3)}
    return {"view": f"{left} {top} {side} {side}", "rects": rects, "mini": mini, "grid": [height, width],
            "window": window}


def number(value: Optional[float], digits: int = 3) -> str:
    """A short, honest number for labels: 3 significant digits, '–' for missing."""
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def percent(value: Optional[float]) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{100 * value:.0f}%"


def spark(values: List[float]) -> List[float]:
    """Bar widths (0-100) for a list of scores relative to the largest absolute one (text score bars)."""
    top = max((abs(v) for v in values), default=0.0) or 1.0
    return [max(0.0, 100.0 * v / top) for v in values]
