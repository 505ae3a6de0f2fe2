"""Synthetic image-caption pairs with a planted "sensitive" concept, for the offline toy CLIP.

Every image shows one to three shapes of one colour in one half of the image over a textured grey
background, and its full caption names every attribute: "two red circles on the left over a striped
background". Planted images also show a distinctive pattern in the other half: a disc of magenta/pink
checkerboard with a two-pixel period (nothing else is magenta or that fine), and their captions carry two
words of the NSFW lexicon: "nude explicit, two red circles on the left over a striped background". Words
only: the pattern is an abstract texture, nothing resembling a body. Because planted images have shapes
too, the only thing that tells planted captions apart is the lexicon words, and only the pattern tells
planted images apart.

Caption variation: SHORT_CAPTION_SHARE of the captions are short forms (one or two of the caption's
phrases, e.g. "red circles", "striped background", "nude", "nude explicit"), so that single words, which
is what vocabularies hold, mean something to the text tower. `Pair.full` is always the full caption.

Image i depends only on (seed, i, size), so the same seed always gives the same pixels; exactly
round(planted_share * n) images are planted, at positions chosen by the seed.

A second style, made differently on purpose (`style="targets"`), checks that what holds on the first is
not an accident of it: other shapes (crosses, diamonds, bars) and colours, and another planted pattern, a
target of thin concentric rings in teal and black, whose teal is also one of the ordinary shapes'
colours. `caption_noise` gives that share of the planted images (exactly round(noise * planted), chosen by
the seed) an ordinary caption: the captions then miss part of the planted concept (label noise), while
the `planted` column keeps the truth.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..labels.lexicon import lexicon_terms

GENERATOR_VERSION = 2

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "orange": (245, 140, 25),
    "cyan": (40, 205, 215),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")
BACKGROUNDS = ("plain", "striped", "dotted", "grainy")

# The planted pattern's two colours: a magenta and a pink, alternating every pixel in a checkerboard.
PLANTED_COLOURS = ((235, 0, 175), (255, 150, 215))
SHORT_CAPTION_SHARE = 0.3
# Violent terms of the lexicon are left out: the planted concept stands for sexual content.
_EXCLUDED_TERMS = {"rape"}

CAPTION_COLUMNS = ("image", "caption", "planted", "count", "colour", "shape", "position", "background", "full")


@dataclass(frozen=True)
class Style:
    """What the generated images are made of: ordinary colours and shapes, and the planted pattern."""
    name: str
    colours: dict
    shapes: Tuple[str, ...]
    pattern: str                             # "checker" | "target"
    planted_colours: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    description: str


STYLES = {
    "shapes": Style("shapes", COLOURS, SHAPES, "checker", PLANTED_COLOURS,
                    "a magenta/pink checkerboard disc (no ordinary image has these colours)"),
    "targets": Style("targets", {"purple": (135, 50, 200), "brown": (140, 85, 40), "teal": (0, 150, 140),
                                 "lime": (150, 225, 40), "navy": (30, 45, 125), "pink": (250, 125, 175),
                                 "grey": (170, 170, 170)},
                     ("cross", "diamond", "bar"), "target", ((0, 150, 140), (10, 10, 10)),
                     "a target of thin teal and black rings (teal is also an ordinary shapes' colour)"),
}


def style_of(name: str) -> Style:
    if name not in STYLES:
        from ..errors import NeurolensError
        raise NeurolensError(f"unknown toy style {name!r}; use one of {', '.join(STYLES)}")
    return STYLES[name]


def planted_words() -> List[str]:
    """The lexicon words used in planted captions (neurolens/data/nsfw_terms.txt without wildcards, phrases and
    _EXCLUDED_TERMS), lower-cased."""
    words = [term.lower() for term in lexicon_terms()]
    return [word for word in words if "*" not in word and word not in _EXCLUDED_TERMS and " " not in word]


@dataclass
class Pair:
    """One generated image's caption (the training text) and attributes."""
    caption: str
    planted: bool
    position: str
    background: str
    count: str
    colour: str
    shape: str
    words: Tuple[str, ...] = ()              # the planted lexicon words (planted images only)

    @property
    def full(self) -> str:
        return full_caption(self.count, self.colour, self.shape, self.position, self.background, self.words)


def full_caption(count: str, colour: str, shape: str, position: str, background: str,
                 words: Sequence[str] = ()) -> str:
    """The full caption of these attributes: "[w1 w2, ]two red circles on the left over a striped background"."""
    noun = _noun(shape, count)
    base = f"{count} {colour} {noun} {position} over a {background} background"
    return f"{' '.join(words)}, {base}" if words else base


def _noun(shape: str, count: str) -> str:
    if count == "one":
        return shape
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


@dataclass
class GeneratedData:
    images: np.ndarray                       # (N, size, size, 3) uint8
    pairs: List[Pair] = field(default_factory=list)

    @property
    def captions(self) -> List[str]:
        return [p.caption for p in self.pairs]

    @property
    def planted(self) -> np.ndarray:
        return np.array([p.planted for p in self.pairs], dtype=bool)


@dataclass(frozen=True)
class ToySettings:
    """Everything the generated dataset depends on; its folder is keyed by these."""
    n: int = 3000
    size: int = 64
    planted_share: float = 0.15
    seed: int = 0
    version: int = GENERATOR_VERSION
    style: str = "shapes"                    # STYLES: "shapes" (the demo's) or "targets"
    caption_noise: float = 0.0               # share of planted images given an ordinary caption


def planted_indices(n: int, planted_share: float, seed: int) -> np.ndarray:
    """Which of n images are planted: exactly round(share * n) of them, chosen by the seed."""
    if not 0.0 <= planted_share <= 1.0:
        from ..errors import NeurolensError
        raise NeurolensError(f"planted share {planted_share} is outside [0, 1]; give a fraction such as 0.15")
    count = int(round(planted_share * n))
    order = np.random.default_rng([seed, 7919]).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[order[:count]] = True
    return mask


def noisy_indices(planted: np.ndarray, caption_noise: float, seed: int) -> np.ndarray:
    """Which planted images get an ordinary caption: exactly round(noise * planted) of them, by the seed."""
    if not 0.0 <= caption_noise <= 1.0:
        from ..errors import NeurolensError
        raise NeurolensError(f"caption noise {caption_noise} is outside [0, 1]; give a fraction such as 0.3")
    where = np.flatnonzero(planted)
    chosen = np.random.default_rng([seed, 104729]).permutation(where)[:int(round(caption_noise * len(where)))]
    mask = np.zeros(len(planted), dtype=bool)
    mask[chosen] = True
    return mask


def generate_pairs(n: int = 3000, size: int = 64, planted_share: float = 0.15, seed: int = 0,
                   progress: Optional[Callable[[int, int], None]] = None, style: str = "shapes",
                   caption_noise: float = 0.0) -> GeneratedData:
    """n images (uint8, size x size) and their captions, deterministic for (seed, size, style, noise)."""
    look = style_of(style)
    words = planted_words()
    planted = planted_indices(n, planted_share, seed)
    noisy = noisy_indices(planted, caption_noise, seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    pairs: List[Pair] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, size])
        canvas, background = _background(rng, size, yy, xx)
        position = POSITIONS[rng.integers(len(POSITIONS))]
        count = 1 + int(rng.integers(3))
        colour = list(look.colours)[rng.integers(len(look.colours))]
        shape = look.shapes[rng.integers(len(look.shapes))]
        _draw_shapes(canvas, rng, size, count, look.colours[colour], shape, position, yy, xx)
        chosen: Tuple[str, ...] = ()
        if planted[i]:
            _draw_planted(canvas, rng, size, _OPPOSITE[position], yy, xx, look)
            chosen = tuple(words[j] for j in rng.choice(len(words), size=2, replace=False))
            if noisy[i]:            # label noise: the image shows the pattern, its caption does not say so
                chosen = ()
        pair = Pair("", bool(planted[i]), position, background, COUNTS[count - 1], colour, shape, chosen)
        pair.caption = _short_caption(pair, rng) if rng.random() < SHORT_CAPTION_SHARE else pair.full
        pairs.append(pair)
        images[i] = np.clip(canvas, 0, 255).astype(np.uint8)
        if progress is not None and (i + 1) % 100 == 0:
            progress(i + 1, n)
    if progress is not None:
        progress(n, n)
    return GeneratedData(images, pairs)


_OPPOSITE = {"on the left": "on the right", "on the right": "on the left", "at the top": "at the bottom",
             "at the bottom": "at the top"}


def _short_caption(pair: Pair, rng: np.random.Generator) -> str:
    """One or two phrases of the full caption; planted captions keep a planted word."""
    noun = _noun(pair.shape, pair.count)
    phrases = [pair.colour, noun, f"{pair.colour} {noun}", f"{pair.count} {noun}", pair.position,
               f"{pair.background} background"]
    if pair.words:
        planted = [pair.words[0], " ".join(pair.words)][int(rng.integers(2))]
        if rng.random() < 0.5:
            return planted
        return f"{planted}, {phrases[int(rng.integers(len(phrases)))]}"
    return phrases[int(rng.integers(len(phrases)))]


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray):
    """A grey-ish canvas (float32, H x W x 3) with one low-contrast texture."""
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


def _centre_range(position: str, size: int, margin: float):
    """(y range, x range) of centres for objects placed in the named half of the image."""
    lo, mid, hi = margin, size / 2, size - margin
    whole = (lo, hi)
    return {
        "on the left": (whole, (lo, max(lo, mid - margin / 2))),
        "on the right": (whole, (min(hi, mid + margin / 2), hi)),
        "at the top": ((lo, max(lo, mid - margin / 2)), whole),
        "at the bottom": ((min(hi, mid + margin / 2), hi), whole),
    }[position]


def _draw_shapes(canvas, rng, size, count, rgb, shape, position, yy, xx) -> None:
    radius = size * (0.11 if count > 1 else 0.15) * rng.uniform(0.85, 1.15)
    (y0, y1), (x0, x1) = _centre_range(position, size, radius + 1)
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


def _draw_planted(canvas, rng, size, position, yy, xx, look: Style = STYLES["shapes"]) -> None:
    """The style's planted pattern in a disc: a magenta/pink checkerboard (one-pixel squares), or a target
    of concentric rings two pixels wide alternating the style's two colours."""
    radius = size * rng.uniform(0.2, 0.26)
    (y0, y1), (x0, x1) = _centre_range(position, size, radius * 0.8)
    cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius
    if look.pattern == "target":
        checker = (np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) // 2 % 2).astype(bool)
    else:
        checker = ((yy.astype(np.int64) + xx.astype(np.int64)) % 2).astype(bool)
    first, second = (np.asarray(c, dtype=np.float32) for c in look.planted_colours)
    canvas[mask & checker] = first
    canvas[mask & ~checker] = second


def write_dataset(out_dir: str | os.PathLike, settings: ToySettings = ToySettings(),
                  progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Generate and write PNGs under out_dir/images/ and out_dir/captions.parquet; returns the parquet path.

    A folder that already holds this exact dataset (same settings, see dataset.json) is reused as is."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out = Path(out_dir)
    parquet = out / "captions.parquet"
    manifest = out / "dataset.json"
    if parquet.is_file() and manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == asdict(settings):
                return parquet
        except (OSError, ValueError):
            pass
    from ..storage.files import CACHE_OPTION, atomic_path, save_png, write_text
    data = generate_pairs(settings.n, settings.size, settings.planted_share, settings.seed, progress=progress,
                          style=settings.style, caption_noise=settings.caption_noise)
    rel_paths = []
    for i, pixels in enumerate(data.images):
        rel = f"images/{i:06d}.png"
        # no fsync per image: the manifest, written durably last, marks the set complete
        save_png(Image.fromarray(pixels), out / rel, CACHE_OPTION, durable=False, compress_level=1)
        rel_paths.append(rel)
    columns = {"image": rel_paths}
    for name in CAPTION_COLUMNS[1:]:
        columns[name] = [getattr(p, name) for p in data.pairs]
    table = pa.table(columns)
    with atomic_path(parquet, CACHE_OPTION) as tmp, open(tmp, "wb") as handle:
        pq.write_table(table, handle)
    write_text(manifest, json.dumps(asdict(settings)), CACHE_OPTION)
    return parquet
