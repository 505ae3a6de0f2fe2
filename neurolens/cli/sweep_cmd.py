"""neurolens sweep, neurolens figure, neurolens grid"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional

import typer
from typing_extensions import Annotated

from ..errors import NeurolensError
from ..pipelines.flags import flags_path, write_flags_csv
from ..pipelines.settings import SweepSettings
from ..pipelines.sweep_find import find_sweep
from ..records.keys import as_basis
from .app import app, command, open_basis, print_json, progress_bar
from .options import (DATASET, ENGINE, LOADER, MODEL, RENDER, SWEEP, CacheOpt, DatasetChoice, EngineChoice, ForceOpt,
                      JsonOpt, LayerOpt, LoaderChoice, ModelChoice, NoBlurOpt, RenderChoice, SaeOpt, uses)

OutDirOpt = Annotated[Optional[str], typer.Option("--out", help="Folder for the PNGs (default outputs/figures/).")]
NO_BLUR_LINE = "note: --no-blur: images are written with RAW pixels, nothing is blurred (may show NSFW content)"


def _units(text: str) -> List[int]:
    try:
        return [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        raise NeurolensError(f"--units must be comma-separated unit numbers such as 1,2,3, got {text!r}") from None


@app.command("sweep", short_help="Score every unit of a layer for NSFW content (AUC, q) and flag units; "
                                  "writes flags.csv.")
@command
@uses(model=MODEL, data=DATASET, loader=LOADER, settings=SWEEP, engine=ENGINE)
def sweep(
    layer: LayerOpt = "image_block_4_5",
    data: DatasetChoice = None,
    settings: SweepSettings = None,
    show: Annotated[int, typer.Option("--show", help="Units printed (text output).")] = 20,
    out: Annotated[Optional[str], typer.Option("--out", help="flags.csv path or folder "
                                               "(default outputs/sweep/<layer>/flags.csv).")] = None,
    force: ForceOpt = False,
    loader: LoaderChoice = None,
    engine: EngineChoice = None,
    sae: SaeOpt = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sweep EVERY unit of a layer for NSFW content. Scans the dataset once (resumable), labels every image
    from independent sources (--labels: captions, a dataset column, NudeNet, and the model's own zero-shot
    score only when it agrees with the others; each source's agreement is printed and stored), then per
    unit: the ROC AUC of its activation between positive and negative images, a Mann-Whitney p and a
    Benjamini-Hochberg q across the layer. A unit is flagged when q <= --max-q and AUC >= --min-auc; the
    NSFW shares of its top images and texts are evidence (texts alone give a text flag). Prints the label
    sources, then the units ranked by AUC; writes flags.csv and the HDF5 cache (no model forward next time).
    With --sae, the SAE's features are the units (flags.csv in outputs/sweep/<layer>_sae-<name>/).

    With --engine ray the scan, the label sources and the units' statistics run in ONE pass on Ray Data
    (no per-image activations are stored; the sources, doubt thresholds and AUC edges are decided on the
    first 8192 items, the AUC is binned beyond them): see docs/ray.md.

    Example:  neurolens sweep --layer image_block_4_5 --dataset laion.parquet --labels column:NSFW=NSFW,UNSURE --labels nudenet
    Example:  neurolens sweep --layer image_block_4_5 --dataset laion/ --labels column:NSFW=NSFW,UNSURE --engine ray --actors 8
    """
    rule = settings.rule
    if engine.keep_per_image:
        raise NeurolensError("--keep-per-image is for scan --engine ray; a sweep on Ray stores no per-image values")
    basis = None
    if engine.ray:
        engine.check_process_only(**{"--workers": loader.workers is not None,
                                     "--auc-memory": settings.auc_memory != SweepSettings().auc_memory,
                                     "--sae": sae is not None})
        from ..pipelines.sweep import run_ray_sweep  # lazy: keeps `neurolens --help` free of torch
        clip = replace(model, device="cpu").load(quiet=as_json, cache=cache)  # the driver ships the tower
        with progress_bar(f"sweep {layer} on Ray", enabled=not as_json) as progress:
            result = run_ray_sweep(clip, layer, data.dataset, settings, cache=cache, force=force, progress=progress,
                                   out=out, ray=engine.ray_options(loader.batch_size), device=model.device,
                                   image_column=data.image_column, caption_column=data.caption_column,
                                   report=lambda state: progress.note(state.line()), decoder=loader.decode)
        description = result.scan.description
    else:
        engine.check_process_only()
        clip = model.load(quiet=as_json, cache=cache)
        basis = open_basis(clip, layer, sae, cache)
        dataset = data.open()
        # the cached answer first: found without the sweep's compute modules (no torch, no model)
        result = None if force else find_sweep(clip, layer, dataset, settings, cache=cache, basis=basis)
        if result is not None:
            result.flags_csv = write_flags_csv(result, flags_path(result.scan.layer, out, as_basis(basis)))
        else:
            from ..pipelines.sweep import run_sweep  # lazy: torch only when the cache lacks the answer
            with progress_bar(f"sweep {layer}", enabled=not as_json) as progress:
                result = run_sweep(clip, layer, dataset, settings, cache=cache, force=force, progress=progress,
                                   out=out, batch_size=loader.batch_size, workers=loader.workers, basis=basis,
                                   decoder=loader.decode)
        description = dataset.description
    for line in result.lines():
        typer.echo(line, err=as_json)
    if as_json:
        print_json(result.ranking())
        return
    s = result.scores
    what = "units" if sae is None else f"features of SAE {basis.name}"
    typer.echo(f"{clip.name} {result.layer}: {len(s.auc)} {what} over {s.n_pos} positive and {s.n_neg} negative "
               f"images of {description} (AUC {s.method}); {int(s.flagged.sum())} flagged "
               f"({rule.describe()}), {int((s.text_flag & ~s.flagged).sum())} more with a text flag only")
    typer.echo(f"{'rank':>4} {'unit':>6} {'AUC':>6} {'q':>8} {'corr':>7} {'img%':>5} {'txt%':>5} {'flag':>4}  top texts")
    for rank, row in enumerate(result.ranking(limit=show, texts=3), start=1):
        auc = f"{row['auc']:.3f}" if row["auc"] is not None else "n/a"
        q = f"{row['q']:.1e}" if row["q"] is not None else "n/a"
        flag = "YES" if row["flagged"] else ("txt" if row["text_flag"] else "")
        text = f"{100 * row['text_nsfw_share']:>5.0f}" if row["text_nsfw_share"] is not None else f"{'-':>5}"
        typer.echo(f"{rank:>4} {row['unit']:>6} {auc:>6} {q:>8} {row['correlation']:>+7.3f} "
                   f"{100 * row['top_nsfw_share']:>5.0f} {text} {flag:>4}  "
                   f"{' | '.join(row['top_texts'])}")
    typer.echo(f"flags: {result.flags_csv}")
    typer.echo(f"scores: {result.path}")


@app.command("figure", short_help="One Microscope-style panel per unit (feature vis., crops, texts); blurred.")
@command
@uses(model=MODEL, data=DATASET, settings=SWEEP, render=RENDER)
def figure(
    unit: Annotated[List[int], typer.Option("--unit", help="Unit index, with --sae a feature index (repeat for "
                                            "several panels).")],
    layer: LayerOpt = "image_block_4_5",
    out: OutDirOpt = None,
    no_blur: NoBlurOpt = False,
    no_fv: Annotated[bool, typer.Option("--no-fv", help="Leave out the feature visualization (no rendering).")] = False,
    render: RenderChoice = None,
    data: DatasetChoice = None,
    settings: SweepSettings = None,
    sae: SaeOpt = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
) -> None:
    """One PNG panel per unit in Microscope's layout: feature visualization(s), top dataset crops, top texts
    with their cosines, the unit's name and its NSFW evidence (AUC, q, shares). BLURRED BY DEFAULT: every crop or feature
    visualization of a flagged unit and every image whose NSFW score passes the threshold. Everything comes
    from the cache when the layer was swept (and the feature visualization rendered): no model forward.

    Example:  neurolens figure --layer image_block_4_5 --unit 1543 --out figures/
    """
    from ..pipelines.figures import run_figure  # lazy: keeps `neurolens --help` free of torch
    render_settings = render.settings()
    if no_blur:
        typer.echo(NO_BLUR_LINE, err=True)
    clip = model.load(cache=cache)
    basis = open_basis(clip, layer, sae, cache)
    dataset = data.open()
    with progress_bar(f"figure {layer}") as progress:
        written = run_figure(clip, layer, unit, dataset, settings, out=out, blur=not no_blur, fv=not no_fv,
                             render_settings=render_settings, cache=cache, progress=progress, basis=basis)
    for path, fig in written:
        typer.echo(f"{path}  ({fig.note})")
    if no_blur:
        typer.echo("NOT BLURRED: --no-blur was given, the figures show raw pixels")


@app.command("grid", short_help="Many units in one PNG, one row each (flagged or chosen units); blurred.")
@command
@uses(model=MODEL, data=DATASET, settings=SWEEP, render=RENDER)
def grid(
    layer: LayerOpt = "image_block_4_5",
    flagged: Annotated[bool, typer.Option("--flagged", help="The sweep's flagged units (by AUC).")] = False,
    units: Annotated[Optional[str], typer.Option("--units", help="Comma-separated units, e.g. 1,2,3.")] = None,
    top: Annotated[int, typer.Option("--top", help="At most this many units (without --flagged/--units: the top "
                                     "units by AUC).")] = 64,
    out: OutDirOpt = None,
    no_blur: NoBlurOpt = False,
    render_fv: Annotated[bool, typer.Option("--render-fv", help="Render feature visualizations that are not "
                                            "cached (default: show only cached ones).")] = False,
    render: RenderChoice = None,
    data: DatasetChoice = None,
    settings: SweepSettings = None,
    sae: SaeOpt = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
) -> None:
    """Many units in one PNG, one row each (feature visualization when cached, top crops, NSFW indicators):
    the flagged units (--flagged), chosen units (--units 1,2,3), or the top units by AUC.
    BLURRED BY DEFAULT, like `figure`; --no-blur writes raw pixels and says so.

    Example:  neurolens grid --layer image_block_4_5 --flagged --top 64 --out figures/
    """
    from ..pipelines.figures import run_grid  # lazy: keeps `neurolens --help` free of torch
    chosen = _units(units) if units else None
    if chosen is not None and not chosen:
        raise NeurolensError("--units needs at least one unit number, e.g. --units 1,2,3")
    render_settings = render.settings()
    if no_blur:
        typer.echo(NO_BLUR_LINE, err=True)
    clip = model.load(cache=cache)
    basis = open_basis(clip, layer, sae, cache)
    dataset = data.open()
    with progress_bar(f"grid {layer}") as progress:
        path, fig, shown = run_grid(clip, layer, chosen, flagged=flagged, top=top, dataset=dataset, settings=settings,
                                    out=out, blur=not no_blur, render_fv=render_fv, render_settings=render_settings,
                                    cache=cache, progress=progress, basis=basis)
    typer.echo(f"{path}  ({len(shown)} {basis.unit_word}s: {', '.join(map(str, shown[:20]))}"
               f"{' ...' if len(shown) > 20 else ''})")
    typer.echo(fig.note)
    if no_blur:
        typer.echo("NOT BLURRED: --no-blur was given, the grid shows raw pixels")
