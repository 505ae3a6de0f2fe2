"""Reading and decoding one dataset item safely: bytes from a file or a tar member, bytes -> RGB PIL image,
and CLIP's resize and centre crop. Every failure is a BadImage carrying the reason the scan shows in its
skip list; nothing here trusts the file.

Zero-byte, truncated and non-image files, decompression bombs and vanished paths raise BadImage; CMYK,
16-bit, palette, grayscale and alpha images are readable and are converted to RGB (alpha composited on white).

Limits (docs/security.md): only regular files are read (a FIFO, a device such as /dev/zero behind a symbolic
link, a socket or a folder is a bad item, checked with stat before opening and with fstat after an O_NONBLOCK
open, so a FIFO never blocks), at most MAX_IMAGE_BYTES per item ($NEUROLENS_MAX_IMAGE_BYTES; a tar member's
size is checked from its header before reading), at most MAX_IMAGE_PIXELS decoded pixels, and `preprocess`
never makes more than MAX_ASPECT x size x size pixels: the long side of a very elongated image is centre-cropped
to MAX_ASPECT times its short side BEFORE resizing (a 1 x 20,000 PNG would otherwise be upscaled to 224 x
4,480,000 pixels, 3 GB). Images up to MAX_ASPECT : 1 are preprocessed exactly as before.
"""
from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from ..storage.limits import describe, env_size

# Images with more pixels than this are refused as decompression bombs (PIL's own default, 89.5 MP,
# a 9459 x 9459 image); PIL's warning at that size and its error at twice it both count as a bad item.
MAX_IMAGE_PIXELS = 89_478_485
# Bytes read for one item at most: every photo, scan and generated image fits (a 50-megapixel JPEG is 10-30 MB,
# an uncompressed 40-megapixel RGB TIFF 120 MB); an endless stream or a multi-GB file does not.
# $NEUROLENS_MAX_IMAGE_BYTES overrides it (neurolens.storage.limits).
MAX_IMAGE_BYTES = 128 * 2 ** 20
MAX_IMAGE_BYTES_ENV = "NEUROLENS_MAX_IMAGE_BYTES"
# Images more elongated than this are centre-cropped along their long side to MAX_ASPECT : 1 before the resize
# (the crop CLIP's preprocessing takes lies inside): preprocess() makes at most MAX_ASPECT x size^2 pixels.
MAX_ASPECT = 4
BACKGROUND = (255, 255, 255)  # transparent pixels become white
_FILE_KINDS = ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
               (stat.S_ISCHR, "is a character device, not a regular file"),
               (stat.S_ISBLK, "is a block device, not a regular file"),
               (stat.S_ISSOCK, "is a socket, not a regular file"))


class BadImage(Exception):
    """One dataset item that cannot be used; the message is the reason shown in the skip list."""


def max_image_bytes() -> int:
    """The per-item byte limit: $NEUROLENS_MAX_IMAGE_BYTES (neurolens.storage.limits) or MAX_IMAGE_BYTES."""
    return env_size(MAX_IMAGE_BYTES_ENV, MAX_IMAGE_BYTES)


def open_regular(path: str, limit: Optional[int] = None):
    """(file descriptor, size) of the regular file at `path` (symbolic links followed), opened with
    O_NONBLOCK so that a FIFO swapped in after the check cannot block; BadImage for anything else or for a file
    over `limit` bytes (default max_image_bytes())."""
    limit = max_image_bytes() if limit is None else limit
    _check_kind(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        _check_kind(info.st_mode)
        if info.st_size > limit:
            raise BadImage(f"file too large ({describe(info.st_size)}, over the {describe(limit)} limit; "
                           f"set {MAX_IMAGE_BYTES_ENV} to raise it)")
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def _check_kind(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    for test, reason in _FILE_KINDS:
        if test(mode):
            raise BadImage(reason)
    raise BadImage("not a regular file")


def read_file_bytes(path: str, limit: Optional[int] = None) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` (default max_image_bytes()); BadImage otherwise."""
    limit = max_image_bytes() if limit is None else limit
    fd, _ = open_regular(path, limit)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:                 # it grew after the check
        raise BadImage(f"file too large (over the {describe(limit)} limit; set {MAX_IMAGE_BYTES_ENV} to raise it)")
    return data


def read_item_bytes(source: Tuple) -> bytes:
    """The encoded bytes of one item, from its source ('file', path) or ('tar', shard, offset, size) (see
    ImageDataset._sources); ('skip', reason), files that are not regular files or are over the size limit, and
    unreadable files raise BadImage with the reason."""
    kind = source[0]
    if kind == "skip":
        raise BadImage(source[1])
    try:
        if kind == "file":
            return read_file_bytes(source[1])
        if kind == "tar":
            _, shard, offset, size = source
            limit = max_image_bytes()
            if size > limit:              # the member's size from its tar header, before reading anything
                raise BadImage(f"tar member too large ({describe(size)}, over the {describe(limit)} limit; "
                               f"set {MAX_IMAGE_BYTES_ENV} to raise it)")
            fd, _ = open_regular(shard, limit=2 ** 62)      # the shard itself may be any size
            with os.fdopen(fd, "rb") as handle:
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
    """CLIP's preprocessing before normalization: resize the shortest side to `size` (bicubic), centre crop.
    An image more elongated than MAX_ASPECT : 1 is first centre-cropped to that ratio (module docstring), so the
    resize never makes more than MAX_ASPECT x size x size pixels."""
    image = limit_aspect(image)
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


def limit_aspect(image: Image.Image, max_aspect: int = MAX_ASPECT) -> Image.Image:
    """`image`, centre-cropped along its long side to at most `max_aspect` times its short side (a lazy crop:
    nothing is copied for images within the ratio)."""
    width, height = image.size
    short = max(1, min(width, height))
    longest = short * max_aspect
    if width > longest:
        left = (width - longest) // 2
        return image.crop((left, 0, left + longest, height))
    if height > longest:
        top = (height - longest) // 2
        return image.crop((0, top, width, top + longest))
    return image


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
