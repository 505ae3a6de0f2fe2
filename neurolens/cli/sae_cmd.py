"""neurolens sae train, neurolens sae list"""
from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

from ..errors import NeurolensError
from ..records.keys import as_cache
from ..records.sae import read_config, sae_folder
from ..sae.registry import list_saes
from .app import app, command, print_json, progress_bar
from .options import (DATASET, MODEL, CacheOpt, DatasetChoice, DecodeOpt, ForceOpt, JsonOpt, LayerOpt, ModelChoice,
                      PrecisionOpt, WorkersOpt, uses)

sae_app = typer.Typer(
    name="sae", no_args_is_help=True, add_completion=False,
    help="Sparse autoencoders (TopK, Gao et al. 2024) on a layer: train one, list them. Every command that takes "
         "--layer L --unit U also takes --layer L --sae NAME --unit F to work on its features.\n\n"
         "Example:  neurolens sae train --layer image_block_4_5 --dataset photos/ --features 8x --k 32 --out nsfw8x")
app.add_typer(sae_app, name="sae", short_help="Sparse autoencoders: train one on a layer, list them; then --sae NAME "
                                              "elsewhere.")


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


@sae_app.command("train", short_help="Train a TopK or BatchTopK SAE on a layer (streamed, resumable) and print its "
                                     "quality report.")
@command
@uses(model=MODEL, data=DATASET)
def train(
    layer: LayerOpt = "image_block_4_5",
    data: DatasetChoice = None,
    features: Annotated[str, typer.Option("--features", help="Dictionary size: a multiple of the layer's channels "
                                          "(8x) or a number of features (4096).")] = "8x",
    k: Annotated[int, typer.Option("--k", help="Active features per vector: exactly k with --sparsity topk, k on "
                                   "average with batchtopk.")] = 32,
    sparsity: Annotated[str, typer.Option("--sparsity", help="topk: exactly k active features per vector, saved as "
                                          "a TopK SAE; batchtopk: each batch keeps its k x batch-size largest "
                                          "activations (k per vector on average), saved as a JumpReLU SAE with one "
                                          "global threshold estimated at the end of training.")] = "topk",
    out: Annotated[Optional[str], typer.Option("--out", help="Name of the SAE (letters, digits, . _ -); default "
                                               "<sparsity>-<features>-k<k>-<hash of the settings>.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training images; 0 = as many as give "
                                        "2M training vectors (at least 1).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Vectors (cells / patch tokens) per optimizer step.")] = 1024,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate; 0 = 8e-4 * sqrt(16384 / features).")] = 0.0,
    held_out: Annotated[float, typer.Option("--held-out", help="Share of the images kept out of training for the "
                                            "quality report (at most 2000 images).")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialization, the held-out split and the "
                                      "data order (same seed, data and settings: same SAE on CPU).")] = 0,
    images_per_forward: Annotated[Optional[int], typer.Option("--images-per-forward", help="Images per model "
                                                              "forward (default 16 on CPU, 64 on GPU).")] = None,
    workers: WorkersOpt = None,
    decode: DecodeOpt = "auto",
    precision: PrecisionOpt = "fp32",
    force: ForceOpt = False,
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a sparse autoencoder on a layer: every spatial cell (ResNet) or patch token (ViT) of the dataset's
    images is one sample, streamed from the model into a shuffled in-memory buffer (nothing is written to disk
    but the SAE). ReLU encoder, TopK (default: exactly k active features per vector) or BatchTopK (--sparsity
    batchtopk: k on average over each batch, saved as a JumpReLU SAE with one global threshold), unit-norm decoder
    rows, a pre-encoder bias, and the AuxK loss for dead features. Resumes from its last checkpoint after an
    interruption; prints the quality report (held-out explained variance, L0 of the saved SAE, dead share,
    embedding cosine with the layer replaced by its reconstruction) and saves the SAE in SAELens's layout next
    to the cache. Use it anywhere with --sae NAME.

    Example:  neurolens sae train --layer image_block_4_5 --dataset photos/ --features 8x --k 32 --out nsfw8x
    """
    from ..pipelines.sae import run_sae_train  # lazy: keeps `neurolens --help` free of torch
    from ..sae.train import SaeTrainSettings  # lazy: keeps `neurolens --help` free of torch
    settings = SaeTrainSettings(features=features, k=k, epochs=epochs, batch_size=batch_size, lr=lr,
                                held_out=held_out, seed=seed, sparsity=sparsity)
    clip = model.load(quiet=as_json, cache=cache)
    dataset = data.open()
    with progress_bar(f"sae train {layer}", enabled=not as_json) as update:
        def quality_update(done: int, total: int) -> None:
            update(done, total, description="quality report (held-out images)")

        def on_metrics(metrics: dict) -> None:
            update(metrics["vectors"], metrics["total"],
                   description=f"sae train {layer}  epoch {metrics['epoch'] + 1}/{metrics['epochs']}  "
                               f"loss {metrics['loss']:.4f}  expl. var. {metrics['explained_variance']:.3f}  "
                               f"dead {100 * metrics['dead_share']:.1f} %")
        result = run_sae_train(clip, layer, dataset, settings, name=out, cache=cache, force=force, progress=update,
                               on_metrics=on_metrics, images_per_forward=images_per_forward, workers=workers,
                               precision=precision, quality_progress=quality_update, decoder=decode)
    summary = result.summary()
    if as_json:
        print_json(summary)
        return
    how = "cached" if result.cached else (f"resumed at {result.resumed_from} vectors" if result.resumed_from
                                          else "trained")
    typer.echo(f"{how}: SAE {result.name} on {result.layer} of {clip.name}: {result.features} features, k={result.k}, "
               f"{result.vectors} training vectors ({result.epochs} epochs) -> {result.path}")
    typer.echo(f"held-out ({summary['held_out_images']} images, {summary['held_out_vectors']} vectors): "
               f"explained variance {_number(summary['explained_variance'])}, L0 {_number(summary['l0'], 1)}, "
               f"never fired {_percent(summary['never_fired_share'])}")
    typer.echo(f"dead features (no firing in the last {summary['dead_after']} training vectors): "
               f"{_percent(summary['dead_share'])}")
    typer.echo(f"embedding cosine with the layer replaced by its reconstruction: "
               f"{_number(summary['embedding_cosine'])}")
    if result.skipped:
        typer.echo(f"skipped {result.skipped} unreadable training image(s)")
    typer.echo(f"use it with --layer {result.layer} --sae {result.name} (scan, samples, visualize, text, sweep, "
               f"figure, grid)")


@sae_app.command("list", short_help="The SAEs trained for a layer of this model, with their quality report.")
@command
@uses(model=MODEL)
def list_command(
    layer: LayerOpt = "image_block_4_5",
    model: ModelChoice = None,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The SAEs trained for a layer of this model (by fingerprint), with their size and quality report.

    Example:  neurolens sae list --layer image_block_4_5
    """
    from ..models.layer_table import resolve_layer  # lazy: keeps `neurolens --help` free of torch
    clip = model.load(quiet=as_json, cache=cache)
    spec = resolve_layer(clip, layer)
    rows = []
    for name in list_saes(clip, spec.name, cache):
        folder = sae_folder(as_cache(cache), clip.fingerprint, spec.name, name)
        try:
            cfg = read_config(folder)
        except NeurolensError as exc:        # listed as unreadable, with the reason; the others still listed
            rows.append({"name": name, "path": str(folder), "unreadable": str(exc)})
            continue
        info = (cfg.get("metadata") or {}).get("neurolens") or {}
        quality = info.get("quality") or {}
        rows.append({"name": name, "path": str(folder), "features": cfg.get("d_sae"), "k": cfg.get("k"),
                     "architecture": cfg.get("architecture"), **{key: quality.get(key) for key in (
                         "explained_variance", "l0", "dead_share", "embedding_cosine")}})
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo(f"no SAE for {spec.name} of {clip.name} yet; train one with "
                   f"`neurolens sae train --layer {spec.name} --dataset ...`")
        return
    for row in rows:
        if "unreadable" in row:
            typer.echo(f"{row['name']}: unreadable: {row['unreadable']}")
            continue
        typer.echo(f"{row['name']}: {row['features']} features, k={row['k']}, explained variance "
                   f"{_number(row['explained_variance'])}, dead {_percent(row['dead_share'])}, embedding cosine "
                   f"{_number(row['embedding_cosine'])}  ({row['path']})")
