"""Unit panels (Microscope's layout) and multi-unit grids, blurred by default.

A unit panel, top to bottom: the title (model, layer, unit) and the unit's NSFW evidence (AUC and q against
the sweep's label sources with the rule's bars, correlation, top-image and top-text shares, FLAGGED), the
feature visualization(s), the top dataset crops (centred on the cell where the unit fired hardest, with the
image's label: + positive, - negative, ? unknown), and the top texts with their cosine and an NSFW mark.
A grid is one row per unit: a feature visualization and the top crops.

Blur: the caller's BlurPolicy (neurolens.labels.policy) decides for every tile; crops are judged on their
whole source image. Blurring is done on the pixels before they are pasted (neurolens.labels.blur), with a label
saying why. Nothing here runs the model when the sweep and the renders are cached (the policy keeps its
detector and zero-shot scores in the cache).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..datasets.decode import BadImage, preprocess
from ..labels.policy import BlurPolicy, blur_note
from ..scoring.flags import text_share_words
from .figures import crop_around_cell, fit_text, font

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


def _empty_tile(pixels: int, text: str) -> Image.Image:
    """A light grey placeholder where a row has no image (no pixels from the data)."""
    tile = Image.new("RGB", (pixels, pixels), (235, 235, 235))
    draw = ImageDraw.Draw(tile)
    draw.text((4, pixels // 2 - 6), fit_text(draw, text, font(9), pixels - 8), fill=(120, 120, 120), font=font(9))
    return tile


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


def _share(value: float) -> str:
    return f"{100 * float(value):.0f}%" if np.isfinite(value) else "n/a"


def _stat(value: float, spec: str) -> str:
    return format(float(value), spec) if np.isfinite(value) else "n/a"


def nsfw_lines(sweep, unit: int) -> List[Tuple[str, Tuple[int, int, int]]]:
    """The unit's evidence: AUC and q against the label sources (and the rule's bars), correlation, the
    positive share of its top images and the NSFW share of its top texts, FLAGGED / text flag."""
    s = sweep.scores
    flagged = bool(s.flagged[unit])
    status = "FLAGGED" if flagged else ("text flag only" if s.text_flag[unit] else "not flagged")
    first = (f"NSFW AUC {_stat(s.auc[unit], '.3f')} (bar {s.rule.min_auc:g})   q {_stat(s.q[unit], '.2g')} "
             f"(bar {s.rule.max_q:g})   correlation {s.correlation[unit]:+.3f}   {status}")
    second = (f"labels: {' + '.join(s.sources) or 'none'} ({s.n_pos} positive / {s.n_neg} negative images)   "
              f"top images positive {100 * s.top_nsfw_share[unit]:.0f}%   {text_share_words(s.text_nsfw_share[unit])}")
    return [(first, ALERT if flagged else INK), (second, INK)]


def unit_crops(sweep, dataset, unit: int, count: int, pixels: int, image_size: int):
    """(dataset index, activation, crop, source image) of the unit's top images, from the cached scan and the
    dataset files."""
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
        out.append((index, float(scan.top_values[unit, rank]), crop, source))
    return out


def fv_tiles(unit: int, fv_images: Optional[np.ndarray], policy: BlurPolicy, pixels: int
             ) -> Tuple[List[Image.Image], List[str], List[Optional[str]]]:
    """The unit's feature visualizations as tiles of `pixels`, judged at full size, blurred as the policy says."""
    tiles, labels, reasons = [], [], []
    for seed, array in enumerate(fv_images if fv_images is not None else []):
        image = Image.fromarray(np.asarray(array, dtype=np.uint8))
        reason = policy.reason_fv(unit, image)
        tiles.append(policy.apply(image.resize((pixels, pixels), Image.BICUBIC), reason))
        labels.append(f"feature vis. seed {seed}")
        reasons.append(reason)
    return tiles, labels, reasons


def crop_tiles(sweep, dataset, unit: int, policy: BlurPolicy, count: int, pixels: int, image_size: int):
    """The unit's top crops, blurred as the policy says: (tiles, [(index, activation)], reasons)."""
    tiles, ranked, reasons = [], [], []
    for index, value, crop, source in unit_crops(sweep, dataset, unit, count, pixels, image_size):
        reason = policy.reason_image(unit, index, source)
        tiles.append(policy.apply(crop, reason))
        ranked.append((index, value))
        reasons.append(reason)
    return tiles, ranked, reasons


def unit_panel(sweep, dataset, unit: int, title: str, image_size: int, policy: BlurPolicy,
               fv_images: Optional[np.ndarray] = None, options: PanelOptions = PanelOptions()) -> Figure:
    """One unit in Microscope's layout (module docstring)."""
    parts: List[Image.Image] = []
    placed: List[Placed] = []
    width_hint = PAD + options.columns * (options.crop_pixels + PAD)

    header = _text_block([(title, INK)] + nsfw_lines(sweep, unit), max(width_hint, 640), size=13)
    parts.append(header)

    fv_t, fv_l, fv_r = fv_tiles(unit, fv_images, policy, options.fv_pixels)
    pending = []   # (part index, boxes, kinds...)
    if fv_t:
        parts.append(_text_block([("Feature visualization", INK)], width_hint))
        row, boxes = _tiles_row(fv_t, fv_l, len(fv_t))
        pending.append((len(parts), boxes, [("fv", i, r) for i, r in enumerate(fv_r)]))
        parts.append(row)

    tiles, ranked, reasons = crop_tiles(sweep, dataset, unit, policy, options.crops, options.crop_pixels,
                                        image_size)
    labels, kinds = [], []
    for rank, ((index, value), reason) in enumerate(zip(ranked, reasons), start=1):
        score = float(sweep.image_scores[index])
        labels.append(f"#{rank} {value:.3g} " + ("label ?" if not np.isfinite(score) else
                                                    ("label +" if score >= 0.5 else "label -")))
        kinds.append(("crop", index, reason))
    parts.append(_text_block([(f"Dataset examples (top {len(tiles)} of {sweep.scan.count} images)", INK)],
                             width_hint))
    if tiles:
        row, boxes = _tiles_row(tiles, labels, options.columns)
        pending.append((len(parts), boxes, kinds))
        parts.append(row)

    text_lines = [("Text (cosine with the unit's direction; [NSFW: lexicon] or [NSFW: zero-shot (model-based)], the "
                   "latter only where the reliability check kept it)", INK)]
    marks = sweep.text_marks(unit, options.texts)
    for (text, cosine, _), mark in zip(sweep.top_texts(unit, options.texts), marks):
        text_lines.append((f"{cosine:+.3f}  {text}{f'   [NSFW: {mark}]' if mark else ''}", ALERT if mark else INK))
    parts.append(_text_block(text_lines, width_hint))

    note = blur_note([r for _, _, ks in pending for _, _, r in ks], policy.blur)
    parts.append(_text_block([(note, ALERT if not policy.blur else INK)], width_hint, size=11))

    canvas, tops = _stack(parts)
    for part_index, boxes, kinds in pending:
        for box, (kind, source, reason) in zip(boxes, kinds):
            placed.append(Placed(kind, int(unit), _shift(box, 0, tops[part_index]), reason, int(source)))
    return Figure(canvas, placed, note)


def units_grid(sweep, dataset, units: Sequence[int], title: str, image_size: int, policy: BlurPolicy,
               fvs: Optional[Dict[int, np.ndarray]] = None, options: PanelOptions = PanelOptions()) -> Figure:
    """One row per unit: its first feature visualization (if given) and its top crops, with a one-line
    label (unit, AUC, q, shares, FLAGGED)."""
    fvs = fvs or {}
    # a feature-visualization column when any shown unit has one; a unit without one gets an empty tile there,
    # so that every row's crops start in the same column
    fv_column = any(fvs.get(unit) is not None and len(fvs[unit]) for unit in units)
    width_hint = PAD + (options.grid_crops + 1) * (options.grid_pixels + PAD)
    parts = [_text_block([(title, INK)], max(width_hint, 480), size=13)]
    pending = []
    for unit in units:
        s = sweep.scores
        flagged = bool(s.flagged[unit])
        label = (f"{getattr(sweep, 'unit_word', 'unit')} {unit}  AUC {_stat(s.auc[unit], '.3f')}  q {_stat(s.q[unit], '.1e')}  "
                 f"img {100 * s.top_nsfw_share[unit]:.0f}%  txt {_share(s.text_nsfw_share[unit])}"
                 f"{'  FLAGGED' if flagged else ''}  "
                 + ", ".join(t for t, _, _ in sweep.top_texts(unit, 3)))
        parts.append(_text_block([(label, ALERT if flagged else INK)], width_hint, size=11))
        tiles, labels, kinds = [], [], []
        fv = fvs.get(unit)
        if fv is not None and len(fv):
            t, _, r = fv_tiles(unit, fv[:1], policy, options.grid_pixels)
            tiles += t
            labels += ["feature vis."]
            kinds += [("fv", 0, r[0])]
        elif fv_column:
            tiles.append(_empty_tile(options.grid_pixels, "no visualization"))
            labels.append("")
        crops, ranked, reasons = crop_tiles(sweep, dataset, unit, policy, options.grid_crops, options.grid_pixels,
                                            image_size)
        tiles += crops
        for rank, ((index, value), reason) in enumerate(zip(ranked, reasons), start=1):
            labels.append(f"#{rank} {value:.3g}")
            kinds.append(("crop", index, reason))
        row, boxes = _tiles_row(tiles, labels, len(tiles) or 1, label_size=9)
        pending.append((len(parts), boxes[len(boxes) - len(kinds):], kinds, unit))   # not the placeholder's box
        parts.append(row)
    note = blur_note([r for _, _, ks, _ in pending for _, _, r in ks], policy.blur)
    parts.append(_text_block([(note, ALERT if not policy.blur else INK)], width_hint, size=11))
    canvas, tops = _stack(parts)
    placed = [Placed(kind, int(unit), _shift(box, 0, tops[part_index]), reason, int(source))
              for part_index, boxes, kinds, unit in pending for box, (kind, source, reason) in zip(boxes, kinds)]
    return Figure(canvas, placed, note)
