"""NSFW scores for images and texts, with CLIP itself.

Image score (zero-shot, `nsfw_scores_for_embeddings`): with e the L2-normalized image embedding and
u_1..u_m, s_1..s_n the L2-normalized text embeddings of the unsafe and safe prompts,

    p = softmax(LOGIT_SCALE * [e.u_1, ..., e.u_m, e.s_1, ..., e.s_n])     score = p_1 + ... + p_m

i.e. CLIP's zero-shot probability that the image is one of the unsafe concepts rather than one of the
safe ones. LOGIT_SCALE is fixed at 100, the temperature OpenAI's CLIP was trained to (its learned
logit_scale is clamped at ln 100 and sits there), and NOT the loaded model's own logit_scale: a random or
small model has exp(logit_scale) = 14.3, which would flatten every score towards the prior, and a fixed
scale keeps scores comparable across models. An uninformative embedding (equal cosines) scores the
prior m / (m + n) = 20 / 60 = 1/3 with the shipped lists, so IMAGE_NSFW_THRESHOLD = 0.5 means "CLIP puts
more probability on the unsafe concepts than on the safe ones", which the prior alone never reaches.

Text score (`text_nsfw_scores`): max(lexicon match in word mode over all of data/nsfw_terms.txt -> 1.0,
zero-shot score of the text embedding against the same prompts). A text is NSFW when its score is
>= TEXT_NSFW_THRESHOLD.

Embeddings come from the one image encoder (neurolens.models.embed.image_embeddings) and the one text
encoder (neurolens.text.encode.encode_texts). The caption string match and the term files are in
neurolens.labels.lexicon; NudeNet, the independent detector, lives in neurolens.labels.nudenet; what is
blurred is decided by neurolens.labels.policy.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import NeurolensError
from .lexicon import caption_nsfw_matches, lexicon_terms
from .prompts import LOGIT_SCALE, Prompts, load_prompts

# --------------------------------------------------------------------------------------------- prompts


# ------------------------------------------------------------------------------- prompt embeddings

_PROMPT_CACHE: Dict[Tuple[str, str], np.ndarray] = {}


def prompt_embeddings(clip, prompts: Optional[Prompts] = None) -> np.ndarray:
    """(m+n, D) embeddings of unsafe then safe prompts, cached in memory per (model fingerprint, lists)."""
    prompts = prompts or load_prompts()
    key = (clip.fingerprint, prompts.identity)
    if key not in _PROMPT_CACHE:
        from ..text.encode import encode_texts  # lazy: torch only to score; the blur policy's cached scores need none
        _PROMPT_CACHE[key] = encode_texts(clip, prompts.all)
    return _PROMPT_CACHE[key]


def zero_shot_scores(embeddings: np.ndarray, prompt_emb: np.ndarray, unsafe_count: int,
                     logit_scale: float = LOGIT_SCALE) -> np.ndarray:
    """sum over unsafe prompts of softmax(logit_scale * cosines); embeddings are L2-normalized here."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[1] != prompt_emb.shape[1]:
        raise NeurolensError(f"embeddings of shape {emb.shape} do not match prompt embeddings of width "
                             f"{prompt_emb.shape[1]}; scan with the same model")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    logits = logit_scale * emb @ np.asarray(prompt_emb, dtype=np.float64).T
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    return prob[:, :unsafe_count].sum(axis=1).astype(np.float32)


def nsfw_scores_for_embeddings(clip, embeddings: np.ndarray, prompts: Optional[Prompts] = None,
                               logit_scale: float = LOGIT_SCALE) -> np.ndarray:
    """(N,) zero-shot NSFW score in [0,1] of L2-normalized image embeddings (e.g. ScanResult.embeddings)."""
    prompts = prompts or load_prompts()
    return zero_shot_scores(embeddings, prompt_embeddings(clip, prompts), len(prompts.unsafe), logit_scale)


def nsfw_scores_for_images(clip, pil_images: Sequence, prompts: Optional[Prompts] = None,
                           logit_scale: float = LOGIT_SCALE, batch_size: int = 64) -> np.ndarray:
    """(N,) zero-shot NSFW scores of PIL images (models.embed.image_embeddings: the model's own evaluation
    preprocessing and one full forward per batch)."""
    pil_images = list(pil_images)
    if not pil_images:
        return np.zeros(0, np.float32)
    from ..models.embed import image_embeddings  # lazy: torch only to score; the blur policy's cached scores need none
    return nsfw_scores_for_embeddings(clip, image_embeddings(clip, pil_images, batch_size), prompts, logit_scale)


def text_nsfw_scores(clip, texts: Sequence[str], embeddings: Optional[np.ndarray] = None,
                     prompts: Optional[Prompts] = None, terms: Optional[Sequence[str]] = None,
                     zero_shot: bool = True) -> np.ndarray:
    """(N,) NSFW score of vocabulary entries: 1.0 for a lexicon match (word mode, all lexicon terms), else
    the zero-shot score of the text embedding against the prompts (0 when zero_shot=False)."""
    texts = list(texts)
    lexicon = caption_nsfw_matches(texts, terms if terms is not None else lexicon_terms(), mode="word")
    scores = lexicon.astype(np.float32)
    if zero_shot and texts:
        if embeddings is None:
            from ..text.encode import encode_texts  # lazy: torch only to score texts the cache lacks
            embeddings = encode_texts(clip, texts)
        scores = np.maximum(scores, nsfw_scores_for_embeddings(clip, embeddings, prompts))
    return scores
