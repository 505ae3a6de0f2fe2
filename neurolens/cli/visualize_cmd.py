"""neurolens visualize"""
from __future__ import annotations

from typing import List, Optional

import typer
from typing_extensions import Annotated

from ..storage.cache import Cache
from ..types import quality_settings
from .app import app, command, open_basis, print_json, progress_bar
from .options import MODEL, CacheOpt, ForceOpt, JsonOpt, LayerOpt, ModelChoice, NoBlurOpt, SaeOpt, uses

_FAST = quality_settings("fast")
_MICROSCOPE = quality_settings("microscope")


@app.command("visualize", short_help="Feature visualizations of units (activation maximization); blurred if needed.")
@command
@uses(model=MODEL)
def visualize(
    layer: LayerOpt,
    unit: Annotated[List[int], typer.Option("--unit", help="Unit (channel) index, with --sae a feature index; repeat to optimize several units in one batch.")],
    quality: Annotated[str, typer.Option("--quality", help=f"Preset: fast (the benchmarked defaults) or microscope ({_MICROSCOPE.steps} steps, seeds {','.join(map(str, _MICROSCOPE.seeds))} kept apart by diversity {_MICROSCOPE.diversity}, Adam lr {_MICROSCOPE.lr} at full resolution, as Microscope rendered). The options below override it.")] = "fast",
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help=f"Optimizer steps (fast: {_FAST.steps}).")] = None,
    size: Annotated[int, typer.Option("--size", min=0, help="Image size in pixels; 0 = the model's input size.")] = 0,
    seed: Annotated[Optional[List[int]], typer.Option("--seed", help="Random seed; repeat for several images per unit (with --diversity) (fast: 0).")] = None,
    objective: Annotated[str, typer.Option("--objective", help="channel (mean over positions) or neuron (centre cell).")] = _FAST.objective,
    diversity: Annotated[Optional[float], typer.Option("--diversity", min=0.0, help=f"Weight of the diversity term between the seeds of a unit (fast: {_FAST.diversity}).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", min=0.0, help=f"Adam's (peak) learning rate (fast: {_FAST.lr}).")] = None,
    low_res_fraction: Annotated[Optional[float], typer.Option("--low-res-fraction", min=0.0, max=1.0, help=f"Share of steps optimized at lower resolution, where the layer's grid allows (speed) (fast: {_FAST.low_res_fraction}).")] = None,
    keep_best: Annotated[Optional[int], typer.Option("--keep-best", min=0, help=f"Check the clean activation every N steps and keep the best image; 0: the last image (fast: {_FAST.keep_best}, microscope: {_MICROSCOPE.keep_best}).")] = None,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16.")] = _FAST.precision,
    out: Annotated[str, typer.Option("--out", help="Folder for the PNGs.")] = "outputs/visualize",
    force: ForceOpt = False,
    no_blur: NoBlurOpt = False,
    sae: SaeOpt = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Feature visualization (activation maximization) of CLIP units, Microscope style.

    Fourier-parameterized images with decorrelated colour, random jitter/scale/rotation, CLIP's own
    normalization and Adam; the forward stops right after the layer. One PNG per unit and seed goes to
    --out, and the images, final activations, activation curves, settings and a fingerprint of the weights
    go to the HDF5 cache: the same request again is read from the cache (--force recomputes). A PNG is
    written blurred when its unit is flagged in a cached sweep of the layer, when NudeNet (if installed)
    fires on it, or when a trained model's own zero-shot NSFW score passes the threshold (a random model's
    score is noise and never used); --no-blur writes raw pixels to *_noblur.png files instead. With --sae the
    objective is an SAE feature's pre-TopK encoder activation (files named ..._sae-<name>_feature<F>_...).

    --quality fast (the default) is the preset the benchmark measures against torch-lucent; --quality
    microscope renders as OpenAI Microscope did (4096 steps, several seeds with diversity).

    Example:  neurolens visualize --layer image_block_4_5 --unit 1543 --unit 244 --seed 0 --out outputs/
    """
    from ..pipelines.visualize import run_visualize, top1_comparison, top1_line  # lazy: keeps `neurolens --help` free of torch

    chosen = dict(steps=steps, seeds=tuple(seed) if seed else None, lr=lr, diversity=diversity,
                  low_res_fraction=low_res_fraction, keep_best=keep_best)
    settings = quality_settings(quality, objective=objective, size=size, precision=precision,
                                **{name: value for name, value in chosen.items() if value is not None})
    if no_blur:
        typer.echo("note: --no-blur: feature visualizations are written with RAW pixels to *_noblur.png", err=True)
    from ..models.layer_table import resolve_layer  # lazy: keeps `neurolens --help` free of torch
    clip = model.load(quiet=as_json, cache=cache)
    resolve_layer(clip, layer)  # bad layer, SAE or unit: one line before any work starts
    basis = open_basis(clip, layer, sae, cache)
    for value in unit:
        basis.check_unit(value)
    store = Cache(cache)
    with progress_bar(f"visualize {layer}", enabled=not as_json) as update:
        results = run_visualize(clip, layer, unit, settings, cache=store, force=force,
                                out_dir=out, progress=update, blur=not no_blur, basis=basis)
    rows = [dict(unit=r.unit, seed=s, path=r.paths[i], activation=float(r.activations[i]), cached=r.cached,
                 blurred=r.blurred[i],
                 **top1_comparison(store, clip.fingerprint, r.layer, r.unit,
                                   None if r.maxima is None else float(r.maxima[i]), basis))
            for r in results for i, s in enumerate(r.seeds)]
    if as_json:
        document = {"model": clip.name, "pretrained": clip.pretrained, "layer": results[0].layer,
                    "fingerprint": clip.fingerprint, "results": rows}
        if sae is not None:
            document.update(basis=basis.id, sae=basis.name)
        print_json(document)
        return
    for row in rows:
        source = "cache" if row["cached"] else "computed"
        shown = f"  (blurred: {row['blurred']})" if row["blurred"] else ""
        typer.echo(f"{basis.unit_word} {row['unit']:>5} seed {row['seed']}: activation {row['activation']:.4f} "
                   f"({source}) -> {row['path']}{shown}")
        below = top1_line(row, basis.unit_word)
        if below:
            typer.echo(below)
        elif row["above_top1"]:
            ratio = f" ({row['top1_ratio']:.2f}x)" if row["top1_ratio"] is not None else ""
            typer.echo(f"  max over its cells {row['unit_max']:.4g} >= the dataset's top-1 {row['dataset_top1']:.4g}"
                       f"{ratio} (scan of {row['top1_scan']['dataset']})")
