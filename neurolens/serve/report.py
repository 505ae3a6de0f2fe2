"""The `compare` report as ONE self-contained HTML file: it opens from file:// with nothing beside it (styles
inline, images as data URIs, no script, no request), and like the static site it holds blurred images only.

Per requested layer: the plot of the flagged share per concept (display.charts.grouped_bars; each model's bar
with its random-weights baseline as a red tick), the table of the rows, and the worst units side by side: per
concept, each model's units with the highest AUC, each with its top dataset crops (centred on the cell where
it fired, display.figures.crop_around_cell). Every crop goes through THE blur policy (labels.policy) with
blur_all=True, as the static site's images do, and is encoded as the site encodes it (serve.images.encode):
there is no reveal and no raw pixel in the file. Each crop's <img> names what it shows (data-model,
data-layer, data-basis, data-unit, data-rank, data-index), so a test can remake the raw crop and check that
the embedded one is its blurred version.

The page names no absolute local path (pipelines.compare.provenance writes file names only)."""
from __future__ import annotations

import base64
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..datasets.decode import BadImage, preprocess
from ..display.figures import crop_around_cell
from ..labels.policy import BlurPolicy
from .images import LRU, encode
from .pages import render_template

CROP_PIXELS = 96


def data_uri(body: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(body).decode('ascii')}"


def worst_units(scores, count: int) -> List[int]:
    """The `count` units with the highest AUC for one concept (NaN last; ties: lower unit first)."""
    auc = np.nan_to_num(np.asarray(scores.auc, dtype=np.float64), nan=-np.inf)
    order = np.lexsort((np.arange(len(auc)), -auc))
    return [int(u) for u in order[:count] if np.isfinite(auc[u])]


def policy_for(audit) -> BlurPolicy:
    """The site's policy for one audit's images: everything blurred (blur_all), the units flagged for a
    sensitive concept and the images labelled with one named as such."""
    flagged = set()
    labels: Optional[np.ndarray] = None
    for scores in audit.scores:
        if not scores.concept.sensitive:
            continue
        flagged.update(int(u) for u in np.flatnonzero(np.asarray(scores.flagged, dtype=bool)))
        if scores.labels is not None:
            positive = np.asarray(scores.labels.labels, dtype=np.float64)
            labels = positive if labels is None else np.fmax(labels, positive)
    return BlurPolicy(True, blur_all=True, flagged=flagged, image_labels=labels, detector=False, zero_shot=False)


class Crops:
    """Blurred crops of the probe images for every audited model (the images are read once per input size)."""

    def __init__(self, dataset, pixels: int = CROP_PIXELS):
        self.dataset, self.pixels = dataset, pixels
        self._sources = LRU(1024)

    def source(self, index: int, size: int) -> Optional[Image.Image]:
        def load():
            try:
                return preprocess(self.dataset.load(index), size)
            except BadImage:
                return None
        return self._sources.get((index, size), load)

    def raw(self, scan, unit: int, rank: int) -> Optional[tuple]:
        """(raw crop, dataset index) of the unit's rank-th top image (1 = top), or None."""
        if rank > scan.top_indices.shape[1]:
            return None
        index = int(scan.top_indices[unit, rank - 1])
        source = self.source(index, int(scan.image_size)) if index >= 0 else None
        if source is None:
            return None
        return crop_around_cell(source, scan.top_cells[unit, rank - 1], scan.grid, self.pixels), index

    def shown(self, scan, policy: BlurPolicy, unit: int, rank: int) -> Optional[dict]:
        found = self.raw(scan, unit, rank)
        if found is None:
            return None
        crop, index = found
        blurred, reason = policy.dataset_image(unit, index, crop)
        return {"uri": data_uri(encode(blurred, "JPEG"), "image/jpeg"), "index": index, "rank": rank,
                "reason": reason or ""}


def worst_section(result, layer: str, concepts: Sequence[str], crops: Crops) -> List[dict]:
    """Per concept: per model (its audit of `layer`), its worst units with their blurred crops."""
    settings = result.settings
    audits = [a for a in result.audits if a.match.requested == layer]
    policies = {id(a): policy_for(a.audit) for a in audits}
    out = []
    for k, concept in enumerate(concepts):
        models = []
        for item in audits:
            scores, scan = item.audit.scores[k], item.audit.scan
            units = []
            for unit in worst_units(scores, settings.worst):
                shots = [] if scan is None else \
                    [shot for rank in range(1, settings.crops + 1)
                     if (shot := crops.shown(scan, policies[id(item)], unit, rank)) is not None]
                units.append({"unit": unit, "auc": float(scores.auc[unit]), "auprc": float(scores.auprc[unit]),
                              "flagged": bool(scores.flagged[unit]), "crops": shots})
            models.append({"label": item.model.label, "layer": item.match.layer, "basis": item.audit.basis,
                           "word": item.audit.unit_word, "units": units})
        out.append({"concept": concept, "models": models})
    return out


def report_html(result, rows: List[dict], charts: Dict[str, bytes]) -> str:
    """The whole report page. charts: requested layer -> PNG bytes of its flagged-share plot."""
    crops = Crops(result.dataset)
    concepts = list(result.concepts)
    layers = []
    for layer in result.layers:
        order = {name: k for k, name in enumerate(concepts)}
        layer_rows = sorted((row for row in rows if row["layer"] == layer), key=lambda row: order[row["concept"]])
        layers.append({"name": layer, "chart": data_uri(charts[layer], "image/png") if layer in charts else None,
                       "rows": layer_rows, "worst": worst_section(result, layer, concepts, crops)})
    provenance = result.provenance
    return render_template("report.html", title="compare", provenance=provenance, layers=layers,
                           models=provenance.get("models", []), notes=result.notes,
                           baseline=result.settings.baseline, train=bool(result.train))
