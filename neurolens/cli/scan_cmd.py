"""neurolens scan, neurolens samples"""
from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from .app import app, command, print_json, progress_bar
from .options import (DATASET, LOADER, MODEL, CacheOpt, DatasetChoice, ForceOpt, JsonOpt, LayerOpt, LoaderChoice,
                      ModelChoice, NoBlurOpt, PrecisionOpt, TopKOpt, uses)

SKIP_LIST_LENGTH = 3


def _skip_line(result) -> str:
    """One line summarizing the skipped items (all of them are listed in the cache record)."""
    if not result.skipped:
        return "skipped 0 items"
    shown = [f"{path} ({reason})" for path, reason in
             zip(result.skipped_paths[:SKIP_LIST_LENGTH], result.skipped_reasons[:SKIP_LIST_LENGTH])]
    more = f" and {result.skipped - SKIP_LIST_LENGTH} more" if result.skipped > SKIP_LIST_LENGTH else ""
    return f"skipped {result.skipped} unreadable item(s): {'; '.join(shown)}{more} (all listed in {result.path})"


@app.command("scan", short_help="Top images of every unit of a layer over a dataset, in one resumable pass.")
@command
@uses(model=MODEL, data=DATASET, loader=LOADER)
def scan(
    layer: LayerOpt = "image_block_4_5",
    data: DatasetChoice = None,
    top_k: TopKOpt = 32,
    loader: LoaderChoice = None,
    precision: PrecisionOpt = "fp32",
    embeddings: Annotated[bool, typer.Option("--embeddings", help="Also keep every image's L2-normalized CLIP "
                                             "embedding (runs the full image tower instead of stopping at the layer).")] = False,
    force: ForceOpt = False,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Write a resume checkpoint every N "
                                                  "batches (0: at most every 5 seconds).")] = 0,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Scan a dataset through one layer: for ALL its units at once, the top-k images (spatial-max activation
    and the grid cell of that max) and running statistics, cached in HDF5. One forward per batch, stopped
    right after the layer. Interrupted scans (Ctrl-C, kill -9) resume where they stopped; bad files are
    skipped, counted and listed.

    Example:  neurolens scan --layer image_block_4_5 --dataset photos/ --top-k 32
    """
    from ..pipelines.scan import run_scan
    clip = model.load(quiet=as_json)
    dataset = data.open()
    with progress_bar(f"scan {layer}", enabled=not as_json) as progress:
        result = run_scan(clip, layer, dataset, top_k=top_k, batch_size=loader.batch_size, workers=loader.workers,
                          cache=cache, force=force, embeddings=embeddings, precision=precision, progress=progress,
                          checkpoint_every=checkpoint_every or None)
    if as_json:
        print_json(result.summary())
        return
    how = "cached" if result.cached else ("resumed" if result.resumed_from else "scanned")
    typer.echo(f"{how}: {result.count} images of {dataset.description} through {result.layer} "
               f"({result.channels} units, top {result.top_k}) -> {result.path}")
    typer.echo(_skip_line(result))


@app.command("samples", short_help="A unit's top dataset images and a grid of crops where it fired (blurred).")
@command
@uses(model=MODEL, data=DATASET, loader=LOADER)
def samples(
    unit: Annotated[int, typer.Option("--unit", help="Unit (channel) index in the layer.")],
    layer: LayerOpt = "image_block_4_5",
    data: DatasetChoice = None,
    top_k: TopKOpt = 32,
    show: Annotated[Optional[int], typer.Option("--show", help="How many of the top-k to print and draw (default all).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="PNG path of the grid (default outputs/samples/<layer>_unit<u>.png).")] = None,
    no_blur: NoBlurOpt = False,
    loader: LoaderChoice = None,
    precision: PrecisionOpt = "fp32",
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A unit's dataset samples: its top images from the cached scan (scanning first if needed) with their
    spatial-max activation and the cell of that max, and a PNG grid of crops centred on that cell, Microscope
    style, labelled with rank and activation. Crops of images that may be NSFW are blurred unless --no-blur.

    Example:  neurolens samples --layer image_block_4_5 --unit 1543 --dataset photos/
    """
    from ..pipelines.samples import run_samples
    clip = model.load(quiet=as_json)
    dataset = data.open()
    with progress_bar(f"scan {layer}", enabled=not as_json) as progress:
        result = run_samples(clip, layer, unit, dataset, top_k=top_k, show=show, out=out, blur=not no_blur,
                             cache=cache, batch_size=loader.batch_size, workers=loader.workers, precision=precision,
                             progress=progress)
    rows = [{k: row[k] for k in ("unit", "rank", "score", "path", "cell")} for row in result.rows]
    if as_json:
        if result.image_path:
            typer.echo(f"grid: {result.image_path}; {result.blur_note}", err=True)
        print_json(rows)
        return
    typer.echo(f"{result.layer} unit {unit}: top {len(rows)} of {result.scan.count} images ({dataset.description})")
    for row in rows:
        typer.echo(f"{row['rank']:>4}  {row['score']:>10.4g}  cell ({row['cell'][0]},{row['cell'][1]})  {row['path']}")
    if result.image_path:
        typer.echo(f"grid: {result.image_path}")
        typer.echo(result.blur_note)
