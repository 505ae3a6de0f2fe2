"""neurolens sweep, neurolens figure, neurolens grid"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from .app import (CacheOpt, CheckpointOpt, DeviceOpt, JsonOpt, ModelOpt, PretrainedOpt, app, command, open_model,
                  print_json, progress_bar)
from .scan_cmd import BatchOpt, CaptionColumnOpt, DatasetOpt, ImageColumnOpt, LayerOpt, WorkersOpt
from ..errors import NeurolensError
from ..models import DEFAULT_MODEL

VocabOpt = Annotated[str, typer.Option("--vocab", help="Vocabulary for the unit texts: builtin, a .txt file (one "
                                       "entry a line), or file.parquet:column / file.csv:column.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Top images kept per unit by the scan (top_nsfw_share counts them all).")]
TextTopKOpt = Annotated[int, typer.Option("--text-top-k", help="Top texts ranked per unit.")]
UnsafeOpt = Annotated[Optional[str], typer.Option("--unsafe-prompts", help="Text file of unsafe concept prompts "
                                                  "(default: neurolens/data/nsfw_prompts_unsafe.txt).")]
SafeOpt = Annotated[Optional[str], typer.Option("--safe-prompts", help="Text file of safe concept prompts "
                                                "(default: neurolens/data/nsfw_prompts_safe.txt).")]
TermsOpt = Annotated[Optional[str], typer.Option("--caption-terms", help="Text file of caption/URL string-match terms "
                                                 "('*' = any one character; default: the paper's 7).")]
CaptionMatchOpt = Annotated[str, typer.Option("--caption-match", help="How captions are matched: word (whole words "
                                              "and inflections), substring (the paper's literal filter), or off.")]
MinCorrOpt = Annotated[float, typer.Option("--min-correlation", help="Flag rule: correlation must reach this "
                                           "(and 3/sqrt(images)).")]
MinTopOpt = Annotated[float, typer.Option("--min-top-share", help="Flag rule: share of NSFW top images.")]
MinTextOpt = Annotated[float, typer.Option("--min-text-share", help="Flag rule: share of NSFW top texts.")]
NoBlurOpt = Annotated[bool, typer.Option("--no-blur", help="Write RAW pixels (the only way to get unblurred images).")]
OutDirOpt = Annotated[Optional[str], typer.Option("--out", help="Folder for the PNGs (default outputs/figures/).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimization steps of a feature visualization that is not cached.")]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="Comma-separated seeds of the feature visualizations.")]

NO_BLUR_LINE = "note: --no-blur: images are written with RAW pixels, nothing is blurred (may show NSFW content)"


def _common(unsafe_prompts, safe_prompts, caption_terms, min_correlation, min_top_share, min_text_share):
    from .. import safety
    from ..unit_scores import FlagRule
    for name, value in (("--min-top-share", min_top_share), ("--min-text-share", min_text_share)):
        if not 0.0 <= value <= 1.0:
            raise NeurolensError(f"{name} must be a share between 0 and 1, got {value}")
    prompts = safety.load_prompts(unsafe_prompts, safe_prompts)
    terms = safety.read_list(caption_terms) if caption_terms else None
    rule = FlagRule(min_correlation=min_correlation, min_top_share=min_top_share, min_text_share=min_text_share)
    return prompts, terms, rule


def _open_dataset(dataset, image_column, caption_column):
    from ..datasets import open_dataset
    return open_dataset(dataset, image_column=image_column, caption_column=caption_column)


def _seeds(text: str):
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise NeurolensError(f"--seeds must be comma-separated integers such as 0,1, got {text!r}") from None
    if not seeds:
        raise NeurolensError("--seeds needs at least one seed, e.g. --seeds 0")
    return seeds


def _units(text: str) -> List[int]:
    try:
        return [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        raise NeurolensError(f"--units must be comma-separated unit numbers such as 1,2,3, got {text!r}") from None


@app.command("sweep")
@command
def sweep(
    layer: LayerOpt = "image_block_4_5",
    dataset: DatasetOpt = None,
    vocab: VocabOpt = "builtin",
    top_k: TopKOpt = 32,
    text_top_k: TextTopKOpt = 30,
    show: Annotated[int, typer.Option("--show", help="Units printed (text output).")] = 20,
    out: Annotated[Optional[str], typer.Option("--out", help="flags.csv path or folder "
                                               "(default outputs/sweep/<layer>/flags.csv).")] = None,
    unsafe_prompts: UnsafeOpt = None,
    safe_prompts: SafeOpt = None,
    caption_terms: TermsOpt = None,
    caption_match: CaptionMatchOpt = "word",
    min_correlation: MinCorrOpt = 0.2,
    min_top_share: MinTopOpt = 0.5,
    min_text_share: MinTextOpt = 0.3,
    force: Annotated[bool, typer.Option("--force", help="Recompute scan, texts and scores even if cached.")] = False,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    image_column: ImageColumnOpt = "image",
    caption_column: CaptionColumnOpt = "caption",
    model: ModelOpt = DEFAULT_MODEL,
    pretrained: PretrainedOpt = "openai",
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
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
    prompts, terms, rule = _common(unsafe_prompts, safe_prompts, caption_terms, min_correlation, min_top_share,
                                   min_text_share)
    clip = open_model(model, pretrained, checkpoint, device, quiet=as_json)
    data = _open_dataset(dataset, image_column, caption_column)
    with progress_bar(f"sweep {layer}", enabled=not as_json) as progress:
        result = run_sweep(clip, layer, data, vocab=vocab, top_k=top_k, text_top_k=text_top_k, cache=cache,
                           force=force, progress=progress, out=out, rule=rule, prompts=prompts,
                           caption_terms=terms, caption_mode=caption_match, batch_size=batch_size, workers=workers)
    if as_json:
        print_json(result.ranking())
        return
    s = result.scores
    typer.echo(f"{clip.name} {result.layer}: {len(s.correlation)} units over {s.n_images} images of "
               f"{data.description}; {int(s.flagged.sum())} flagged "
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


@app.command("figure")
@command
def figure(
    unit: Annotated[List[int], typer.Option("--unit", help="Unit index (repeat for several panels).")],
    layer: LayerOpt = "image_block_4_5",
    out: OutDirOpt = None,
    no_blur: NoBlurOpt = False,
    no_fv: Annotated[bool, typer.Option("--no-fv", help="Leave out the feature visualization (no rendering).")] = False,
    steps: StepsOpt = 256,
    seeds: SeedsOpt = "0",
    dataset: DatasetOpt = None,
    vocab: VocabOpt = "builtin",
    top_k: TopKOpt = 32,
    text_top_k: TextTopKOpt = 30,
    unsafe_prompts: UnsafeOpt = None,
    safe_prompts: SafeOpt = None,
    caption_terms: TermsOpt = None,
    caption_match: CaptionMatchOpt = "word",
    min_correlation: MinCorrOpt = 0.2,
    min_top_share: MinTopOpt = 0.5,
    min_text_share: MinTextOpt = 0.3,
    image_column: ImageColumnOpt = "image",
    caption_column: CaptionColumnOpt = "caption",
    model: ModelOpt = DEFAULT_MODEL,
    pretrained: PretrainedOpt = "openai",
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
    cache: CacheOpt = None,
) -> None:
    """One PNG panel per unit in Microscope's layout: feature visualization(s), top dataset crops, top texts
    with their cosines, the unit's name and its NSFW indicators. BLURRED BY DEFAULT: every crop or feature
    visualization of a flagged unit and every image whose NSFW score passes the threshold. Everything comes
    from the cache when the layer was swept (and the feature visualization rendered): no model forward.

    Example:  neurolens figure --layer image_block_4_5 --unit 1543 --out figures/
    """
    from ..pipelines.sweep import run_figure
    from ..types import RenderSettings
    prompts, terms, rule = _common(unsafe_prompts, safe_prompts, caption_terms, min_correlation, min_top_share,
                                   min_text_share)
    settings = RenderSettings(steps=steps, seeds=_seeds(seeds))
    if no_blur:
        typer.echo(NO_BLUR_LINE, err=True)
    clip = open_model(model, pretrained, checkpoint, device)
    data = _open_dataset(dataset, image_column, caption_column)
    with progress_bar(f"figure {layer}") as progress:
        written = run_figure(clip, layer, unit, data, vocab=vocab, top_k=top_k, text_top_k=text_top_k, out=out,
                             blur=not no_blur, fv=not no_fv, render_settings=settings, cache=cache,
                             progress=progress, prompts=prompts, rule=rule, caption_mode=caption_match,
                             caption_terms=terms)
    for path, fig in written:
        typer.echo(f"{path}  ({fig.note})")
    if no_blur:
        typer.echo("NOT BLURRED: --no-blur was given, the figures show raw pixels")


@app.command("grid")
@command
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
    steps: StepsOpt = 256,
    seeds: SeedsOpt = "0",
    dataset: DatasetOpt = None,
    vocab: VocabOpt = "builtin",
    top_k: TopKOpt = 32,
    text_top_k: TextTopKOpt = 30,
    unsafe_prompts: UnsafeOpt = None,
    safe_prompts: SafeOpt = None,
    caption_terms: TermsOpt = None,
    caption_match: CaptionMatchOpt = "word",
    min_correlation: MinCorrOpt = 0.2,
    min_top_share: MinTopOpt = 0.5,
    min_text_share: MinTextOpt = 0.3,
    image_column: ImageColumnOpt = "image",
    caption_column: CaptionColumnOpt = "caption",
    model: ModelOpt = DEFAULT_MODEL,
    pretrained: PretrainedOpt = "openai",
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
    cache: CacheOpt = None,
) -> None:
    """Many units in one PNG, one row each (feature visualization when cached, top crops, NSFW indicators):
    the flagged units (--flagged), chosen units (--units 1,2,3), or the top units by NSFW correlation.
    BLURRED BY DEFAULT, like `figure`; --no-blur writes raw pixels and says so.

    Example:  neurolens grid --layer image_block_4_5 --flagged --top 64 --out figures/
    """
    from ..pipelines.sweep import run_grid
    from ..types import RenderSettings
    prompts, terms, rule = _common(unsafe_prompts, safe_prompts, caption_terms, min_correlation, min_top_share,
                                   min_text_share)
    chosen = _units(units) if units else None
    if chosen is not None and not chosen:
        raise NeurolensError("--units needs at least one unit number, e.g. --units 1,2,3")
    settings = RenderSettings(steps=steps, seeds=_seeds(seeds))
    if no_blur:
        typer.echo(NO_BLUR_LINE, err=True)
    clip = open_model(model, pretrained, checkpoint, device)
    data = _open_dataset(dataset, image_column, caption_column)
    with progress_bar(f"grid {layer}") as progress:
        path, fig, shown = run_grid(clip, layer, chosen, flagged=flagged, top=top, dataset=data, vocab=vocab,
                                    top_k=top_k, text_top_k=text_top_k, out=out, blur=not no_blur,
                                    render_fv=render_fv, render_settings=settings, cache=cache, progress=progress,
                                    prompts=prompts, rule=rule, caption_mode=caption_match, caption_terms=terms)
    typer.echo(f"{path}  ({len(shown)} units: {', '.join(map(str, shown[:20]))}{' ...' if len(shown) > 20 else ''})")
    typer.echo(fig.note)
    if no_blur:
        typer.echo("NOT BLURRED: --no-blur was given, the grid shows raw pixels")
