"""Figures and grids drawn from a sweep: one Microscope-style panel per unit (run_figure) or many units in one
PNG (run_grid), blurred as the one blur policy says. Both read the cached sweep (swept first if needed) with
the same SweepSettings, so a layer swept once is drawn without a model forward."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..datasets.open import open_dataset
from ..datasets.types import ImageDataset
from ..display.panels import PanelOptions, unit_panel, units_grid
from ..errors import NeurolensError
from ..labels.policy import BlurPolicy
from ..models.layer_table import check_unit, resolve_layer
from ..records.keys import as_basis, as_cache
from ..records.sweep import SweepResult
from ..records.visualize import unit_tag
from ..storage.cache import Cache, safe_segment
from ..storage.files import save_png
from ..types import RenderSettings
from . import visualize
from .settings import SweepSettings, sweep_settings
from .sweep import Progress, run_sweep
from .sweep_find import Scorer

DEFAULT_FIGURES = Path("outputs") / "figures"


def _feature_visualizations(clip, layer: str, units: Sequence[int], settings, cache: Cache, render: bool,
                            progress: Progress, basis=None) -> dict:
    """{unit: (seeds,H,W,3) uint8}: rendered/cached by run_visualize when render=True, else only those
    already in the cache (no model forward)."""
    if not units:
        return {}
    if render:
        return {r.unit: np.asarray(r.images) for r in
                visualize.run_visualize(clip, layer, units, settings, cache=cache, progress=progress, basis=basis)}
    resolved = visualize.resolved_settings(clip, settings)
    found = {}
    for unit in units:
        record = cache.read(visualize.record_path(cache, clip, layer, int(unit), resolved, basis))
        if record is not None:
            found[int(unit)] = np.asarray(record.arrays["images"])
    return found


def blur_policy(clip, sweep: SweepResult, cache: Cache, blur: bool = True, prompts=None, basis=None) -> BlurPolicy:
    """The BlurPolicy of a figure or grid drawn from `sweep`: its flagged units (and those of every cached
    sweep of the layer) and its combined per-image labels (1 positive, 0 negative, NaN unknown or doubtful:
    the policy then asks the detector, or blurs the image as not judged). A random-weights model's zero-shot
    score is never a label source (neurolens.labels.sources), so it never reaches these labels."""
    return BlurPolicy.for_layer(clip, sweep.layer, cache, blur=blur, flagged=sweep.flagged_units,
                                image_labels=np.asarray(sweep.image_labels, dtype=np.float64), prompts=prompts,
                                basis=basis)


def _check_units(clip, layer: str, units: Sequence[int], basis=None) -> List[int]:
    spec = resolve_layer(clip, layer)
    for unit in units:
        if basis is None:
            check_unit(spec, int(unit))
        else:
            basis.check_unit(int(unit))
    return [int(u) for u in dict.fromkeys(units)]


def _label(unit: int, basis) -> str:
    return f"unit {int(unit)}" if basis is None else basis.label(unit)



def _swept(clip, layer: str, dataset, settings: SweepSettings, cache: Cache, progress: Progress,
           scorer: Optional[Scorer], basis) -> SweepResult:
    return run_sweep(clip, layer, dataset, settings, cache=cache, progress=progress, scorer=scorer, write_csv=False,
                     basis=basis)


def run_figure(clip, layer: str, units: Sequence[int], dataset=None, settings: Optional[SweepSettings] = None, *,
               out: Optional[str | os.PathLike] = None, blur: bool = True, fv: bool = True, render_settings=None,
               cache=None, progress: Progress = None, options=None, scorer: Optional[Scorer] = None, basis=None,
               **sweep_options) -> List[Tuple[Path, object]]:
    """One PNG panel per unit under `out` (default outputs/figures/), from the cached sweep (swept first if
    needed). Returns (path, panels.Figure) per unit. Blurred as blur_policy() says; raw pixels (blur=False)
    go to *_noblur.png. basis: an SAE basis draws its features (files ..._sae-<name>_feature<F>.png).
    settings: the sweep's SweepSettings; sweep_options: run_sweep's older keyword arguments (vocab, top_k,
    labels, ...: SweepSettings.updated)."""
    settings = sweep_settings(settings, **sweep_options)
    cache = as_cache(cache)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    basis = as_basis(basis)
    units = _check_units(clip, layer, units, basis)
    sweep = _swept(clip, layer, dataset, settings, cache, progress, scorer, basis)
    fvs = _feature_visualizations(clip, sweep.layer, units, render_settings or RenderSettings(), cache, True,
                                  progress, basis) if fv else {}
    policy = blur_policy(clip, sweep, cache, blur, settings.labels.prompts(), basis)
    folder = Path(out) if out else DEFAULT_FIGURES
    written = []
    for unit in units:
        title = f"{clip.name} ({clip.pretrained})  {sweep.layer}  {_label(unit, basis)}"
        figure = unit_panel(sweep, dataset, unit, title, clip.image_size, policy, fv_images=fvs.get(unit),
                            options=options or PanelOptions())
        path = policy.output_path(folder / f"{safe_segment(clip.name)}_{sweep.layer}_{unit_tag(unit, basis)}.png")
        written.append((save_png(figure.image, path), figure))
    return written


def run_grid(clip, layer: str, units: Optional[Sequence[int]] = None, flagged: bool = False, top: int = 64,
             dataset=None, settings: Optional[SweepSettings] = None, *, out: Optional[str | os.PathLike] = None,
             blur: bool = True, render_fv: bool = False, render_settings=None, cache=None, progress: Progress = None,
             options=None, scorer: Optional[Scorer] = None, basis=None, **sweep_options
             ) -> Tuple[Path, object, List[int]]:
    """Many units in one PNG: `units`, else the sweep's flagged units (flagged=True), else the `top` units by
    AUC; at most `top`. Feature visualizations are shown when cached (render_fv renders them). basis: an SAE
    basis draws its features (file ..._sae-<name>_grid_...png). settings / sweep_options: as run_figure."""
    if int(top) < 1:
        raise NeurolensError(f"--top must be at least 1, got {top}")
    settings = sweep_settings(settings, **sweep_options)
    cache = as_cache(cache)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    basis = as_basis(basis)
    if units:
        units = _check_units(clip, layer, units, basis)
    sweep = _swept(clip, layer, dataset, settings, cache, progress, scorer, basis)
    if units:
        chosen, what = list(units)[:top], "selected units"
    elif flagged:
        chosen, what = sweep.flagged_units[:top], "flagged units"
        if not chosen:
            raise NeurolensError(f"no unit of {sweep.layer} is flagged ({sweep.scores.rule.describe()} against "
                                 f"{' + '.join(sweep.scores.sources) or 'no labels'}); omit --flagged to show the "
                                 f"top units by AUC, or pass --units")
    else:
        chosen, what = [int(u) for u in sweep.scores.ranking()[:top]], "units by AUC"
    fvs = _feature_visualizations(clip, sweep.layer, chosen, render_settings or RenderSettings(), cache, render_fv,
                                  progress, basis)
    policy = blur_policy(clip, sweep, cache, blur, settings.labels.prompts(), basis)
    if basis is not None:
        what = what.replace("units", f"features of SAE {basis.name}")
    title = f"{clip.name} ({clip.pretrained})  {sweep.layer}: {len(chosen)} {what}"
    figure = units_grid(sweep, dataset, chosen, title, clip.image_size, policy, fvs=fvs,
                        options=options or PanelOptions())
    kind = "flagged" if flagged and not units else ("units" if units else "top")
    folder = Path(out) if out else DEFAULT_FIGURES
    basis_part = "" if basis is None else f"_sae-{basis.name}"
    path = policy.output_path(folder / f"{safe_segment(clip.name)}_{sweep.layer}{basis_part}_grid_{kind}{len(chosen)}.png")
    return save_png(figure.image, path), figure, chosen
