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
                                                 "('*' = any one character; default: the whole NSFW lexicon, "
                                                 "neurolens/data/nsfw_terms.txt).")]
CaptionMatchOpt = Annotated[str, typer.Option("--caption-match", help="How captions are matched: word (whole words "
                                              "and inflections), substring (the paper's literal filter), or off.")]
LabelsOpt = Annotated[Optional[List[str]], typer.Option(
    "--labels", help="Where the per-image NSFW labels come from (repeat to combine): captions (caption/URL "
                     "match against the NSFW lexicon), column:NAME[=V1,V2] (a dataset column, e.g. "
                     "column:NSFW=NSFW,UNSURE), nudenet (NudeNet's offline detector, installed with neurolens), "
                     "zero-shot (the inspected model's own score; never with random weights), or auto "
                     "(default: captions + nudenet + zero-shot, each kept only if it agrees with the others).")]
MinAgreementOpt = Annotated[float, typer.Option(
    "--min-agreement", help="Reliability check: a source whose AUC against the other sources is below this is "
                            "dropped (unless named with --labels).")]
MaxQOpt = Annotated[float, typer.Option("--max-q", help="Flag rule: Benjamini-Hochberg q-value at most this.")]
MinAucOpt = Annotated[float, typer.Option("--min-auc", help="Flag rule: AUC of the unit's activation, positive "
                                          "against negative images, at least this.")]
MinTextOpt = Annotated[float, typer.Option("--min-text-share", help="Text flag: share of NSFW top texts (texts "
                                           "alone never flag a unit).")]
AucMemoryOpt = Annotated[int, typer.Option("--auc-memory", help="MB the exact AUC may keep; beyond it, a "
                                           "streaming binned estimate (error <= 0.005).")]
NoBlurOpt = Annotated[bool, typer.Option("--no-blur", help="Write RAW pixels (the only way to get unblurred images).")]
OutDirOpt = Annotated[Optional[str], typer.Option("--out", help="Folder for the PNGs (default outputs/figures/).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimization steps of a feature visualization that is not cached.")]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="Comma-separated seeds of the feature visualizations.")]

NO_BLUR_LINE = "note: --no-blur: images are written with RAW pixels, nothing is blurred (may show NSFW content)"


def _common(unsafe_prompts, safe_prompts, caption_terms, max_q, min_auc, min_text_share):
    from .. import safety
    from ..unit_scores import FlagRule
    if not 0.0 <= min_text_share <= 1.0:
        raise NeurolensError(f"--min-text-share must be a share between 0 and 1, got {min_text_share}")
    if not 0.0 < max_q <= 1.0:
        raise NeurolensError(f"--max-q must be a q-value in (0, 1], got {max_q}")
    if not 0.5 <= min_auc <= 1.0:
        raise NeurolensError(f"--min-auc must be an AUC between 0.5 and 1, got {min_auc}")
    prompts = safety.load_prompts(unsafe_prompts, safe_prompts)
    terms = safety.read_list(caption_terms) if caption_terms else None
    rule = FlagRule(max_q=max_q, min_auc=min_auc, min_text_share=min_text_share)
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
    labels: LabelsOpt = None,
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
    min_agreement: MinAgreementOpt = 0.75,
    max_q: MaxQOpt = 0.01,
    min_auc: MinAucOpt = 0.8,
    min_text_share: MinTextOpt = 0.3,
    auc_memory: AucMemoryOpt = 2048,
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
    """Sweep EVERY unit of a layer for NSFW content. Scans the dataset once (resumable), labels every image
    from independent sources (--labels: captions, a dataset column, NudeNet, and the model's own zero-shot
    score only when it agrees with the others), then per unit: the ROC AUC of its activation between
    positive and negative images, a Mann-Whitney p and a Benjamini-Hochberg q across the layer. A unit is
    flagged when q <= --max-q and AUC >= --min-auc; the NSFW shares of its top images and texts are
    evidence. Prints the label sources and their agreement, then the units ranked by AUC; writes flags.csv
    and the HDF5 cache (a second run does no model forward).

    Example:  neurolens sweep --layer image_block_4_5 --dataset laion.parquet --labels column:NSFW=NSFW,UNSURE --labels nudenet
    """
    from ..pipelines.sweep import run_sweep
    prompts, terms, rule = _common(unsafe_prompts, safe_prompts, caption_terms, max_q, min_auc, min_text_share)
    if auc_memory < 0:
        raise NeurolensError(f"--auc-memory must be a number of MB >= 0, got {auc_memory}")
    clip = open_model(model, pretrained, checkpoint, device, quiet=as_json)
    data = _open_dataset(dataset, image_column, caption_column)
    with progress_bar(f"sweep {layer}", enabled=not as_json) as progress:
        result = run_sweep(clip, layer, data, vocab=vocab, top_k=top_k, text_top_k=text_top_k, cache=cache,
                           force=force, progress=progress, out=out, rule=rule, prompts=prompts,
                           caption_terms=terms, caption_mode=caption_match, batch_size=batch_size, workers=workers,
                           labels=labels or ["auto"], min_agreement=min_agreement,
                           auc_memory=int(auc_memory) * 2 ** 20)
    for line in result.lines():
        typer.echo(line, err=as_json)
    if as_json:
        print_json(result.ranking())
        return
    s = result.scores
    typer.echo(f"{clip.name} {result.layer}: {len(s.auc)} units over {s.n_pos} positive and {s.n_neg} negative "
               f"images of {data.description} (AUC {s.method}); {int(s.flagged.sum())} flagged "
               f"({rule.describe()}), {int((s.text_flag & ~s.flagged).sum())} more with a text flag only")
    typer.echo(f"{'rank':>4} {'unit':>6} {'AUC':>6} {'q':>8} {'corr':>7} {'img%':>5} {'txt%':>5} {'flag':>4}  top texts")
    for rank, row in enumerate(result.ranking(limit=show, texts=3), start=1):
        auc = f"{row['auc']:.3f}" if row["auc"] is not None else "n/a"
        q = f"{row['q']:.1e}" if row["q"] is not None else "n/a"
        flag = "YES" if row["flagged"] else ("txt" if row["text_flag"] else "")
        typer.echo(f"{rank:>4} {row['unit']:>6} {auc:>6} {q:>8} {row['correlation']:>+7.3f} "
                   f"{100 * row['top_nsfw_share']:>5.0f} {100 * row['text_nsfw_share']:>5.0f} {flag:>4}  "
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
    labels: LabelsOpt = None,
    min_agreement: MinAgreementOpt = 0.75,
    max_q: MaxQOpt = 0.01,
    min_auc: MinAucOpt = 0.8,
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
    prompts, terms, rule = _common(unsafe_prompts, safe_prompts, caption_terms, max_q, min_auc, min_text_share)
    settings = RenderSettings(steps=steps, seeds=_seeds(seeds))
    if no_blur:
        typer.echo(NO_BLUR_LINE, err=True)
    clip = open_model(model, pretrained, checkpoint, device)
    data = _open_dataset(dataset, image_column, caption_column)
    with progress_bar(f"figure {layer}") as progress:
        written = run_figure(clip, layer, unit, data, vocab=vocab, top_k=top_k, text_top_k=text_top_k, out=out,
                             blur=not no_blur, fv=not no_fv, render_settings=settings, cache=cache,
                             progress=progress, prompts=prompts, rule=rule, caption_mode=caption_match,
                             caption_terms=terms, labels=labels or ["auto"], min_agreement=min_agreement)
    for path, fig in written:
        typer.echo(f"{path}  ({fig.note})")
    if no_blur:
        typer.echo("NOT BLURRED: --no-blur was given, the figures show raw pixels")


@app.command("grid")
@command
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
    labels: LabelsOpt = None,
    min_agreement: MinAgreementOpt = 0.75,
    max_q: MaxQOpt = 0.01,
    min_auc: MinAucOpt = 0.8,
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
    the flagged units (--flagged), chosen units (--units 1,2,3), or the top units by AUC.
    BLURRED BY DEFAULT, like `figure`; --no-blur writes raw pixels and says so.

    Example:  neurolens grid --layer image_block_4_5 --flagged --top 64 --out figures/
    """
    from ..pipelines.sweep import run_grid
    from ..types import RenderSettings
    prompts, terms, rule = _common(unsafe_prompts, safe_prompts, caption_terms, max_q, min_auc, min_text_share)
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
                                    prompts=prompts, rule=rule, caption_mode=caption_match, caption_terms=terms,
                                    labels=labels or ["auto"], min_agreement=min_agreement)
    typer.echo(f"{path}  ({len(shown)} units: {', '.join(map(str, shown[:20]))}{' ...' if len(shown) > 20 else ''})")
    typer.echo(fig.note)
    if no_blur:
        typer.echo("NOT BLURRED: --no-blur was given, the grid shows raw pixels")
