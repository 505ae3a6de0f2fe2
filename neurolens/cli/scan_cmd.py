"""neurolens scan, neurolens samples"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import typer
from typing_extensions import Annotated

from .app import app, command, open_basis, print_json, progress_bar
from .options import (DATASET, ENGINE, LOADER, MODEL, CacheOpt, DatasetChoice, EngineChoice, ForceOpt, JsonOpt,
                      LayerOpt, LoaderChoice, ModelChoice, NoBlurOpt, PrecisionOpt, SaeOpt, TopKOpt, uses)

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
@uses(model=MODEL, data=DATASET, loader=LOADER, engine=ENGINE)
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
    engine: EngineChoice = None,
    sae: SaeOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="When another scan of the same layer, dataset and settings "
                                       "is running, wait for it and read its result (default: stop with one "
                                       "line, exit 2).")] = False,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Scan a dataset through one layer: for ALL its units at once, the top-k images (spatial-max activation
    and the grid cell of that max) and running statistics, cached in HDF5. One forward per batch, stopped
    right after the layer. Interrupted scans (Ctrl-C, kill -9) resume where they stopped; bad files are
    skipped, counted and listed. With --sae, the SAE's features are scanned too, in the same pass (its encoder
    applied to every cell; an image's value is the max over cells). --engine ray runs the same scan on Ray
    Data (many CPUs decoding, one model actor per GPU), resumable by shard, with the same result in the same
    cache record.

    Example:  neurolens scan --layer image_block_4_5 --dataset photos/ --top-k 32
    Example:  neurolens scan --layer image_block_4_5 --dataset laion/ --engine ray --actors 8
    Example:  neurolens scan --layer image_block_4_5 --dataset photos/ --wait   (another scan of it is running)
    """
    basis = None
    if engine.ray:
        engine.check_process_only(**{"--workers": loader.workers is not None, "--embeddings": embeddings,
                                     "--checkpoint-every": bool(checkpoint_every), "--sae": sae is not None})
        result = _scan_on_ray(layer, data, top_k, loader, precision, force, engine, model, cache, as_json, wait)
    else:
        engine.check_process_only()
        from ..pipelines.scan import run_scan  # lazy: keeps `neurolens --help` free of torch
        clip = model.load(quiet=as_json, cache=cache)
        basis = open_basis(clip, layer, sae, cache)
        with progress_bar(f"scan {layer}", enabled=not as_json) as progress:
            result = run_scan(clip, layer, data.open(), top_k=top_k, batch_size=loader.batch_size,
                              workers=loader.workers, cache=cache, force=force, embeddings=embeddings,
                              precision=precision, progress=progress, checkpoint_every=checkpoint_every or None,
                              basis=basis, wait=wait, decoder=loader.decode)
    if as_json:
        print_json(result.summary())
        return
    how = "cached" if result.cached else ("resumed" if result.resumed_from else "scanned")
    what = f"{result.channels} units" if sae is None else f"{result.channels} features of SAE {basis.name}"
    typer.echo(f"{how}{' on Ray' if engine.ray else ''}: {result.count} images of {result.description} through "
               f"{result.layer} ({what}, top {result.top_k}) -> {result.path}")
    typer.echo(_skip_line(result))


def _scan_on_ray(layer, data, top_k, loader, precision, force, engine, model, cache, as_json, wait):
    from ..pipelines.scan import run_ray_scan  # lazy: keeps `neurolens --help` free of torch
    clip = replace(model, device="cpu").load(quiet=as_json, cache=cache)  # the driver ships the weights
    with progress_bar(f"scan {layer} on Ray", enabled=not as_json) as progress:
        return run_ray_scan(clip, layer, data.dataset, top_k=top_k, cache=cache, force=force, precision=precision,
                            keep_per_image=engine.keep_per_image, ray=engine.ray_options(loader.batch_size),
                            device=model.device, image_column=data.image_column,
                            caption_column=data.caption_column, progress=progress,
                            report=lambda state: progress.note(state.line()), wait=wait, decoder=loader.decode)


@app.command("samples", short_help="A unit's top dataset images and a grid of crops where it fired (blurred).")
@command
@uses(model=MODEL, data=DATASET, loader=LOADER)
def samples(
    unit: Annotated[int, typer.Option("--unit", help="Unit (channel) index in the layer; with --sae a feature index.")],
    layer: LayerOpt = "image_block_4_5",
    data: DatasetChoice = None,
    top_k: TopKOpt = 32,
    show: Annotated[Optional[int], typer.Option("--show", help="How many of the top-k to print and draw (default all).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="PNG path of the grid (default outputs/samples/<layer>_unit<u>.png).")] = None,
    no_blur: NoBlurOpt = False,
    loader: LoaderChoice = None,
    precision: PrecisionOpt = "fp32",
    sae: SaeOpt = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A unit's dataset samples: its top images from the cached scan (scanning first if needed) with their
    spatial-max activation and the cell of that max, and a PNG grid of crops centred on that cell, Microscope
    style, labelled with rank and activation. Crops of images that may be NSFW are blurred unless --no-blur.
    With --sae, the unit is an SAE feature: crops are centred on the cell where the feature fired.

    Example:  neurolens samples --layer image_block_4_5 --unit 1543 --dataset photos/
    """
    from ..pipelines.samples import run_samples  # lazy: keeps `neurolens --help` free of torch
    clip = model.load(quiet=as_json, cache=cache)
    basis = open_basis(clip, layer, sae, cache)
    basis.check_unit(unit)
    dataset = data.open()
    with progress_bar(f"scan {layer}", enabled=not as_json) as progress:
        result = run_samples(clip, layer, unit, dataset, top_k=top_k, show=show, out=out, blur=not no_blur,
                             cache=cache, batch_size=loader.batch_size, workers=loader.workers, precision=precision,
                             progress=progress, basis=basis, decoder=loader.decode)
    rows = [{k: row[k] for k in ("unit", "rank", "score", "path", "cell")} for row in result.rows]
    if as_json:
        if result.image_path:
            typer.echo(f"grid: {result.image_path}; {result.blur_note}", err=True)
        print_json(rows)
        return
    typer.echo(f"{result.layer} {basis.label(unit)}: top {len(rows)} of {result.scan.count} images "
               f"({dataset.description})")
    for row in rows:
        typer.echo(f"{row['rank']:>4}  {row['score']:>10.4g}  cell ({row['cell'][0]},{row['cell'][1]})  {row['path']}")
    if result.image_path:
        typer.echo(f"grid: {result.image_path}")
        typer.echo(result.blur_note)
