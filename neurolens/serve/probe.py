"""Live probes: one image through the loaded model to one layer, for the unit page's "test an image".

The image is an upload (decoded by the dataset decoder, so the same bomb guard, format handling and bounded
preprocessing apply) or a dataset item of the layer's scan. Computes and returns numbers only: nothing is
written anywhere. Every probe's decoding and forward runs on the prober's own pool of PROBE_WORKERS threads
(not the server's 40-thread pool), so many uploads at once wait in line instead of decoding side by side.
"""
from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional

import numpy as np
import torch
from PIL import Image

from ..activations.forward import layer_forward
from ..datasets.decode import BadImage, decode_image, preprocess, preprocess_array
from ..errors import NeurolensError
from ..models.layer_table import resolve_layer
from ..sae.basis import load_basis
from .images import LayerImages
from .layer import LayerData

MAX_UPLOAD_BYTES = 10 * 2 ** 20
TOP_UNITS = 8
PROBE_WORKERS = 2          # probes decoded and run at once (each decode may hold an 89.5-megapixel image)


class ProbeError(NeurolensError):
    """A probe request that cannot be answered (the server answers 400 with this one line)."""


class Prober:
    """Runs probes with one loaded model; one forward at a time (the model is shared by every request).

    For an SAE entry the prober also loads that SAE (neurolens.sae.basis.load_basis, by the name it was trained
    under in the cache's registry, else from the path its scan recorded) and probes only when the loaded SAE
    is the very one the records were made with (same basis id, which hashes the weights)."""

    def __init__(self, clip, cache=None):
        self.clip, self.cache = clip, cache
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=PROBE_WORKERS, thread_name_prefix="neurolens-probe")
        self._bases: Dict[str, object] = {}       # entry id -> basis (neurolens.sae)
        self.reasons: Dict[str, str] = {}         # entry id -> why it cannot be probed

    async def run(self, func: Callable, *args):
        """func(*args) on the prober's bounded pool (module docstring), awaited from the server's event loop."""
        return await asyncio.wrap_future(self._pool.submit(func, *args))

    def matches(self, data: LayerData) -> bool:
        """True when the loaded weights (and, for features, the SAE) are the ones the records were made with."""
        data.load()
        entry = data.entry
        if not self.clip.fingerprint.startswith(entry.fingerprint16):
            self.reasons[entry.id] = "the loaded model's weights are not the ones this layer was computed with"
            return False
        if data.scan is None:
            self.reasons[entry.id] = "this layer has no scan in the cache, so a probe has nothing to compare with"
            return False
        try:
            resolve_layer(self.clip, entry.layer)
        except NeurolensError:
            self.reasons[entry.id] = f"the loaded model has no layer {entry.layer}"
            return False
        basis = self._load_basis(entry)
        if basis is None:
            return False
        self._bases[entry.id] = basis
        return True

    def _load_basis(self, entry):
        if not entry.is_features:
            return load_basis(self.clip, entry.layer, None)
        tried = []
        for reference in (entry.sae_name, entry.sae_info.get("path")):
            if not reference or reference in tried:
                continue
            tried.append(reference)
            try:
                basis = load_basis(self.clip, entry.layer, reference, self.cache, name=entry.sae_name)
            except NeurolensError:
                continue
            if basis.id == entry.basis:
                return basis
        self.reasons[entry.id] = (f"the SAE {entry.sae_name} that made these records ({entry.basis}) was not found "
                                  f"with the same weights (looked for: {', '.join(map(str, tried)) or 'nothing'})")
        return None

    def activations(self, data: LayerData, image: Image.Image, precision: str = "fp32") -> np.ndarray:
        """(U, H, W) float32 activation of every unit of the entry's basis (neurons or SAE features) on `image`
        (CLIP's preprocessing)."""
        layer = data.entry.layer
        spec = resolve_layer(self.clip, layer)
        basis = self._bases.get(data.entry.id)
        if basis is None:
            raise ProbeError(self.reasons.get(data.entry.id, "this layer cannot be probed with the loaded model"))
        pixels = torch.from_numpy(preprocess_array(image, self.clip.image_size))[None].float().div_(255.0)
        with self._lock, torch.no_grad():
            acts, _ = layer_forward(self.clip, spec, pixels.to(self.clip.device), precision)
            units = basis.activations(acts)
        return units[0].float().cpu().numpy()


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
    image drives hardest by percentile, and the image as the page shows it (blurred). For an SAE entry the
    units are its features: the SAE applied to the layer's activation on every cell."""
    data = images.data
    words = data.entry.words
    if not 0 <= unit < data.units:
        raise ProbeError(f"{words['unit']} {unit} is not in this {'layer' if not data.entry.is_features else 'SAE'} "
                         f"(0 to {data.units - 1})")
    acts = prober.activations(data, image, str(data.scan.attrs.get("precision", "fp32")))
    maxima = acts.reshape(acts.shape[0], -1).max(axis=1)
    percentiles = np.full(len(maxima), np.nan)
    for u in range(len(maxima)):
        hist = data.histogram(u)
        if hist is not None:
            percentiles[u] = hist.percentile(float(maxima[u]))
    ranked = sorted(range(len(maxima)), key=lambda u: (-np.nan_to_num(percentiles[u], nan=-1.0), -maxima[u], u))
    preview = images.preview(preprocess(image, data.image_size))
    return {
        "unit": int(unit), "unit_word": words["unit"], "value": float(maxima[unit]), "percentile": _finite(percentiles[unit]),
        "grid": [int(acts.shape[1]), int(acts.shape[2])], "map": acts[unit].astype(float).tolist(),
        "vmax": float(data.top_values[unit, 0]),
        "top_units": [{"unit": int(u), "value": float(maxima[u]), "percentile": _finite(percentiles[u])}
                      for u in ranked[:TOP_UNITS]],
        "preview": "data:image/jpeg;base64," + base64.b64encode(preview).decode("ascii"),
    }


def _finite(value: float) -> Optional[float]:
    return float(value) if np.isfinite(value) else None
