"""neurolens concepts"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from ..pipelines.settings import ConceptSettings, DescribeSettings
from ..errors import NeurolensError
from .app import app, command, open_basis, print_json, progress_bar
from .options import (CONCEPTS, DATASET, ENGINE, LOADER, MODEL, CacheOpt, DatasetChoice, EngineChoice, ForceOpt,
                      JsonOpt, LayerOpt, LoaderChoice, ModelChoice, SaeOpt, uses)


def _num(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


@app.command("concepts", short_help="Score every unit against every concept of a concept set (AUC, AUPRC, q) in "
                                     "one pass.")
@command
@uses(model=MODEL, data=DATASET, loader=LOADER, settings=CONCEPTS, engine=ENGINE)
def concepts(
    layer: LayerOpt = "image_block_4_5",
    data: DatasetChoice = None,
    settings: ConceptSettings = None,
    pairs: Annotated[bool, typer.Option("--pairs", help="Only the units flagged for two or more concepts, with "
                                        "each of those concepts' scores.")] = False,
    show: Annotated[int, typer.Option("--show", help="Flagged units printed per concept (text output).")] = 10,
    out: Annotated[Optional[str], typer.Option("--out", help="Also write the --json rows as a CSV file (every cell "
                                               "safe to open in a spreadsheet).")] = None,
    force: ForceOpt = False,
    loader: LoaderChoice = None,
    engine: EngineChoice = None,
    sae: SaeOpt = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Audit EVERY unit of a layer (or, with --sae, every feature of an SAE) against EVERY concept of a concept set
    in one pass over the dataset (resumable, cached). Each concept's images are labelled from independent
    sources named in the concept set (caption lexicon, a dataset column, NudeNet; the model's own zero-shot
    score only where it agrees with them, never on random weights). Per unit and concept: ROC AUC, AUPRC
    (beside the concept's prevalence, its chance level), correlation, Mann-Whitney p and a Benjamini-Hochberg q
    across the layer's units; flagged when q <= --max-q and AUC >= --min-auc, never for a concept with fewer
    than 10 images in a class. Units flagged for two or more concepts come first.

    --json: one list, a row per (unit, concept): unit, basis, concept, auc, auprc, prevalence, correlation,
    p, q, flagged (docs/concepts.md gives the order).

    Example:  neurolens concepts --layer image_block_4_5 --dataset photos/ --concepts builtin
    Example:  neurolens concepts --layer image_block_4_5 --dataset laion.parquet --concepts harms.yaml --pairs --json
    """
    from ..pipelines.concepts import write_concepts_csv  # lazy: keeps --help light
    result, clip, description = _audit(layer, data, settings, force, loader, engine, sae, model, cache, as_json)
    for line in result.lines():
        typer.echo(line, err=as_json)
    written = write_concepts_csv(result, out, pairs=pairs) if out else None
    if as_json:
        print_json(result.rows(pairs=pairs))
        return
    _print_text(result, clip, description, show, pairs)
    if written is not None:
        typer.echo(f"csv: {written}")
    typer.echo(f"scores: {result.path}")


@app.command("describe", short_help="Describe every unit: its best concepts and the caption words enriched in its "
                                     "top images (held out).")
@command
@uses(model=MODEL, data=DATASET, loader=LOADER, settings=CONCEPTS, engine=ENGINE)
def describe(
    layer: LayerOpt = "image_block_4_5",
    data: DatasetChoice = None,
    settings: ConceptSettings = None,
    unit: Annotated[Optional[List[int]], typer.Option("--unit", help="Only these units (or features); repeat for "
                                                      "several. Default: every unit.")] = None,
    half_top: Annotated[int, typer.Option("--half-top", help="Top images per half of the dataset that choose "
                                          "(half A) and score (half B) a unit's caption n-grams.")] = 32,
    ngrams: Annotated[int, typer.Option("--ngrams", help="Caption words or two-word phrases kept per unit.")] = 5,
    show: Annotated[int, typer.Option("--show", help="Units printed (text output; --json prints all).")] = 20,
    force: ForceOpt = False,
    loader: LoaderChoice = None,
    engine: EngineChoice = None,
    sae: SaeOpt = None,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Describe EVERY unit of a layer (or, with --sae, every SAE feature): its best concepts with their scores
    (the concept audit of `neurolens concepts`, run first and cached: independent labels, AUC, AUPRC, q,
    flags) and the caption words and two-word phrases most enriched in its top images, each chosen on one
    half of the dataset and scored on the other, held-out half (log-odds with an informative Dirichlet prior,
    its 95% interval and z). Concept scores that used the model's own zero-shot score are marked model-based;
    nothing rests on it alone.

    --json: one list, a row per unit: unit, basis, concepts [...], captions [...], summary, model_based
    (docs/json.md); units flagged for two or more concepts first.

    Example:  neurolens describe --layer image_block_4_5 --dataset photos/
    Example:  neurolens describe --layer image_block_4_5 --dataset laion.parquet --concepts harms.yaml --unit 1543
    """
    describe_settings = DescribeSettings(top_k=half_top, ngrams=ngrams, concepts=DescribeSettings().concepts)
    result, clip, description = _audit(layer, data, settings, force, loader, engine, sae, model, cache, as_json,
                                       describe=describe_settings)
    for line in result.concepts.lines() + ([f"note: {result.note}"] if result.note else []):
        typer.echo(line, err=as_json)
    for u in unit or []:
        if not 0 <= u < result.units:
            raise NeurolensError(f"--unit {u} is out of range: the layer has {result.units} {result.unit_word}s "
                                 f"(0-{result.units - 1})")
    rows = result.rows(unit or None)
    if as_json:
        print_json(rows)
        return
    word = result.unit_word
    typer.echo(f"{clip.name} {result.layer}: {result.units} {word}s described over {description}; concepts from "
               f"{Path(str(result.concepts.path)).name}, caption n-grams chosen on half A and scored on half B "
               f"(top {half_top} images per half)")
    for row in rows[:show if not unit else None]:
        typer.echo(f"{word} {row['unit']:>6}: {row['summary']}")
    typer.echo(f"descriptions: {result.path}")


def _audit(layer, data, settings, force, loader, engine, sae, model, cache, as_json, describe=None):
    """The concept audit (describe: a DescribeSettings, then the descriptions of its units) in this process or
    on Ray: (result, clip, the dataset's description)."""
    from ..pipelines.concepts import run_concepts, run_ray_concepts  # lazy: keeps --help light
    from ..pipelines.describe import describe_units  # lazy: keeps --help light
    basis = None
    if engine.ray:
        engine.check_process_only(**{"--workers": loader.workers is not None, "--sae": sae is not None})
        if engine.keep_per_image:
            typer.echo("note: a concept audit on Ray always keeps the per-image maxima", err=True)
        clip = replace(model, device="cpu").load(quiet=as_json, cache=cache)  # the driver ships the tower
        with progress_bar(f"concepts {layer} on Ray", enabled=not as_json) as progress:
            result = run_ray_concepts(clip, layer, data.dataset, settings, cache=cache, force=force, progress=progress,
                                      ray=engine.ray_options(loader.batch_size), device=model.device,
                                      image_column=data.image_column, caption_column=data.caption_column,
                                      report=lambda state: progress.note(state.line()), decoder=loader.decode)
        description = result.scan.description
    else:
        engine.check_process_only()
        clip = model.load(quiet=as_json, cache=cache)
        basis = open_basis(clip, layer, sae, cache)
        dataset = data.open()
        with progress_bar(f"concepts {layer}", enabled=not as_json) as progress:
            result = run_concepts(clip, layer, dataset, settings, cache=cache, force=force, progress=progress,
                                  batch_size=loader.batch_size, workers=loader.workers, basis=basis,
                                  decoder=loader.decode)
        description = dataset.description
    if describe is not None:
        with progress_bar(f"describe {layer}", enabled=not as_json) as progress:
            result = describe_units(clip, result, describe, cache=cache, force=force, progress=progress, basis=basis)
    return result, clip, description


def _print_text(result, clip, description: str, show: int, pairs: bool) -> None:
    word = result.unit_word
    images = len(result.scan.keys) if result.scan is not None else 0
    typer.echo(f"{clip.name} {result.layer}: {result.units} {word}s x {len(result.scores)} concepts over {images} "
               f"images of {description} (AUC {result.method}); flagged when {result.rule.describe()}")
    both = result.intersections()
    typer.echo(f"{word}s flagged for two or more concepts: {len(both)}")
    for unit in both[:show if not pairs else None]:
        parts = [f"{row['concept']} AUC {_num(row['auc'], '.3f')} AUPRC {_num(row['auprc'], '.3f')} "
                 f"q {_num(row['q'], '.1e')}" for row in result.rows(pairs=True) if row["unit"] == unit]
        typer.echo(f"  {word} {unit:>6}: " + " | ".join(parts))
    if pairs:
        return
    typer.echo(f"{'concept':<16} {'prevalence':>10} {'flagged':>7}  sources; top flagged {word}s (AUC, AUPRC)")
    for s in result.scores:
        order = [int(u) for u in sorted(map(int, s.flagged.nonzero()[0]), key=lambda u: (-float(s.auc[u]), u))]
        top = ", ".join(f"{u} ({s.auc[u]:.3f}, {s.auprc[u]:.3f})" for u in order[:show])
        sources = " + ".join(s.used) or "none"
        marks = " [model-based]" if s.model_based else ""
        typer.echo(f"{s.name:<16} {_num(s.prevalence, '.4f'):>10} "
                   f"{len(order):>7}  {sources}{marks}; {top or '-'}")
