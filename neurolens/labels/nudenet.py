"""NudeNet, the independent detector: an ONNX object detector for exposed and covered body parts that
ships its weights inside the wheel and runs offline. It does not depend on the CLIP model under
inspection, which is why the sweep's labels and the blur policy can lean on it.

Image-level score: the highest confidence among the EXPOSED classes below (0.0 when none is detected).
NudeNet itself drops detections under 0.2; the detector "fires" on an image when that score is
>= FIRE_THRESHOLD. NudeNet is a dependency of neurolens (nudenet==3.4.2 installs onnxruntime and
opencv-python-headless, binary wheels, nothing else); where it cannot be imported, `available()` is False
and every function here says so instead of guessing."""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from importlib.metadata import version as package_version
from typing import List, Sequence

import numpy as np

# NudeNet 3.x classes that mean exposed sexual regions (its *_COVERED, FACE_*, FEET_*, BELLY_* and
# ARMPITS_* classes are not evidence of NSFW content).
EXPOSED = frozenset({
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
})
FIRE_THRESHOLD = 0.4


@lru_cache(maxsize=1)
def available() -> bool:
    """True when the nudenet package and its onnxruntime are installed. Found without importing them (that
    takes a few tenths of a second, and a cached answer that only asks whether the detector is there needs
    none of it); a broken install surfaces when the detector first runs."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("nudenet", "onnxruntime"))
    except (ImportError, ValueError):
        return False


def version() -> str:
    """The installed NudeNet version (scores are cached per version), or 'none'."""
    try:
        return package_version("nudenet")
    except Exception:
        return "none"


@lru_cache(maxsize=1)
def _detector():
    from nudenet import NudeDetector  # lazy: optional dependency, loads an ONNX model
    return NudeDetector()


def _bgr(pil_image) -> np.ndarray:
    # NudeNet reads numpy input as OpenCV does: BGR channel order
    return np.ascontiguousarray(np.asarray(pil_image.convert("RGB"))[:, :, ::-1])


def detections(pil_image, min_score: float = FIRE_THRESHOLD) -> List[dict]:
    """Exposed-region detections: [{'label', 'score', 'box': (x, y, w, h)}], best first."""
    if not available():
        raise RuntimeError("NudeNet is not installed; pip install nudenet==3.4.2")
    found = _detector().detect(_bgr(pil_image))
    out = [dict(label=d["class"], score=float(d["score"]), box=tuple(int(v) for v in d["box"]))
           for d in found if d.get("class") in EXPOSED and float(d.get("score", 0.0)) >= min_score]
    return sorted(out, key=lambda d: -d["score"])


def image_scores(pil_images: Sequence) -> np.ndarray:
    """(N,) float32 image-level scores in [0, 1]: the highest exposed-class confidence of each image."""
    scores = np.zeros(len(pil_images), np.float32)
    for i, image in enumerate(pil_images):
        found = detections(image, min_score=0.0)
        scores[i] = found[0]["score"] if found else 0.0
    return scores
