"""Feature visualizations, cache-or-compute: one HDF5 record per (model, layer, unit, settings)
(neurolens.records.visualize)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..labels.policy import BlurPolicy
from ..models.layer_table import check_unit, resolve_layer
from ..optvis.precision import resolve_precision
from ..records.keys import as_basis, as_cache
from ..records.scan import dataset_top1
from ..records.visualize import record_path, unit_tag, visualization_record
from ..storage.cache import Cache, Record
from ..storage.files import save_png
from ..types import RenderResult, RenderSettings, budget_settings

DEFAULT_OUT = Path("outputs") / "visualize"
MAX_BATCH_IMAGES = 16  # (unit, seed) images optimized together; more units are done in further batches


def resolved_settings(clip, settings: RenderSettings) -> RenderSettings:
    """Fill in what depends on the model, the device and the step budget (types.budget_settings: a short run
    keeps its steps at full size), so the cache key names what was actually run."""
    return dataclasses.replace(
        budget_settings(settings),
        size=settings.size or clip.image_size,
        seeds=tuple(int(s) for s in settings.seeds),
        precision=resolve_precision(settings.precision, clip.device_type),
    )


def _result_from_record(record: Record, layer: str, unit: int, settings: RenderSettings, clip) -> RenderResult:
    return RenderResult(layer=layer, unit=unit, seeds=settings.seeds, images=record.arrays["images"],
                        activations=record.arrays["activations"], curve=record.arrays["curve"],
                        settings=settings, fingerprint=clip.fingerprint, cached=True,
                        maxima=record.arrays.get("maxima"))


def run_visualize(clip, layer: str, units: Sequence[int], settings: RenderSettings = RenderSettings(),
                  cache: Optional[Cache] = None, force: bool = False, out_dir: Optional[str | Path] = None,
                  progress: Optional[Callable[[int, int], None]] = None, blur: bool = True,
                  policy: Optional[BlurPolicy] = None, basis=None) -> List[RenderResult]:
    """Feature visualizations of `units` of `layer`: read from the cache, or rendered (several units in one
    batch) and cached unit by unit as each batch finishes, so an interrupted run keeps what it finished.

    With out_dir, one PNG per unit and seed is written there, blurred where the blur policy says so
    (neurolens.labels.policy: a flagged unit, the detector, or a trained model's zero-shot score); each
    result's `blurred` holds the reason per seed (None: raw pixels). blur=False writes raw pixels to
    *_noblur.png files. `policy` replaces the default BlurPolicy.for_layer(clip, layer, cache, blur).
    basis: None for neurons, or a basis of the layer (neurolens.sae.basis.load_basis): `units` are then its
    features, the objective is the feature's pre-TopK encoder activation, and keys and file names say so."""
    cache = as_cache(cache)
    spec = resolve_layer(clip, layer)
    basis = as_basis(basis)
    units = list(dict.fromkeys(int(u) for u in units))
    for unit in units:
        if basis is None:
            check_unit(spec, unit)
        else:
            basis.check_unit(unit)
    settings = resolved_settings(clip, settings)

    results = {}
    missing = []
    for unit in units:
        record = None if force else cache.read(record_path(cache, clip, spec.name, unit, settings, basis))
        if record is not None:
            results[unit] = _result_from_record(record, spec.name, unit, settings, clip)
        else:
            missing.append(unit)

    per_batch = max(1, MAX_BATCH_IMAGES // len(settings.seeds))
    batches = [missing[i:i + per_batch] for i in range(0, len(missing), per_batch)]
    total_steps = settings.steps * len(batches)
    if progress is not None and total_steps:
        progress(0, total_steps)
    if batches:
        from ..optvis.loop import render  # lazy: torch only to render; a cached answer imports none
    for index, batch in enumerate(batches):
        offset = index * settings.steps
        report = (lambda done, total, offset=offset: progress(offset + done, total_steps)) if progress else None
        started = time.time()
        output = render(clip, spec, batch, settings, progress=report, basis=basis)
        elapsed = time.time() - started
        seeds = len(settings.seeds)
        for position, unit in enumerate(batch):
            rows = slice(position * seeds, (position + 1) * seeds)
            record = visualization_record(clip, spec, unit, settings, output.images[rows],
                                          output.activations[rows], output.curve[:, rows], batch, elapsed, basis,
                                          maxima=output.maxima[rows])
            cache.write(record_path(cache, clip, spec.name, unit, settings, basis), record)
            results[unit] = RenderResult(layer=spec.name, unit=unit, seeds=settings.seeds,
                                         images=record.arrays["images"], activations=record.arrays["activations"],
                                         curve=record.arrays["curve"], settings=settings,
                                         fingerprint=clip.fingerprint, cached=False, maxima=record.arrays["maxima"])

    ordered = [results[unit] for unit in units]
    if out_dir is not None:
        policy = policy or BlurPolicy.for_layer(clip, spec.name, cache, blur=blur, basis=basis)
        for result in ordered:
            write_pngs(result, clip.name, out_dir, policy, basis)
    return ordered


def write_pngs(result: RenderResult, model_name: str, out_dir: str | Path, policy: BlurPolicy,
               basis=None) -> List[str]:
    """One PNG per seed under out_dir, as the policy shows it; sets result.paths and result.blurred."""
    paths, reasons = [], []
    for index, seed in enumerate(result.seeds):
        shown, reason = policy.fv(result.unit, Image.fromarray(np.asarray(result.images[index])))
        name = f"{model_name}_{result.layer}_{unit_tag(result.unit, basis)}_seed{seed}.png"
        path = policy.output_path(Path(out_dir) / name)
        paths.append(str(save_png(shown, path)))
        reasons.append(reason)
    result.paths, result.blurred = tuple(paths), tuple(reasons)
    return paths


# ------------------------------------------------------------------------------------- the sanity figure

def top1_comparison(cache, fingerprint: str, layer: str, unit: int, unit_max: Optional[float],
                    basis=None) -> dict:
    """How a visualization compares with the dataset's strongest image for the unit: the keys that `visualize
    --json` adds to each result (and the notebook dashboard shows), from the newest finished scan of the layer
    (and basis) in the cache (records.scan.dataset_top1); no model needed.

        unit_max      the unit's highest activation over the visualization's cells (RenderResult.maxima: the
                      measure a scan ranks dataset images by), or None for a record written before it was kept
        dataset_top1  the unit's top-1 activation in that scan, or None (no finished scan of the layer)
        top1_ratio    unit_max / dataset_top1 (None unless both are known and dataset_top1 > 0)
        above_top1    unit_max >= dataset_top1 (None unless both are known)
        top1_scan     {record, dataset, images, index}: the scan and the top-1 image's dataset index, or None"""
    top = dataset_top1(as_cache(cache), fingerprint, layer, unit, basis)
    known = top is not None and unit_max is not None
    return {
        "unit_max": None if unit_max is None else float(unit_max),
        "dataset_top1": None if top is None else top.value,
        "top1_ratio": float(unit_max) / top.value if known and top.value > 0 else None,
        "above_top1": bool(float(unit_max) >= top.value) if known else None,
        "top1_scan": None if top is None else {"record": str(top.record), "dataset": top.dataset,
                                               "images": top.images, "index": top.index},
    }


def top1_line(comparison: dict, unit_word: str = "unit") -> Optional[str]:
    """One line for the CLI when a visualization ends below the dataset's top-1, else None."""
    if comparison["above_top1"] is not False:
        return None
    scan = comparison["top1_scan"]
    return (f"note: this visualization reaches {comparison['unit_max']:.4g}, below the dataset's top-1 of the "
            f"{unit_word} ({comparison['dataset_top1']:.4g}, image {scan['index']} of {scan['dataset']}, scan "
            f"{scan['record']}); more --steps may help")
