"""Caption words and n-grams (pure Python): what the descriptions' caption evidence counts (scoring.enrichment)
and what free text in `find` matches (labels.query; the browser's search does the same, static/find.js).

A caption is lower-cased and split into words: runs of letters and digits, an apostrophe inside a word dropped
("dog's" -> "dogs"). Its n-grams are every word that is not in STOPWORDS and every pair of adjacent words
neither of which is a stopword, each once.
"""
from __future__ import annotations

import re
from typing import List, Optional

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves s t d ll m o re ve y isn aren wasn weren
hasn haven hadn doesn don didn won wouldn shan shouldn can cannot couldn mustn let us via per vs etc also one two
""".split())
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def words(caption: Optional[str]) -> List[str]:
    """The caption's words, lower-cased (module docstring)."""
    return [w.replace("'", "") for w in _WORD.findall(str(caption or "").lower())]


def caption_ngrams(caption: Optional[str]) -> List[str]:
    """The caption's n-grams (every non-stopword, every adjacent pair of non-stopwords), each once."""
    tokens = words(caption)
    keep = [t not in STOPWORDS for t in tokens]
    grams = [t for t, k in zip(tokens, keep) if k]
    grams += [f"{a} {b}" for a, b, ka, kb in zip(tokens, tokens[1:], keep, keep[1:]) if ka and kb]
    return list(dict.fromkeys(grams))
