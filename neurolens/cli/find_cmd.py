"""neurolens find"""
from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from ..errors import NeurolensError
from .app import app, command, print_json
from .options import DATASET, MODEL, CacheOpt, DatasetChoice, JsonOpt, LayerOpt, ModelChoice, SaeOpt, uses

QueryArg = Annotated[str, typer.Argument(help="A concept name (e.g. nsfw), a lexicon word of a concept (e.g. gore), or "
                                         "free text (e.g. \"red circles\").", show_default=False)]


@app.command("find", short_help="Rank the units of a layer for a concept, a lexicon word or free text, from the cache.")
@command
@uses(model=MODEL, data=DATASET.without("image_column", "caption_column"))
def find(
    query: QueryArg,
    layer: LayerOpt = "image_block_4_5",
    data: DatasetChoice = None,
    sae: SaeOpt = None,
    top: Annotated[int, typer.Option("--top", help="Rows printed, best first (0: every unit).")] = 20,
    text_score: Annotated[bool, typer.Option("--text-score/--no-text-score", help="For free text: load the model's "
                                             "text tower for the text-direction score (model-based); a concept name "
                                             "or lexicon word reads it from the cache.")] = True,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rank the units of a layer (or, with --sae, the features of an SAE) for a concept name, a lexicon word of a
    concept, or free text, from the records of `neurolens describe` (or `neurolens concepts`): the share of
    each unit's top images whose captions match the query, with its 95% Wilson interval (ranked by the
    interval's lower end), and the cosine of the unit's text direction with the query's text embedding
    (model-based, shown, never ranked on). A concept name or lexicon word is answered from the cache without
    loading the model; free text loads the model's text tower for its text score (--no-text-score: not).

    --json: one list, best first, a row per unit: unit, basis, score, caption_share, ci_low, ci_high, text_score,
    model_based.

    Example:  neurolens find violence --layer image_block_4_5
    Example:  neurolens find "red circles" --checkpoint toy.pt --layer image_block_4_0 --json
    """
    from ..labels.query import KINDS, parse_query  # lazy: reads records (h5py)
    from ..pipelines.find import find as find_units, locate  # lazy: reads records (h5py)
    from ..records.keys import as_cache  # lazy: reads records (h5py)
    if top < 0:
        raise NeurolensError(f"--top must be 0 (every unit) or more, got {top}")
    store = as_cache(cache)
    identity = data.open().identity if data.dataset is not None else None
    located = locate(store, layer, model=model.model, pretrained=model.pretrained, checkpoint=model.checkpoint,
                     sae=sae, dataset_identity=identity)
    embedding = directions = None
    parsed = parse_query(query, located.concepts)
    if parsed.kind == KINDS[2] and text_score:
        directions = located.directions(store)
        if directions is not None:
            typer.echo("note: free text: loading the model's text tower for its text-direction score (model-based)",
                       err=True)
            embedding = _encode(model, query, located, as_json)
    result = find_units(located, query, query_embedding=embedding, directions=directions, limit=top or None)
    for line in result.notes:
        typer.echo(f"note: {line}", err=True)
    if as_json:
        print_json(result.rows)
        return
    word = "unit" if result.basis == "neurons" else "feature"
    what = {"concept": f"concept {result.query.concept}",
            "lexicon": f"a lexicon word of {result.query.concept}"}.get(result.query.kind, "free text")
    typer.echo(f"{located.layer}: {result.units} {word}s for {query!r} ({what}; captions matched by "
               f"{result.query.source}); score = lower end of the 95% Wilson interval of the top-image share")
    typer.echo(f"{'rank':>4} {word:>7} {'score':>6} {'share':>6} {'95% interval':>14} {'text (model-based)':>18}")
    for rank, row in enumerate(result.rows, start=1):
        text = "-" if row["text_score"] is None else f"{row['text_score']:+.3f}"
        share = "-" if row["caption_share"] is None else f"{row['caption_share']:.2f}"
        interval = "-" if row["ci_low"] is None else f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
        score = "-" if row["score"] is None else f"{row['score']:.3f}"
        typer.echo(f"{rank:>4} {row['unit']:>7} {score:>6} {share:>6} {interval:>14} {text:>18}")


def _encode(model: ModelChoice, query: str, located, quiet: bool) -> Optional[object]:
    """The query's text embedding from the model that made the records (checked by its fingerprint)."""
    from ..text.encode import encode_texts  # lazy: torch and open_clip only for free text
    clip = model.load(quiet=quiet)
    if clip.fingerprint[:16] != located.fingerprint[:16]:
        raise NeurolensError(f"the model loaded ({clip.name}, {clip.fingerprint[:16]}) did not make the records found "
                             f"({located.fingerprint[:16]}); pass the same model options as `neurolens describe`, or "
                             f"--no-text-score")
    return encode_texts(clip, [query])[0]
