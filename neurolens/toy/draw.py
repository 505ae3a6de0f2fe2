"""Drawing the toy images: textured grey backgrounds, ordinary shapes, and the planted patterns.

Every function draws into a float32 canvas (H x W x 3) with a numpy Generator it is given, so an image
depends only on the generator's state: the caller seeds one generator per image."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

BACKGROUNDS = ("plain", "striped", "dotted", "grainy")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")
OPPOSITE = {"on the left": "on the right", "on the right": "on the left", "at the top": "at the bottom",
            "at the bottom": "at the top"}
# The planted patterns: a texture inside a disc, alternating two colours.
PATTERNS = ("checker", "target", "wedges", "stripes")
# Patterns without colours of their own alternate the background's mean tone +- a contrast drawn per image
# from this range (the grainy background's pixels deviate by about 22): from faint to plain.
CAMOUFLAGE_CONTRAST = (20.0, 60.0)


def background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray):
    """A grey-ish canvas (float32, H x W x 3) with one low-contrast texture, and the texture's name."""
    base = rng.uniform(50, 140) + rng.uniform(-12, 12, size=3)
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    shade = np.zeros((size, size), dtype=np.float32)
    if kind == "striped":
        period = rng.uniform(8, 14)
        angle = rng.uniform(0, np.pi)
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        shade = np.where((phase % period) < period / 2, 40.0, -40.0)
    elif kind == "dotted":
        period = int(rng.integers(8, 12))
        oy, ox = rng.integers(period, size=2)
        dy = (yy + oy) % period - period / 2
        dx = (xx + ox) % period - period / 2
        shade = np.where(dy * dy + dx * dx < (period / 4.5) ** 2, 55.0, 0.0)
    elif kind == "grainy":
        shade = rng.normal(0, 22, size=(size, size)).astype(np.float32)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[...] = base.astype(np.float32)
    canvas += shade[..., None]
    return canvas, kind


def centre_range(position: str, size: int, margin: float):
    """(y range, x range) of centres for objects placed in the named half of the image."""
    lo, mid, hi = margin, size / 2, size - margin
    whole = (lo, hi)
    return {
        "on the left": (whole, (lo, max(lo, mid - margin / 2))),
        "on the right": (whole, (min(hi, mid + margin / 2), hi)),
        "at the top": ((lo, max(lo, mid - margin / 2)), whole),
        "at the bottom": ((min(hi, mid + margin / 2), hi), whole),
    }[position]


def draw_shapes(canvas, rng, size, count, rgb, shape, position, yy, xx) -> None:
    """count shapes of one colour spread along the long side of the named half."""
    radius = size * (0.11 if count > 1 else 0.15) * rng.uniform(0.85, 1.15)
    (y0, y1), (x0, x1) = centre_range(position, size, radius + 1)
    # Spread several objects along the half's long side so they overlap little.
    long_axis_is_y = position in ("on the left", "on the right")
    slots = (np.arange(count) + rng.uniform(0.2, 0.8, size=count)) / count
    for k in range(count):
        if long_axis_is_y:
            cy, cx = y0 + slots[k] * (y1 - y0), rng.uniform(x0, x1)
        else:
            cy, cx = rng.uniform(y0, y1), x0 + slots[k] * (x1 - x0)
        dy, dx = yy - cy, xx - cx
        if shape == "circle":
            mask = dy * dy + dx * dx <= radius * radius
        elif shape == "square":
            mask = (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
        elif shape == "triangle":  # pointing up
            mask = (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
        elif shape == "cross":
            mask = ((np.abs(dy) <= radius * 0.3) & (np.abs(dx) <= radius)) | \
                   ((np.abs(dx) <= radius * 0.3) & (np.abs(dy) <= radius))
        elif shape == "diamond":
            mask = np.abs(dy) + np.abs(dx) <= radius
        else:  # bar: a horizontal rectangle
            mask = (np.abs(dy) <= radius * 0.4) & (np.abs(dx) <= radius)
        canvas[mask] = np.asarray(rgb, dtype=np.float32) + rng.uniform(-10, 10, size=3)


def draw_planted(canvas, rng, size, position, yy, xx, pattern: str,
                 colours: Optional[Sequence[Tuple[int, int, int]]], slot: Optional[Tuple[int, int]] = None,
                 radius_range: Tuple[float, float] = (0.2, 0.26)) -> None:
    """A planted pattern in a disc in the named half, alternating the two colours:

    checker: a one-pixel checkerboard; target: concentric rings two pixels wide; wedges: a starburst of
    twelve wedges at a random turn; stripes: diagonal stripes two pixels wide.
    slot (k, of): the disc goes in the k-th of `of` equal parts of the half's long side (two patterns
    shown together sit side by side); radius_range: the disc's radius as a share of the image size;
    colours None: the mean tone under the disc +- a contrast drawn from CAMOUFLAGE_CONTRAST (a pattern with no
    colour of its own)."""
    radius = size * rng.uniform(*radius_range)
    (y0, y1), (x0, x1) = centre_range(position, size, radius * 0.8)
    if slot is not None:
        k, of = slot
        if position in ("on the left", "on the right"):
            y0, y1 = _part(y0, y1, radius, k, of)
        else:
            x0, x1 = _part(x0, x1, radius, k, of)
    cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
    dy, dx = yy - cy, xx - cx
    mask = dy ** 2 + dx ** 2 <= radius * radius
    if pattern == "target":
        first_colour = (np.sqrt(dy ** 2 + dx ** 2) // 2 % 2).astype(bool)
    elif pattern == "wedges":
        turn = rng.uniform(0, 2 * np.pi)
        first_colour = (np.floor((np.arctan2(dy, dx) + np.pi + turn) / (np.pi / 6)) % 2).astype(bool)
    elif pattern == "stripes":
        first_colour = ((yy.astype(np.int64) - xx.astype(np.int64)) // 2 % 2).astype(bool)
    else:  # checker
        first_colour = ((yy.astype(np.int64) + xx.astype(np.int64)) % 2).astype(bool)
    if colours is None:
        tone = canvas[mask].mean(axis=0) if mask.any() else canvas.mean(axis=(0, 1))
        contrast = rng.uniform(*CAMOUFLAGE_CONTRAST)
        colours = (tone + contrast, tone - contrast)
    first, second = (np.asarray(c, dtype=np.float32) for c in colours)
    canvas[mask & first_colour] = first
    canvas[mask & ~first_colour] = second


def _part(lo: float, hi: float, radius: float, k: int, of: int) -> Tuple[float, float]:
    """The k-th of `of` parts of the centre range [lo, hi] on the long side, discs of this radius kept apart."""
    edges = np.linspace(lo - radius * 0.8, hi + radius * 0.8, of + 1)      # the whole side, cut in `of`
    a, b = edges[k] + radius, edges[k + 1] - radius
    return (a, b) if a <= b else ((a + b) / 2, (a + b) / 2)
