"""The pixels the web app and the static site show: tiles, dataset crops and feature visualizations of a
layer, addressed by (kind, unit, number) from the cache records, never by a path from a request.

Every image shown goes through the one blur policy (neurolens.labels.policy) with `blur_all=True`: it is
blurred, labelled with the rule's reason ("flagged unit", "NSFW label 0.93", "hidden until revealed").
Raw pixels come only from `raw()`, which the server answers on an explicit reveal (and never with
`--no-reveal`); the static site never calls it.

The NudeNet detector and the model's zero-shot score are left off here: under blur_all they could only
change the wording of the label on an image that is blurred anyway, at a model run per thumbnail.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Callable, Hashable, Optional, Tuple

import numpy as np
from PIL import Image

from ..datasets.decode import BadImage, preprocess
from ..datasets.open import dataset_from_keys
from ..display.figures import crop_around_cell
from ..labels.policy import BlurPolicy
from ..records.concepts import flagged_in_cache as concept_flags
from ..records.sweep import flagged_in_cache
from .layer import LayerData

CROP_PIXELS = 128          # dataset crops (unit page), as Microscope showed them
FV_PIXELS = 192            # feature visualizations (unit page)
TILE_PIXELS = 112          # layer-page tiles
KINDS = ("tile", "crop", "fv")
JPEG_QUALITY = 82


class LRU:
    """A small thread-safe least-recently-used memo."""

    def __init__(self, size: int):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def peek(self, key: Hashable):
        with self._lock:
            return self._items.get(key)

    def get(self, key: Hashable, make: Callable[[], object]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


class LayerImages:
    """Blurred (shown) and raw (revealed) images of one layer."""

    def __init__(self, data: LayerData, memo_images: int = 8192):
        self.data = data.load()
        self.dataset = dataset_from_keys(data.keys, data.dataset) if data.scan is not None else None
        flagged = set(int(u) for u in np.flatnonzero(data.flagged()))
        # every cached sweep of this layer and basis: a feature's flags come from sweeps of that SAE's features;
        # and every unit flagged for a sensitive concept by a cached concept audit of it
        entry = data.entry
        flagged |= flagged_in_cache(data.cache, entry.fingerprint16, entry.layer, entry.basis)
        flagged |= concept_flags(data.cache, entry.fingerprint16, entry.layer, entry.basis)
        self.flagged = flagged
        # images labelled NSFW by the sweep or with a sensitive concept by the concept audit (LayerData.image_labels)
        label_name = "sensitive" if data.concepts.sensitive_labels() is not None else "NSFW"
        self.policy = BlurPolicy(True, blur_all=True, flagged=flagged, image_labels=data.image_labels(),
                                 label_name=label_name,
                                 detector=False, zero_shot=False)
        self.raw_policy = BlurPolicy(False)
        self._sources = LRU(512)
        self._shown = LRU(memo_images)

    # ---------------------------------------------------------------------------------------- raw pixels

    def _source(self, index: int) -> Optional[Image.Image]:
        """The model's view of dataset image `index` (resized and centre-cropped), or None if unreadable."""
        def load():
            try:
                return preprocess(self.dataset.load(index), self.data.image_size)
            except BadImage:
                return None
        return self._sources.get(index, load)

    def _crop(self, unit: int, rank: int, pixels: int = CROP_PIXELS) -> Optional[Tuple[Image.Image, int]]:
        """(crop centred on the cell where the unit fired, dataset index) of the unit's rank-th image (1 = top)."""
        data = self.data
        if data.scan is None or not (0 <= unit < data.units) or not (1 <= rank <= data.top_k):
            return None
        index = int(data.top_indices[unit, rank - 1])
        if index < 0:
            return None
        source = self._source(index)
        if source is None:
            return None
        return crop_around_cell(source, data.top_cells[unit, rank - 1], data.grid, pixels), index

    def _fv(self, unit: int, number: int, pixels: int = FV_PIXELS) -> Optional[Image.Image]:
        if not 0 <= unit < self.data.units:
            return None
        array = self.data.visualization_pixels(unit, number)
        if array is None:
            return None
        image = Image.fromarray(np.asarray(array, dtype=np.uint8))
        return image.resize((pixels, pixels), Image.BICUBIC) if image.size != (pixels, pixels) else image

    def _pixels(self, kind: str, unit: int, number: int) -> Optional[Tuple[Image.Image, Optional[int], str]]:
        """(pixels, dataset index or None, 'fv'|'image') of an image, or None when there is none."""
        if kind == "crop":
            found = self._crop(unit, number)
            return None if found is None else (found[0], found[1], "image")
        if kind == "fv":
            image = self._fv(unit, number)
            return None if image is None else (image, None, "fv")
        if kind == "tile":
            if self.data.fv_paths.get(unit):
                image = self._fv(unit, 0, TILE_PIXELS)
                if image is not None:
                    return image, None, "fv"
            found = self._crop(unit, 1, TILE_PIXELS)
            return None if found is None else (found[0], found[1], "image")
        return None

    # ---------------------------------------------------------------------------------------- answers

    def shown(self, kind: str, unit: int, number: int = 0) -> Optional[bytes]:
        """JPEG bytes of the image as pages show it: blurred under the policy. None: no such image."""
        return self._shown.get((kind, unit, number), lambda: self._encode_shown(kind, unit, number))

    def cached(self, kind: str, unit: int, number: int = 0) -> Optional[bytes]:
        """The shown image's bytes if already made (answered without a thread hop), else None."""
        return self._shown.peek((kind, unit, number))

    def _encode_shown(self, kind: str, unit: int, number: int) -> Optional[bytes]:
        found = self._pixels(kind, unit, number)
        if found is None:
            return None
        image, index, what = found
        if what == "fv":
            shown, _ = self.policy.fv(unit, image)
        else:
            shown, _ = self.policy.dataset_image(unit, index, image)
        return encode(shown, "JPEG")

    def reason(self, unit: int, index: Optional[int] = None) -> str:
        """Why the policy blurs a dataset image (index) or a feature visualization (index None) of `unit`,
        as the page says it. The pixels are not needed: the policy's only pixel-based rules (detector,
        zero-shot) are off here."""
        if index is None:
            return self.policy.reason_fv(unit, None) or ""
        return self.policy.reason_image(unit, index, None) or ""

    def raw(self, kind: str, unit: int, number: int = 0) -> Optional[bytes]:
        """PNG bytes of the raw pixels (an explicit reveal: the policy with blur off). Never for tiles."""
        if kind == "tile":
            return None
        found = self._pixels(kind, unit, number)
        if found is None:
            return None
        image, index, what = found
        raw = self.raw_policy.fv(unit, image)[0] if what == "fv" else self.raw_policy.dataset_image(unit, index, image)[0]
        return encode(raw, "PNG")

    def preview(self, image: Image.Image) -> bytes:
        """A probe's input as the page shows it: blurred under the policy (no unit, no dataset index), at the
        page's size so the blur label keeps its proportions."""
        if image.width < FV_PIXELS:
            image = image.resize((FV_PIXELS, round(FV_PIXELS * image.height / image.width)), Image.BICUBIC)
        shown, _ = self.policy.dataset_image(None, None, image)
        return encode(shown, "JPEG")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()
