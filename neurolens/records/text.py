"""The text records: a vocabulary's text embeddings, a layer's unit directions and each unit's top texts.

One HDF5 file each (<fp> is the weights fingerprint's first 16 hex digits):
  text-embeddings/<fp>/text/<key>.h5     embeddings (N,D) float32 L2-normalized, one row per vocabulary
                                         entry; key = (vocabulary identity, encoder version); attrs
                                         vocab_identity, vocab_source, count, model, fingerprint
  text-directions/<fp>/<layer>/<key>.h5  directions (U,D) float32, the unit directions; key = (layer's
                                         capture point, reference identity, version[, basis id]). Reused by
                                         every vocabulary and top-k. attrs layer, reference, basis,
                                         reference_description
  text-rankings/<fp>/<layer>/<key>.h5    top_indices (U,k) int64, top_scores (U,k) float32, best first, and
                                         texts (U,k) (the ranked entries, so readers need no vocabulary);
                                         key = (capture point, vocabulary identity, reference identity, top-k,
                                         version[, basis id]); attrs layer, vocab_identity, vocab_source,
                                         basis, reference, reference_description, top_k, count
  vocabulary/<key>.h5                    the builtin vocabulary's entries (one UTF-8 text, entries joined by
                                         newlines), so a cached answer does not rebuild it from timm's and
                                         open_clip's files; key = what it is made from (text.vocab.
                                         builtin_identity: version, each source file's path, size, mtime);
                                         attrs identity, source, count
A vocabulary's identity is a hash of its entries (same content, same cache, whatever the file name); a
reference's identity is `neutral-grey-0.5` or `scan-mean-<hash of the mean map's bytes>`. Records of an SAE
basis add its id to the key (neurolens.records.keys).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..errors import NeurolensError
from ..storage.cache import Cache, Record, settings_key
from ..text.vocab import Vocabulary
from .keys import basis_id, basis_parts

EMBEDDINGS_KIND = "text-embeddings"
DIRECTIONS_KIND = "text-directions"
RANKINGS_KIND = "text-rankings"
TEXT_VERSION = 1
EMBEDDINGS_FOLDER = "text"        # text embeddings belong to the model, not to a layer
VOCABULARY_KIND = "vocabulary"


# ------------------------------------------------------------------------------------------- vocabulary

def vocabulary_path(cache: Cache, made_from: dict) -> Path:
    return cache.root / VOCABULARY_KIND / f"{settings_key(VOCABULARY_KIND, TEXT_VERSION, made_from)}.h5"


def read_vocabulary(cache: Cache, path: Path) -> Optional[Vocabulary]:
    """The vocabulary kept at `path`, or None when absent or unreadable."""
    record = cache.read(path)
    if record is None or "entries" not in record.arrays:
        return None
    entries = bytes(np.asarray(record.arrays["entries"], dtype=np.uint8)).decode("utf-8").split("\n")
    if len(entries) != int(record.attrs.get("count", -1)):
        return None
    return Vocabulary(entries=entries, identity=str(record.attrs["identity"]), source=str(record.attrs["source"]))


def write_vocabulary(cache: Cache, path: Path, vocab: Vocabulary) -> Optional[Path]:
    """Keep the vocabulary (entries hold no newline: they are whitespace-normalized); None when the cache
    cannot be written (it is then built again next time)."""
    blob = np.frombuffer("\n".join(vocab.entries).encode("utf-8"), dtype=np.uint8)
    try:
        return cache.write(path, Record(arrays={"entries": blob}, attrs={"identity": vocab.identity,
                                                                         "source": vocab.source, "count": len(vocab)}))
    except (NeurolensError, OSError):
        return None


# ------------------------------------------------------------------------------------------- embeddings

def embeddings_path(cache: Cache, fingerprint: str, vocab_identity: str) -> Path:
    key = settings_key(EMBEDDINGS_KIND, TEXT_VERSION, vocab_identity)
    return cache.path(EMBEDDINGS_KIND, fingerprint, EMBEDDINGS_FOLDER, key)


def read_embeddings(cache: Cache, path: Path, count: int) -> Optional[np.ndarray]:
    """The (count, D) embeddings at `path`, or None when absent, unreadable or of another size."""
    record = cache.read(path)
    if record is None or record.arrays.get("embeddings", np.empty(0)).shape[:1] != (count,):
        return None
    return record.arrays["embeddings"].astype(np.float32, copy=False)


def write_embeddings(cache: Cache, path: Path, embeddings: np.ndarray, vocab, clip) -> Path:
    return cache.write(path, Record(arrays={"embeddings": embeddings},
                                    attrs={"vocab_identity": vocab.identity, "vocab_source": vocab.source,
                                           "count": len(vocab), "model": clip.name, "fingerprint": clip.fingerprint}))


# ------------------------------------------------------------------------------------------- directions

def directions_path(cache: Cache, fingerprint: str, spec, reference: str, basis=None) -> Path:
    key = settings_key(DIRECTIONS_KIND, TEXT_VERSION, spec.hook_module, spec.capture, reference,
                       *basis_parts(basis))
    return cache.path(DIRECTIONS_KIND, fingerprint, spec.name, key)


def read_directions(cache: Cache, path: Path, units: Optional[int] = None) -> Optional[np.ndarray]:
    """The (U, D) directions at `path` (only that array is read), or None when absent, unreadable or not of
    `units` units (any number when None)."""
    record = cache.read(path, names=["directions"])
    if record is None:
        return None
    directions = record.arrays["directions"]
    return directions if units is None or directions.shape[:1] == (units,) else None


def write_directions(cache: Cache, path: Path, directions: np.ndarray, layer: str, reference: str,
                     reference_description: str, basis=None) -> Path:
    return cache.write(path, Record(arrays={"directions": directions},
                                    attrs={"layer": layer, "reference": reference, "basis": basis_id(basis),
                                           "reference_description": reference_description}))


# ------------------------------------------------------------------------------------------- rankings

def ranking_path(cache: Cache, fingerprint: str, spec, vocab_identity: str, reference: str, top_k: int,
                 basis=None) -> Path:
    key = settings_key(RANKINGS_KIND, TEXT_VERSION, spec.hook_module, spec.capture, vocab_identity, reference,
                       int(top_k), *basis_parts(basis))
    return cache.path(RANKINGS_KIND, fingerprint, spec.name, key)


def read_ranking(cache: Cache, path: Path, units: int, top_k: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(top_indices int64, top_scores float32), both (units, top_k), or None when absent, unreadable or of
    another shape."""
    record = cache.read(path)
    if record is None or record.arrays.get("top_indices", np.empty((0, 0))).shape != (units, top_k):
        return None
    return record.arrays["top_indices"].astype(np.int64), record.arrays["top_scores"].astype(np.float32)


def write_ranking(cache: Cache, path: Path, top_indices: np.ndarray, top_scores: np.ndarray, top_k: int,
                  layer: str, vocab, reference: str, reference_description: str, basis=None) -> Path:
    """The ranking, with the ranked texts themselves (vocabulary entries), so readers of the cache (the web
    app, the static site) need no vocabulary."""
    entries = vocab.entries
    texts = np.asarray([[entries[int(i)] for i in row] for row in np.asarray(top_indices)], dtype=object)
    return cache.write(path, Record(
        arrays={"top_indices": top_indices, "top_scores": top_scores, "texts": texts},
        attrs={"layer": layer, "vocab_identity": vocab.identity, "vocab_source": vocab.source,
               "basis": basis_id(basis), "reference": reference, "reference_description": reference_description,
               "top_k": int(top_k), "count": len(vocab)}))
