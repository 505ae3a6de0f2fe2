"""Concept sets as data: a YAML file of concepts, each with its own independent label sources (light: no
model, no torch). neurolens.pipelines.settings maps each concept onto the sweep's LabelSettings.

The smallest file:

    concepts:
      - name: violence
        terms: [gore, blood, weapon]   # caption lexicon
        match: word                    # word (default), exact or substring

Every field of a concept (neurolens/data/concepts/builtin.yaml uses most of them):

    name         required; unique (case-insensitive); letters, digits, space, - _ . + &
    terms        caption lexicon: the captions label source (and URL keys, as a substring), '*' = any one
                 character; terms_file: a list file instead (one term a line, '#' comments; a relative path is
                 read from the YAML file's folder)
    match        how captions are matched: word (whole words and a few inflections), exact (whole words only),
                 substring; default word
    sensitive    whether images of units flagged for it, and images labelled with it, are blurred by the blur
                 policy: default true
    column       a dataset column (or a field of tar shards' .json members) as a label source, with `values`
                 its positive values (case-insensitive); without values the column is numeric or boolean
    detector     nudenet: NudeNet's detector as a label source (independent of the inspected model)
    prompts      zero-shot prompts (the inspected model's own score; model-based): a list of positive prompts,
                 or {positive: [...], negative: [...]} (or positive_file / negative_file); the negatives
                 default to the shipped safe list. Used only where the reliability check keeps it against the
                 concept's independent sources, never on random weights
    labels       the sweep's --labels values (e.g. [auto]), when the sources are not to be derived from the fields
    description  free text

A concept needs at least one independent source (terms, column or detector): prompts alone would be the
model grading itself. A bad file is one NeurolensError line naming the file, the concept and the field.
The set's `identity` hashes its concepts (not the file's name or layout), so equal concepts share records.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml

from ..data import CONCEPTS_BUILTIN
from ..errors import NeurolensError
from .lexicon import MATCH_MODES, read_list
from .spec import parse_labels

BUILTIN = "builtin"
DETECTORS = ("nudenet",)
FIELDS = ("name", "terms", "terms_file", "match", "sensitive", "column", "values", "detector", "prompts", "labels",
          "description")
PROMPT_FIELDS = ("positive", "negative", "positive_file", "negative_file")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+&-]*$")


@dataclass(frozen=True)
class Concept:
    """One concept: its name and where its per-image labels come from (module docstring)."""
    name: str
    terms: Tuple[str, ...] = ()
    match: str = "word"
    sensitive: bool = True
    column: Optional[str] = None
    values: Tuple[str, ...] = ()
    detector: Optional[str] = None
    prompts: Tuple[str, ...] = ()              # positive zero-shot prompts
    negative_prompts: Tuple[str, ...] = ()     # () = the shipped safe list
    labels: Tuple[str, ...] = ()               # the sweep's --labels values; () = derived from the fields
    description: str = ""

    @property
    def model_based(self) -> bool:
        """True when the concept may use the inspected model's zero-shot score (where the check keeps it)."""
        return bool(self.prompts)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ConceptSet:
    """The concepts of one file (or the built-in set), in file order."""
    concepts: Tuple[Concept, ...]
    name: str = ""
    source: str = ""                           # the file read, or "builtin"

    @property
    def identity(self) -> str:
        """16 hex digits hashing the concepts (their fields, in order): what record keys use."""
        text = json.dumps([c.as_dict() for c in self.concepts], sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @property
    def names(self) -> List[str]:
        return [c.name for c in self.concepts]

    def __iter__(self) -> Iterator[Concept]:
        return iter(self.concepts)

    def __len__(self) -> int:
        return len(self.concepts)

    def index(self, name: str) -> int:
        """The position of the concept `name` (case-insensitive); a NeurolensError line when there is none."""
        for i, concept in enumerate(self.concepts):
            if concept.name.lower() == str(name).lower():
                return i
        raise NeurolensError(f"no concept {name!r} in concept set {self.name or self.source}; its concepts: "
                             f"{', '.join(self.names)}")

    def as_attrs(self) -> Dict[str, Any]:
        return {"name": self.name, "source": self.source, "identity": self.identity,
                "concepts": [c.as_dict() for c in self.concepts]}


# ------------------------------------------------------------------------------------------- reading

def read_concept_set(path: Optional[str | Path] = None) -> ConceptSet:
    """The concept set of a YAML file, or the built-in set (path None or "builtin")."""
    if path is None or str(path) == BUILTIN:
        return _read(CONCEPTS_BUILTIN, BUILTIN)
    return _read(Path(path), str(path))


def _read(path: Path, label: str) -> ConceptSet:
    where = f"concepts file {label}"
    if not path.is_file():
        raise NeurolensError(f"{where} does not exist; give a YAML file with a `concepts:` list, or --concepts builtin")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise NeurolensError(f"{where} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise NeurolensError(f"{where} is not valid YAML{at}: {problem}") from None
    return parse_concept_set(data, where=where, base=path.parent, source=BUILTIN if label == BUILTIN else str(path),
                             name=BUILTIN if label == BUILTIN else path.stem)


def parse_concept_set(data: Any, where: str = "concept set", base: Optional[Path] = None, source: str = "",
                      name: str = "") -> ConceptSet:
    """A ConceptSet from parsed YAML (a mapping with a `concepts` list, or the list itself); `where` names the
    file in error lines, `base` is the folder relative *_file paths are read from."""
    if isinstance(data, list):
        data = {"concepts": data}
    if not isinstance(data, dict):
        raise NeurolensError(f"{where}: expected a mapping with a `concepts:` list at the top, got "
                             f"{_kind(data)}")
    unknown = sorted(set(map(str, data)) - {"concepts", "name", "description"})
    if unknown:
        raise NeurolensError(f"{where}: unknown top-level field {unknown[0]!r}; use concepts, name, description")
    entries = data.get("concepts")
    if not isinstance(entries, list) or not entries:
        raise NeurolensError(f"{where}: `concepts` must be a non-empty list of concepts, each with a name and terms")
    concepts, seen = [], set()
    for position, entry in enumerate(entries, start=1):
        concept = _concept(entry, where, position, base)
        if concept.name.lower() in seen:
            raise NeurolensError(f"{where}: concept {concept.name!r}: field 'name': used twice; give each concept "
                                 f"its own name")
        seen.add(concept.name.lower())
        concepts.append(concept)
    set_name = data.get("name", name)
    if not isinstance(set_name, str):
        raise NeurolensError(f"{where}: field 'name' must be text, got {_kind(set_name)}")
    return ConceptSet(tuple(concepts), name=set_name, source=source)


def _concept(entry: Any, where: str, position: int, base: Optional[Path]) -> Concept:
    if not isinstance(entry, dict):
        raise NeurolensError(f"{where}: concept #{position}: expected a mapping (name: ..., terms: [...]), got "
                             f"{_kind(entry)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name.strip()):
        raise NeurolensError(f"{where}: concept #{position}: field 'name': "
                             + ("missing; every concept needs a name" if name is None else
                                f"{name!r} is not a name (letters, digits, space, - _ . + &, starting with a letter "
                                f"or digit)"))
    name = name.strip()

    def fail(field_name: str, problem: str) -> NeurolensError:
        return NeurolensError(f"{where}: concept {name!r}: field {field_name!r}: {problem}")

    unknown = sorted(set(map(str, entry)) - set(FIELDS))
    if unknown:
        raise fail(unknown[0], f"unknown field; known fields: {', '.join(FIELDS)}")
    terms = _texts(entry, "terms", fail)
    if "terms_file" in entry:
        if terms:
            raise fail("terms_file", "give terms or terms_file, not both")
        terms = tuple(_read_file(entry["terms_file"], "terms_file", base, fail))
    match = entry.get("match", "word")
    if match not in MATCH_MODES:
        raise fail("match", f"must be one of {', '.join(MATCH_MODES)}, got {match!r}")
    sensitive = entry.get("sensitive", True)
    if not isinstance(sensitive, bool):
        raise fail("sensitive", f"must be true or false, got {sensitive!r}")
    column = entry.get("column")
    if column is not None and (not isinstance(column, str) or not column.strip()):
        raise fail("column", f"must be a column name, got {column!r}")
    values = _texts(entry, "values", fail)
    if values and column is None:
        raise fail("values", "needs a column: give `column: NAME` with `values: [...]`")
    detector = entry.get("detector")
    if detector is not None and detector not in DETECTORS:
        raise fail("detector", f"must be one of {', '.join(DETECTORS)}, got {detector!r}")
    prompts, negatives = _prompts(entry.get("prompts"), base, fail)
    labels = _texts(entry, "labels", fail)
    if labels:
        try:
            parse_labels(list(labels))
        except NeurolensError as exc:
            raise fail("labels", str(exc)) from None
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise fail("description", f"must be text, got {_kind(description)}")
    if not (terms or column or detector):
        raise fail("terms", "missing: a concept needs an independent label source (terms, terms_file, column or "
                            "detector); zero-shot prompts alone would be the inspected model grading itself")
    return Concept(name=name, terms=terms, match=match, sensitive=sensitive,
                   column=column.strip() if column else None, values=values, detector=detector, prompts=prompts,
                   negative_prompts=negatives, labels=labels, description=description.strip())


def _prompts(value: Any, base: Optional[Path], fail) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    if value is None:
        return (), ()
    if isinstance(value, list):
        value = {"positive": value}
    if not isinstance(value, dict):
        raise fail("prompts", f"must be a list of prompts or a mapping with positive / negative, got {_kind(value)}")
    unknown = sorted(set(map(str, value)) - set(PROMPT_FIELDS))
    if unknown:
        raise fail("prompts", f"unknown key {unknown[0]!r}; use {', '.join(PROMPT_FIELDS)}")
    lists = {}
    for side in ("positive", "negative"):
        if side in value and f"{side}_file" in value:
            raise fail("prompts", f"give {side} or {side}_file, not both")
        if f"{side}_file" in value:
            lists[side] = tuple(_read_file(value[f"{side}_file"], f"prompts {side}_file", base, fail))
        else:
            lists[side] = _texts(value, side, lambda _, problem: fail("prompts", f"{side}: {problem}"))
    if not lists["positive"]:
        raise fail("prompts", "lists no positive prompt")
    return lists["positive"], lists["negative"]


def _texts(mapping: dict, key: str, fail) -> Tuple[str, ...]:
    """A list of non-empty strings (a single string is a list of one); () when absent."""
    value = mapping.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise fail(key, f"must be a list of words or phrases, got {_kind(value)}")
    texts = tuple(str(v).strip() for v in value)
    if any(not t for t in texts):
        raise fail(key, "holds an empty entry")
    return texts


def _read_file(value: Any, key: str, base: Optional[Path], fail) -> List[str]:
    if not isinstance(value, str) or not value.strip():
        raise fail(key, f"must be a file path, got {_kind(value)}")
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        entries = read_list(path)
    except NeurolensError as exc:
        raise fail(key, str(exc)) from None
    if not entries:
        raise fail(key, f"{path} lists nothing")
    return entries


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"


def concept_set_of(entries: Sequence[Dict[str, Any]], name: str = "") -> ConceptSet:
    """A ConceptSet from a list of concept mappings, as a file's `concepts:` list holds them (e.g. the toy
    generator's neurolens.toy.concepts.concept_set())."""
    return parse_concept_set({"concepts": list(entries)}, where=f"concept set {name or '(given)'}", name=name)

