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
from ..models.layers import check_unit, resolve_layer
from ..optvis.loop import render, resolve_precision
from ..records.keys import as_basis, as_cache
from ..records.visualize import record_path, unit_tag, visualization_record
from ..storage.cache import Cache, Record
from ..storage.files import save_png
from ..types import RenderResult, RenderSettings

DEFAULT_OUT = Path("outputs") / "visualize"
MAX_BATCH_IMAGES = 16  # (unit, seed) images optimized together; more units are done in further batches


def resolved_settings(clip, settings: RenderSettings) -> RenderSettings:
    """Fill in what depends on the model and device, so the cache key names what was actually run."""
    return dataclasses.replace(
        settings,
        size=settings.size or clip.image_size,
        seeds=tuple(int(s) for s in settings.seeds),
        precision=resolve_precision(settings.precision, clip.device),
    )


def _result_from_record(record: Record, layer: str, unit: int, settings: RenderSettings, clip) -> RenderResult:
    return RenderResult(layer=layer, unit=unit, seeds=settings.seeds, images=record.arrays["images"],
                        activations=record.arrays["activations"], curve=record.arrays["curve"],
                        settings=settings, fingerprint=clip.fingerprint, cached=True)


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
                                          output.activations[rows], output.curve[:, rows], batch, elapsed, basis)
            cache.write(record_path(cache, clip, spec.name, unit, settings, basis), record)
            results[unit] = RenderResult(layer=spec.name, unit=unit, seeds=settings.seeds,
                                         images=record.arrays["images"], activations=record.arrays["activations"],
                                         curve=record.arrays["curve"], settings=settings,
                                         fingerprint=clip.fingerprint, cached=False)

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
