"""A `find` query as a per-image label (light: numpy and the lexicon only, no model): which images' captions
match a concept name, a lexicon term of a concept, or free text. `neurolens find` (pipelines.find) ranks units by
these matches among their top images; the web app and the static site (serve.concepts) ship the same matches
in their search index, and the browser matches free text as `query_words` and `words` do here.

    concept     its caption lexicon as the concept audit labelled the images (the `captions` source: 1, 0, NaN
                without a caption); a concept without one: its combined label
    lexicon     the term, matched as its concept matches captions (word / exact / substring)
    free text   every word of the query that is not a stopword (scoring.enrichment.words, STOPWORDS; all of
                them when every word is one) is a word of the caption
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..errors import NeurolensError
from ..records.concepts import ConceptsResult
from ..scoring.captions import STOPWORDS, words
from .lexicon import caption_nsfw_matches

KINDS = ("concept", "lexicon", "free text")


@dataclass
class Query:
    text: str
    kind: str                                # KINDS
    concept: Optional[str] = None            # the concept (a concept name or a term of it)
    source: str = ""                         # what matched the captions, in words


def query_words(text: str) -> List[str]:
    """The words free text must find in a caption: its words without stopwords (all of them if that leaves none)."""
    tokens = words(text)
    return [t for t in tokens if t not in STOPWORDS] or tokens


def parse_query(text: str, concepts: ConceptsResult) -> Query:
    """A concept name, else a lexicon term of a concept (the first concept that lists it), else free text."""
    text = " ".join(str(text).split())
    if not text:
        raise NeurolensError("the query is empty; give a concept name, a word or a phrase")
    lowered = text.lower()
    for concept in concepts.concept_set:
        if concept.name.lower() == lowered:
            return Query(text, "concept", concept.name)
    for concept in concepts.concept_set:
        if any(term.lower() == lowered for term in concept.terms):
            return Query(text, "lexicon", concept.name, f"the term '{text}' ({concept.match} match)")
    return Query(text, "free text", None)


def caption_matches(query: Query, concepts: ConceptsResult, captions: Optional[Sequence[str]]) -> np.ndarray:
    """(N,) 1 where the image's caption matches the query, 0 where it does not, NaN where unknown (no caption;
    a concept: its label unknown); sets query.source."""
    if query.kind == "concept":
        scores = concepts.concept(query.concept)
        if scores.labels is not None:
            for source in scores.labels.sources:
                if source.spec.kind == "captions":
                    query.source = f"the caption lexicon of {scores.name}"
                    values = np.asarray(source.scores, dtype=np.float64)
                    return np.where(np.isfinite(values), (values >= source.threshold).astype(np.float64), np.nan)
            query.source = (f"the combined label of {scores.name} ({' + '.join(scores.used) or 'none'}; no caption "
                            f"lexicon)")
            return np.asarray(scores.labels.labels, dtype=np.float64)
        query.source = f"nothing: {scores.name} has no labels ({scores.note})"
        return np.full(len(captions or []), np.nan)
    if captions is None:
        query.source = "nothing: the scan has no captions"
        return np.full(0, np.nan)
    known = np.array([bool(str(c or "").strip()) for c in captions])
    if query.kind == "lexicon":
        concept = concepts.concept_set.concepts[concepts.concept_set.index(query.concept)]
        matched = caption_nsfw_matches(captions, [query.text], concept.match)
    else:
        wanted = set(query_words(query.text))
        query.source = "the caption words " + ", ".join(f"'{t}'" for t in query_words(query.text)) + \
            " (every one, as a word)"
        matched = np.array([wanted <= set(words(c)) for c in captions], dtype=bool)
    return np.where(known, matched.astype(np.float64), np.nan)
