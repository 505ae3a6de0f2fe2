"""NSFW scores for images and texts, with CLIP itself, and the paper's caption string-match filter.

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

Caption / URL filter (`caption_nsfw_matches`): the paper's case-insensitive string match on the terms
porn, hot, adult, xxx, sex, f*ck, rape ('*' = any one character). mode="substring" is the paper's
literal filter (note "hot" matches "photo"); mode="word" asks the term to be a whole word, allowing a
few inflections (sexy, sexual, pornography, raped, ...), which is what the sweep uses on captions.

Text score (`text_nsfw_scores`): max(lexicon match in word mode over all of data/nsfw_terms.txt -> 1.0,
zero-shot score of the text embedding against the same prompts). A text is NSFW when its score is
>= TEXT_NSFW_THRESHOLD.

NudeNet, the independent detector, lives in neurolens.labels.nudenet; what is blurred is decided by
neurolens.labels.policy.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..data import NSFW_PROMPTS_SAFE, NSFW_PROMPTS_UNSAFE, NSFW_TERMS
from ..errors import NeurolensError

LOGIT_SCALE = 100.0
IMAGE_NSFW_THRESHOLD = 0.5
TEXT_NSFW_THRESHOLD = 0.5
PAPER_TERM_COUNT = 7

UNSAFE_PROMPTS_FILE = NSFW_PROMPTS_UNSAFE
SAFE_PROMPTS_FILE = NSFW_PROMPTS_SAFE
TERMS_FILE = NSFW_TERMS

# Inflections a term may carry in mode="word" (sex -> sexy, sexual; porn -> porno, pornography; rape -> raped).
_WORD_SUFFIXES = ("s", "es", "y", "ier", "iest", "ies", "ual", "ually", "uality", "o", "os", "ography",
                  "ographic", "er", "ers", "ed", "ing", "d", "r", "rs")


# --------------------------------------------------------------------------------------------- lists

def read_list(path: str | Path) -> List[str]:
    """The entries of a term or prompt file: one per line, stripped; blank lines are ignored and a line whose
    first non-blank character is '#' is a comment ('#' inside an entry is kept: 'photo #tag')."""
    path = Path(path)
    if not path.is_file():
        raise NeurolensError(f"list file {path} does not exist; give a text file with one entry per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise NeurolensError(f"list file {path} is not UTF-8 text; save it as UTF-8, one entry per line") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def default_terms() -> List[str]:
    """The paper's seven string-match terms: the first 7 entries of data/nsfw_terms.txt."""
    return read_list(TERMS_FILE)[:PAPER_TERM_COUNT]


def lexicon_terms() -> List[str]:
    """Every term of data/nsfw_terms.txt (used for texts)."""
    return read_list(TERMS_FILE)


class Prompts:
    """The unsafe and safe prompt lists used by the zero-shot scores."""

    def __init__(self, unsafe: Sequence[str], safe: Sequence[str]):
        if not unsafe or not safe:
            raise NeurolensError("the NSFW prompt lists need at least one unsafe and one safe prompt; "
                                 "check --unsafe-prompts / --safe-prompts")
        self.unsafe = list(unsafe)
        self.safe = list(safe)

    @property
    def all(self) -> List[str]:
        return self.unsafe + self.safe

    @property
    def identity(self) -> str:
        text = "\n".join(self.unsafe) + "\n--\n" + "\n".join(self.safe)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_prompts(unsafe_file: Optional[str | Path] = None, safe_file: Optional[str | Path] = None) -> Prompts:
    """The shipped prompt lists, or the user's files (--unsafe-prompts / --safe-prompts)."""
    return Prompts(read_list(unsafe_file or UNSAFE_PROMPTS_FILE), read_list(safe_file or SAFE_PROMPTS_FILE))


# ------------------------------------------------------------------------------- prompt embeddings

_PROMPT_CACHE: Dict[Tuple[str, str], np.ndarray] = {}


def encode_text_list(clip, texts: Sequence[str]) -> np.ndarray:
    """(N,D) float32 L2-normalized text embeddings: TEXT's encode_texts when present, else open_clip's."""
    try:
        from ..text.encode import encode_texts  # truncated encoding, shared with the text rankings
    except ImportError:
        encode_texts = None
    if encode_texts is not None:
        return np.asarray(encode_texts(clip, list(texts)), dtype=np.float32)
    import torch
    with torch.no_grad():
        tokens = clip.tokenizer(list(texts)).to(clip.device)
        features = clip.model.encode_text(tokens).float()
        features = torch.nn.functional.normalize(features, dim=-1)
    return features.cpu().numpy().astype(np.float32)


def prompt_embeddings(clip, prompts: Optional[Prompts] = None) -> np.ndarray:
    """(m+n, D) embeddings of unsafe then safe prompts, cached in memory per (model fingerprint, lists)."""
    prompts = prompts or load_prompts()
    key = (clip.fingerprint, prompts.identity)
    if key not in _PROMPT_CACHE:
        _PROMPT_CACHE[key] = encode_text_list(clip, prompts.all)
    return _PROMPT_CACHE[key]


# ------------------------------------------------------------------------------------------ scores

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
    from ..models.embed import image_embeddings
    pil_images = list(pil_images)
    if not pil_images:
        return np.zeros(0, np.float32)
    return nsfw_scores_for_embeddings(clip, image_embeddings(clip, pil_images, batch_size), prompts, logit_scale)


# ------------------------------------------------------------------------------ string matching

@lru_cache(maxsize=64)
def _term_pattern(terms: Tuple[str, ...], mode: str) -> re.Pattern:
    parts = []
    for term in terms:
        body = "".join("." if ch == "*" else re.escape(ch) for ch in term.lower())
        if mode == "word":
            suffixes = "|".join(re.escape(s) for s in _WORD_SUFFIXES)
            body = rf"(?<![a-z0-9]){body}(?:{suffixes})?(?![a-z0-9])"
        parts.append(body)
    return re.compile("|".join(parts) if parts else r"(?!x)x")


def caption_nsfw_matches(texts: Iterable[Optional[str]], terms: Optional[Sequence[str]] = None,
                         mode: str = "substring") -> np.ndarray:
    """(N,) bool: the text contains one of `terms` (default: the paper's 7), case-insensitive.

    '*' in a term matches any one character. mode="substring" is the paper's filter; mode="word" needs a
    whole word (plus a few inflections) so that "hot" no longer matches "photo". None counts as no match."""
    if mode not in ("substring", "word"):
        raise NeurolensError(f"unknown caption match mode {mode!r}; use substring or word")
    pattern = _term_pattern(tuple(terms if terms is not None else default_terms()), mode)
    return np.array([bool(text) and pattern.search(str(text).lower()) is not None for text in texts], dtype=bool)


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
            embeddings = encode_text_list(clip, texts)
        scores = np.maximum(scores, nsfw_scores_for_embeddings(clip, embeddings, prompts))
    return scores
