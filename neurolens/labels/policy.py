"""THE blur policy: the one place that decides whether an image neurolens writes or shows is blurred.

Every writer of pixels asks it: feature-visualization PNGs (visualize, the demo), dataset crops (samples,
figure, grid), the similarity matrix's thumbnails, the web app and the static site. Raw pixels only when the caller asks explicitly
(`--no-blur` in the CLI, `blur=False` in the API); a raw file then gets a `_noblur` suffix
(`BlurPolicy.output_path`), so it never replaces a blurred one.

`BlurPolicy.reason_*` return the first rule that applies (the text printed on the blurred image), or
None when the image is shown as it is:

feature visualization of unit u
  1. u is flagged: in the sweep the caller passes (`flagged=`), or in any cached sweep of that layer
     made with these weights, or for a sensitive concept in any cached concept audit of it
     (`BlurPolicy.for_layer` reads them);
  2. the independent detector (NudeNet, where installed) fires on the image;
  3. the inspected model's zero-shot NSFW score passes IMAGE_NSFW_THRESHOLD, and the model is trained:
     a random-weights model's zero-shot score is noise, so it is never used.

dataset image i shown for unit u (a crop or thumbnail of one of its top images; judged on the whole image)
  1. u is flagged (as above);
  2. the caller's per-image label (`image_labels=`, e.g. the sweep's; the web app adds the images a cached
     concept audit labels with a sensitive concept, records.concepts.sensitive_labels) marks i positive;
  3. the detector fires on the image;
  4. the zero-shot score passes (trained models only);
  5. nothing above could judge the image (no label for i -- none given, or NaN -- and no detector and
     random weights): blurred as "not judged". An image that nothing vouched for is not shown raw.
  Images that ship with neurolens (scikit-image's samples, `bundled=True`) are shown as they are.

Detector and zero-shot scores are kept per pixel hash, in memory and (with a cache) in the cache
(neurolens.records.labels), so drawing the same images again runs neither the detector nor the
model.

`blur_all=True` (the web app before a reveal, the static site) blurs every image, with the reason the
rules give or "hidden until revealed".
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Collection, Dict, Iterable, Optional, Set, Tuple

import numpy as np
from PIL import Image

from ..errors import NeurolensError
from ..models.layer_table import resolve_layer
from ..records import labels as label_records
from ..records.keys import as_cache, basis_id
from ..records.concepts import flagged_in_cache as concept_flags
from ..records.sweep import flagged_in_cache
from . import nudenet, zero_shot as safety
from .blur import maybe_blur
from .prompts import IMAGE_NSFW_THRESHOLD, LOGIT_SCALE, load_prompts
from .spec import is_random

# A label at or above this counts as positive (labels are 0/1, or scores in [0, 1]).
LABEL_POSITIVE = 0.5
NOT_JUDGED = "not judged"
HIDDEN = "hidden until revealed"
NOBLUR_SUFFIX = "_noblur"


class BlurPolicy:
    """Decides, for each image, whether it is blurred and why (module docstring), and blurs it.

    blur: False only on an explicit request for raw pixels. flagged: units flagged by the caller's sweep.
    image_labels: (N,) per dataset index, >= LABEL_POSITIVE positive, NaN unknown (label_name names them in the
    reason: "NSFW label 0.93"; the web app's labels of sensitive concepts: "sensitive label 1.00"). detector:
    None = NudeNet when installed, False = off. zero_shot: None = on for trained models when `clip` is given,
    False = off."""

    def __init__(self, blur: bool = True, *, clip=None, cache=None, flagged: Optional[Collection[int]] = None,
                 image_labels: Optional[np.ndarray] = None, detector: Optional[bool] = None,
                 zero_shot: Optional[bool] = None, prompts=None, blur_all: bool = False, label_name: str = "NSFW"):
        self.blur = bool(blur)
        self.blur_all = bool(blur_all) and self.blur
        self.clip, self.cache, self.prompts = clip, cache, prompts
        self.flagged: Set[int] = set(int(u) for u in (flagged or ()))
        self.image_labels = None if image_labels is None else np.asarray(image_labels, dtype=np.float64)
        self.label_name = str(label_name)
        self.detector = nudenet.available() if detector is None else bool(detector and nudenet.available())
        self.zero_shot = (clip is not None and not is_random(clip)) if zero_shot in (None, True) else False
        self._scores: Dict[Tuple[str, str], float] = {}

    @classmethod
    def for_layer(cls, clip, layer: str, cache=None, blur: bool = True, flagged: Iterable[int] = (), basis=None,
                  **options):
        """The policy for one layer: the caller's flagged units plus those of every cached sweep of it and those
        flagged for a sensitive concept by every cached concept audit of it.
        `cache`: a store.Cache, a folder, or None for the default cache. basis: None for the neurons, or a basis
        of the layer (SAE features): its units are what `unit` means, and its sweeps give the flags."""
        cache = as_cache(cache)
        name = resolve_layer(clip, layer).name
        found = flagged_in_cache(cache, clip.fingerprint, name, basis_id(basis)) | \
            concept_flags(cache, clip.fingerprint, name, basis_id(basis)) if blur else set()
        return cls(blur, clip=clip, cache=cache, flagged=set(flagged) | found, **options)

    # ------------------------------------------------------------------------------------- decisions

    def reason_fv(self, unit: int, image: Image.Image) -> Optional[str]:
        """Why a feature visualization of `unit` is blurred, or None."""
        if not self.blur:
            return None
        reason = ("flagged unit" if int(unit) in self.flagged else None) or self._detector_reason(image) \
            or self._zero_shot_reason(image)
        return reason or (HIDDEN if self.blur_all else None)

    def reason_image(self, unit: Optional[int], index: Optional[int], image: Image.Image,
                     bundled: bool = False) -> Optional[str]:
        """Why dataset image `index` (shown for `unit`) is blurred, or None. `image`: the whole image (a
        crop of it is blurred for the same reason); bundled: an image that ships with neurolens."""
        if not self.blur:
            return None
        if bundled:
            return HIDDEN if self.blur_all else None
        if unit is not None and int(unit) in self.flagged:
            return "flagged unit"
        label = self._label(index)
        if label is not None and label >= LABEL_POSITIVE:
            return f"{self.label_name} label {label:.2f}"
        reason = self._detector_reason(image) or self._zero_shot_reason(image)
        if reason:
            return reason
        judged = label is not None or self.detector or self.zero_shot
        return NOT_JUDGED if not judged else (HIDDEN if self.blur_all else None)

    def _label(self, index: Optional[int]) -> Optional[float]:
        """The caller's label of dataset image `index`, or None when there is none (no labels, NaN)."""
        if self.image_labels is None or index is None or not 0 <= int(index) < len(self.image_labels):
            return None
        value = float(self.image_labels[int(index)])
        return value if np.isfinite(value) else None

    def _detector_reason(self, image: Image.Image) -> Optional[str]:
        score = self.detector_score(image)
        return f"NudeNet {score:.2f}" if score is not None and score >= nudenet.FIRE_THRESHOLD else None

    def _zero_shot_reason(self, image: Image.Image) -> Optional[str]:
        score = self.zero_shot_score(image)
        return f"NSFW score {score:.2f}" if score is not None and score >= IMAGE_NSFW_THRESHOLD else None

    # ------------------------------------------------------------------------------------- scores

    def detector_score(self, image: Image.Image) -> Optional[float]:
        """NudeNet's image-level score (labels.nudenet), or None when the detector is off or not installed."""
        if not self.detector:
            return None
        detector_version = nudenet.version()
        return self._score("detector", image, lambda img: float(nudenet.image_scores([img])[0]),
                           lambda digest: label_records.detector_score_path(self.cache, detector_version, digest))

    def zero_shot_score(self, image: Image.Image) -> Optional[float]:
        """The inspected model's zero-shot NSFW score (neurolens.labels.zero_shot), or None when that branch is off
        (random weights, no model, or zero_shot=False)."""
        if not self.zero_shot:
            return None
        prompts = self.prompts or load_prompts()
        return self._score("zero-shot", image,
                           lambda img: float(safety.nsfw_scores_for_images(self.clip, [img], prompts)[0]),
                           lambda digest: label_records.zero_shot_score_path(
                               self.cache, self.clip.fingerprint, digest, prompts.identity, LOGIT_SCALE))

    def _score(self, scorer: str, image: Image.Image, compute, path_of) -> float:
        """compute(image), kept per pixel hash in memory and, with a cache, in the record path_of(pixel hash)."""
        digest = _pixel_digest(image)
        if (scorer, digest) in self._scores:
            return self._scores[(scorer, digest)]
        path = None
        if self.cache is not None:
            path = path_of(digest)
            cached = label_records.read_score(self.cache, path)
            if cached is not None:
                self._scores[(scorer, digest)] = cached
                return cached
        score = float(compute(image))
        self._scores[(scorer, digest)] = score
        if path is not None:
            try:
                label_records.write_score(self.cache, path, score)
            except (NeurolensError, OSError):   # a score we cannot keep is computed again next time
                pass
        return score

    # ------------------------------------------------------------------------------------ pixels

    def apply(self, image: Image.Image, reason: Optional[str]) -> Image.Image:
        """The pixels to show: blurred with a label naming the reason, or the image unchanged."""
        return maybe_blur(image, reason)

    def fv(self, unit: int, image: Image.Image) -> Tuple[Image.Image, Optional[str]]:
        reason = self.reason_fv(unit, image)
        return self.apply(image, reason), reason

    def dataset_image(self, unit: Optional[int], index: Optional[int], image: Image.Image
                      ) -> Tuple[Image.Image, Optional[str]]:
        reason = self.reason_image(unit, index, image)
        return self.apply(image, reason), reason

    def output_path(self, path: str | os.PathLike) -> Path:
        """Where a file of this policy goes: `path`, or `<stem>_noblur<suffix>` when raw pixels were asked."""
        path = Path(path)
        if self.blur or path.stem.endswith(NOBLUR_SUFFIX):
            return path
        return path.with_name(f"{path.stem}{NOBLUR_SUFFIX}{path.suffix}")


def blur_note(reasons: Iterable[Optional[str]], blur: bool = True) -> str:
    """One line for the user: how many of the images were blurred and why, or that raw pixels were asked."""
    reasons = list(reasons)
    if not blur:
        return "NOT BLURRED (--no-blur): raw pixels, written to a *_noblur file"
    kinds: Dict[str, int] = {}
    for reason in reasons:
        if reason is not None:
            kind = reason.rstrip("0123456789. ") or reason   # 'NudeNet 0.91' -> 'NudeNet'
            kinds[kind] = kinds.get(kind, 0) + 1
    why = ", ".join(f"{kind}: {count}" for kind, count in kinds.items())
    return (f"blurred {sum(kinds.values())} of {len(reasons)} images" + (f" ({why})" if why else "")
            + "; --no-blur writes raw pixels to a *_noblur file")


def _pixel_digest(image: Image.Image) -> str:
    array = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()[:20]
