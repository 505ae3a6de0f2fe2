"""One layer (and basis) of the cache as the web app and the static site show it: its records read on first use
and kept in memory (thread-safe: pages are built in a thread pool), and what pages ask of them (top examples,
histograms, texts, evidence, visualizations, SAE links). Read-only: every record is read through its module in
neurolens.records, nothing is written, and a missing or unreadable record is shown as "not computed", never
as an error page.

Which record when there are several for one layer and basis (several datasets, settings or vocabularies): the
newest finished scan; the sweep made from that scan (else the newest); the newest text ranking that stores its
texts, preferring one referenced to a scan's mean activation; the unit directions with the ranking's
reference; every feature visualization of a unit (every cached seed and setting); the top-k activation maps
made from the chosen scan.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import NeurolensError
from ..records import sae as sae_records
from ..records import scan as scan_records
from ..records import sweep as sweep_records
from ..records import text as text_records
from ..records import visualize as visualize_records
from ..records.index import LayerEntry
from ..records.keys import NEURONS
from ..records.maps import read_maps_array, top_maps_path
from ..sae.basis import weights_digest
from ..sae.io import load_sae
from ..storage.cache import Cache, read_attrs, written_at
from .concepts import LayerConcepts
from .histograms import Histogram, layer_histograms

HISTOGRAM_BINS = 40


@dataclass
class Visualization:
    """One cached feature visualization image of a unit."""
    record: Path
    position: int              # row in the record's images
    seed: int
    steps: int
    activation: float


class LayerData:
    """The records of one layer, read on first use and kept (thread-safe: pages are built in a thread pool)."""

    def __init__(self, cache: Cache, entry: LayerEntry):
        self.cache, self.entry = cache, entry
        self._lock = threading.RLock()
        self._loaded = False
        self._histograms: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None
        self._directions: Optional[np.ndarray] = None
        self._maps: Optional[np.ndarray] = None
        self._maps_loaded = False
        self._decoder: Optional[np.ndarray] = None
        self._decoder_loaded = False
        self._concepts: Optional[LayerConcepts] = None

    # ---------------------------------------------------------------------------------------- loading

    def load(self) -> "LayerData":
        with self._lock:
            if not self._loaded:
                self._load_scan()
                self._load_sweep()
                self._load_texts()
                self._load_visualizations()
                self._loaded = True
        return self

    def _newest(self, kind: str, accept=lambda record: True, names: Optional[list] = None):
        """The newest readable record of `kind` that `accept` takes, or None."""
        best = None
        for path in self.entry.paths.get(kind, []):
            record = self.cache.read(path, names=names)
            if record is None or not accept(record):
                continue
            written = written_at(path)
            if best is None or written > best[0]:
                best = (written, record)
        return best[1] if best else None

    def _load_scan(self) -> None:
        record = self._newest(scan_records.KIND, lambda r: bool(r.attrs.get("complete")))
        self.scan = None
        if record is None:
            return
        a, attrs = record.arrays, record.attrs
        self.scan = record
        self.scan_path = record.path
        self.top_values, self.top_indices, self.top_cells = a["top_values"], a["top_indices"], a["top_cells"]
        self.mean, self.var = a["mean"], a["var"]
        self.keys = [str(k) for k in a["keys"]]
        self.captions = [str(c) for c in a["captions"]] if "captions" in a else None
        self.grid = tuple(int(v) for v in attrs["grid"])
        self.image_size = int(attrs["image_size"])
        self.count = int(attrs["count"])
        self.top_k = int(attrs["top_k"])
        self.dataset = str(attrs.get("dataset", ""))
        self.chunk_paths = scan_records.chunk_paths(self.cache, record)
        self.fingerprint = str(attrs.get("fingerprint", ""))

    def _load_sweep(self) -> None:
        self.sweep = None
        if not self.entry.has(sweep_records.SWEEP_KIND):
            return
        scan_name = self.scan_path.name if self.scan is not None else None
        record = self._newest(sweep_records.SWEEP_KIND, lambda r: sweep_records.made_from_scan(r) == scan_name)
        self.sweep = record or self._newest(sweep_records.SWEEP_KIND)

    def _load_texts(self) -> None:
        def with_texts(record) -> bool:
            return "texts" in record.arrays
        rankings = text_records.RANKINGS_KIND
        self.ranking = self._newest(rankings, lambda r: with_texts(r) and
                                    str(r.attrs.get("reference", "")).startswith("scan-mean")) \
            or self._newest(rankings, with_texts) or self._newest(rankings)
        reference = self.ranking.attrs.get("reference") if self.ranking is not None else None
        self.directions_record_path = None
        for path in self.entry.paths.get(text_records.DIRECTIONS_KIND, []):
            try:
                attrs = read_attrs(path)
            except (OSError, KeyError, ValueError):
                continue
            if self.directions_record_path is None or attrs.get("reference") == reference:
                self.directions_record_path = path

    def _load_visualizations(self) -> None:
        """unit -> record paths, from the file names `unit<U>_<settings key>.h5` (neurons) or
        `sae-<name>_feature<F>_<settings key>.h5` (features) (opened when shown)."""
        self.fv_paths: Dict[int, List[Path]] = {}
        owner = self.entry.sae_name if self.entry.is_features else NEURONS
        for path in self.entry.paths.get(visualize_records.KIND, []):
            name = visualize_records.parse_name(path)
            if name is not None and name.owner == owner:
                self.fv_paths.setdefault(name.unit, []).append(path)

    # ---------------------------------------------------------------------------------------- basics

    @property
    def units(self) -> int:
        """Number of units of the layer, from whatever record is there."""
        self.load()
        if self.scan is not None:
            return int(self.top_values.shape[0])
        if self.sweep is not None:
            return sweep_records.unit_count(self.sweep)
        if self.ranking is not None:
            return int(self.ranking.arrays["top_indices"].shape[0])
        return (max(self.fv_paths) + 1) if self.fv_paths else 0

    @property
    def units_known(self) -> bool:
        """False when only feature visualizations are cached: then the layer's width is unknown (`units` is
        one past the highest visualized unit) and pages list the visualized units only."""
        self.load()
        return self.scan is not None or self.sweep is not None or self.ranking is not None

    def listed_units(self) -> List[int]:
        return list(range(self.units)) if self.units_known else sorted(self.fv_paths)

    def summary(self) -> dict:
        """What has been computed for this layer (the home page's row)."""
        self.load()
        flagged = self.flagged()
        entry = self.entry
        return {
            "id": entry.id, "model": entry.model, "pretrained": entry.pretrained,
            "fingerprint": entry.fingerprint16, "layer": entry.layer, "units": self.units,
            "basis": entry.basis, "sae": entry.sae_name if entry.is_features else None, "words": entry.words,
            "quality": entry.sae_quality, "sae_k": entry.sae_info.get("k"),
            "units_known": self.units_known, "listed": len(self.listed_units()),
            "scan": ({"images": self.count, "top_k": self.top_k, "dataset": self.dataset,
                      "grid": list(self.grid)} if self.scan is not None else None),
            "sweep": ({"flagged": int(flagged.sum()), "evidence": self.evidence_name()}
                      if self.sweep is not None else None),
            "visualizations": len(self.fv_paths),
            "texts": ({"top_k": int(self.ranking.arrays["top_indices"].shape[1]),
                       "vocabulary": str(self.ranking.attrs.get("vocab_source", ""))}
                      if self.ranking is not None else None),
            "maps": self.scan is not None and self.cache.exists(self._maps_path()),
            "concepts": self._concepts_summary(),
        }

    def _concepts_summary(self) -> Optional[dict]:
        audit = self.concepts.load().audit
        if audit is None:
            return None
        flagged = audit.flagged()
        return {"concepts": len(audit.scores), "names": [s.name for s in audit.scores],
                "flagged": int(flagged.any(axis=0).sum()), "intersections": len(audit.intersections()),
                "described": self.concepts.descriptions is not None}

    # ---------------------------------------------------------------------------------------- evidence

    def flagged(self) -> np.ndarray:
        return sweep_records.flagged(self.sweep, self.units)

    def evidence_name(self) -> str:
        return sweep_records.evidence_name(self.sweep)

    def evidence_values(self) -> np.ndarray:
        return sweep_records.evidence_values(self.sweep, self.units)

    def unit_evidence(self, unit: int) -> Optional[dict]:
        return sweep_records.unit_evidence(self.sweep, unit)

    def image_labels(self) -> Optional[np.ndarray]:
        """(N,) per image: positive where the sweep labels it NSFW or the concept audit labels it with a sensitive
        concept (np.fmax: a known label wins over NaN), for the blur policy; None without either."""
        sweep, concepts = sweep_records.image_labels(self.sweep), self.concepts.sensitive_labels()
        if sweep is None or concepts is None or len(sweep) != len(concepts):
            return sweep if sweep is not None else concepts
        return np.fmax(sweep, concepts)

    @property
    def concepts(self) -> LayerConcepts:
        """The layer's concept audit and descriptions (serve.concepts), read on first use."""
        with self._lock:
            if self._concepts is None:
                self.load()
                self._concepts = LayerConcepts(self.cache, self.entry,
                                               self.scan_path.name if self.scan is not None else None)
            return self._concepts

    # ---------------------------------------------------------------------------------------- texts

    def top_texts(self, unit: int, count: Optional[int] = None) -> List[dict]:
        """[{text, score, nsfw, marks}] best first; [] without a ranking that stores its texts. `marks`: the
        text's independent marks, [{concept, source}]: every concept of the layer's concept audit whose caption
        lexicon matches the text ("lexicon"), and NSFW from the sweep where its record says why (the NSFW
        lexicon, or "zero-shot (model-based)" only where the check kept it); `nsfw`: whether one says NSFW."""
        if self.ranking is None or "texts" not in self.ranking.arrays:
            return []
        texts = self.ranking.arrays["texts"][unit]
        scores = self.ranking.arrays["top_scores"][unit]
        sweep_marks = sweep_records.text_marks(self.sweep, unit)
        limit = len(texts) if count is None else min(count, len(texts))
        shown = [str(texts[i]) for i in range(limit)]
        marks = self.concepts.lexicon_marks(shown)
        for i in range(limit):
            source = sweep_marks[i] if sweep_marks is not None and i < len(sweep_marks) else None
            if source and not any(m["concept"].lower() == "nsfw" for m in marks[i]):
                marks[i].append({"concept": "nsfw", "source": source})
        return [{"text": shown[i], "score": float(scores[i]), "marks": marks[i],
                 "nsfw": any(m["concept"].lower() == "nsfw" for m in marks[i])} for i in range(limit)]

    def texts_missing_reason(self) -> Optional[str]:
        if self.ranking is None:
            return "no text ranking of this layer in the cache: run `neurolens text` on it"
        if "texts" not in self.ranking.arrays:
            return "this text ranking was cached without its texts: rerun `neurolens text --force` on this layer"
        return None

    def similar_units(self, unit: int, count: int = 8) -> List[dict]:
        """Units whose text direction (text-directions record) is closest to this unit's, by cosine."""
        directions = self._unit_directions()
        if directions is None or not 0 <= unit < len(directions):
            return []
        norms = np.linalg.norm(directions, axis=1)
        if norms[unit] == 0:
            return []
        cosines = directions @ directions[unit] / np.maximum(norms * norms[unit], 1e-12)
        cosines[unit] = -np.inf
        cosines[norms == 0] = -np.inf
        order = np.argsort(-cosines, kind="stable")[:count]
        return [{"unit": int(u), "cosine": float(cosines[u])} for u in order if np.isfinite(cosines[u])]

    def _unit_directions(self) -> Optional[np.ndarray]:
        with self._lock:
            if self._directions is None and self.directions_record_path is not None:
                directions = text_records.read_directions(self.cache, self.directions_record_path)
                if directions is not None:
                    self._directions = np.asarray(directions, dtype=np.float32)
            return self._directions

    # ------------------------------------------------------------------------------- features <-> neurons

    def decoder(self) -> Optional[np.ndarray]:
        """(features, neurons) decoder of this entry's SAE, when its weights are found (the registry's folder of
        that name, else the path its scan recorded) and hash to this entry's basis id; None for the neurons or
        when no such SAE is found. Each row is a feature's unit-norm direction over the layer's neurons."""
        if not self.entry.is_features:
            return None
        with self._lock:
            if not self._decoder_loaded:
                self._decoder = sae_decoder(self.cache, self.entry)
                self._decoder_loaded = True
            return self._decoder

    def strongest_neurons(self, feature: int, count: int = 8) -> List[dict]:
        """The neurons the feature's decoder direction weighs most (by |weight|): [{unit, weight}]."""
        decoder = self.decoder()
        if decoder is None or not 0 <= feature < len(decoder):
            return []
        return _strongest(decoder[feature], count)

    def features_on_neuron(self, neuron: int, count: int = 8) -> List[dict]:
        """The features whose decoder direction weighs this neuron most (by |weight|): [{unit, weight}]."""
        decoder = self.decoder()
        if decoder is None or not 0 <= neuron < decoder.shape[1]:
            return []
        return _strongest(decoder[:, neuron], count)

    # ---------------------------------------------------------------------------------------- scan

    def top_examples(self, unit: int, count: Optional[int] = None) -> List[dict]:
        """[{rank (1 = best), index, value, cell, key, caption}] of the unit's top images."""
        if self.scan is None:
            return []
        rows = []
        limit = self.top_k if count is None else min(count, self.top_k)
        for rank in range(limit):
            index = int(self.top_indices[unit, rank])
            if index < 0:
                break
            rows.append({"rank": rank + 1, "index": index, "value": float(self.top_values[unit, rank]),
                         "cell": [int(v) for v in self.top_cells[unit, rank]], "key": self.keys[index],
                         "caption": self.captions[index] if self.captions else None})
        return rows

    def maps(self) -> Optional[np.ndarray]:
        """(U, k, H, W) float32 activation maps of every unit's top-k images (top-maps record), or None."""
        with self._lock:
            if not self._maps_loaded:
                self._maps_loaded = True
                self.load()
                if self.scan is not None:
                    self._maps = read_maps_array(self.cache, self._maps_path(), self.top_indices.shape)
            return self._maps

    def _maps_path(self) -> Path:
        return top_maps_path(self.cache, self.entry.fingerprint16, self.entry.layer, self.scan_path)

    def histogram(self, unit: int) -> Optional[Histogram]:
        """The unit's activation histogram over the scanned images (None without a scan).

        Today it is binned from the scan's per-image maxima (scan-chunk records), all units in one pass over
        the chunks, on first use; a scan that stores binned counts would answer here instead."""
        edges_counts = self._all_histograms()
        if edges_counts is None:
            return None
        edges, counts, totals = edges_counts
        return Histogram(edges=edges[unit], counts=counts[unit], count=int(totals[unit]))

    def _all_histograms(self):
        with self._lock:
            if self._histograms is None:
                self.load()
                if self.scan is None or not self.chunk_paths:
                    return None
                self._histograms = layer_histograms(self.cache, self.chunk_paths, self.units, HISTOGRAM_BINS)
            return self._histograms

    # ---------------------------------------------------------------------------------------- visualizations

    def visualizations(self, unit: int) -> List[Visualization]:
        """Every cached feature visualization image of the unit (every record, every seed), most steps first."""
        found = []
        for path in self.fv_paths.get(unit, []):
            record = visualize_records.read_visualization(self.cache, path, ["activations"], self.entry.basis)
            if record is None:
                continue       # unreadable, or another SAE of the same name (retrained): not this basis's feature
            settings = record.attrs.get("settings", {})
            seeds = list(settings.get("seeds", range(len(record.arrays["activations"]))))
            for position, activation in enumerate(record.arrays["activations"]):
                seed = int(seeds[position]) if position < len(seeds) else position
                found.append(Visualization(path, position, seed, int(settings.get("steps", 0)), float(activation)))
        return sorted(found, key=lambda v: (-v.steps, v.seed, str(v.record)))

    def visualization_pixels(self, unit: int, number: int) -> Optional[np.ndarray]:
        """(H, W, 3) uint8 of the unit's `number`-th visualization (the order of `visualizations`)."""
        found = self.visualizations(unit)
        if not 0 <= number < len(found):
            return None
        record = visualize_records.read_visualization(self.cache, found[number].record, ["images"])
        return None if record is None else np.asarray(record.arrays["images"][found[number].position])


def sae_candidates(cache: Cache, entry: LayerEntry) -> List[Path]:
    """Where the SAE of a feature entry may be: the registry's folder of its name, then the path its scan
    recorded (an SAE made elsewhere). Empty for the neurons."""
    if not entry.is_features:
        return []
    candidates = [sae_records.layer_folder(cache, entry.fingerprint16, entry.layer) / entry.sae_name]
    if entry.sae_info.get("path"):
        candidates.append(Path(str(entry.sae_info["path"])))
    return candidates


def sae_decoder(cache: Cache, entry: LayerEntry) -> Optional[np.ndarray]:
    """The decoder W_dec (features, neurons) of the SAE that made `entry`'s records, or None when no SAE with
    exactly those weights is found (weights_digest against the basis id's hash)."""
    digest = entry.basis.rpartition("-")[2]
    for folder in sae_candidates(cache, entry):
        if not folder.exists():
            continue
        try:
            sae = load_sae(folder)
        except (NeurolensError, OSError, ValueError, KeyError, RuntimeError):
            continue
        if weights_digest(sae).startswith(digest):
            return sae.W_dec.detach().float().cpu().numpy()
    return None


def _strongest(weights: np.ndarray, count: int) -> List[dict]:
    order = np.argsort(-np.abs(weights), kind="stable")[:count]
    return [{"unit": int(u), "weight": float(weights[u])} for u in order if weights[u] != 0]
