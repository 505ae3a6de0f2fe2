"""CLIP's cosine-threshold probe (the paper's Figures 1-3): image/text cosines and the similarity-matrix figure.

cosine(image, text) = <e_i / |e_i|, e_t / |e_t|>, where e_i = model.encode_image(preprocess(image)) with the
model's own open_clip evaluation preprocessing (resize the short side, centre-crop, normalize with the
model's mean/std; neurolens.models.embed.image_embeddings) and e_t = model.encode_text(tokenizer([text]))
(neurolens.text.encode.encode_texts, which equals it to float rounding). No logit scale, no softmax.
A pair passes when cosine >= threshold (LAION-400M kept pairs with cosine >= 0.3 under ViT-B/32; cosines
are model-dependent, so the same cut-off means different things for other models).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..datasets.builtin import builtin_image, builtin_samples
from ..datasets.decode import BadImage, decode_image, read_file_bytes
from ..datasets.types import IMAGE_EXTENSIONS
from ..errors import DatasetError, NeurolensError
from ..display.figures import fit_text
from ..labels.blur import maybe_blur
from ..labels.policy import BlurPolicy
from ..models.embed import image_embeddings
from ..text.encode import encode_texts

LAION_THRESHOLD = 0.3
SAMPLE_PREFIX = "sample:"
CAPTION_PREFIX = "This is "      # CLIP's notebook turns each description into "This is <description>"


@dataclass(frozen=True)
class LabeledImage:
    label: str                  # 'sample:astronaut' or the file path
    image: Image.Image
    builtin: bool               # True for scikit-image's bundled samples (known safe, never blurred)


@dataclass(frozen=True)
class PairScore:
    image: str
    text: str
    cosine: float
    passes: bool

    def as_dict(self) -> dict:
        return dict(image=self.image, text=self.text, cosine=self.cosine, passes=self.passes)


def builtin_caption(description: str) -> str:
    return CAPTION_PREFIX + description


def load_image_ref(ref: str) -> LabeledImage:
    """'sample:NAME' (a built-in scikit-image sample) or a path to an image file."""
    if ref.startswith(SAMPLE_PREFIX):
        return LabeledImage(ref, builtin_image(ref[len(SAMPLE_PREFIX):]), True)
    if not os.path.isfile(ref):
        raise NeurolensError(f"image {ref} does not exist; give an image file or sample:NAME (e.g. sample:astronaut)")
    try:
        image = read_image_file(ref)
    except BadImage as exc:
        raise NeurolensError(f"{ref} is not a readable image ({exc}); give a JPEG/PNG/WebP file") from None
    return LabeledImage(ref, image, False)


def read_image_file(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB through the dataset decoder (decompression-bomb guard, transparency composited on
    white, 16-bit and CMYK converted), or BadImage saying why not."""
    try:
        data = read_file_bytes(str(path))      # regular files only, at most the per-image byte limit
    except OSError as exc:
        raise BadImage(f"cannot read the file ({exc.strerror or type(exc).__name__})") from None
    return decode_image(data)


def builtin_pairs() -> Tuple[List[LabeledImage], List[str]]:
    """The built-in samples and their captions ('This is <description>'), in the same order."""
    images, captions = [], []
    for name, image, description in builtin_samples():
        images.append(LabeledImage(SAMPLE_PREFIX + name, image, True))
        captions.append(builtin_caption(description))
    return images, captions


def load_image_folder(folder: str, limit: Optional[int] = None) -> Tuple[List[LabeledImage], List[Optional[str]], List[str]]:
    """Images of a folder (sorted by name), each one's sidecar caption (<stem>.txt, or None), and the
    files that could not be read, as 'path (reason)' (skipped, not fatal)."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{folder} is not a folder; give --images DIR or --images builtin")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if limit is not None:
        paths = paths[:limit]
    images, captions, bad = [], [], []
    for path in paths:
        try:
            image = read_image_file(path)
        except BadImage as exc:
            bad.append(f"{path} ({exc})")
            continue
        images.append(LabeledImage(str(path), image, False))
        sidecar = path.with_suffix(".txt")
        captions.append(sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None)
    if not images:
        raise DatasetError(f"{folder} holds no readable images ({', '.join(IMAGE_EXTENSIONS)})")
    return images, captions, bad


def read_captions(path: str) -> List[str]:
    """One caption per line; blank lines are ignored."""
    if not os.path.isfile(path):
        raise NeurolensError(f"captions file {path} does not exist; give a text file with one caption per line")
    captions = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise NeurolensError(f"captions file {path} has no captions; write one caption per line")
    return captions


def cosine_matrix(clip, images: Sequence[Image.Image], texts: Sequence[str],
                  progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """(n_images, n_texts) float32 cosines between CLIP image and text embeddings."""
    if not images or not texts:
        raise NeurolensError("need at least one image and one text to compare")
    return image_embeddings(clip, images, progress=progress) @ encode_texts(clip, texts).T


def pair_scores(labels: Sequence[str], texts: Sequence[str], cosines: np.ndarray,
                threshold: float = LAION_THRESHOLD) -> List[PairScore]:
    """Every (image, text) pair, image-major, with passes = cosine >= threshold."""
    return [PairScore(labels[i], texts[j], float(cosines[i, j]), bool(cosines[i, j] >= threshold))
            for i in range(len(labels)) for j in range(len(texts))]


def image_text_similarity(clip, images: Sequence[str], texts: Sequence[str], threshold: float = LAION_THRESHOLD) -> List[PairScore]:
    """Cosines of every image reference ('sample:NAME' or a path) with every text, marked pass/fail."""
    loaded = [load_image_ref(ref) for ref in images]
    cosines = cosine_matrix(clip, [im.image for im in loaded], list(texts))
    return pair_scores([im.label for im in loaded], list(texts), cosines, threshold)


# ---------------------------------------------------------------------------------------------- figure
_VIRIDIS = np.array([[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
                     [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]], float)
PASS_COLOR = (255, 40, 40)


def _colour(value: float, low: float, high: float) -> Tuple[int, int, int]:
    x = 0.0 if high <= low else float(np.clip((value - low) / (high - low), 0, 1))
    pos = x * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[i] + (pos - i) * (_VIRIDIS[i + 1] - _VIRIDIS[i])
    return tuple(int(round(c)) for c in rgb)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _square_thumb(image: Image.Image, size: int) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.convert("RGB").crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def draw_similarity_matrix(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    cosines: np.ndarray,
    threshold: float = LAION_THRESHOLD,
    blur: Optional[Sequence[Optional[str]]] = None,
    title: str = "",
    cell: int = 72,
) -> Image.Image:
    """CLIP's notebook / the paper's Figure 3: image thumbnails across the top, captions down the left,
    the cosine printed in every cell, cells with cosine >= threshold outlined in red, and a legend line.

    `blur[i]`: why thumbnail i is blurred (the blur policy's reason; None: shown as it is). Blurring is done
    on the written pixels (neurolens.labels.blur) with the reason as its label."""
    n_img, n_cap = len(images), len(captions)
    if cosines.shape != (n_img, n_cap):
        raise ValueError(f"cosines shape {cosines.shape} != ({n_img}, {n_cap})")
    blur = list(blur) if blur is not None else [None] * n_img
    font, small = _font(max(11, cell // 5)), _font(max(10, cell // 6))
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(min(520, max(scratch.textlength(c, font=font) for c in captions) + 16))
    top, bottom, margin = 44, 60, 12
    width = margin + label_w + n_img * cell + margin
    height = top + cell + 6 + n_cap * cell + bottom
    canvas = Image.new("RGB", (max(width, 560), height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 10), title or "CLIP cosine similarity (image x caption)", fill=(0, 0, 0), font=font)

    x0, y0 = margin + label_w, top
    for i, image in enumerate(images):
        canvas.paste(maybe_blur(_square_thumb(image, cell - 4), blur[i]), (x0 + i * cell + 2, y0 + 2))
    grid_y = y0 + cell + 6
    low, high = float(cosines.min()), float(cosines.max())
    for j, caption in enumerate(captions):
        y = grid_y + j * cell
        text = fit_text(draw, caption, font, label_w - 12)
        draw.text((margin, y + cell // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
        for i in range(n_img):
            x = x0 + i * cell
            value = float(cosines[i, j])
            rgb = _colour(value, low, high)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=rgb)
            ink = (0, 0, 0) if sum(rgb) > 380 else (255, 255, 255)
            draw.text((x + cell // 2, y + cell // 2), f"{value:.2f}", fill=ink, font=small, anchor="mm")
            if value >= threshold:
                draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], outline=PASS_COLOR, width=3)

    legend_y = grid_y + n_cap * cell + 10
    draw.rectangle([margin, legend_y, margin + 18, legend_y + 14], outline=PASS_COLOR, width=3)
    legend = (f"outlined: cosine >= {threshold:g} (passes the threshold); colour: {low:.2f} (dark) to "
              f"{high:.2f} (yellow)")
    draw.text((margin + 26, legend_y + 7), legend, fill=(0, 0, 0), font=small, anchor="lm")
    blurred = [reason for reason in blur if reason is not None]
    if blurred:
        note = f"{len(blurred)} thumbnail(s) blurred ({', '.join(sorted(set(blurred)))}); pass --no-blur to show them"
        draw.text((margin, legend_y + 30), note, fill=(120, 0, 0), font=small, anchor="lm")
    return canvas


@dataclass
class MatrixResult:
    image_labels: List[str]
    captions: List[str]
    cosines: np.ndarray          # (n_images, n_captions) float32
    blurred: List[bool]
    figure: Image.Image
    blur_reasons: List[Optional[str]] = field(default_factory=list)   # per image: why blurred, or None

    def scores(self, threshold: float) -> List[PairScore]:
        return pair_scores(self.image_labels, self.captions, self.cosines, threshold)


def similarity_matrix(clip, images: Sequence[LabeledImage], captions: Sequence[str],
                      threshold: float = LAION_THRESHOLD, blur_user_images: bool = True,
                      title: Optional[str] = None,
                      progress: Optional[Callable[[int, int], None]] = None, cache=None) -> MatrixResult:
    """Cosines of every image with every caption and the figure. Thumbnails of the user's images are shown
    as the blur policy says (neurolens.labels.policy: the detector, a trained model's zero-shot score, or
    blurred as not judged when nothing can judge them); the built-in samples as they are.
    blur_user_images=False shows raw pixels."""
    cosines = cosine_matrix(clip, [im.image for im in images], list(captions), progress=progress)
    policy = BlurPolicy(blur_user_images, clip=clip, cache=cache)
    reasons = [policy.reason_image(None, None, im.image, bundled=im.builtin) for im in images]
    figure = draw_similarity_matrix(
        [im.image for im in images], list(captions), cosines, threshold, reasons,
        title=title or f"CLIP cosine similarity, {clip.name} ({clip.pretrained})")
    return MatrixResult([im.label for im in images], list(captions), cosines, [r is not None for r in reasons],
                        figure, reasons)
