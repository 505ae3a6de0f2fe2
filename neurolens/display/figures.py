"""Pillow primitives for figures: a crop centred on a layer cell, and a labelled grid of tiles.

Blurring is the caller's decision and happens (with neurolens/blur.py) on the tiles before they are
passed to tile_grid, so the written pixels are the blurred ones."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

CROP_WINDOW = 0.5          # the crop's side as a fraction of the (centre-cropped) input image's side
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def cell_center(cell: Sequence[int], grid_hw: Sequence[int], image_hw: Sequence[int]) -> Tuple[float, float]:
    """(x, y) pixel centre of layer cell (row, col) on a grid of grid_hw over an image of image_hw.

    Cell (r, c) of an H x W map covers rows [r, r+1) * image_h / H of the input: its centre is at
    (c + 0.5) * image_w / W, (r + 0.5) * image_h / H."""
    row, col = int(cell[0]), int(cell[1])
    grid_h, grid_w = max(1, int(grid_hw[0])), max(1, int(grid_hw[1]))
    image_h, image_w = image_hw
    return (col + 0.5) * image_w / grid_w, (row + 0.5) * image_h / grid_h


def crop_around_cell(image: Image.Image, cell: Sequence[int], grid_hw: Sequence[int], out_size: int,
                     window: float = CROP_WINDOW) -> Image.Image:
    """A square crop of `image` (the centre-cropped model input) centred on `cell`, Microscope style,
    resized to out_size x out_size. The window is `window` x the image's shorter side; near an edge it is
    shifted inside the image rather than padded."""
    left, top, side = crop_box(image.size, cell, grid_hw, window)
    crop = image.convert("RGB").crop((left, top, left + side, top + side))
    return crop.resize((int(out_size), int(out_size)), Image.BICUBIC)


def crop_box(image_wh: Sequence[int], cell: Sequence[int], grid_hw: Sequence[int],
             window: float = CROP_WINDOW) -> Tuple[int, int, int]:
    """(left, top, side) in image pixels of the square that crop_around_cell cuts out (the web app draws
    the unit's activation map over exactly this window)."""
    width, height = int(image_wh[0]), int(image_wh[1])
    side = max(1, min(width, height, int(round(window * min(width, height)))))
    cx, cy = cell_center(cell, grid_hw, (height, width))
    left = min(max(0, int(round(cx - side / 2))), width - side)
    top = min(max(0, int(round(cy - side / 2))), height - side)
    return left, top, side


def tile_grid(tiles: List[Image.Image], labels: List[str], columns: int, title: Optional[str] = None,
              pad: int = 4, label_height: int = 16) -> Image.Image:
    """Tiles in rows of `columns`, each with its label underneath, and an optional title line on top.
    Tiles may differ in size: each cell is as large as the largest tile."""
    if len(labels) != len(tiles):
        raise ValueError("tile_grid needs one label per tile")
    columns = max(1, min(int(columns), len(tiles) or 1))
    rows = -(-len(tiles) // columns) if tiles else 0
    tile_w = max((t.width for t in tiles), default=64)
    tile_h = max((t.height for t in tiles), default=64)
    label_font = font(max(9, label_height - 4))
    title_font = font(14)
    title_h = 22 if title else 0
    width = pad + columns * (tile_w + pad)
    height = title_h + pad + rows * (tile_h + label_height + pad)
    canvas = Image.new("RGB", (width, max(height, title_h + pad)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill=TEXT, font=title_font)
    for position, (tile, label) in enumerate(zip(tiles, labels)):
        row, col = divmod(position, columns)
        x = pad + col * (tile_w + pad)
        y = title_h + pad + row * (tile_h + label_height + pad)
        canvas.paste(tile.convert("RGB"), (x, y))
        draw.text((x, y + tile_h + 1), fit_text(draw, str(label), label_font, tile_w), fill=TEXT, font=label_font)
    return canvas


def fit_text(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> str:
    """The text, shortened with an ellipsis to fit `width` pixels (labels, captions, panel lines)."""
    if draw.textlength(text, font=face) <= width:
        return text
    while text and draw.textlength(text + "…", font=face) > width:
        text = text[:-1]
    return text + "…"
