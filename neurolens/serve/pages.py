"""The pages, as HTML strings, for the server and the static site alike (one set of Jinja2 templates).

A layer id names a basis too (records.layer_id): `<fp16>-<layer>` is the layer's neurons and
`<fp16>-<layer>~sae-<name>-<hash>` the features of one SAE, whose pages are the same templates worded by
`LayerEntry.words` ("feature 320 of SAE x").

Every link is relative (`root` is the way back to the site's top folder), and page URLs are file names, so
the same HTML works from the server and from `file://`:

    index.html                   home: every (model, layer) in the cache, each basis (neurons, SAEs) with
                                 what was computed
    find.html                    search: the units of every layer (or one) ranked for a concept, a lexicon word
                                 or free text (static/find.js over each layer's find-index.js)
    L/<layer id>/index.html      layer: every unit as a tile; sort, flagged filter, concept filter
                                 (intersections first), text search
    L/<layer id>/find-index.js   the layer's search index (serve.concepts), when it has a concept audit
    L/<layer id>/u/<unit>.html   unit: description and concept table, feature visualizations, top examples with
                                 activation maps, histogram, top texts with their independent marks, NSFW
                                 evidence, neighbours, probe (server + model)
    img/<layer id>/<kind>/...    blurred images (tile/<u>.jpg, crop/<u>-<rank>.jpg, fv/<u>-<n>.jpg)
    raw/<layer id>/<kind>/...    raw pixels on a confirmed reveal (server only, never the static site)
    static/...                   style.css, layer.js, unit.js, find.js

Every page has a search box (base.html) that opens find.html, with the page's layer chosen.

Data that scripts read is embedded as JSON in a `<script type="application/json">` block with `<`, `>`
and `&` escaped, and scripts insert text with textContent only, so a caption or vocabulary entry
holding HTML is shown as text, never run.

Pages never show an absolute local path (they are published as a static site): a dataset's description and a
vocabulary's source name files by their last component (`folder photos (96 images)`), `public_text`.
"""
from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Dict, List, Optional, Set

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from . import charts
from .layer import LayerData
from ..records.sae import trained_saes

TEXTS_PER_TILE = 5          # searched on the layer page; the first is shown on the tile
TEXT_CHARS = 90
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}

_env = Environment(loader=PackageLoader("neurolens.serve", "templates"), autoescape=select_autoescape(["html"]),
                   trim_blocks=True, lstrip_blocks=True)
_env.filters["num"] = charts.number
_env.filters["pct"] = charts.percent
_env.globals["spark"] = charts.spark


def render_template(name: str, **context) -> str:
    """A template of serve/templates rendered with the pages' filters (num, pct) and autoescaping."""
    return _env.get_template(name).render(**context)


def _load_static() -> Dict[str, bytes]:
    folder = resources.files("neurolens.serve") / "static"
    return {entry.name: entry.read_bytes() for entry in folder.iterdir()
            if entry.name[entry.name.rfind("."):] in STATIC_TYPES}


STATIC = _load_static()     # the only files the server sends from disk: a fixed set, read once


def embed_json(value) -> str:
    """JSON safe inside a <script type="application/json"> block."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, default=_plain)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])(?:[A-Za-z]:\\|/|~/)[^\s()'\",;|]*")


def public_text(text: str) -> str:
    """`text` with every absolute path in it (/..., ~/..., C:\\...) replaced by its last component."""
    def name(match) -> str:
        parts = [part for part in re.split(r"[\\/]", match.group(0)) if part]
        return parts[-1] if parts else "/"
    return _ABSOLUTE_PATH.sub(name, str(text))


def quality_numbers(quality) -> Optional[dict]:
    """An SAE's quality report as pages show it: its numeric values only (it comes from files made elsewhere)."""
    if not isinstance(quality, dict):
        return None
    return {key: float(value) for key, value in quality.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def public_summary(summary: dict) -> dict:
    """A layer's summary (records.LayerData.summary) as pages show it: no absolute local path, the SAE's
    quality report numbers only."""
    summary = dict(summary, quality=quality_numbers(summary.get("quality")))
    if summary.get("scan"):
        summary["scan"] = {**summary["scan"], "dataset": public_text(summary["scan"].get("dataset", ""))}
    if summary.get("texts"):
        summary["texts"] = {**summary["texts"], "vocabulary": public_text(summary["texts"].get("vocabulary", ""))}
    return summary


def _finite(value) -> Optional[float]:
    value = float(value)
    return value if np.isfinite(value) else None


@dataclass
class Pages:
    """Renders the pages of some layers. mode: 'serve' (a live server) or 'site' (static files)."""
    layers: Dict[str, LayerData]
    mode: str = "serve"
    reveal: bool = True
    probe_layers: Set[str] = field(default_factory=set)
    examples: Optional[int] = None          # dataset examples per unit page (None: the scan's top-k)
    model_note: str = ""                    # shown on the home page: the model loaded for probes
    images: Dict[str, object] = field(default_factory=dict)   # layer id -> LayerImages (blur reasons)
    # pages are pure functions of the records, which are read once: each page is made once
    _made: Dict[tuple, str] = field(default_factory=dict, repr=False)

    def _once(self, key: tuple, make) -> str:
        if key not in self._made:
            if len(self._made) > 4096:
                self._made.clear()
            self._made[key] = make()
        return self._made[key]

    def _render(self, name: str, root: str, **context) -> str:
        reveal = self.reveal and self.mode == "serve"
        return _env.get_template(name).render(root=root, mode=self.mode, reveal=reveal, **context)

    # ------------------------------------------------------------------------------------------ home

    def home(self) -> str:
        return self._once(("home",), self._home)

    def _home(self) -> str:
        """One group per (weights, layer): a card per basis (the neurons, each SAE) with what was computed,
        and the SAEs trained for the layer that nothing was computed with yet."""
        groups: Dict[tuple, dict] = {}
        for data in self.layers.values():
            summary = public_summary(data.summary())
            group = groups.setdefault(data.entry.layer_key, {
                "model": summary["model"], "layer": summary["layer"], "fingerprint": summary["fingerprint"],
                "pretrained": summary["pretrained"], "rows": [], "cache": data.cache})
            group["rows"].append(summary)
        for group in groups.values():
            shown = {row["sae"] for row in group["rows"] if row["sae"]}
            group["pending"] = [replace(sae, quality=quality_numbers(sae.quality),
                                        unreadable=public_text(sae.unreadable) if sae.unreadable else None)
                                for sae in trained_saes(group.pop("cache"), group["fingerprint"], group["layer"])
                                if sae.name not in shown]
        return self._render("home.html", "", title="Cache", groups=list(groups.values()),
                            model_note=self.model_note, probe_layers=self.probe_layers)

    def siblings(self, data: LayerData) -> list:
        """The other bases of the same (weights, layer) in this app: the layer page's basis switch."""
        return [{"id": layer_id, "title": other.entry.words["basis_title"], "current": other is data}
                for layer_id, other in self.layers.items() if other.entry.layer_key == data.entry.layer_key]

    def basis_links(self, data: LayerData, unit: int) -> List[dict]:
        """A unit page's links across bases, from the SAEs' decoders (no forward pass): for a feature, the
        neurons its decoder direction weighs most; for a neuron, per SAE of the layer in this app, the features
        whose decoder direction weighs it most. Each group: {title, note, rows [{label, weight, href|None}]};
        href is None where that page is not in this app (the target basis is not shown, or not that unit)."""
        groups = []
        if data.entry.is_features:
            targets = [(data.strongest_neurons(unit), self._neurons_of(data))]
        else:
            targets = [(other.features_on_neuron(unit), other) for other in self._siblings_data(data)
                       if other.entry.is_features]
        for rows, other in targets:
            if not rows:
                continue
            listed = set(other.load().listed_units()) if other is not None else set()
            words = other.entry.words if other is not None else {"unit": "unit"}
            title = ("Strongest neurons" if data.entry.is_features
                     else f"Features of SAE {other.entry.sae_name} on this neuron")
            groups.append({"title": title, "rows": [
                {"label": f"{words['unit']} {r['unit']}", "weight": r["weight"],
                 "href": f"../../{other.entry.id}/u/{r['unit']}.html" if other is not None and r["unit"] in listed
                 else None} for r in rows]})
        return groups

    def _siblings_data(self, data: LayerData) -> List[LayerData]:
        return [other for other in self.layers.values() if other.entry.layer_key == data.entry.layer_key]

    def _neurons_of(self, data: LayerData) -> Optional[LayerData]:
        """The neurons of data's layer in this app, or None."""
        return next((other for other in self._siblings_data(data) if not other.entry.is_features), None)

    # ------------------------------------------------------------------------------------------ layer

    def layer_units(self, data: LayerData) -> dict:
        """The layer page's data: one compact row per unit [unit, flagged, evidence, top share, has fv, texts]."""
        flagged = data.flagged()
        evidence = data.evidence_values()
        shares = data.sweep.arrays.get("top_nsfw_share") if data.sweep is not None else None
        rows = []
        for unit in data.listed_units():
            texts = [t["text"][:TEXT_CHARS] for t in data.top_texts(unit, TEXTS_PER_TILE)]
            rows.append([unit, int(bool(flagged[unit])), _finite(evidence[unit]),
                         _finite(shares[unit]) if shares is not None else None,
                         int(bool(data.fv_paths.get(unit))), texts])
        return {"id": data.entry.id, "evidence": data.evidence_name() if data.sweep is not None else None,
                "crops": data.scan is not None, "unit_word": data.entry.words["unit"],
                "units_word": data.entry.words["units"], "units": rows, "concepts": data.concepts.layer_payload()}

    def layer(self, layer_id: str) -> str:
        return self._once(("layer", layer_id), lambda: self._layer(layer_id))

    def _layer(self, layer_id: str) -> str:
        data = self.layers[layer_id].load()
        summary = public_summary(data.summary())
        return self._render("layer.html", "../../", title=f"{data.entry.title}", layer=summary, w=data.entry.words,
                            siblings=self.siblings(data), payload=embed_json(self.layer_units(data)))

    # ------------------------------------------------------------------------------------------ unit

    def unit(self, layer_id: str, unit: int) -> str:
        if self.mode == "site":          # written once anyway: keep no copy
            return self._unit(layer_id, unit)
        return self._once(("unit", layer_id, unit), lambda: self._unit(layer_id, unit))

    def _unit(self, layer_id: str, unit: int) -> str:
        data = self.layers[layer_id].load()
        units = data.units
        listed = data.listed_units()
        before, after = bisect.bisect_left(listed, unit), bisect.bisect_right(listed, unit)
        neighbours = (listed[before - 1] if before > 0 else None, listed[after] if after < len(listed) else None)
        examples = data.top_examples(unit, self.examples)
        maps = data.maps()
        vmax = float(data.top_values[unit, 0]) if data.scan is not None and examples else 1.0
        images = self.images.get(layer_id)
        for example in examples:
            example["reason"] = images.reason(unit, example["index"]) if images else ""
            example["heat"] = (charts.heatmap_cells(maps[unit, example["rank"] - 1], example["cell"], data.grid,
                                                    data.image_size, vmax) if maps is not None else None)
        hist = data.histogram(unit) if data.scan is not None else None
        chart = None
        if hist is not None:
            kth = data.top_values[unit, data.top_k - 1]
            chart = charts.histogram_chart(hist, float(kth) if np.isfinite(kth) else None, float(data.mean[unit]))
        stats = None
        if data.scan is not None:
            stats = {"mean": float(data.mean[unit]), "sd": float(np.sqrt(max(float(data.var[unit]), 0.0))),
                     "max": float(data.top_values[unit, 0]), "images": data.count, "top_k": data.top_k}
        fvs = [{"seed": v.seed, "steps": v.steps, "activation": v.activation,
                "reason": images.reason(unit) if images else ""} for v in data.visualizations(unit)]
        probe = None
        if self.mode == "serve" and layer_id in self.probe_layers:
            probe = {"unit": unit, "count": len(data.keys) if data.scan is not None else 0,
                     "unit_word": data.entry.words["unit"],
                     "edges": [float(e) for e in hist.edges] if hist is not None else []}
        entry = data.entry
        return self._render(
            "unit.html", "../../../", title=f"{entry.label(unit)} · {entry.model or entry.fingerprint16} · {entry.layer}",
            layer=public_summary(data.summary()), unit=unit, w=entry.words, unit_label=entry.label(unit),
            siblings=self.siblings(data),
            units=units, prev=neighbours[0], next=neighbours[1],
            evidence=data.unit_evidence(unit), texts=data.top_texts(unit), texts_missing=data.texts_missing_reason(),
            similar=data.similar_units(unit), examples=examples, maps_missing=maps is None and data.scan is not None,
            chart=chart, stats=stats, fvs=fvs, flagged=bool(data.flagged()[unit]) if units else False,
            probe=probe, probe_json=embed_json(probe) if probe else None, links=self.basis_links(data, unit),
            concept_table=data.concepts.table(unit), description=data.concepts.description(unit))

    # ------------------------------------------------------------------------------------------ search

    def find(self) -> str:
        """find.html: the search page every page's search box opens (static/find.js ranks the units of each
        layer with its search index, find_index)."""
        return self._once(("find",), self._find)

    def _find(self) -> str:
        layers = []
        for layer_id, data in self.layers.items():
            data.load()
            layers.append({"id": layer_id, "title": public_text(data.entry.title), "unit_word": data.entry.words["unit"],
                           "units_word": data.entry.words["units"], "indexed": data.concepts.present,
                           "crops": data.scan is not None})
        return self._render("find.html", "", title="Find units", layers=layers, payload=embed_json({"layers": layers}))

    def find_index(self, layer_id: str) -> Optional[str]:
        """L/<layer id>/find-index.js: the layer's search index (serve.concepts.LayerConcepts.find_index) as a
        script that registers it (a script loads from file:// where a fetch of a JSON file would not)."""
        return self._once(("find-index", layer_id), lambda: self._find_index(layer_id))

    def _find_index(self, layer_id: str) -> Optional[str]:
        data = self.layers[layer_id].load()
        if data.scan is None:
            return None
        index = data.concepts.find_index(data.top_indices, data.captions)
        if index is None:
            return None
        index["title"] = public_text(index["title"])
        return (f"window.neurolensFind = window.neurolensFind || {{}};\n"
                f"window.neurolensFind[{embed_json(layer_id)}] = {embed_json(index)};\n")
