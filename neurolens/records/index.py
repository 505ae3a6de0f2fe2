"""The index of a cache: which (model weights, layer, basis) it holds records of, for the web app, the static
site and notebooks. Read-only; folders are listed and only a few records' attrs are opened, so indexing a
cache of thousands of records stays fast.

A basis is the layer's neurons or the features of one SAE (neurolens.sae.basis). Records of both live in the
same folder (`<kind>/<fingerprint[:16]>/<layer>/`); a record's `basis` attr says whose units it holds (the
neurons when absent), and feature visualizations are told apart by file name (records.visualize). Each
(model, layer, basis) is one `LayerEntry`, the one place that names it and its units.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..storage.cache import Cache, read_attrs, safe_segment
from . import concepts, descriptions, maps, scan, sweep, text, visualize
from .keys import NEURONS
from .sae import trained_saes

# kinds of records that a layer's pages can show; a layer is in the index when any of them is cached
KINDS = (scan.KIND, sweep.SWEEP_KIND, text.RANKINGS_KIND, text.DIRECTIONS_KIND, visualize.KIND, maps.KIND,
         concepts.CONCEPTS_KIND, descriptions.DESCRIPTIONS_KIND)
BASIS_SEPARATOR = "~"       # in a layer id, between the layer and an SAE basis (never in a layer folder name)


def layer_id(fingerprint: str, layer: str, basis: str = NEURONS) -> str:
    """URL- and file-safe id of a (weights, layer, basis): `<fingerprint[:16]>-<layer folder>` for the neurons,
    `<fingerprint[:16]>-<layer folder>~<basis id>` for an SAE's features (basis id `sae-<name>-<hash>`)."""
    base = f"{fingerprint[:16]}-{safe_segment(layer)}"
    return base if basis == NEURONS else f"{base}{BASIS_SEPARATOR}{safe_segment(basis)}"


def sae_name_of(basis: str) -> str:
    """The SAE's name in a basis id `sae-<name>-<12 hex digits>` (neurolens.sae.basis), '' for the neurons."""
    if basis == NEURONS or not basis.startswith("sae-"):
        return ""
    name, _, digest = basis[4:].rpartition("-")
    return name if name and len(digest) == 12 else basis[4:]


@dataclass
class LayerEntry:
    """One (model weights, layer, basis) in the cache: the one place that names a layer and its units. The
    basis is the layer's neurons, or the features of one SAE (neurolens.sae.basis): every page, tile,
    breadcrumb and command hint takes its words from here ("unit 5" / "feature 320 of SAE x")."""
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


def _attrs(path: Path) -> dict:
    try:
        return dict(read_attrs(path))
    except (OSError, KeyError, ValueError):
        return {}


def _layer_folders(cache: Cache) -> Dict[Tuple[str, str], Dict[str, List[Path]]]:
    """(fingerprint[:16], layer folder) -> kind -> record paths, for every kind in KINDS."""
    found: Dict[Tuple[str, str], Dict[str, List[Path]]] = {}
    for kind in KINDS:
        for fp16, folder in cache.layers_of(kind):
            paths = cache.layer_records(kind, fp16, folder)
            if paths:
                found.setdefault((fp16, folder), {})[kind] = paths
    return found


def index_cache(cache: Cache) -> List[LayerEntry]:
    """Every (fingerprint, layer, basis) that has at least one record a page can show, by model, layer, then
    neurons before SAEs. A record's basis is its `basis` attr (no attr: the neurons); feature visualizations
    are told apart by file name (their attrs are read only when an SAE name has several bases here)."""
    found: Dict[Tuple[str, str, str], LayerEntry] = {}
    for (fp16, folder), kinds in _layer_folders(cache).items():
        by_basis: Dict[str, Dict[str, List[Path]]] = {}
        scan_info: Dict[str, dict] = {}
        for kind, paths in kinds.items():
            if kind == visualize.KIND:
                continue
            for path in paths:
                attrs = _attrs(path)
                basis = str(attrs.get("basis") or NEURONS)
                by_basis.setdefault(basis, {}).setdefault(kind, []).append(path)
                if kind == scan.KIND and basis != NEURONS and isinstance(attrs.get("basis_info"), dict):
                    scan_info[basis] = attrs["basis_info"]
        named: Dict[str, List[str]] = {}
        for basis in by_basis:
            named.setdefault(sae_name_of(basis), []).append(basis)
        for path in kinds.get(visualize.KIND, []):
            name = visualize.parse_name(path)
            if name is None:
                continue
            if name.owner == NEURONS:
                basis = NEURONS
            elif len(named.get(name.owner, [])) == 1:
                basis = named[name.owner][0]     # checked again when the record is opened (serve.layer)
            else:
                basis = str(_attrs(path).get("basis") or "")
                if not basis.startswith("sae-"):
                    continue
            by_basis.setdefault(basis, {}).setdefault(visualize.KIND, []).append(path)
        for basis, paths in by_basis.items():
            entry = LayerEntry(fp16, folder, basis=basis, sae_info=scan_info.get(basis, {}))
            entry.paths = {kind: sorted(p) for kind, p in paths.items()}
            found[(fp16, folder, basis)] = entry
    entries = list(found.values())
    for entry in entries:
        _name_model(entry)
    names = {(e.fingerprint16, safe_segment(e.layer)): (e.model, e.pretrained, e.layer) for e in entries if e.model}
    for entry in entries:
        if not entry.model and (entry.fingerprint16, safe_segment(entry.layer)) in names:
            entry.model, entry.pretrained, entry.layer = names[(entry.fingerprint16, safe_segment(entry.layer))]
        if entry.is_features:
            entry.sae_quality = _sae_quality(cache, entry)
    return sorted(entries, key=lambda e: (e.model, e.fingerprint16, e.layer, e.is_features, e.sae_name, e.basis))


def _name_model(entry: LayerEntry) -> None:
    """Model name and layer name as the records state them (the folder name is a sanitized copy)."""
    for kind in (scan.KIND, visualize.KIND, sweep.SWEEP_KIND, concepts.CONCEPTS_KIND):
        for path in reversed(entry.paths.get(kind, [])):
            attrs = _attrs(path)
            if not attrs:
                continue
            entry.model = str(attrs.get("model") or "")
            entry.pretrained = str(attrs.get("pretrained") or "")
            entry.layer = str(attrs.get("layer") or entry.layer)
            if entry.model:
                return


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
