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

Multi-concept mode (`concepts="multi"`, neurolens.toy.concepts) plants three concepts, each an abstract
pattern with its own caption lexicon: round(planted_share * n) images show each concept alone,
round(intersection_share * n) show two of them together (side by side in the other half, their captions
carrying both lexicons' words), the rest none. Its table adds one bool truth column per concept
(`planted_nsfw`, `planted_violence`, `planted_drugs`); `planted` is then true where any concept is shown.
The single-concept mode's output is unchanged by it (same pixels, captions and columns).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..errors import NeurolensError
from ..storage.files import CACHE_OPTION, atomic_path, save_png, write_text
from .concepts import PLANTED_COLOURS, Concept, assign_concepts, check_mode, multi_concepts, planted_words, truth_column
from .draw import OPPOSITE, POSITIONS, background, draw_planted, draw_shapes

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
SHORT_CAPTION_SHARE = 0.3
# Two patterns shown together are smaller, to fit side by side in one half of the image.
PAIR_RADIUS = (0.16, 0.2)

CAPTION_COLUMNS = ("image", "caption", "planted", "count", "colour", "shape", "position", "background", "full")


@dataclass(frozen=True)
class Style:
    """What the generated images are made of: ordinary colours and shapes, and the planted pattern."""
    name: str
    colours: dict
    shapes: Tuple[str, ...]
    pattern: str                             # "checker" | "target"
    planted_colours: Optional[Tuple[Tuple[int, int, int], Tuple[int, int, int]]]   # None: the background's greys
    description: str


STYLES = {
    "shapes": Style("shapes", COLOURS, SHAPES, "checker", PLANTED_COLOURS,
                    "a magenta/pink checkerboard disc (no ordinary image has these colours)"),
    "targets": Style("targets", {"purple": (135, 50, 200), "brown": (140, 85, 40), "teal": (0, 150, 140),
                                 "lime": (150, 225, 40), "navy": (30, 45, 125), "pink": (250, 125, 175),
                                 "grey": (170, 170, 170)},
                     ("cross", "diamond", "bar"), "target", ((0, 150, 140), (10, 10, 10)),
                     "a target of thin teal and black rings (teal is also an ordinary shapes' colour)"),
    "camouflage": Style("camouflage", COLOURS, SHAPES, "checker", None,
                        "a one-pixel checkerboard disc in two greys of the background's own tone (no colour of "
                        "its own)"),
}


def style_of(name: str) -> Style:
    if name not in STYLES:
        raise NeurolensError(f"unknown toy style {name!r}; use one of {', '.join(STYLES)}")
    return STYLES[name]


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
    concepts: Tuple[str, ...] = ()           # the planted concepts shown (empty for ordinary images)

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
    """Everything the generated dataset depends on; its folder is keyed by `identity()`."""
    n: int = 3000
    size: int = 64
    planted_share: float = 0.15              # multi-concept mode: the share of EACH concept shown alone
    seed: int = 0
    version: int = GENERATOR_VERSION
    style: str = "shapes"                    # STYLES: "shapes" (the demo's) or "targets"
    caption_noise: float = 0.0               # share of planted images given an ordinary caption
    concepts: str = "single"                 # "single" (nsfw only) or "multi" (neurolens.toy.concepts)
    intersection_share: float = 0.05         # multi: the share showing INTERSECTION's two concepts together
    caption_words: int = 2                   # lexicon words per shown concept in a planted full caption

    def identity(self) -> dict:
        """The settings as a dict for cache keys and dataset.json: a single-concept dataset leaves out the
        fields added with multi-concept mode while they hold their defaults, so its keys stay as they were."""
        values = asdict(self)
        if self.concepts == "single":
            for name in _LATER_FIELDS:
                if values[name] == _DEFAULTS[name]:
                    del values[name]
        return values


_LATER_FIELDS = ("concepts", "intersection_share", "caption_words")
_DEFAULTS = {name: ToySettings.__dataclass_fields__[name].default for name in _LATER_FIELDS}


def planted_indices(n: int, planted_share: float, seed: int) -> np.ndarray:
    """Which of n images are planted: exactly round(share * n) of them, chosen by the seed."""
    if not 0.0 <= planted_share <= 1.0:
        raise NeurolensError(f"planted share {planted_share} is outside [0, 1]; give a fraction such as 0.15")
    count = int(round(planted_share * n))
    order = np.random.default_rng([seed, 7919]).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[order[:count]] = True
    return mask


def noisy_indices(planted: np.ndarray, caption_noise: float, seed: int) -> np.ndarray:
    """Which planted images get an ordinary caption: exactly round(noise * planted) of them, by the seed."""
    if not 0.0 <= caption_noise <= 1.0:
        raise NeurolensError(f"caption noise {caption_noise} is outside [0, 1]; give a fraction such as 0.3")
    where = np.flatnonzero(planted)
    chosen = np.random.default_rng([seed, 104729]).permutation(where)[:int(round(caption_noise * len(where)))]
    mask = np.zeros(len(planted), dtype=bool)
    mask[chosen] = True
    return mask


def generate_pairs(n: int = 3000, size: int = 64, planted_share: float = 0.15, seed: int = 0,
                   progress: Optional[Callable[[int, int], None]] = None, style: str = "shapes",
                   caption_noise: float = 0.0, concepts: str = "single", intersection_share: float = 0.05,
                   caption_words: int = 2) -> GeneratedData:
    """n images (uint8, size x size) and their captions, deterministic for (seed, size, style, noise) and,
    in multi-concept mode, the shares and caption words."""
    look = style_of(style)
    check_mode(concepts)
    if concepts == "multi":
        if style != "shapes":
            raise NeurolensError(f"multi-concept mode draws the shapes style; style {style!r} is single-concept "
                                 f"only")
        shown = assign_concepts(n, planted_share, intersection_share, seed)
        planted = np.array([bool(s) for s in shown], dtype=bool)
        patterns = {c.name: c for c in multi_concepts()}
    else:
        planted = planted_indices(n, planted_share, seed)
        nsfw = Concept("nsfw", tuple(planted_words()), look.pattern, look.planted_colours, look.description)
        shown = [("nsfw",) if p else () for p in planted]
        patterns = {"nsfw": nsfw}
    if not 1 <= caption_words <= min(len(c.terms) for c in patterns.values()):
        raise NeurolensError(f"caption words {caption_words} must be between 1 and the smallest lexicon's size")
    noisy = noisy_indices(planted, caption_noise, seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    pairs: List[Pair] = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, size])
        canvas, texture = background(rng, size, yy, xx)
        position = POSITIONS[rng.integers(len(POSITIONS))]
        count = 1 + int(rng.integers(3))
        colour = list(look.colours)[rng.integers(len(look.colours))]
        shape = look.shapes[rng.integers(len(look.shapes))]
        draw_shapes(canvas, rng, size, count, look.colours[colour], shape, position, yy, xx)
        chosen: Tuple[str, ...] = ()
        for k, name in enumerate(shown[i]):
            concept = patterns[name]
            together = len(shown[i]) > 1
            draw_planted(canvas, rng, size, OPPOSITE[position], yy, xx, concept.pattern, concept.colours,
                         slot=(k, len(shown[i])) if together else None,
                         **({"radius_range": PAIR_RADIUS} if together else {}))
        for name in shown[i]:
            terms = patterns[name].terms
            chosen += tuple(terms[j] for j in rng.choice(len(terms), size=caption_words, replace=False))
        if noisy[i]:                # label noise: the image shows the pattern, its caption does not say so
            chosen = ()
        pair = Pair("", bool(planted[i]), position, texture, COUNTS[count - 1], colour, shape, chosen,
                    tuple(shown[i]))
        pair.caption = _short_caption(pair, rng) if rng.random() < SHORT_CAPTION_SHARE else pair.full
        pairs.append(pair)
        images[i] = np.clip(canvas, 0, 255).astype(np.uint8)
        if progress is not None and (i + 1) % 100 == 0:
            progress(i + 1, n)
    if progress is not None:
        progress(n, n)
    return GeneratedData(images, pairs)


def _short_caption(pair: Pair, rng: np.random.Generator) -> str:
    """One or two phrases of the full caption; planted captions keep a planted word of every concept shown."""
    noun = _noun(pair.shape, pair.count)
    phrases = [pair.colour, noun, f"{pair.colour} {noun}", f"{pair.count} {noun}", pair.position,
               f"{pair.background} background"]
    if pair.words:
        first_words = " ".join(pair.words[::len(pair.words) // len(pair.concepts)])
        planted = [first_words, " ".join(pair.words)][int(rng.integers(2))]
        if rng.random() < 0.5:
            return planted
        return f"{planted}, {phrases[int(rng.integers(len(phrases)))]}"
    return phrases[int(rng.integers(len(phrases)))]


def write_dataset(out_dir: str | os.PathLike, settings: ToySettings = ToySettings(),
                  progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Generate and write PNGs under out_dir/images/ and out_dir/captions.parquet; returns the parquet path.
    The table's columns: CAPTION_COLUMNS, and in multi-concept mode one bool `planted_<concept>` per concept.

    A folder that already holds this exact dataset (same settings, see dataset.json) is reused as is."""

    out = Path(out_dir)
    parquet = out / "captions.parquet"
    manifest = out / "dataset.json"
    if parquet.is_file() and manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == settings.identity():
                return parquet
        except (OSError, ValueError):
            pass
    data = generate_pairs(settings.n, settings.size, settings.planted_share, settings.seed, progress=progress,
                          style=settings.style, caption_noise=settings.caption_noise, concepts=settings.concepts,
                          intersection_share=settings.intersection_share, caption_words=settings.caption_words)
    rel_paths = []
    for i, pixels in enumerate(data.images):
        rel = f"images/{i:06d}.png"
        # no fsync per image: the manifest, written durably last, marks the set complete
        save_png(Image.fromarray(pixels), out / rel, CACHE_OPTION, durable=False, compress_level=1)
        rel_paths.append(rel)
    columns = {"image": rel_paths}
    for name in CAPTION_COLUMNS[1:]:
        columns[name] = [getattr(p, name) for p in data.pairs]
    if settings.concepts == "multi":          # one truth column per planted concept
        for concept in multi_concepts():
            columns[truth_column(concept.name)] = [concept.name in p.concepts for p in data.pairs]
    table = pa.table(columns)
    with atomic_path(parquet, CACHE_OPTION) as tmp, open(tmp, "wb") as handle:
        pq.write_table(table, handle)
    write_text(manifest, json.dumps(settings.identity()), CACHE_OPTION)
    return parquet
