"""Charts drawn with Pillow (no plotting library): grouped bars with a baseline mark per bar (the compare
report's flagged share per concept) and lines over a numeric axis (the dose-response plot).

Only synthetic marks are drawn here (bars, lines, text): no dataset pixel ever reaches a chart."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from .figures import fit_text, font

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)
# A colour-blind-safe qualitative palette (Okabe & Ito), then greys.
PALETTE = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0),
           (240, 228, 66), (0, 0, 0), (120, 120, 120), (180, 180, 180))
BASELINE = (200, 0, 0)


def colour(i: int) -> Tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def nice_top(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^n at or above value (an axis end); 1 for nothing to show."""
    if not value or value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value - 1e-12:
            return step * power
    return 10 * power


def _axis_label(value: float, percent: bool) -> str:
    if percent:
        return f"{100 * value:.3g}%"
    return f"{value:.3g}"


def grouped_bars(groups: Sequence[str], series: Sequence[str], values: Sequence[Sequence[Optional[float]]],
                 baselines: Optional[Sequence[Sequence[Optional[float]]]] = None, title: str = "",
                 y_label: str = "", percent: bool = True, width: int = 860, height: int = 380) -> Image.Image:
    """One group of bars per `groups` entry, one bar per `series` entry in it; values[s][g] (None: no bar,
    marked 'n/a'). baselines[s][g]: a red tick across bar (s, g) at that value (e.g. the random-weights
    model's share), drawn even where it is above the bar."""
    left, right, top, bottom = 64, 16, 34 if title else 12, 64 + 18 * ((len(series) + 2) // 3)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    small, label_font = font(11), font(12)
    plot_w, plot_h = width - left - right, height - top - bottom
    every = [v for row in list(values) + list(baselines or []) for v in row if v is not None and math.isfinite(v)]
    y_top = nice_top(max(every, default=0.0))
    y_of = lambda v: top + plot_h - plot_h * min(max(v, 0.0), y_top) / y_top    # noqa: E731
    _frame(draw, title, width, left, right, plot_w, y_top, y_of, percent, small)
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill=INK)
    n_groups, n_series = max(1, len(groups)), max(1, len(series))
    group_w = plot_w / n_groups
    bar_w = max(2.0, group_w * 0.8 / n_series)
    for g, name in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for s in range(len(series)):
            x = x0 + s * bar_w
            value = values[s][g] if g < len(values[s]) else None
            if value is None or not math.isfinite(value):
                draw.text((x + 1, top + plot_h - 12), "n/a", fill=INK, font=font(9))
            else:
                draw.rectangle([x + 1, y_of(value), x + bar_w - 1, top + plot_h], fill=colour(s))
            base = baselines[s][g] if baselines is not None and g < len(baselines[s]) else None
            if base is not None and math.isfinite(base):
                y = y_of(base)
                draw.line([(x, y), (x + bar_w, y)], fill=BASELINE, width=2)
        text = fit_text(draw, str(name), label_font, int(group_w) - 4)
        draw.text((left + g * group_w + (group_w - draw.textlength(text, font=label_font)) / 2, top + plot_h + 6),
                  text, fill=INK, font=label_font)
    _legend(draw, series, left, top + plot_h + 28, plot_w, baselines is not None, small)
    if y_label:
        _vertical_text(canvas, y_label, 4, top, plot_h)
    return canvas


def lines(x: Sequence[float], series: Sequence[str], values: Sequence[Sequence[Optional[float]]],
          dashed: Sequence[Optional[float]] = (), dashed_label: str = "", title: str = "", x_label: str = "",
          y_label: str = "", x_percent: bool = True, width: int = 700, height: int = 380) -> Image.Image:
    """values[s][i] over x[i], one line with dots per series; dashed[s]: a dashed horizontal line in series s's
    colour (e.g. a random-weights baseline), named `dashed_label` in the legend."""
    left, right, top, bottom = 64, 20, 34 if title else 12, 70 + 18 * ((len(series) + 2) // 3)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    small = font(11)
    plot_w, plot_h = width - left - right, height - top - bottom
    every = [v for row in values for v in row if v is not None] + [v for v in dashed if v is not None]
    y_top = nice_top(max(every, default=0.0))
    x_lo, x_hi = min(x, default=0.0), max(x, default=1.0)
    x_span = (x_hi - x_lo) or 1.0
    x_of = lambda v: left + plot_w * (v - x_lo) / x_span       # noqa: E731
    y_of = lambda v: top + plot_h - plot_h * min(max(v, 0.0), y_top) / y_top    # noqa: E731
    _frame(draw, title, width, left, right, plot_w, y_top, y_of, False, small)
    free = -math.inf            # labels that would overlap the one before are left out (their tick stays)
    for value in sorted(x):
        text = _axis_label(value, x_percent)
        draw.line([(x_of(value), top + plot_h), (x_of(value), top + plot_h + 4)], fill=INK)
        start = x_of(value) - draw.textlength(text, font=small) / 2
        if start >= free:
            draw.text((start, top + plot_h + 6), text, fill=INK, font=small)
            free = start + draw.textlength(text, font=small) + 4
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill=INK)
    if x_label:
        draw.text((left + (plot_w - draw.textlength(x_label, font=small)) / 2, top + plot_h + 22), x_label, fill=INK,
                  font=small)
    for s, row in enumerate(values):
        points = [(x_of(xv), y_of(v)) for xv, v in zip(x, row) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour(s), width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour(s))
        base = dashed[s] if s < len(dashed) else None
        if base is not None:
            y = y_of(base)
            for start in range(0, plot_w, 12):
                draw.line([(left + start, y), (left + min(start + 6, plot_w), y)], fill=colour(s), width=1)
    names = list(series) + ([dashed_label] if dashed_label and any(v is not None for v in dashed) else [])
    _legend(draw, names, left, top + plot_h + 40, plot_w, False, small, dashed_last=bool(dashed_label))
    if y_label:
        _vertical_text(canvas, y_label, 4, top, plot_h)
    return canvas


def _frame(draw: ImageDraw.ImageDraw, title: str, width: int, left: int, right: int, plot_w: float, y_top: float,
           y_of, percent: bool, small) -> None:
    """The title and the y axis's five gridlines with their labels (both charts)."""
    if title:
        draw.text((left, 8), fit_text(draw, title, font(14), width - left - right), fill=INK, font=font(14))
    for tick in range(5):
        value = y_top * tick / 4
        y = y_of(value)
        draw.line([(left, y), (left + plot_w, y)], fill=GRID)
        text = _axis_label(value, percent)
        draw.text((left - 6 - draw.textlength(text, font=small), y - 6), text, fill=INK, font=small)


def _legend(draw: ImageDraw.ImageDraw, names: Sequence[str], left: int, y: int, width: int, baseline: bool,
            face, dashed_last: bool = False) -> None:
    entries: List[Tuple[str, Optional[Tuple[int, int, int]], str]] = \
        [(str(name), colour(i), "box") for i, name in enumerate(names)]
    if dashed_last and entries:
        entries[-1] = (entries[-1][0], INK, "dash")
    if baseline:
        entries.append(("random-weights baseline", BASELINE, "tick"))
    column_w = max(1, width // 3)
    for i, (name, fill, kind) in enumerate(entries):
        x, row_y = left + (i % 3) * column_w, y + (i // 3) * 18
        if kind == "box":
            draw.rectangle([x, row_y + 2, x + 10, row_y + 12], fill=fill)
        elif kind == "tick":
            draw.line([(x, row_y + 7), (x + 10, row_y + 7)], fill=fill, width=2)
        else:
            draw.line([(x, row_y + 7), (x + 4, row_y + 7)], fill=fill)
            draw.line([(x + 7, row_y + 7), (x + 11, row_y + 7)], fill=fill)
        draw.text((x + 16, row_y), fit_text(draw, name, face, column_w - 22), fill=INK, font=face)


def _vertical_text(canvas: Image.Image, text: str, x: int, top: int, height: int) -> None:
    face = font(11)
    probe = ImageDraw.Draw(canvas)
    length = int(probe.textlength(text, font=face)) + 4
    label = Image.new("RGB", (length, 14), BACKGROUND)
    ImageDraw.Draw(label).text((2, 0), text, fill=INK, font=face)
    rotated = label.rotate(90, expand=True)
    canvas.paste(rotated, (x, int(top + max(0, (height - rotated.height) / 2))))
