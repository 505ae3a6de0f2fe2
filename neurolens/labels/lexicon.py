"""The NSFW lexicon: term and prompt files (read_list), the paper's string-match terms and the whole lexicon
(data/nsfw_terms.txt), and the caption / URL string match.

Caption / URL filter (`caption_nsfw_matches`): the paper's case-insensitive string match on the terms
porn, hot, adult, xxx, sex, f*ck, rape ('*' = any one character). mode="substring" is the paper's
literal filter (note "hot" matches "photo"); mode="word" asks the term to be a whole word, allowing a
few inflections (sexy, sexual, pornography, raped, ...), which is what the sweep uses on captions;
mode="exact" asks for the whole word and nothing more (for lexicons that list every form they mean: a
concept's "car, cars" must not match "card" or "caring").
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..data import NSFW_TERMS
from ..errors import NeurolensError

PAPER_TERM_COUNT = 7
MATCH_MODES = ("word", "exact", "substring")      # how a caption is matched against terms (module docstring)
TERMS_FILE = NSFW_TERMS

# Inflections a term may carry in mode="word" (sex -> sexy, sexual; porn -> porno, pornography; rape -> raped).
_WORD_SUFFIXES = ("s", "es", "y", "ier", "iest", "ies", "ual", "ually", "uality", "o", "os", "ography",
                  "ographic", "er", "ers", "ed", "ing", "d", "r", "rs")


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


@lru_cache(maxsize=64)
def _term_pattern(terms: Tuple[str, ...], mode: str) -> re.Pattern:
    parts = []
    for term in terms:
        body = "".join("." if ch == "*" else re.escape(ch) for ch in term.lower())
        if mode == "word":
            suffixes = "|".join(re.escape(s) for s in _WORD_SUFFIXES)
            body = rf"(?<![a-z0-9]){body}(?:{suffixes})?(?![a-z0-9])"
        elif mode == "exact":
            body = rf"(?<![a-z0-9]){body}(?![a-z0-9])"
        parts.append(body)
    return re.compile("|".join(parts) if parts else r"(?!x)x")


_RE2_SPECIAL = set("\\.^$|?*+()[]{}")


def re2_pattern(terms: Sequence[str], mode: str) -> str:
    """The caption match of `terms` in `mode` as an RE2 pattern (DuckDB's regexp_matches; RE2 has no
    look-behind): a text matches it exactly when caption_nsfw_matches says so, for lower-cased text.
    A word boundary is a non-alphanumeric character or the text's start or end, consumed instead of looked at."""
    if mode not in MATCH_MODES:
        raise NeurolensError(f"unknown caption match mode {mode!r}; use word, exact or substring")
    parts = []
    for term in terms:
        body = "".join("." if ch == "*" else ("\\" + ch if ch in _RE2_SPECIAL else ch) for ch in term.lower())
        if mode == "word":
            body = "(?:" + body + ")(?:" + "|".join(_WORD_SUFFIXES) + ")?"
        if mode != "substring":
            body = "(?:^|[^a-z0-9])" + body + "(?:[^a-z0-9]|$)"
        parts.append("(?:" + body + ")")
    return "|".join(parts) if parts else "[^\\s\\S]"


def caption_nsfw_matches(texts: Iterable[Optional[str]], terms: Optional[Sequence[str]] = None,
                         mode: str = "substring") -> np.ndarray:
    """(N,) bool: the text contains one of `terms` (default: the paper's 7), case-insensitive.

    '*' in a term matches any one character. mode="substring" is the paper's filter; mode="word" needs a
    whole word (plus a few inflections) so that "hot" no longer matches "photo"; mode="exact" a whole word
    without inflections. None counts as no match."""
    if mode not in MATCH_MODES:
        raise NeurolensError(f"unknown caption match mode {mode!r}; use word, exact or substring")
    pattern = _term_pattern(tuple(terms if terms is not None else default_terms()), mode)
    return np.array([bool(text) and pattern.search(str(text).lower()) is not None for text in texts], dtype=bool)
