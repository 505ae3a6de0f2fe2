"""neurolens sweep, neurolens figure, neurolens grid"""
from __future__ import annotations

from typing import List, Optional

import typer
from typing_extensions import Annotated

from .app import app, command, print_json, progress_bar
from .options import (DATASET, LOADER, MODEL, RENDER, SWEEP, CacheOpt, DatasetChoice, ForceOpt, JsonOpt, LayerOpt,
                      LoaderChoice, ModelChoice, NoBlurOpt, RenderChoice, SweepChoice, uses)
from ..errors import NeurolensError

OutDirOpt = Annotated[Optional[str], typer.Option("--out", help="Folder for the PNGs (default outputs/figures/).")]
NO_BLUR_LINE = "note: --no-blur: images are written with RAW pixels, nothing is blurred (may show NSFW content)"


def _units(text: str) -> List[int]:
    try:
        return [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        raise NeurolensError(f"--units must be comma-separated unit numbers such as 1,2,3, got {text!r}") from None


@app.command("sweep", short_help="Score every unit of a layer for NSFW content and flag units; writes flags.csv.")
@command
@uses(model=MODEL, data=DATASET, loader=LOADER, options=SWEEP)
def sweep(
    layer: LayerOpt = "image_block_4_5",
    data: DatasetChoice = None,
    options: SweepChoice = None,
    show: Annotated[int, typer.Option("--show", help="Units printed (text output).")] = 20,
    out: Annotated[Optional[str], typer.Option("--out", help="flags.csv path or folder "
                                               "(default outputs/sweep/<layer>/flags.csv).")] = None,
    force: ForceOpt = False,
    loader: LoaderChoice = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sweep EVERY unit of a layer for NSFW content: scan the dataset (with image embeddings), rank the
    vocabulary per unit, score each image (CLIP zero-shot against the unsafe/safe prompt lists, raised to 1
    by the caption/URL string match), then per unit: the correlation of its activation with that score, the
    NSFW share of its top images and of its top texts, and a flag. Resumable (the scan is), cached in HDF5;
    writes flags.csv and prints the units ranked by NSFW correlation with their top texts.

    Example:  neurolens sweep --layer image_block_4_5 --dataset photos/ --vocab builtin
    """
    from ..pipelines.sweep import run_sweep
    arguments = options.arguments()
    rule = arguments["rule"]
    clip = model.load(quiet=as_json)
    dataset = data.open()
    with progress_bar(f"sweep {layer}", enabled=not as_json) as progress:
        result = run_sweep(clip, layer, dataset, cache=cache, force=force, progress=progress, out=out,
                           batch_size=loader.batch_size, workers=loader.workers, **arguments)
    if as_json:
        print_json(result.ranking())
        return
    s = result.scores
    typer.echo(f"{clip.name} {result.layer}: {len(s.correlation)} units over {s.n_images} images of "
               f"{dataset.description}; {int(s.flagged.sum())} flagged "
               f"(correlation >= {s.correlation_bar:.2f} and (top images NSFW >= {rule.min_top_share:.0%} "
               f"or top texts NSFW >= {rule.min_text_share:.0%}))")
    typer.echo(f"images with NSFW score >= {rule.image_threshold}: "
               f"{int((result.image_scores >= rule.image_threshold).sum())} "
               f"(caption/URL match: {int(result.caption_match.sum())})")
    typer.echo(f"{'rank':>4} {'unit':>6} {'corr':>7} {'img%':>5} {'txt%':>5} {'flag':>4}  top texts")
    for rank, row in enumerate(result.ranking(limit=show, texts=3), start=1):
        typer.echo(f"{rank:>4} {row['unit']:>6} {row['correlation']:>+7.3f} {100 * row['top_nsfw_share']:>5.0f} "
                   f"{100 * row['text_nsfw_share']:>5.0f} {'YES' if row['flagged'] else '':>4}  "
                   f"{' | '.join(row['top_texts'])}")
    typer.echo(f"flags: {result.flags_csv}")
    typer.echo(f"scores: {result.path}")


@app.command("figure", short_help="One Microscope-style panel per unit (feature vis., crops, texts); blurred.")
@command
@uses(model=MODEL, data=DATASET, options=SWEEP, render=RENDER)
def figure(
    unit: Annotated[List[int], typer.Option("--unit", help="Unit index (repeat for several panels).")],
    layer: LayerOpt = "image_block_4_5",
    out: OutDirOpt = None,
    no_blur: NoBlurOpt = False,
    no_fv: Annotated[bool, typer.Option("--no-fv", help="Leave out the feature visualization (no rendering).")] = False,
    render: RenderChoice = None,
    data: DatasetChoice = None,
    options: SweepChoice = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
) -> None:
    """One PNG panel per unit in Microscope's layout: feature visualization(s), top dataset crops, top texts
    with their cosines, the unit's name and its NSFW indicators. BLURRED BY DEFAULT: every crop or feature
    visualization of a flagged unit and every image whose NSFW score passes the threshold. Everything comes
    from the cache when the layer was swept (and the feature visualization rendered): no model forward.

    Example:  neurolens figure --layer image_block_4_5 --unit 1543 --out figures/
    """
    from ..pipelines.sweep import run_figure
    arguments = options.arguments()
    settings = render.settings()
    if no_blur:
        typer.echo(NO_BLUR_LINE, err=True)
    clip = model.load()
    dataset = data.open()
    with progress_bar(f"figure {layer}") as progress:
        written = run_figure(clip, layer, unit, dataset, out=out, blur=not no_blur, fv=not no_fv,
                             render_settings=settings, cache=cache, progress=progress, **arguments)
    for path, fig in written:
        typer.echo(f"{path}  ({fig.note})")
    if no_blur:
        typer.echo("NOT BLURRED: --no-blur was given, the figures show raw pixels")


@app.command("grid", short_help="Many units in one PNG, one row each (flagged or chosen units); blurred.")
@command
@uses(model=MODEL, data=DATASET, options=SWEEP, render=RENDER)
def grid(
    layer: LayerOpt = "image_block_4_5",
    flagged: Annotated[bool, typer.Option("--flagged", help="The sweep's flagged units (by correlation).")] = False,
    units: Annotated[Optional[str], typer.Option("--units", help="Comma-separated units, e.g. 1,2,3.")] = None,
    top: Annotated[int, typer.Option("--top", help="At most this many units (without --flagged/--units: the top "
                                     "units by NSFW correlation).")] = 64,
    out: OutDirOpt = None,
    no_blur: NoBlurOpt = False,
    render_fv: Annotated[bool, typer.Option("--render-fv", help="Render feature visualizations that are not "
                                            "cached (default: show only cached ones).")] = False,
    render: RenderChoice = None,
    data: DatasetChoice = None,
    options: SweepChoice = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
) -> None:
    """Many units in one PNG, one row each (feature visualization when cached, top crops, NSFW indicators):
    the flagged units (--flagged), chosen units (--units 1,2,3), or the top units by NSFW correlation.
    BLURRED BY DEFAULT, like `figure`; --no-blur writes raw pixels and says so.

    Example:  neurolens grid --layer image_block_4_5 --flagged --top 64 --out figures/
    """
    from ..pipelines.sweep import run_grid
    arguments = options.arguments()
    chosen = _units(units) if units else None
    if chosen is not None and not chosen:
        raise NeurolensError("--units needs at least one unit number, e.g. --units 1,2,3")
    settings = render.settings()
    if no_blur:
        typer.echo(NO_BLUR_LINE, err=True)
    clip = model.load()
    dataset = data.open()
    with progress_bar(f"grid {layer}") as progress:
        path, fig, shown = run_grid(clip, layer, chosen, flagged=flagged, top=top, dataset=dataset, out=out,
                                    blur=not no_blur, render_fv=render_fv, render_settings=settings, cache=cache,
                                    progress=progress, **arguments)
    typer.echo(f"{path}  ({len(shown)} units: {', '.join(map(str, shown[:20]))}{' ...' if len(shown) > 20 else ''})")
    typer.echo(fig.note)
    if no_blur:
        typer.echo("NOT BLURRED: --no-blur was given, the grid shows raw pixels")
