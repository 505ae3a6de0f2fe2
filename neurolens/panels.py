"""Unit panels (Microscope's layout) and multi-unit grids, blurred by default.

A unit panel, top to bottom: the title (model, layer, unit) and the unit's NSFW indicators (correlation
and the bar it must reach, top-image and top-text NSFW shares, FLAGGED), the feature visualization(s), the
top dataset crops (centred on the cell where the unit fired hardest), and the top texts with their cosine
and an NSFW mark. A grid is one row per unit: a feature visualization and the top crops.

Blur (unless blur=False, i.e. --no-blur): every crop and feature visualization of a FLAGGED unit; every
crop whose source image's NSFW score (the sweep's per-image score) is >= IMAGE_NSFW_THRESHOLD or unknown;
every feature visualization whose own NSFW score (nsfw_scores_for_images, cached by pixel hash) is >= the
threshold. Blurring is done on the pixels before they are pasted (neurolens.blur), with a label saying
why. When the NudeNet extra is installed, exposed regions it detects in images that are not blurred whole
are blurred too. Nothing here runs the model when the sweep, the renders and the FV scores are cached.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from . import safety
from .blur import blur_regions_with_label, blur_with_label
from .figures import crop_around_cell, fit_text, font
from .store import Cache, Record, settings_key

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
ALERT = (190, 0, 0)
PAD = 6


@dataclass
class PanelOptions:
    crops: int = 12            # top dataset crops shown per unit (panel)
    crop_pixels: int = 112
    columns: int = 6           # crops per row (panel)
    texts: int = 10            # top texts listed (panel)
    fv_pixels: int = 160
    grid_crops: int = 6        # crops per unit (grid)
    grid_pixels: int = 80


@dataclass
class Placed:
    """Where one image went in the written PNG, and whether/why it was blurred."""
    kind: str                  # "fv" or "crop"
    unit: int
    box: Tuple[int, int, int, int]   # left, top, right, bottom in the written image
    reason: Optional[str]      # None: raw pixels
    source_index: int = -1     # dataset index (crops) or seed index (fv)


@dataclass
class Figure:
    image: Image.Image
    placed: List[Placed] = field(default_factory=list)
    note: str = ""

    @property
    def blurred(self) -> int:
        return sum(p.reason is not None for p in self.placed)


# ---------------------------------------------------------------------------------------- blur decisions

def crop_blur_reason(flagged: bool, score: float, blur: bool) -> Optional[str]:
    if not blur:
        return None
    if flagged:
        return "flagged unit"
    if not np.isfinite(score):
        return "not scored"
    if score >= safety.IMAGE_NSFW_THRESHOLD:
        return f"NSFW {score:.2f}"
    return None


def apply_blur(image: Image.Image, reason: Optional[str], blur: bool) -> Tuple[Image.Image, Optional[str]]:
    """The pixels to write: blurred whole with a label, region-blurred (NudeNet), or the image unchanged."""
    if reason is not None:
        return blur_with_label(image, reason), reason
    if blur and safety.nudenet_available():
        regions = safety.detect_regions(image)
        if regions:
            return blur_regions_with_label(image, [r["box"] for r in regions], "NudeNet region"), "NudeNet region"
    return image, None


class FvScores:
    """NSFW scores of feature-visualization images, cached by (model, prompts, pixel hash): the model runs
    only for images never scored before."""

    def __init__(self, clip, cache: Optional[Cache], prompts: Optional[safety.Prompts] = None):
        self.clip, self.cache, self.prompts = clip, cache, prompts or safety.load_prompts()

    def _path(self, image: np.ndarray) -> Optional[Path]:
        if self.cache is None:
            return None
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()[:20]
        return self.cache.path("fv-nsfw", self.clip.fingerprint, "images",
                               settings_key(digest, self.prompts.identity, safety.LOGIT_SCALE))

    def scores(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = np.full(len(images), np.nan, dtype=np.float32)
        todo = []
        for i, image in enumerate(images):
            path = self._path(image)
            record = self.cache.read(path) if path is not None else None
            if record is not None:
                out[i] = float(record.attrs["score"])
            else:
                todo.append(i)
        if todo:
            fresh = safety.nsfw_scores_for_images(self.clip, [Image.fromarray(np.asarray(images[i])) for i in todo],
                                                  self.prompts)
            for i, score in zip(todo, fresh):
                out[i] = float(score)
                path = self._path(images[i])
                if path is not None:
                    self.cache.write(path, Record(arrays={}, attrs={"score": float(score)}))
        return out


# --------------------------------------------------------------------------------------------- drawing

def _text_block(lines: Sequence[Tuple[str, Tuple[int, int, int]]], width: int, size: int = 12) -> Image.Image:
    face = font(size)
    height = PAD + len(lines) * (size + 4)
    block = Image.new("RGB", (width, max(height, 1)), BACKGROUND)
    draw = ImageDraw.Draw(block)
    for row, (text, colour) in enumerate(lines):
        draw.text((PAD, PAD // 2 + row * (size + 4)), fit_text(draw, text, face, width - 2 * PAD), fill=colour, font=face)
    return block


def _tiles_row(tiles: Sequence[Image.Image], labels: Sequence[str], columns: int,
               label_size: int = 10) -> Tuple[Image.Image, List[Tuple[int, int, int, int]]]:
    """Tiles in rows of `columns`, labels underneath; returns the image and each tile's box in it."""
    if not tiles:
        return Image.new("RGB", (1, 1), BACKGROUND), []
    columns = max(1, min(columns, len(tiles)))
    tile_w = max(t.width for t in tiles)
    tile_h = max(t.height for t in tiles)
    label_h = label_size + 4
    rows = -(-len(tiles) // columns)
    image = Image.new("RGB", (PAD + columns * (tile_w + PAD), PAD + rows * (tile_h + label_h + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    face = font(label_size)
    boxes = []
    for position, (tile, label) in enumerate(zip(tiles, labels)):
        row, col = divmod(position, columns)
        x, y = PAD + col * (tile_w + PAD), PAD + row * (tile_h + label_h + PAD)
        image.paste(tile.convert("RGB"), (x, y))
        boxes.append((x, y, x + tile.width, y + tile.height))
        draw.text((x, y + tile_h + 1), fit_text(draw, label, face, tile_w), fill=INK, font=face)
    return image, boxes


def _stack(parts: Sequence[Image.Image]) -> Tuple[Image.Image, List[int]]:
    """Parts one under the other; returns the image and each part's top offset."""
    width = max(p.width for p in parts)
    height = sum(p.height for p in parts)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    tops, y = [], 0
    for part in parts:
        canvas.paste(part, (0, y))
        tops.append(y)
        y += part.height
    return canvas, tops


def _shift(box, dx: int, dy: int):
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


def nsfw_lines(sweep, unit: int) -> List[Tuple[str, Tuple[int, int, int]]]:
    s = sweep.scores
    flagged = bool(s.flagged[unit])
    text = (f"NSFW correlation {s.correlation[unit]:+.3f} (flag bar {s.correlation_bar:.2f})   "
            f"top images NSFW {100 * s.top_nsfw_share[unit]:.0f}%   top texts NSFW {100 * s.text_nsfw_share[unit]:.0f}%"
            f"   {'FLAGGED' if flagged else 'not flagged'}")
    return [(text, ALERT if flagged else INK)]


def unit_crops(sweep, dataset, unit: int, count: int, pixels: int, image_size: int):
    """(dataset index, activation, crop) of the unit's top images, from the cached scan and the dataset files."""
    from .datasets import BadImage, preprocess
    scan = sweep.scan
    out = []
    for rank in range(min(count, scan.top_k)):
        index = int(scan.top_indices[unit, rank])
        if index < 0:
            break
        try:
            source = preprocess(dataset.load(index), image_size)
        except BadImage:
            continue  # changed on disk since the scan: skipped, not fatal
        crop = crop_around_cell(source, scan.top_cells[unit, rank], scan.grid, pixels)
        out.append((index, float(scan.top_values[unit, rank]), crop))
    return out


def fv_tiles(unit: int, fv_images: Optional[np.ndarray], fv_scores: Optional[np.ndarray], flagged: bool,
             blur: bool, pixels: int) -> Tuple[List[Image.Image], List[str], List[Optional[str]]]:
    tiles, labels, reasons = [], [], []
    if fv_images is None:
        return tiles, labels, reasons
    for seed, array in enumerate(fv_images):
        image = Image.fromarray(np.asarray(array, dtype=np.uint8)).resize((pixels, pixels), Image.BICUBIC)
        score = float(fv_scores[seed]) if fv_scores is not None else float("nan")
        reason = None
        if blur:
            reason = "flagged unit" if flagged else (f"NSFW {score:.2f}" if score >= safety.IMAGE_NSFW_THRESHOLD
                                                     else ("not scored" if not np.isfinite(score) else None))
        image, reason = apply_blur(image, reason, blur)
        tiles.append(image)
        labels.append(f"feature vis. seed {seed}")
        reasons.append(reason)
    return tiles, labels, reasons


def unit_panel(sweep, dataset, unit: int, title: str, image_size: int, blur: bool = True,
               fv_images: Optional[np.ndarray] = None, fv_scores: Optional[np.ndarray] = None,
               options: PanelOptions = PanelOptions()) -> Figure:
    """One unit in Microscope's layout (module docstring)."""
    flagged = bool(sweep.scores.flagged[unit])
    parts: List[Image.Image] = []
    placed: List[Placed] = []
    width_hint = PAD + options.columns * (options.crop_pixels + PAD)

    header = _text_block([(title, INK)] + nsfw_lines(sweep, unit), max(width_hint, 640), size=13)
    parts.append(header)

    fv_t, fv_l, fv_r = fv_tiles(unit, fv_images, fv_scores, flagged, blur, options.fv_pixels)
    pending = []   # (part index, boxes, kinds...)
    if fv_t:
        parts.append(_text_block([("Feature visualization", INK)], width_hint))
        row, boxes = _tiles_row(fv_t, fv_l, len(fv_t))
        pending.append((len(parts), boxes, [("fv", i, r) for i, r in enumerate(fv_r)]))
        parts.append(row)

    crops = unit_crops(sweep, dataset, unit, options.crops, options.crop_pixels, image_size)
    tiles, labels, kinds = [], [], []
    for rank, (index, value, crop) in enumerate(crops, start=1):
        score = float(sweep.image_scores[index])
        image, reason = apply_blur(crop, crop_blur_reason(flagged, score, blur), blur)
        tiles.append(image)
        labels.append(f"#{rank} {value:.3g} nsfw {score:.2f}" if np.isfinite(score) else f"#{rank} {value:.3g}")
        kinds.append(("crop", index, reason))
    parts.append(_text_block([(f"Dataset examples (top {len(tiles)} of {sweep.scores.n_images} images)", INK)],
                             width_hint))
    if tiles:
        row, boxes = _tiles_row(tiles, labels, options.columns)
        pending.append((len(parts), boxes, kinds))
        parts.append(row)

    text_lines = [("Text (cosine with the unit's direction)", INK)]
    for text, cosine, nsfw in sweep.top_texts(unit, options.texts):
        text_lines.append((f"{cosine:+.3f}  {text}{'   [NSFW]' if nsfw else ''}", ALERT if nsfw else INK))
    parts.append(_text_block(text_lines, width_hint))

    blurred = sum(r is not None for _, _, ks in pending for _, _, r in ks)
    note = (f"{blurred} image(s) blurred (flagged unit, or NSFW score >= {safety.IMAGE_NSFW_THRESHOLD}); "
            f"--no-blur shows raw pixels" if blur else "NOT BLURRED (--no-blur): raw pixels")
    parts.append(_text_block([(note, ALERT if not blur else INK)], width_hint, size=11))

    canvas, tops = _stack(parts)
    for part_index, boxes, kinds in pending:
        for box, (kind, source, reason) in zip(boxes, kinds):
            placed.append(Placed(kind, int(unit), _shift(box, 0, tops[part_index]), reason, int(source)))
    return Figure(canvas, placed, note)


def units_grid(sweep, dataset, units: Sequence[int], title: str, image_size: int, blur: bool = True,
               fvs: Optional[Dict[int, np.ndarray]] = None, fv_scores: Optional[Dict[int, np.ndarray]] = None,
               options: PanelOptions = PanelOptions()) -> Figure:
    """One row per unit: its first feature visualization (if given) and its top crops, with a one-line
    label (unit, correlation, shares, FLAGGED)."""
    fvs, fv_scores = fvs or {}, fv_scores or {}
    width_hint = PAD + (options.grid_crops + 1) * (options.grid_pixels + PAD)
    parts = [_text_block([(title, INK)], max(width_hint, 480), size=13)]
    pending = []
    for unit in units:
        s = sweep.scores
        flagged = bool(s.flagged[unit])
        label = (f"unit {unit}  r={s.correlation[unit]:+.2f}  img {100 * s.top_nsfw_share[unit]:.0f}%  "
                 f"txt {100 * s.text_nsfw_share[unit]:.0f}%{'  FLAGGED' if flagged else ''}  "
                 + ", ".join(t for t, _, _ in sweep.top_texts(unit, 3)))
        parts.append(_text_block([(label, ALERT if flagged else INK)], width_hint, size=11))
        tiles, labels, kinds = [], [], []
        fv = fvs.get(unit)
        if fv is not None and len(fv):
            scores = fv_scores.get(unit)
            t, l, r = fv_tiles(unit, fv[:1], scores[:1] if scores is not None else None, flagged, blur,
                               options.grid_pixels)
            tiles += t
            labels += ["feature vis."]
            kinds += [("fv", 0, r[0])]
        for rank, (index, value, crop) in enumerate(
                unit_crops(sweep, dataset, unit, options.grid_crops, options.grid_pixels, image_size), start=1):
            score = float(sweep.image_scores[index])
            image, reason = apply_blur(crop, crop_blur_reason(flagged, score, blur), blur)
            tiles.append(image)
            labels.append(f"#{rank} {value:.3g}")
            kinds.append(("crop", index, reason))
        row, boxes = _tiles_row(tiles, labels, len(tiles) or 1, label_size=9)
        pending.append((len(parts), boxes, kinds, unit))
        parts.append(row)
    blurred = sum(r is not None for _, _, ks, _ in pending for _, _, r in ks)
    note = (f"{blurred} image(s) blurred (flagged unit, or NSFW score >= {safety.IMAGE_NSFW_THRESHOLD}); "
            f"--no-blur shows raw pixels" if blur else "NOT BLURRED (--no-blur): raw pixels")
    parts.append(_text_block([(note, ALERT if not blur else INK)], width_hint, size=11))
    canvas, tops = _stack(parts)
    placed = [Placed(kind, int(unit), _shift(box, 0, tops[part_index]), reason, int(source))
              for part_index, boxes, kinds, unit in pending for box, (kind, source, reason) in zip(boxes, kinds)]
    return Figure(canvas, placed, note)
