"""Reading and decoding one dataset item safely: bytes from a file or a tar member, bytes -> RGB PIL image,
and CLIP's resize and centre crop. Every failure is a BadImage carrying the reason the scan shows in its
skip list; nothing here trusts the file.

Zero-byte, truncated and non-image files, decompression bombs and vanished paths raise BadImage; CMYK,
16-bit, palette, grayscale and alpha images are readable and are converted to RGB (alpha composited on white).
"""
from __future__ import annotations

import io
import struct
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image

# Images with more pixels than this are refused as decompression bombs (PIL's own default, 89.5 MP,
# a 9459 x 9459 image); PIL's warning at that size and its error at twice it both count as a bad item.
MAX_IMAGE_PIXELS = 89_478_485
BACKGROUND = (255, 255, 255)  # transparent pixels become white


class BadImage(Exception):
    """One dataset item that cannot be used; the message is the reason shown in the skip list."""


def read_item_bytes(source: Tuple) -> bytes:
    """The encoded bytes of one item, from its source ('file', path) or ('tar', shard, offset, size) (see
    ImageDataset._sources); ('skip', reason) and unreadable files raise BadImage with the reason."""
    kind = source[0]
    if kind == "skip":
        raise BadImage(source[1])
    try:
        if kind == "file":
            with open(source[1], "rb") as handle:
                return handle.read()
        if kind == "tar":
            _, shard, offset, size = source
            with open(shard, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
            if len(data) != size:
                raise BadImage("tar member is cut short")
            return data
    except IsADirectoryError:
        raise BadImage("is a directory") from None
    except FileNotFoundError:
        raise BadImage("file not found (vanished or broken link)") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except OSError as exc:
        raise BadImage(f"cannot read ({exc.strerror or exc})") from None
    raise BadImage(f"item kind {kind} has no bytes")


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image, or BadImage saying why not."""
    if not data:
        raise BadImage("zero-byte file")
    with warnings.catch_warnings():
        # PIL warns (instead of failing) between MAX_IMAGE_PIXELS and twice that: refuse those too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise BadImage(f"decompression bomb ({image.width}x{image.height} pixels)")
            image.load()
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(f"decompression bomb (over {MAX_IMAGE_PIXELS} pixels)") from None
        except Image.UnidentifiedImageError:
            raise BadImage("not an image (unidentified format)") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
            text = str(exc) or type(exc).__name__
            if "truncated" in text:
                text = "truncated image"
            raise BadImage(f"corrupt image ({text})") from None
        except MemoryError:
            raise BadImage("image too large to decode") from None
    try:
        return to_rgb(image)
    except (OSError, ValueError) as exc:
        raise BadImage(f"cannot convert {image.mode} to RGB ({exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: 16/32-bit scaled to 8 bits, palette and alpha composited on white, CMYK converted."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = max(1.0, float(array.max(initial=0)))
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------- preprocessing

def preprocess(image: Image.Image, size: int) -> Image.Image:
    """CLIP's preprocessing before normalization: resize the shortest side to `size` (bicubic), centre crop."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess_array(image: Image.Image, size: int) -> np.ndarray:
    """preprocess() as a uint8 (3, size, size) array (what DataLoader workers send back: 4x less than float)."""
    return np.ascontiguousarray(np.asarray(preprocess(image, size), dtype=np.uint8).transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------- one item

def decode_item(dataset, index: int, size: int) -> Tuple[Optional[np.ndarray], str]:
    """(uint8 (3,S,S) array, "") for a readable item of `dataset` (an ImageDataset), (None, reason) for a bad
    one; never raises."""
    array, reason, _ = decode_item_with_image(dataset, index, size)
    return array, reason


def decode_item_with_image(dataset, index: int, size: int):
    """decode_item, plus the decoded RGB PIL image (None for a bad item), for what else looks at it."""
    try:
        image = dataset.load(index)
        return preprocess_array(image, size), "", image
    except BadImage as exc:
        return None, str(exc), None
    except Exception as exc:  # a decoder bug on one file must not end the scan either
        return None, f"cannot decode ({type(exc).__name__}: {exc})", None
