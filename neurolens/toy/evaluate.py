"""Zero-shot accuracy of a CLIP model on held-out generated pairs (images it never saw).

Definitions (every cosine is between L2-normalized image and text embeddings of the model):
- attribute accuracy, for attribute A in count, colour, shape, position, background: over the held-out
  images, the share whose true full caption scores higher than every caption made from it by replacing
  A's value with another value of A (K candidates; chance 1/K: 1/3, 1/7, 1/3, 1/4, 1/4).
- zero-shot accuracy (the headline figure): the mean of the five attribute accuracies (chance 0.262).
- planted accuracy: over the held-out images, the share whose true full caption scores higher than the
  same caption with the planted words removed (planted image) or with two random lexicon words added
  (ordinary image; in multi-concept mode two words of one concept drawn at random); chance 0.5.
- retrieval@1: the share of held-out images whose best-scoring caption among all held-out full captions
  is (textually) their own; chance about 1/n.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..scoring.statistics import ExactAUC
from ..text.encode import encode_texts
from .concepts import multi_concepts, planted_words
from .draw import BACKGROUNDS, POSITIONS
from .generate import COUNTS, full_caption, generate_pairs, style_of

HELD_OUT_SEED_OFFSET = 1_000_003      # held-out images use seed + this, never the training seed


def attributes(style: str = "shapes") -> Dict[str, tuple]:
    """The caption attributes and their values in a generator style."""
    look = style_of(style)
    return {"count": COUNTS, "colour": tuple(look.colours), "shape": look.shapes, "position": POSITIONS,
            "background": BACKGROUNDS}


ATTRIBUTES = attributes()


@dataclass
class ZeroShotReport:
    accuracy: float                                  # mean attribute accuracy (headline)
    chance: float
    attribute_accuracy: Dict[str, float] = field(default_factory=dict)
    attribute_chance: Dict[str, float] = field(default_factory=dict)
    planted_accuracy: float = 0.0
    retrieval_at_1: float = 0.0
    retrieval_chance: float = 0.0
    images: int = 0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _encode_texts(clip, texts: List[str]) -> torch.Tensor:
    """L2-normalized embeddings of texts (each distinct text encoded once, truncated like every text job)."""
    unique = sorted(set(texts))
    table = dict(zip(unique, torch.from_numpy(encode_texts(clip, unique))))
    return torch.stack([table[t] for t in texts])


def _encode_images(clip, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float().div(255)
            if x.shape[-1] != clip.image_size:
                x = torch.nn.functional.interpolate(x, size=(clip.image_size, clip.image_size), mode="bilinear",
                                                    align_corners=False)
            feats = clip.model.encode_image(clip.normalize(x.to(clip.device)))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out)


def zero_shot_accuracy(clip, n: int = 500, seed: int = 0, size: int = 64, planted_share: float = 0.15,
                       progress: Optional[Callable[[int, int], None]] = None, style: str = "shapes",
                       concepts: str = "single", intersection_share: float = 0.05) -> ZeroShotReport:
    """Zero-shot accuracies (see the module docstring) of a LoadedClip on n held-out generated pairs of the
    generator style and concept mode it was trained on (always with clean captions)."""
    held_out_seed = seed + HELD_OUT_SEED_OFFSET
    data = generate_pairs(n, size, planted_share, held_out_seed, style=style, concepts=concepts,
                          intersection_share=intersection_share)
    attribute_values = attributes(style)
    image_feats = _encode_images(clip, data.images)
    if progress is not None:
        progress(1, 3)
    lexicons = [planted_words()] if concepts == "single" else [list(c.terms) for c in multi_concepts()]
    rng = np.random.default_rng(held_out_seed)

    attribute_accuracy, attribute_chance = {}, {}
    everyone = list(range(len(data.pairs)))
    for attribute, values in attribute_values.items():
        texts = []
        for pair in data.pairs:
            fields = {k: getattr(pair, k) for k in attribute_values}
            for value in values:   # the candidates: the true caption with this attribute set to each value
                fields[attribute] = value
                texts.append(full_caption(**fields, words=pair.words))
        text_feats = _encode_texts(clip, texts).view(len(everyone), len(values), -1)
        scores = torch.einsum("nd,nkd->nk", image_feats, text_feats)
        truth = torch.tensor([values.index(getattr(pair, attribute)) for pair in data.pairs])
        attribute_accuracy[attribute] = float((scores.argmax(dim=1) == truth).float().mean())
        attribute_chance[attribute] = 1.0 / len(values)
    if progress is not None:
        progress(2, 3)

    # Planted vs ordinary: each image's true caption against the same caption of the other kind.
    own, other = [], []
    for pair in data.pairs:
        own.append(pair.full)
        fields = {k: getattr(pair, k) for k in attribute_values}
        words = lexicons[int(rng.integers(len(lexicons)))] if len(lexicons) > 1 else lexicons[0]
        swapped = () if pair.words else tuple(words[j] for j in rng.choice(len(words), size=2, replace=False))
        other.append(full_caption(**fields, words=swapped))
    own_feats, other_feats = _encode_texts(clip, own), _encode_texts(clip, other)
    planted_accuracy = float(((image_feats * own_feats).sum(1) > (image_feats * other_feats).sum(1)).float().mean())

    best = (image_feats @ own_feats.t()).argmax(dim=1).tolist()
    retrieval = float(np.mean([own[j] == own[i] for i, j in enumerate(best)]))
    if progress is not None:
        progress(3, 3)
    accuracy = float(np.mean(list(attribute_accuracy.values())))
    return ZeroShotReport(accuracy=accuracy, chance=float(np.mean(list(attribute_chance.values()))),
                          attribute_accuracy=attribute_accuracy, attribute_chance=attribute_chance,
                          planted_accuracy=planted_accuracy, retrieval_at_1=retrieval,
                          retrieval_chance=1.0 / len(data.pairs), images=len(data.pairs), seed=held_out_seed)


# ------------------------------------------------------------------- sweep flags against ground truth

RELATED_AUC = 0.8        # a flagged unit is right when its planted AUC reaches this
PLANTED_AUC = 0.95       # a unit that must be flagged: its planted AUC reaches this


@dataclass
class FlagQuality:
    """How a sweep's flags compare with the generator's ground truth on the swept images.

    planted AUC of a unit: the ROC AUC of its per-image activation, planted images against the others, from
    the generator's `planted` column (not captions, not any label source). precision: the share of flagged
    units whose planted AUC >= RELATED_AUC; recall: the share of units with planted AUC >= PLANTED_AUC
    that are flagged."""
    flagged: int
    precision: float                 # NaN when nothing is flagged
    recall: float                    # NaN when no unit reaches PLANTED_AUC
    related_units: int               # units with planted AUC >= RELATED_AUC
    planted_units: int               # units with planted AUC >= PLANTED_AUC
    planted_auc: List[float] = field(default_factory=list)    # per unit

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("planted_auc")
        return data


def planted_auc(maxima: np.ndarray, planted: np.ndarray) -> np.ndarray:
    """(U,) each unit's ROC AUC of planted against ordinary images (rows of maxima: images; NaN rows skipped)."""
    maxima = np.asarray(maxima, dtype=np.float32)
    stats = ExactAUC(maxima.shape[1])
    stats.add(maxima, np.asarray(planted, dtype=np.float64))
    return stats.result().auc


def flag_quality(flagged: np.ndarray, maxima: np.ndarray, planted: np.ndarray) -> FlagQuality:
    """FlagQuality of a sweep's (U,) flags, from the swept images' per-unit maxima (N, U) and planted mask."""
    truth = planted_auc(maxima, planted)
    flagged = np.asarray(flagged, dtype=bool)
    related, must = truth >= RELATED_AUC, truth >= PLANTED_AUC
    precision = float((related & flagged).sum() / flagged.sum()) if flagged.any() else float("nan")
    recall = float((flagged & must).sum() / must.sum()) if must.any() else float("nan")
    return FlagQuality(flagged=int(flagged.sum()), precision=precision, recall=recall,
                       related_units=int(related.sum()), planted_units=int(must.sum()),
                       planted_auc=[float(x) for x in truth])
