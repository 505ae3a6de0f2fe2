"""The planted concepts of the toy generator, as data: each a name, a caption lexicon and an abstract pattern.

Single-concept mode plants one concept, "nsfw" (the style's pattern). Multi-concept mode plants three, each
an abstract texture in a disc, never anything resembling a body or a person, in colours no ordinary shape
or background has, and each with its own caption lexicon (words only):

    nsfw      a one-pixel checkerboard of magenta and pink       words of neurolens/data/nsfw_terms.txt
    violence  a starburst of twelve dark-red and black wedges    VIOLENCE_TERMS
    drugs     diagonal stripes of lime and violet, 2 px wide     DRUGS_TERMS

and shows INTERSECTION (nsfw and violence) together in a share of the images. `concept_set()` is the list
that later code writes as a concept-set file; `truth_column(name)` names a concept's truth column in the
generated table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from ..errors import NeurolensError
from ..labels.lexicon import lexicon_terms

CONCEPT_MODES = ("single", "multi")
# Violent terms of the NSFW lexicon are left out: the nsfw concept stands for sexual content.
_EXCLUDED_TERMS = {"rape"}
VIOLENCE_TERMS = ("gore", "blood", "bloody", "weapon", "stabbing", "gunfire", "knife", "murder", "massacre",
                  "corpse")
DRUGS_TERMS = ("cocaine", "heroin", "syringe", "pills", "narcotics", "overdose", "meth", "opioid", "ecstasy",
               "marijuana")


# The nsfw pattern's two colours: a magenta and a pink, alternating every pixel in a checkerboard.
PLANTED_COLOURS = ((235, 0, 175), (255, 150, 215))


def planted_words() -> List[str]:
    """The lexicon words used in planted captions (neurolens/data/nsfw_terms.txt without wildcards, phrases and
    _EXCLUDED_TERMS), lower-cased."""
    words = [term.lower() for term in lexicon_terms()]
    return [word for word in words if "*" not in word and word not in _EXCLUDED_TERMS and " " not in word]


@dataclass(frozen=True)
class Concept:
    """A planted concept: its name, its caption lexicon, and the pattern its images show."""
    name: str
    terms: Tuple[str, ...]
    pattern: str                                              # neurolens.toy.draw.PATTERNS
    colours: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    description: str


def multi_concepts() -> Tuple[Concept, ...]:
    """The three concepts of multi-concept mode, in the order of their truth columns."""
    return (
        Concept("nsfw", tuple(planted_words()), "checker", PLANTED_COLOURS,
                "a one-pixel checkerboard of magenta and pink in a disc"),
        Concept("violence", VIOLENCE_TERMS, "wedges", ((150, 0, 25), (15, 15, 15)),
                "a starburst of twelve dark-red and black wedges in a disc"),
        Concept("drugs", DRUGS_TERMS, "stripes", ((160, 255, 0), (150, 60, 255)),
                "diagonal stripes of lime and violet, two pixels wide, in a disc"),
    )


INTERSECTION = ("nsfw", "violence")          # the two concepts shown together in a share of the images


def concept_names(mode: str = "multi") -> Tuple[str, ...]:
    """The planted concepts of a mode: ("nsfw",) or the three of multi-concept mode."""
    check_mode(mode)
    return ("nsfw",) if mode == "single" else tuple(c.name for c in multi_concepts())


def concept_set(mode: str = "multi") -> List[Dict]:
    """The planted concepts as a concept set: [{"name", "terms", "match": "word"}], one per concept, in the
    form of a concept-set file's `concepts` list."""
    check_mode(mode)
    chosen = [c for c in multi_concepts() if c.name in concept_names(mode)]
    return [{"name": c.name, "terms": list(c.terms), "match": "word"} for c in chosen]


def truth_column(name: str) -> str:
    """The generated table's bool column that says which images show concept `name`."""
    return f"planted_{name}"


def check_mode(mode: str) -> None:
    if mode not in CONCEPT_MODES:
        raise NeurolensError(f"unknown toy concept mode {mode!r}; use one of {', '.join(CONCEPT_MODES)}")


def assign_concepts(n: int, share: float, intersection_share: float, seed: int) -> List[Tuple[str, ...]]:
    """Which concepts each of n images shows in multi-concept mode: exactly round(share * n) images show each
    concept alone, round(intersection_share * n) show INTERSECTION together, the rest none; chosen by the
    seed. Returns one tuple of concept names per image (empty for neutral images)."""
    names = concept_names("multi")
    for label, value in (("planted share", share), ("intersection share", intersection_share)):
        if not 0.0 <= value <= 1.0:
            raise NeurolensError(f"{label} {value} is outside [0, 1]; give a fraction such as 0.1")
    alone, together = int(round(share * n)), int(round(intersection_share * n))
    if alone * len(names) + together > n:
        raise NeurolensError(f"{len(names)} concepts at planted share {share} plus intersection share "
                             f"{intersection_share} exceed all {n} images; lower the shares")
    order = np.random.default_rng([seed, 7919, 2]).permutation(n)
    shown: List[Tuple[str, ...]] = [()] * n
    for i in order[:together]:
        shown[i] = INTERSECTION
    start = together
    for name in names:
        for i in order[start:start + alone]:
            shown[i] = (name,)
        start += alone
    return shown
