"""The built-in image set: scikit-image's bundled sample images (no network), with short descriptions.

Used when a command gets no --dataset, as natural images in tests, and by `similarity --matrix`."""
from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import numpy as np
import skimage.data
from PIL import Image

from ..errors import NeurolensError

# name -> description, in the style of CLIP's "Interacting with CLIP" notebook.
BUILTIN_DESCRIPTIONS = {
    "astronaut": "a portrait of an astronaut with the American flag",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a facial photo of a tabby cat",
    "cat": "a close-up photo of a cat's face",
    "camera": "a black-and-white photo of a man with a camera on a tripod",
    "rocket": "a rocket standing on a launchpad",
    "horse": "a black-and-white silhouette of a horse",
    "page": "a page of text about segmentation",
    "coins": "a black-and-white photo of old coins",
    "immunohistochemistry": "a microscope image of stained tissue",
    "hubble_deep_field": "a telescope image of many distant galaxies",
    "moon": "a black-and-white photo of the surface of the moon",
    "text": "a photo of text printed on a page",
    "clock": "a black-and-white photo of a clock",
    "retina": "a medical photo of the back of an eye",
    "grass": "a black-and-white photo of grass",
    "gravel": "a black-and-white photo of gravel",
    "brick": "a black-and-white photo of a brick wall",
    "colorwheel": "a colour wheel",
    "cell": "a microscope image of a cell",
}


def builtin_names() -> List[str]:
    return list(BUILTIN_DESCRIPTIONS)


@lru_cache(maxsize=None)
def builtin_image(name: str) -> Image.Image:
    """One sample as an RGB PIL image."""
    if name not in BUILTIN_DESCRIPTIONS:
        raise NeurolensError(f"unknown built-in image {name!r}; choose one of {', '.join(builtin_names())}")
    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = np.clip(array * 255 if array.max() <= 1 else array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(array[..., :3]).convert("RGB")


def builtin_samples() -> List[Tuple[str, Image.Image, str]]:
    """(name, image, description) for every built-in sample."""
    return [(name, builtin_image(name), BUILTIN_DESCRIPTIONS[name]) for name in builtin_names()]


def builtin_images(size: int) -> np.ndarray:
    """All samples, centre-cropped and resized to size x size, as float32 (N, 3, size, size) in [0, 1]."""
    out = []
    for name in builtin_names():
        image = builtin_image(name)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(out)
