"""Which encoded items the batched JPEG decoder (`--decode torchvision`, neurolens.engines.decode) may take, read
from the JPEG header alone (no pixel is decoded here).

An item goes to the batched decoder only when it is a complete baseline (or extended sequential) 8-bit JPEG with
1 (grayscale) or 3 (YCbCr) components, at most MAX_IMAGE_PIXELS pixels by its header, ending with the EOI
marker. Everything else (PNG and other formats, progressive, CMYK/YCCK and other Adobe colour transforms,
12-bit, lossless or arithmetic-coded JPEGs, truncated files, decompression bombs) is decoded by PIL instead, per
image, under the same rules as with `--decode pil`: skip reasons always come from the PIL decoder, so both
decoders skip and list the same items with the same reasons.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
SEQUENTIAL = (0xC0, 0xC1)                                    # baseline and extended sequential, Huffman
OTHER_FRAMES = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)   # progressive, lossless, ...
STANDALONE = {0x01, 0xD8} | set(range(0xD0, 0xD8))           # markers without a length
APP14 = 0xEE
SCAN = 0xDA


@dataclass(frozen=True)
class JpegHeader:
    """What the frame header (SOFn) and an Adobe APP14 segment say."""
    width: int
    height: int
    components: int
    precision: int
    sequential: bool                 # SOF0/SOF1; False for progressive, lossless, arithmetic
    adobe_transform: Optional[int]   # the APP14 colour transform (0: none, i.e. RGB or CMYK), None without APP14


def read_header(data: bytes) -> Optional[JpegHeader]:
    """The frame header of a JPEG, or None when `data` is not a JPEG or its header is cut short or malformed."""
    if not data.startswith(SOI):
        return None
    position, size, transform = 2, len(data), None
    while position + 4 <= size:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:                       # fill byte before a marker
            position += 1
            continue
        if marker in STANDALONE:
            position += 2
            continue
        if marker in (SCAN, 0xD9):               # image data or the end before any frame header
            return None
        length = int.from_bytes(data[position + 2:position + 4], "big")
        segment = data[position + 4:position + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker == APP14 and segment.startswith(b"Adobe") and len(segment) >= 12:
            transform = segment[11]
        if marker in SEQUENTIAL or marker in OTHER_FRAMES:
            if len(segment) < 6:
                return None
            return JpegHeader(width=int.from_bytes(segment[3:5], "big"), height=int.from_bytes(segment[1:3], "big"),
                              components=segment[5], precision=segment[0], sequential=marker in SEQUENTIAL,
                              adobe_transform=transform)
        position += 2 + length
    return None


def batchable(data: bytes, max_pixels: int) -> bool:
    """True when the batched decoder may take these bytes (module docstring); False sends the item to PIL."""
    header = read_header(data)
    if header is None or not header.sequential or header.precision != 8 or header.components not in (1, 3):
        return False
    if header.components == 3 and header.adobe_transform == 0:      # RGB-coded, not YCbCr
        return False
    if header.width < 1 or header.height < 1 or header.width * header.height > max_pixels:
        return False
    return data[-64:].rstrip(b"\x00").endswith(EOI)                 # a cut-off file goes to PIL (it says why)
