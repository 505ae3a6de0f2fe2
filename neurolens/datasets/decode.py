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

Both decoders (`--decode`, DECODERS) obey these limits: `prepare_item` reads an item's bytes through the same
reader (regular files only, the byte limit) whichever decoder runs; a JPEG goes to the batched decoder
(neurolens.engines.decode) only when its header shows at most MAX_IMAGE_PIXELS pixels (datasets.jpeg), and
that decoder takes the same `geometry` (the MAX_ASPECT crop before the resize) as `preprocess`.
"""
from __future__ import annotations

import io
import os
import stat
import struct
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from ..errors import NeurolensError
from ..storage.limits import describe, env_size
from .jpeg import batchable

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
# --decode: pil decodes and resizes every item with PIL in the decode workers; torchvision decodes the JPEGs it
# can take in batches with torchvision.io.decode_jpeg (nvJPEG on a CUDA device) and resizes with torch
# (neurolens.engines.decode); auto is torchvision on CUDA, pil elsewhere (resolve_decoder).
DECODERS = ("auto", "pil", "torchvision")
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

@dataclass(frozen=True)
class Geometry:
    """Where CLIP's preprocessing takes an image's pixels from, for both decoders (PIL here, torch in
    neurolens.engines.decode): the MAX_ASPECT crop, the resize of the shortest side to `size`, the centre crop."""
    box: Tuple[int, int, int, int]    # (left, top, right, bottom) of the source kept by the MAX_ASPECT crop
    resized: Tuple[int, int]          # (width, height) after the resize
    crop: Tuple[int, int]             # (left, top) of the size x size centre crop in the resized image


def geometry(width: int, height: int, size: int, max_aspect: int = MAX_ASPECT) -> Geometry:
    """The preprocessing of a width x height image to size x size (module docstring: the long side of an image
    more elongated than max_aspect : 1 is centre-cropped to that ratio first)."""
    short = max(1, min(width, height))
    longest = short * max_aspect
    box = (0, 0, width, height)
    if width > longest:
        left = (width - longest) // 2
        box = (left, 0, left + longest, height)
    elif height > longest:
        top = (height - longest) // 2
        box = (0, top, width, top + longest)
    width, height = box[2] - box[0], box[3] - box[1]
    if width <= height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    return Geometry(box, (new_w, new_h), (int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))))


def preprocess(image: Image.Image, size: int) -> Image.Image:
    """CLIP's preprocessing before normalization: resize the shortest side to `size` (bicubic), centre crop.
    An image more elongated than MAX_ASPECT : 1 is first centre-cropped to that ratio (module docstring), so the
    resize never makes more than MAX_ASPECT x size x size pixels."""
    plan = geometry(image.width, image.height, size)
    if plan.box != (0, 0, image.width, image.height):
        image = image.crop(plan.box)          # a lazy crop: nothing is copied before the resize reads it
    if plan.resized != image.size:
        image = image.resize(plan.resized, Image.BICUBIC)
    left, top = plan.crop
    return image.crop((left, top, left + size, top + size))


def preprocess_array(image: Image.Image, size: int) -> np.ndarray:
    """preprocess() as a uint8 (3, size, size) array (what DataLoader workers send back: 4x less than float)."""
    return np.ascontiguousarray(np.asarray(preprocess(image, size), dtype=np.uint8).transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------- one item

@dataclass
class Prepared:
    """One item as a decode worker leaves it: preprocessed pixels (PIL), or the bytes of a JPEG for the batched
    decoder (neurolens.engines.decode, `--decode torchvision`), or the reason it is skipped."""
    index: int
    array: Optional[np.ndarray] = None     # uint8 (3, S, S)
    jpeg: Optional[bytes] = None           # a JPEG the batched decoder may take (datasets.jpeg.batchable)
    reason: str = ""                       # "" for a readable item
    image: Optional[Image.Image] = None    # the decoded RGB image, when asked for (keep_image)
    decode_s: float = 0.0                  # wall seconds reading (and with PIL, decoding) the item
    resize_s: float = 0.0                  # wall seconds of the PIL preprocessing


def prepare_item(dataset, index: int, size: int, decoder: str = "pil", keep_image: bool = False) -> Prepared:
    """Item `index` of `dataset` (an ImageDataset) as a decode worker prepares it; never raises.

    decoder "pil": read, decode and preprocess here. "torchvision": read the bytes (the same regular-file check
    and byte limit), and leave a JPEG that datasets.jpeg.batchable accepts to the batched decoder; anything else
    is decoded here with PIL, so both decoders skip the same items for the same reasons. keep_image: also keep
    the decoded PIL image (decoding a JPEG left to the batched decoder with PIL too), for what else looks at
    the whole image."""
    start = time.perf_counter()
    try:
        data = dataset.encoded(index) if decoder == "torchvision" else None
        if data is not None and batchable(data, MAX_IMAGE_PIXELS):
            return Prepared(index, jpeg=data, image=decode_image(data) if keep_image else None,
                            decode_s=time.perf_counter() - start)
        image = decode_image(data) if data is not None else dataset.load(index)
        decoded = time.perf_counter()
        array = preprocess_array(image, size)
        return Prepared(index, array=array, image=image if keep_image else None, decode_s=decoded - start,
                        resize_s=time.perf_counter() - decoded)
    except BadImage as exc:
        reason = str(exc)
    except Exception as exc:  # a decoder bug on one file must not end the scan either
        reason = f"cannot decode ({type(exc).__name__}: {exc})"
    return Prepared(index, reason=reason, decode_s=time.perf_counter() - start)


def decode_item(dataset, index: int, size: int) -> Tuple[Optional[np.ndarray], str]:
    """(uint8 (3,S,S) array, "") for a readable item of `dataset` (an ImageDataset), (None, reason) for a bad
    one; never raises."""
    item = prepare_item(dataset, index, size)
    return item.array, item.reason


def decode_item_with_image(dataset, index: int, size: int):
    """decode_item, plus the decoded RGB PIL image (None for a bad item), for what else looks at it."""
    item = prepare_item(dataset, index, size, keep_image=True)
    return item.array, item.reason, item.image


def resolve_decoder(decoder: str, device) -> str:
    """The decoder a run uses: `auto` is torchvision on a CUDA device (batched nvJPEG) and pil elsewhere (on the
    CPU, PIL in the decode workers is what keeps the forward fed: docs/benchmarks.md); pil and torchvision are
    themselves. device: a torch.device or its type ("cpu", "cuda")."""
    if decoder not in DECODERS:
        raise NeurolensError(f"unknown --decode {decoder!r}; use {', '.join(DECODERS)}")
    if decoder != "auto":
        return decoder
    return "torchvision" if str(getattr(device, "type", device)).startswith("cuda") else "pil"
