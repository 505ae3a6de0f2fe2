"""Vocabularies for text feature visualization: the builtin word list, a text file, or a table column.

`builtin` is read at run time from files that installed dependencies ship (nothing is downloaded, nothing
is copied into neurolens):
  1. every lemma of the 21,843 ImageNet-21k classes (WordNet synonyms, e.g. "golden retriever"), as timm
     ships them in timm/data/_info (timm: Apache-2.0; the lemmas come from WordNet 3.0, WordNet licence);
  2. the whole-word tokens of CLIP's own BPE vocabulary (open_clip's bpe_simple_vocab_16e6.txt.gz, MIT):
     merges that end a word (`</w>`), lowercase letters only, at least 3 letters, kept only if the word (or
     the word less a plain English suffix such as -s, -y, -ing) occurs in the ImageNet-21k lemmas or
     definitions; this drops word-final fragments such as "cence" or "ation" and keeps common words such as
     "beach" or "smiling" that no class name has.
Entries are lowercased, deduplicated and kept in that order (deterministic); phrases of at most 4 words.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import NeurolensError

BUILTIN = "builtin"
BUILTIN_VERSION = 1
BUILTIN_SOURCE = (
    "builtin: ImageNet-21k class lemmas (timm's copy of WordNet 3.0 synonyms; timm Apache-2.0, WordNet licence) "
    "+ whole-word tokens of CLIP's BPE vocabulary found in those lemmas or their definitions "
    "(open_clip bpe_simple_vocab_16e6.txt.gz, MIT)"
)
DEFAULT_COLUMNS = ("caption", "text")
TIMM_FILES = ("imagenet21k_goog_synsets.txt", "imagenet_synset_to_lemma.txt", "imagenet_synset_to_definition.txt")
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

_LEMMA = re.compile(r"[a-z][a-z' .\-]*[a-z.]|[a-z]")
_WORD = re.compile(r"[a-z]+")
_SUFFIXES = ("ing", "ies", "es", "ed", "ly", "er", "est", "s", "y")


@dataclass(frozen=True)
class Vocabulary:
    """A list of texts to rank, with a content hash (`identity`) that cache keys use."""
    entries: List[str]
    identity: str
    source: str

    def __len__(self) -> int:
        return len(self.entries)


def load_vocab(spec: str = BUILTIN) -> Vocabulary:
    """`builtin`, a text file (one entry per line), or `table.parquet:column` / `table.csv:column`.

    A table without `:column` uses its `caption` or `text` column. Blank entries are dropped and duplicates
    kept once (first occurrence), so a caption column becomes its distinct captions."""
    if is_builtin(spec):
        return builtin_vocab()
    spec = str(spec)
    path, column = _split_spec(spec)
    if not path.is_file():
        raise NeurolensError(f"vocabulary file {str(path)!r} not found; pass --vocab builtin, a text file "
                             f"(one entry per line), or TABLE.parquet:COLUMN / TABLE.csv:COLUMN")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq", ".csv", ".tsv"):
        texts = _read_column(path, column)
        label = f"{path.name}:{column}" if column else path.name
    else:
        if column is not None:
            raise NeurolensError(f"{path.name} is not a .parquet or .csv table, so ':{column}' cannot name a "
                                 f"column; pass the text file alone (one entry per line)")
        texts = _read_lines(path)
        label = path.name
    entries = _clean(texts)
    if not entries:
        raise NeurolensError(f"vocabulary {spec!r} has no non-blank entries; give a file with one text per line "
                             f"or a column of captions")
    return Vocabulary(entries=entries, identity=_identity(entries), source=f"file {label} ({len(entries)} entries)")


def _split_spec(spec: str) -> "tuple[Path, Optional[str]]":
    """FILE or FILE:COLUMN; a path that exists as typed wins (so names with ':' still work)."""
    if Path(spec).is_file() or ":" not in spec:
        return Path(spec), None
    path, column = spec.rsplit(":", 1)
    return Path(path), (column or None)


def _read_lines(path: Path) -> List[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise NeurolensError(f"cannot read vocabulary file {str(path)!r} ({exc.strerror})") from None


def _read_column(path: Path, column: Optional[str]) -> List[str]:
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            handle = pq.ParquetFile(path)   # not pq.read_table: it imports pandas (~0.5 s)
            column = _pick_column(path, handle.schema_arrow.names, column)
            values = handle.read(columns=[column]).column(column).to_pylist()
        else:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
            column = _pick_column(path, table.column_names, column)
            values = table.column(column).to_pylist()
    except NeurolensError:
        raise
    except Exception as exc:  # pyarrow raises many types for a damaged or empty table
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NeurolensError(f"cannot read table {str(path)!r}: {first}") from None
    return [value for value in values if isinstance(value, str)]


def _pick_column(path: Path, names: Sequence[str], column: Optional[str]) -> str:
    if column is not None:
        if column not in names:
            raise NeurolensError(f"{path.name} has no column {column!r}; its columns are: {', '.join(names) or 'none'}")
        return column
    for candidate in DEFAULT_COLUMNS:
        if candidate in names:
            return candidate
    raise NeurolensError(f"{path.name} has no caption or text column; name one as {path.name}:COLUMN "
                         f"(columns: {', '.join(names) or 'none'})")


def _clean(texts: Iterable[str]) -> List[str]:
    seen = set()
    entries = []
    for text in texts:
        text = " ".join(str(text).split())
        if text and text not in seen:
            seen.add(text)
            entries.append(text)
    return entries


def _identity(entries: Sequence[str]) -> str:
    digest = hashlib.sha1()
    for entry in entries:
        digest.update(entry.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:20]


_builtin_cache: Optional[Vocabulary] = None


def builtin_vocab() -> Vocabulary:
    """The builtin list (about 47k words and short phrases; see the module docstring), memoized."""
    global _builtin_cache
    if _builtin_cache is None:
        lemmas, dictionary = _imagenet21k_lemmas()
        words = [w for w in _clip_whole_words() if _known(w, dictionary)]
        entries = _clean(lemmas + words)
        if len(entries) < 20000:  # pragma: no cover - only if a dependency changed its files
            raise NeurolensError(f"the builtin vocabulary came out with only {len(entries)} entries; "
                                 f"check the timm and open_clip installs, or pass --vocab FILE")
        _builtin_cache = Vocabulary(entries=entries, identity=f"builtin-v{BUILTIN_VERSION}-{_identity(entries)}",
                                    source=f"{BUILTIN_SOURCE}; {len(entries)} entries")
    return _builtin_cache


def is_builtin(spec) -> bool:
    return spec is None or str(spec).strip() == "" or str(spec) == BUILTIN


def builtin_identity() -> dict:
    """What the builtin list is made from, without reading it: its version and each source file's path, size and
    mtime (a cached copy of the list is used while these are unchanged: neurolens.pipelines.text.vocabulary)."""
    info, bpe = _timm_info_dir(), _package_dir("open_clip") / BPE_FILE
    files = [info / name for name in TIMM_FILES] + [bpe]
    found = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            return {"version": BUILTIN_VERSION, "files": None}
        found.append([str(path), int(stat.st_size), int(stat.st_mtime_ns)])
    return {"version": BUILTIN_VERSION, "files": found}


def _package_dir(name: str) -> Path:
    """A package's folder without importing it (importing timm alone takes seconds)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:  # pragma: no cover - open_clip depends on timm
        raise NeurolensError(f"the builtin vocabulary needs {name} (installed with open_clip); pip install {name}, "
                             f"or pass --vocab FILE")
    return Path(spec.origin).resolve().parent


def _timm_info_dir() -> Path:
    return _package_dir("timm") / "data" / "_info"


def _imagenet21k_lemmas() -> "tuple[List[str], set]":
    """Lemmas of the ImageNet-21k classes in class order, and every word of their lemmas and definitions."""
    info = _timm_info_dir()
    try:
        synsets = (info / TIMM_FILES[0]).read_text().split()
        lemma_of = _tab_file(info / TIMM_FILES[1])
        definition_of = _tab_file(info / TIMM_FILES[2])
    except OSError as exc:  # pragma: no cover
        raise NeurolensError(f"cannot read timm's ImageNet-21k class files ({exc}); pass --vocab FILE") from None
    lemmas: List[str] = []
    dictionary: set = set()
    for synset in synsets:
        for lemma in lemma_of.get(synset, "").split(","):
            lemma = " ".join(lemma.lower().split())
            dictionary.update(_WORD.findall(lemma))
            if _LEMMA.fullmatch(lemma) and len(lemma.split()) <= 4:
                lemmas.append(lemma)
        dictionary.update(_WORD.findall(definition_of.get(synset, "").lower()))
    return lemmas, dictionary


def _tab_file(path: Path) -> dict:
    table = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition("\t")
        table[key] = value
    return table


def _clip_whole_words() -> List[str]:
    """Word-final BPE merges of CLIP's tokenizer that are plain lowercase words, in merge (frequency) order."""
    path = _package_dir("open_clip") / BPE_FILE
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # the same slice open_clip's SimpleTokenizer uses: 49152 - 256 - 2 merges after the version line
    merges = lines[1:49152 - 256 - 2 + 1]
    words = []
    for merge in merges:
        token = merge.replace(" ", "")
        if token.endswith("</w>"):
            word = token[:-4]
            if len(word) >= 3 and word.isascii() and word.isalpha() and word.islower():
                words.append(word)
    return words


def _known(word: str, dictionary: set) -> bool:
    if word in dictionary:
        return True
    for suffix in _SUFFIXES:
        stem = word[: -len(suffix)]
        if word.endswith(suffix) and len(stem) >= 3 and (stem in dictionary or stem + "e" in dictionary):
            return True
    return False
