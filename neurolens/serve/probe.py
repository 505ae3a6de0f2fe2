"""Live probes: one image through the loaded model to one layer, for the unit page's "test an image".

The image is an upload (decoded by the dataset decoder, so the same bomb guard and format handling apply)
or a dataset item of the layer's scan. Computes and returns numbers only: nothing is written anywhere.
"""
from __future__ import annotations

import base64
import threading
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..datasets import BadImage, decode_image, preprocess_array, preprocess
from ..errors import NeurolensError
from ..models import resolve_layer
from ..scan import layer_forward
from .images import LayerImages
from .records import LayerData

MAX_UPLOAD_BYTES = 10 * 2 ** 20
TOP_UNITS = 8


class ProbeError(NeurolensError):
    """A probe request that cannot be answered (the server answers 400 with this one line)."""


class Prober:
    """Runs probes with one loaded model; one forward at a time (the model is shared by every request)."""

    def __init__(self, clip):
        self.clip = clip
        self._lock = threading.Lock()

    def matches(self, data: LayerData) -> bool:
        """True when the loaded weights are the ones the layer's records were made with."""
        data.load()
        if not self.clip.fingerprint.startswith(data.entry.fingerprint16):
            return False
        if data.scan is None:
            return False
        try:
            resolve_layer(self.clip, data.entry.layer)
        except NeurolensError:
            return False
        return True

    def activations(self, layer: str, image: Image.Image, precision: str = "fp32") -> np.ndarray:
        """(C, H, W) float32 activation of every unit of `layer` on `image` (CLIP's preprocessing)."""
        spec = resolve_layer(self.clip, layer)
        pixels = torch.from_numpy(preprocess_array(image, self.clip.image_size))[None].float().div_(255.0)
        with self._lock:
            acts, _ = layer_forward(self.clip, spec, pixels.to(self.clip.device), precision)
        return acts[0].cpu().numpy()


def decode_upload(data: bytes) -> Image.Image:
    if len(data) > MAX_UPLOAD_BYTES:
        raise ProbeError(f"the upload is larger than {MAX_UPLOAD_BYTES // 2 ** 20} MB; send a smaller image")
    try:
        return decode_image(data)
    except BadImage as exc:
        raise ProbeError(f"the upload is not a usable image ({exc})") from None


def dataset_item(images: LayerImages, index: str) -> Image.Image:
    data = images.data
    try:
        number = int(index)
    except ValueError:
        raise ProbeError(f"index must be a whole number, got {index[:40]!r}") from None
    if images.dataset is None or not 0 <= number < len(data.keys):
        raise ProbeError(f"no dataset item {number}: the scan has items 0 to {len(data.keys) - 1}")
    try:
        return images.dataset.load(number)
    except BadImage as exc:
        raise ProbeError(f"dataset item {number} cannot be read ({exc})") from None


def answer(prober: Prober, images: LayerImages, unit: int, image: Image.Image) -> dict:
    """The probe's JSON: the unit's map, its value (spatial max) and percentile in the dataset, the units the
    image drives hardest by percentile, and the image as the page shows it (blurred)."""
    data = images.data
    if not 0 <= unit < data.units:
        raise ProbeError(f"unit {unit} is not in this layer (0 to {data.units - 1})")
    acts = prober.activations(data.entry.layer, image, str(data.scan.attrs.get("precision", "fp32")))
    maxima = acts.reshape(acts.shape[0], -1).max(axis=1)
    percentiles = np.full(len(maxima), np.nan)
    for u in range(len(maxima)):
        hist = data.histogram(u)
        if hist is not None:
            percentiles[u] = hist.percentile(float(maxima[u]))
    ranked = sorted(range(len(maxima)), key=lambda u: (-np.nan_to_num(percentiles[u], nan=-1.0), -maxima[u], u))
    preview = images.preview(preprocess(image, data.image_size))
    return {
        "unit": int(unit), "value": float(maxima[unit]), "percentile": _finite(percentiles[unit]),
        "grid": [int(acts.shape[1]), int(acts.shape[2])], "map": acts[unit].astype(float).tolist(),
        "vmax": float(data.top_values[unit, 0]),
        "top_units": [{"unit": int(u), "value": float(maxima[u]), "percentile": _finite(percentiles[u])}
                      for u in ranked[:TOP_UNITS]],
        "preview": "data:image/jpeg;base64," + base64.b64encode(preview).decode("ascii"),
    }


def _finite(value: float) -> Optional[float]:
    return float(value) if np.isfinite(value) else None
