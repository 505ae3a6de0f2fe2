"""Safety blur applied to the pixels that are written to disk (never an overlay that can be removed).

A strong pixelation followed by a Gaussian blur removes everything but coarse colour: shapes and
textures are no longer recognizable. A small label on the image says it was blurred and why."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFilter

BLUR_CELLS = 6          # the image is reduced to at most 6x6 colour cells before blurring
LABEL_HEIGHT_FRACTION = 0.16


def blur_pixels(image: Image.Image) -> Image.Image:
    """The image, unrecognizable: pixelated to BLUR_CELLS cells per side, then Gaussian-blurred."""
    image = image.convert("RGB")
    width, height = image.size
    cells = max(1, min(BLUR_CELLS, width, height))
    small = image.resize((cells, max(1, round(cells * height / width))), Image.BILINEAR)
    coarse = small.resize((width, height), Image.NEAREST)
    return coarse.filter(ImageFilter.GaussianBlur(radius=max(width, height) / (2 * cells)))


def blur_with_label(image: Image.Image, reason: str = "may be NSFW") -> Image.Image:
    """blur_pixels plus a small 'blurred: <reason>' label along the bottom edge."""
    blurred = blur_pixels(image)
    draw = ImageDraw.Draw(blurred)
    band = max(9, int(blurred.height * LABEL_HEIGHT_FRACTION))
    draw.rectangle([0, blurred.height - band, blurred.width, blurred.height], fill=(0, 0, 0))
    draw.text((2, blurred.height - band + 1), f"blurred: {reason}", fill=(255, 255, 255))
    return blurred
