"""neurolens text"""
from __future__ import annotations

from typing import List, Optional

import typer
from typing_extensions import Annotated

from ..errors import NeurolensError
from .app import app, command, open_basis, print_json, progress_bar
from .options import DATASET, MODEL, CacheOpt, DatasetChoice, ForceOpt, JsonOpt, LayerOpt, ModelChoice, SaeOpt, uses

# --dataset here only chooses the reference activation (its captions play no part)
TEXT_DATASET = DATASET.without("caption_column").replace(dataset=(Annotated[Optional[str], typer.Option(
    "--dataset", help="Use this dataset's mean activation map (from its scan; scanned first if not cached) as "
                      "the reference; default: a neutral grey image.")], None))


@app.command("text", short_help="The vocabulary texts that point along each unit's direction in CLIP's joint space.")
@command
@uses(model=MODEL, data=TEXT_DATASET)
def text(
    unit: Annotated[List[int], typer.Option("--unit", help="Unit (channel) index, with --sae a feature index; repeat for several units.")],
    layer: LayerOpt = "image_block_4_5",
    vocab: Annotated[str, typer.Option(
        "--vocab", help="builtin | FILE (one entry per line) | TABLE.parquet:COLUMN | TABLE.csv:COLUMN. builtin: "
                        "~47k ImageNet-21k class lemmas (timm's WordNet synonyms; Apache-2.0 / WordNet licence) "
                        "and whole-word tokens of CLIP's BPE vocabulary (open_clip, MIT), read from those "
                        "installed packages.")] = "builtin",
    top_k: Annotated[int, typer.Option("--top-k", help="Texts kept per unit (all units are ranked and cached).")] = 30,
    data: DatasetChoice = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per encoder batch.")] = 256,
    force: ForceOpt = False,
    sae: SaeOpt = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The texts whose embeddings point most along a unit's direction in CLIP's joint space (Microscope's
    text feature visualization), ranked for ALL units of the layer in one go and cached.

    A unit's direction is the derivative of the normalized image embedding with respect to a spatially
    uniform increase of that unit's channel, at a reference activation (the dataset's mean activation map
    with --dataset, else a neutral grey image); a text's score is its cosine with that direction. Texts
    are encoded only up to each batch's longest token sequence. With --sae, a feature's direction is its
    decoder direction pushed through the same Jacobian.

    Example:  neurolens text --layer image_block_4_5 --unit 1543 --top-k 30
    """
    from ..models.layer_table import resolve_layer  # lazy: keeps `neurolens --help` free of torch
    from ..pipelines.text import (find_text, run_text, text_embeddings,  # lazy: keeps `neurolens --help` free of torch
                                  unit_directions_cached, vocabulary as vocab_of)

    vocabulary = vocab_of(vocab, cache)
    if top_k < 1:
        raise NeurolensError(f"--top-k must be at least 1, got {top_k}")
    clip = model.load(quiet=as_json, cache=cache)
    spec = resolve_layer(clip, layer)
    basis = open_basis(clip, layer, sae, cache)
    for u in unit:
        basis.check_unit(u)
    scan = None
    if data.dataset is not None:
        from ..pipelines.scan import run_scan  # lazy: keeps `neurolens --help` free of torch
        with progress_bar(f"scan {spec.name}", enabled=not as_json) as progress:
            scan = run_scan(clip, spec.name, data.open(), cache=cache, progress=progress, basis=basis)
    ranking = None if force else find_text(clip, spec.name, vocabulary, top_k, scan, cache, basis=basis)
    if ranking is None:
        # the two slow steps, each with its own bar; run_text then reads both from the cache
        with progress_bar(f"encode {len(vocabulary)} texts", enabled=not as_json) as progress:
            text_embeddings(clip, vocabulary, cache, force=force, batch_size=batch_size, progress=progress)
        with progress_bar(f"unit directions of {spec.name}", enabled=not as_json) as progress:
            unit_directions_cached(clip, spec, scan, cache, force=force, progress=progress, basis=basis)
        ranking = run_text(clip, spec.name, vocabulary, top_k=top_k, scan=scan, cache=cache, force=False, basis=basis)
    if as_json:
        print_json([row for u in unit for row in ranking.rows(u)])
        return
    how = "cached" if ranking.cached else "computed"
    typer.echo(f"{how}: {spec.name} of {clip.name}, all {basis.units} {basis.unit_word}s"
               f"{'' if sae is None else f' of SAE {basis.name}'} ranked -> {ranking.path}")
    typer.echo(f"vocabulary: {ranking.vocab_source}")
    typer.echo(f"reference: {ranking.reference_description}")
    for u in unit:
        typer.echo(f"\n{basis.label(u)}")
        if not ranking.top_scores[u].any():
            hint = ("Try --dataset for a dataset's mean activation as reference" if scan is None else
                    "the reference is already the dataset's mean activation: at it this unit moves nothing; its "
                    "top images (neurolens samples) and its concept scores (neurolens describe) still say what "
                    "it responds to")
            typer.echo("  (this unit's direction is zero at the reference: a small uniform increase of it does not "
                       "move the image embedding, e.g. its ReLU is off everywhere there; every score is 0, so the "
                       f"order below is arbitrary and is no text evidence. {hint})")
        for row in ranking.rows(u):
            typer.echo(f"{row['rank']:>4}  {row['score']:+.4f}  {row['text']}")
