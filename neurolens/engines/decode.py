"""Batches of prepared items -> the model's uint8 input on a device: the batched JPEG decoder of `--decode
torchvision` and the one place a batch's pixels are put together, for every engine (DataLoader workers or the
main process in engines/local.py, Ray's model actors in engines/ray/workers.py).

The JPEGs that decode workers left to the batched decoder (datasets.decode.prepare_item) are decoded in one
torchvision.io.decode_jpeg call over the list: with device="cuda" that is batched nvJPEG, on the CPU
libjpeg-turbo, the same code path. Each decoded image is then preprocessed with torch exactly where PIL's
preprocessing takes its pixels (datasets.decode.geometry: the MAX_ASPECT crop before the resize, the shortest
side resized to the input size, the centre crop), with torch's antialiased bicubic in PIL's two passes (`resize`).
The result differs from PIL's by at most one grey level on a few pixels (tests/test_decoders.py; docs/scan.md),
and nvJPEG's decode from libjpeg-turbo's by a little more, so scans with either decoder rank images alike but
are not bit-identical.

An image the batched decoder cannot decode (a corrupt file whose header looked fine) is decoded by PIL here,
under the same skip-and-list rules as every other item (its reason comes from PIL).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from ..datasets.decode import MAX_IMAGE_PIXELS, BadImage, Prepared, decode_image, geometry, preprocess_array
from .timing import NO_CLOCK


@dataclass
class Assembled:
    """A batch ready for the model: the readable items' indices and pixels (in the order of the items given),
    and the skipped ones with their reasons."""
    indices: List[int]
    pixels: Optional[torch.Tensor]          # uint8 (b, 3, S, S) on the device; None when nothing was readable
    skipped: List[Tuple[int, str]]


def decode_jpegs(blobs: Sequence[bytes], device) -> List[Optional[torch.Tensor]]:
    """uint8 (3, H, W) RGB tensors on `device` of JPEG `blobs`, in one batched call; None for each image the
    decoder refuses (the batch is retried image by image when the batched call fails)."""
    if not blobs:
        return []
    tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:  # one bad image fails the whole call: find it (nvJPEG and libjpeg raise RuntimeError)
        decoded: List[Optional[torch.Tensor]] = []
        for tensor in tensors:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except Exception:
                decoded.append(None)
        return decoded


def to_input(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): datasets.decode.geometry's crop, resize and centre crop, with
    torch's antialiased bicubic resize (the image's dimensions are checked before: datasets.jpeg.batchable)."""
    plan = geometry(int(image.shape[2]), int(image.shape[1]), size)
    left, top, right, bottom = plan.box
    image = image[:, top:bottom, left:right]
    x, y = plan.crop
    return resize(image, plan.resized)[:, y:y + size, x:x + size]


def resize(image: torch.Tensor, new_size: Tuple[int, int]) -> torch.Tensor:
    """uint8 (3, H, W) resized to new_size = (width, height) the way PIL's bicubic resize works: antialiased
    bicubic (torch's antialias=True kernel is PIL's), one pass along the width and then one along the height, each
    rounded to uint8 (PIL keeps 8 bits between its passes). Where PIL takes the same order the result is PIL's
    to within one grey level on a few values; the Pillow build measured (13.0.0) runs the height pass first for
    some tall images, and there up to 2 grey levels differ (docs/scan.md). One float pass would differ by up to
    3 levels on ~15 % of the values."""
    new_w, new_h = new_size
    out = image[None].float()
    if new_w != out.shape[3]:
        out = F.interpolate(out, size=(out.shape[2], new_w), mode="bicubic", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255)
    if new_h != out.shape[2]:
        out = F.interpolate(out, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255)
    return out[0].to(torch.uint8)


def with_pil(item: Prepared, size: int) -> Prepared:
    """The item decoded and preprocessed by PIL from its bytes (the batched decoder refused it), or skipped with
    PIL's reason."""
    try:
        return Prepared(item.index, array=preprocess_array(decode_image(item.jpeg), size))
    except BadImage as exc:
        return Prepared(item.index, reason=str(exc))
    except Exception as exc:  # a decoder bug on one file must not end the scan either
        return Prepared(item.index, reason=f"cannot decode ({type(exc).__name__}: {exc})")


def assemble(items: Sequence[Prepared], size: int, device="cpu", clock=NO_CLOCK) -> Assembled:
    """The batch of `items` on `device`: PIL-prepared arrays as they are, JPEGs decoded in one batch on `device`
    and preprocessed with torch, refused JPEGs decoded by PIL; skipped items listed. clock (engines.timing)
    times the batched decode and resize."""
    device = torch.device(device)
    jpegs = [item for item in items if item.jpeg is not None and not item.reason]
    ready = {}
    if jpegs:
        with clock.device_stage("decode", device):
            images = decode_jpegs([item.jpeg for item in jpegs], device)
        with clock.device_stage("resize", device):
            for item, image in zip(jpegs, images):
                # the decoded shape is checked again before the resize (the header was checked before decoding)
                if image is not None and image.dim() == 3 and image.shape[0] == 3 and \
                        0 < image.shape[1] * image.shape[2] <= MAX_IMAGE_PIXELS:
                    ready[item.index] = to_input(image, size)
    indices, rows, skipped = [], [], []
    for item in items:
        if item.jpeg is not None and not item.reason and item.index not in ready:
            with clock.host_stage("decode"):
                item = with_pil(item, size)
        if item.reason:
            skipped.append((item.index, item.reason))
            continue
        row = ready.get(item.index)
        if row is None:
            row = torch.from_numpy(item.array).to(device, non_blocking=True)
        indices.append(item.index)
        rows.append(row)
    return Assembled(indices, torch.stack(rows) if rows else None, skipped)
