"""What the web app and the static site know about the cache: which (model, layer, basis) it holds, and, per
one of them, the records that pages show. Read-only: every read goes through neurolens.storage.cache.Cache, nothing
is written, and a missing or unreadable record is shown as "not computed", never as an error page.

A basis is the layer's neurons or the features of one SAE (neurolens.sae.basis). Records of both live in the
same folder (`<kind>/<fingerprint[:16]>/<layer>/`); a record's `basis` attr says whose units it holds (the
neurons when absent), and feature visualizations are named `sae-<name>_feature<F>_...`. Each (model, layer,
basis) is one `LayerEntry`, the one place that names it and its units, and has its own layer id, pages and
images, so everything below works on features as on neurons. Folders are listed and only the few scan,
sweep, text and map records' attrs are opened, so the home page does not open thousands of files; an
entry's records are read on its first request and kept in memory.

Which record when there are several for one layer and basis (several datasets, settings or vocabularies): the newest
finished scan; the sweep made from that scan (else the newest); the newest text ranking that stores its
texts, preferring one referenced to a scan's mean activation; the unit directions with the ranking's
reference; every feature visualization of a unit (every cached seed and setting); the top-k activation
maps made from the chosen scan.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..records.keys import NEURONS
from ..records.maps import top_maps_path
from ..records.sae import saved_names
from ..storage.cache import Cache, _safe_segment, read_attrs, written_at

# kinds of records that a layer page can show; the layer exists in the app when any of them is cached
KINDS = ("scan", "sweep", "text-rankings", "text-directions", "visualize", "top-maps")
SAE_KIND = "sae"           # where neurolens.sae.registry keeps trained SAEs
HISTOGRAM_BINS = 40


# ------------------------------------------------------------------------------------------- the index

BASIS_SEPARATOR = "~"       # in a layer id, between the layer and an SAE basis (never in a layer folder name)


def layer_id(fingerprint: str, layer: str, basis: str = NEURONS) -> str:
    """URL- and file-safe id of a (weights, layer, basis): `<fingerprint[:16]>-<layer folder>` for the neurons,
    `<fingerprint[:16]>-<layer folder>~<basis id>` for an SAE's features (basis id `sae-<name>-<hash>`)."""
    base = f"{fingerprint[:16]}-{_safe_segment(layer)}"
    return base if basis == NEURONS else f"{base}{BASIS_SEPARATOR}{_safe_segment(basis)}"


def sae_name_of(basis: str) -> str:
    """The SAE's name in a basis id `sae-<name>-<12 hex digits>` (neurolens.sae.basis), '' for the neurons."""
    if basis == NEURONS or not basis.startswith("sae-"):
        return ""
    name, _, digest = basis[4:].rpartition("-")
    return name if name and len(digest) == 12 else basis[4:]


@dataclass
class LayerEntry:
    """One (model weights, layer, basis) in the cache: the one place in the web app that names a layer and
    its units. The basis is the layer's neurons, or the features of one SAE (neurolens.sae.basis): every
    page, tile, breadcrumb and command hint takes its words from here ("unit 5" / "feature 320 of SAE x")."""
    fingerprint16: str
    layer: str
    paths: Dict[str, List[Path]] = field(default_factory=dict)   # kind -> record paths (sorted)
    model: str = ""
    pretrained: str = ""
    basis: str = NEURONS                 # "neurons" or the SAE basis id the records were made with
    sae_info: dict = field(default_factory=dict)   # the SAE as its scan described it (basis.describe())
    sae_quality: Optional[dict] = None   # the SAE's quality report (cfg.json or the scan's description)

    @property
    def id(self) -> str:
        return layer_id(self.fingerprint16, self.layer, self.basis)

    @property
    def layer_key(self) -> Tuple[str, str]:
        """The (weights, layer) this entry belongs to, whatever its basis."""
        return self.fingerprint16, self.layer

    @property
    def is_features(self) -> bool:
        return self.basis != NEURONS

    @property
    def sae_name(self) -> str:
        return str(self.sae_info.get("name") or sae_name_of(self.basis))

    @property
    def basis_name(self) -> str:
        """How `serve --basis` / `site --basis` name this basis: "neurons" or the SAE's name."""
        return self.sae_name if self.is_features else NEURONS

    @property
    def title(self) -> str:
        return f"{self.model or 'model ' + self.fingerprint16} · {self.layer}" + \
            (f" · SAE {self.sae_name}" if self.is_features else "")

    @property
    def words(self) -> dict:
        """How pages name this entry's units and what to run for them."""
        if not self.is_features:
            return {"unit": "unit", "units": "units", "Unit": "Unit", "Units": "Units", "basis": "neurons",
                    "basis_title": "neurons", "option": ""}
        return {"unit": "feature", "units": "features", "Unit": "Feature", "Units": "Features", "basis": "sae",
                "basis_title": f"SAE {self.sae_name}", "option": f" --sae {self.sae_name}"}

    def label(self, unit: int) -> str:
        """'unit 5' or 'feature 320 of SAE x' (neurolens.sae.basis names them so too)."""
        return f"unit {int(unit)}" if not self.is_features else f"feature {int(unit)} of SAE {self.sae_name}"

    def has(self, kind: str) -> bool:
        return bool(self.paths.get(kind))


def _records(folder: Path) -> List[Path]:
    return sorted(p for p in folder.glob("*.h5") if not p.name.startswith(".") and p.is_file())


def _attrs(path: Path) -> dict:
    try:
        return dict(read_attrs(path))
    except (OSError, KeyError, ValueError):
        return {}


def _visualization_owner(path: Path) -> Optional[str]:
    """From a visualize record's file name (pipelines.visualize.record_path): NEURONS for `unit<U>_...`, the SAE
    name for `sae-<name>_feature<F>_...`, None for anything else."""
    stem = path.stem
    if stem.startswith("unit"):
        return NEURONS
    if stem.startswith("sae-") and "_feature" in stem:
        return stem[4:stem.rindex("_feature")]
    return None


def index_cache(cache: Cache) -> List[LayerEntry]:
    """Every (fingerprint, layer, basis) that has at least one record a page can show, by model, layer, then
    neurons before SAEs. A record's basis is its `basis` attr (no attr: the neurons); feature visualizations
    are told apart by file name (their attrs are read only when an SAE name has several bases here)."""
    found: Dict[Tuple[str, str, str], LayerEntry] = {}
    root = Path(cache.root)
    layer_dirs: Dict[Tuple[str, str], Dict[str, List[Path]]] = {}
    for kind in KINDS:
        base = root / kind
        if not base.is_dir():
            continue
        for fp_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for layer_dir in sorted(p for p in fp_dir.iterdir() if p.is_dir()):
                paths = _records(layer_dir)
                if paths:
                    layer_dirs.setdefault((fp_dir.name, layer_dir.name), {})[kind] = paths
    for (fp16, folder), kinds in layer_dirs.items():
        by_basis: Dict[str, Dict[str, List[Path]]] = {}
        scan_info: Dict[str, dict] = {}
        for kind, paths in kinds.items():
            if kind == "visualize":
                continue
            for path in paths:
                attrs = _attrs(path)
                basis = str(attrs.get("basis") or NEURONS)
                by_basis.setdefault(basis, {}).setdefault(kind, []).append(path)
                if kind == "scan" and basis != NEURONS and isinstance(attrs.get("basis_info"), dict):
                    scan_info[basis] = attrs["basis_info"]
        named: Dict[str, List[str]] = {}
        for basis in by_basis:
            named.setdefault(sae_name_of(basis), []).append(basis)
        for path in kinds.get("visualize", []):
            owner = _visualization_owner(path)
            if owner is None:
                continue
            if owner == NEURONS:
                basis = NEURONS
            elif len(named.get(owner, [])) == 1:
                basis = named[owner][0]           # checked again when the record is opened (LayerData)
            else:
                basis = str(_attrs(path).get("basis") or "")
                if not basis.startswith("sae-"):
                    continue
            by_basis.setdefault(basis, {}).setdefault("visualize", []).append(path)
        for basis, paths in by_basis.items():
            entry = LayerEntry(fp16, folder, basis=basis, sae_info=scan_info.get(basis, {}))
            entry.paths = {kind: sorted(p) for kind, p in paths.items()}
            found[(fp16, folder, basis)] = entry
    entries = list(found.values())
    for entry in entries:
        _name_model(entry)
    names = {(e.fingerprint16, _safe_segment(e.layer)): (e.model, e.pretrained, e.layer) for e in entries if e.model}
    for entry in entries:
        if not entry.model and (entry.fingerprint16, _safe_segment(entry.layer)) in names:
            entry.model, entry.pretrained, entry.layer = names[(entry.fingerprint16, _safe_segment(entry.layer))]
        if entry.is_features:
            entry.sae_quality = _sae_quality(cache, entry)
    return sorted(entries, key=lambda e: (e.model, e.fingerprint16, e.layer, e.is_features, e.sae_name, e.basis))


def _name_model(entry: LayerEntry) -> None:
    """Model name and layer name as the records state them (the folder name is a sanitized copy)."""
    for kind in ("scan", "visualize", "sweep"):
        for path in reversed(entry.paths.get(kind, [])):
            attrs = _attrs(path)
            if not attrs:
                continue
            entry.model = str(attrs.get("model") or "")
            entry.pretrained = str(attrs.get("pretrained") or "")
            entry.layer = str(attrs.get("layer") or entry.layer)
            if entry.model:
                return


@dataclass
class TrainedSae:
    """An SAE trained for a (weights, layer) of the cache (`<cache>/sae/<fp16>/<layer>/<name>/cfg.json`)."""
    name: str
    features: Optional[int]
    k: Optional[int]
    quality: Optional[dict]
    unreadable: Optional[str] = None       # why its cfg.json is not usable (listed so, never a 500)


def trained_saes(cache: Cache, fingerprint16: str, layer: str) -> List[TrainedSae]:
    """The SAEs `neurolens sae train` saved for this weights and layer, from their cfg.json (no weights read,
    every value checked by neurolens.sae.io.check_config; a bad one is listed with its reason)."""
    from ..errors import NeurolensError
    from ..sae.io import read_config  # lazy: sae.io imports torch, which `site` and the pages need only for SAEs
    folder = cache.folder(SAE_KIND, fingerprint16, layer)
    if not folder.is_dir():
        return []
    found = []
    for name in saved_names(cache, fingerprint16, layer):
        try:
            config = read_config(folder / name)
        except NeurolensError as exc:
            found.append(TrainedSae(name, None, None, None, unreadable=str(exc)))
            continue
        info = (config.get("metadata") or {}).get("neurolens") or {}
        found.append(TrainedSae(name, _int_or_none(config.get("d_sae")), _int_or_none(config.get("k")),
                                info.get("quality")))
    return found


def _sae_quality(cache: Cache, entry: LayerEntry) -> Optional[dict]:
    """The quality report of the entry's SAE: as its scan recorded it (the very weights the records were made
    with), else from the trained SAE of that name when its size agrees."""
    quality = entry.sae_info.get("quality")
    if isinstance(quality, dict):
        return quality
    for sae in trained_saes(cache, entry.fingerprint16, entry.layer):
        if sae.name == entry.sae_name and entry.sae_info.get("units") in (None, sae.features):
            return sae.quality
    return None


def sae_candidates(cache: Cache, entry: LayerEntry) -> List[Path]:
    """Where the SAE of a feature entry may be: the registry's folder of its name, then the path its scan
    recorded (an SAE made elsewhere). Empty for the neurons."""
    if not entry.is_features:
        return []
    candidates = [cache.folder(SAE_KIND, entry.fingerprint16, entry.layer) / entry.sae_name]
    if entry.sae_info.get("path"):
        candidates.append(Path(str(entry.sae_info["path"])))
    return candidates


def sae_decoder(cache: Cache, entry: LayerEntry) -> Optional[np.ndarray]:
    """The decoder W_dec (features, neurons) of the SAE that made `entry`'s records, or None when no SAE with
    exactly those weights is found (weights_digest against the basis id's hash)."""
    from ..errors import NeurolensError
    from ..sae.basis import weights_digest
    from ..sae.io import load_sae
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


def _int_or_none(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- one layer

@dataclass
class Histogram:
    """Counts of the unit's per-image activation (spatial max) over the scanned images."""
    edges: np.ndarray          # (bins + 1,)
    counts: np.ndarray         # (bins,) int64
    count: int                 # images counted

    def percentile(self, value: float) -> float:
        """Share (0-100) of counted images whose activation is below `value`, linear within a bin."""
        if self.count == 0:
            return float("nan")
        if value <= self.edges[0]:
            return 0.0
        if value >= self.edges[-1]:
            return 100.0
        position = int(np.searchsorted(self.edges, value, side="right")) - 1
        below = float(self.counts[:position].sum())
        lo, hi = float(self.edges[position]), float(self.edges[position + 1])
        inside = float(self.counts[position]) * ((value - lo) / (hi - lo) if hi > lo else 1.0)
        return 100.0 * (below + inside) / self.count


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
        record = self._newest("scan", lambda r: bool(r.attrs.get("complete")))
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
        self.chunk_paths = [self.cache.path("scan-chunk", self.entry.fingerprint16, self.entry.layer, name)
                            for name in attrs.get("chunks", [])]
        self.fingerprint = str(attrs.get("fingerprint", ""))

    def _load_sweep(self) -> None:
        self.sweep = None
        if not self.entry.has("sweep"):
            return
        scan_name = self.scan_path.name if self.scan is not None else None
        record = self._newest("sweep", lambda r: Path(str(r.attrs.get("scan_record") or "")).name == scan_name)
        self.sweep = record or self._newest("sweep")

    def _load_texts(self) -> None:
        def with_texts(record) -> bool:
            return "texts" in record.arrays
        self.ranking = self._newest("text-rankings", lambda r: with_texts(r) and
                                    str(r.attrs.get("reference", "")).startswith("scan-mean")) \
            or self._newest("text-rankings", with_texts) or self._newest("text-rankings")
        reference = self.ranking.attrs.get("reference") if self.ranking is not None else None
        self.directions_record_path = None
        for path in self.entry.paths.get("text-directions", []):
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
        for path in self.entry.paths.get("visualize", []):
            stem = path.stem
            if self.entry.is_features:
                marker = f"sae-{self.entry.sae_name}_feature"
                number = stem[len(marker):].split("_", 1)[0] if stem.startswith(marker) else ""
            else:
                number = stem[4:].split("_", 1)[0] if stem.startswith("unit") else ""
            if number.isdigit():
                self.fv_paths.setdefault(int(number), []).append(path)

    # ---------------------------------------------------------------------------------------- basics

    @property
    def units(self) -> int:
        """Number of units of the layer, from whatever record is there."""
        self.load()
        if self.scan is not None:
            return int(self.top_values.shape[0])
        if self.sweep is not None:
            return int(len(self.sweep.arrays["flagged"]))
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
        }

    # ---------------------------------------------------------------------------------------- evidence

    def flagged(self) -> np.ndarray:
        units = self.units
        if self.sweep is None:
            return np.zeros(units, dtype=bool)
        return np.asarray(self.sweep.arrays["flagged"], dtype=bool)

    def evidence_name(self) -> str:
        """'AUC' when the sweep stores per-unit ROC AUCs, else 'correlation'."""
        return "AUC" if self.sweep is not None and "auc" in self.sweep.arrays else "correlation"

    def evidence_values(self) -> np.ndarray:
        """(U,) the number units are sorted by: AUC when stored, else the NSFW correlation (NaN: no sweep)."""
        if self.sweep is None:
            return np.full(self.units, np.nan)
        key = "auc" if "auc" in self.sweep.arrays else "correlation"
        return np.asarray(self.sweep.arrays[key], dtype=np.float64)

    def unit_evidence(self, unit: int) -> Optional[dict]:
        """Everything the sweep says about one unit, and the rule's checks (why it is flagged or not)."""
        if self.sweep is None:
            return None
        a, attrs = self.sweep.arrays, self.sweep.attrs
        rule = dict(attrs.get("rule") or {})

        def value(name: str) -> Optional[float]:
            return float(a[name][unit]) if name in a and np.ndim(a[name]) >= 1 else None

        checks = []
        auc, q, p = value("auc"), value("q"), value("p")
        correlation = value("correlation")
        if auc is not None:
            bar = _first(rule, "min_auc", "auc")
            checks.append(("AUC (activation separates labelled-NSFW from other images)", auc, bar, ">="))
        if q is not None:
            bar = _first(rule, "max_q", "fdr", "q")
            checks.append(("q (Benjamini-Hochberg adjusted p)", q, bar, "<="))
        if correlation is not None and auc is None:
            bar = attrs.get("correlation_bar", _first(rule, "min_correlation"))
            checks.append(("NSFW correlation", correlation, bar, ">="))
        top = value("top_nsfw_share")
        if top is not None:
            checks.append(("share of top images that are NSFW", top, _first(rule, "min_top_share"), ">="))
        text = value("text_nsfw_share")
        if text is not None:
            # with an AUC rule the text share raises only text_flag (evidence), never the flag itself
            label = "share of top texts that are NSFW" + (" (text_flag, not the flag)" if auc is not None else "")
            checks.append((label, text, _first(rule, "min_text_share"), ">="))
        rows = []
        for label, number, bar, op in checks:
            passed = None if bar is None else (number >= bar if op == ">=" else number <= bar)
            rows.append({"label": label, "value": number, "bar": bar, "op": op, "passed": passed})
        text_flag = value("text_flag")
        return {"flagged": bool(a["flagged"][unit]), "auc": auc, "q": q, "p": p, "correlation": correlation,
                "top_share": top, "text_share": text, "text_flag": None if text_flag is None else bool(text_flag),
                "checks": rows, "rule": rule,
                "n_images": attrs.get("n_images", _sum_known(attrs.get("n_pos"), attrs.get("n_neg"))),
                "rule_text": _rule_text(rule, auc is not None)}

    def image_labels(self) -> Optional[np.ndarray]:
        """(N,) per dataset index: the sweep's per-image NSFW label or score (NaN unknown), for the blur policy."""
        if self.sweep is None:
            return None
        for name in ("image_labels", "labels", "image_scores"):
            if name in self.sweep.arrays and np.ndim(self.sweep.arrays[name]) == 1:
                return np.asarray(self.sweep.arrays[name], dtype=np.float64)
        return None

    # ---------------------------------------------------------------------------------------- texts

    def top_texts(self, unit: int, count: Optional[int] = None) -> List[dict]:
        """[{text, score, nsfw}] best first; [] without a ranking that stores its texts."""
        if self.ranking is None or "texts" not in self.ranking.arrays:
            return []
        texts = self.ranking.arrays["texts"][unit]
        scores = self.ranking.arrays["top_scores"][unit]
        nsfw = None
        if self.sweep is not None and "text_nsfw" in self.sweep.arrays:
            nsfw = np.asarray(self.sweep.arrays["text_nsfw"][unit], dtype=bool)
        limit = len(texts) if count is None else min(count, len(texts))
        return [{"text": str(texts[i]), "score": float(scores[i]),
                 "nsfw": bool(nsfw[i]) if nsfw is not None and i < len(nsfw) else None} for i in range(limit)]

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
                record = self.cache.read(self.directions_record_path, names=["directions"])
                if record is not None:
                    self._directions = np.asarray(record.arrays["directions"], dtype=np.float32)
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
                    record = self.cache.read(self._maps_path(), names=["maps"])
                    if record is not None and record.arrays["maps"].shape[:2] == self.top_indices.shape:
                        self._maps = record.arrays["maps"]
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
            record = self.cache.read(path, names=["activations"])
            if record is None or str(record.attrs.get("basis") or NEURONS) != self.entry.basis:
                continue       # another SAE of the same name (retrained): not this basis's feature
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
        record = self.cache.read(found[number].record, names=["images"])
        return None if record is None else np.asarray(record.arrays["images"][found[number].position])


def layer_histograms(cache: Cache, chunk_paths: Sequence[Path], units: int, bins: int):
    """(edges (U, bins+1), counts (U, bins), totals (U,)) of every unit's per-image maxima, binned between
    the unit's own min and max, in two streaming passes over the chunk records (never N x U in memory)."""
    lo = np.full(units, np.inf)
    hi = np.full(units, -np.inf)
    for maxima in _chunk_maxima(cache, chunk_paths):
        lo = np.minimum(lo, np.nanmin(maxima, axis=0, initial=np.inf))
        hi = np.maximum(hi, np.nanmax(maxima, axis=0, initial=-np.inf))
    empty = ~np.isfinite(lo)
    lo[empty], hi[empty] = 0.0, 1.0
    flat = hi <= lo
    hi[flat] = lo[flat] + 1e-6 * np.maximum(1.0, np.abs(lo[flat]))
    counts = np.zeros((units, bins), dtype=np.int64)
    width = (hi - lo) / bins
    offsets = np.arange(units) * bins
    for maxima in _chunk_maxima(cache, chunk_paths):
        finite = np.isfinite(maxima)
        position = np.clip(((maxima - lo) / width), 0, bins - 1)
        position = np.where(finite, position, 0).astype(np.int64)
        flat_index = (position + offsets)[finite]
        counts += np.bincount(flat_index, minlength=units * bins).reshape(units, bins)
    edges = lo[:, None] + width[:, None] * np.arange(bins + 1)[None, :]
    edges[:, -1] = hi
    return edges, counts, counts.sum(axis=1)


def _chunk_maxima(cache: Cache, chunk_paths: Sequence[Path]):
    for path in chunk_paths:
        record = cache.read(path, names=["maxima"])
        if record is not None and record.arrays["maxima"].size:
            yield np.asarray(record.arrays["maxima"], dtype=np.float64)


def _first(mapping: dict, *names: str) -> Optional[float]:
    for name in names:
        if name in mapping and mapping[name] is not None:
            try:
                return float(mapping[name])
            except (TypeError, ValueError):
                continue
    return None


def _sum_known(*counts) -> Optional[int]:
    """The sum of the counts, or None when one is unknown."""
    return None if any(c is None for c in counts) else int(sum(counts))


def _rule_text(rule: dict, has_auc: bool) -> str:
    """The flag rule in words, from the thresholds the sweep stored."""
    if not rule:
        return ""
    if has_auc and "max_q" in rule and "min_auc" in rule:
        return (f"flagged when q <= {rule['max_q']:g} and AUC >= {rule['min_auc']:g}; text_flag when at least "
                f"{rule.get('min_text_share', 0):.0%} of the top {rule.get('text_k')} texts are NSFW")
    if has_auc:
        parts = [f"{k} {v}" for k, v in rule.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return "flag rule: " + ", ".join(parts)
    return (f"flagged when the NSFW correlation reaches max({rule.get('min_correlation')}, "
            f"{rule.get('noise_z')}/sqrt(N)) and either at least {rule.get('min_top_share', 0):.0%} of the top "
            f"images or {rule.get('min_text_share', 0):.0%} of the top {rule.get('text_k')} texts are NSFW")
