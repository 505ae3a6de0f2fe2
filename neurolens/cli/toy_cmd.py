"""neurolens train-toy, neurolens demo"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ..errors import NeurolensError
from ..storage.cache import default_cache_root
from ..toy.concepts import check_mode
from ..toy.generate import ToySettings
from ..toy.settings import DEFAULT_TOY_MODEL, TrainSettings
from .app import app, command, print_json, stage_bars
from .options import CacheOpt, DeviceOpt, JsonOpt

_T = TrainSettings()


@app.command("train-toy", short_help="Train a small CLIP contrastively (CPU), by default on the generated toy data.")
@command
def train_toy(
    out: Annotated[str, typer.Option("--out", help="Where to write the checkpoint (.pt).")] = "toy.pt",
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="A parquet/CSV table of image paths (relative to the table's folder) and captions. "
                          "Default: generate the toy dataset (shapes + the planted concept) under the cache.")] = None,
    concepts: Annotated[str, typer.Option(
        "--concepts", help="The generated dataset's planted concepts (without --dataset): single (nsfw) or multi "
                           "(nsfw, violence, drugs, nsfw+violence together; see docs/toy-model.md).")] = "single",
    image_column: Annotated[str, typer.Option("--image-column", help="Column of image paths.")] = "image",
    caption_column: Annotated[str, typer.Option("--caption-column", help="Column of captions.")] = "caption",
    model: Annotated[str, typer.Option("--model", help="open_clip config to train from random weights.")] = DEFAULT_TOY_MODEL,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data.")] = _T.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per contrastive batch.")] = _T.batch_size,
    lr: Annotated[float, typer.Option("--lr", help="Peak AdamW learning rate (cosine schedule, linear warm-up).")] = _T.lr,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initialization and the batch order.")] = _T.seed,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a small CLIP (ModifiedResNet image tower, CLIP's tokenizer) contrastively on image-caption pairs.

    CPU only and deterministic for a seed. The checkpoint carries its model config, so any command loads
    it with --checkpoint alone. On the generated toy dataset the zero-shot accuracy on held-out generated
    pairs is measured and printed.

    Example:  neurolens train-toy --out toy.pt --epochs 10
    Example:  neurolens train-toy --out multi.pt --concepts multi
    Example:  neurolens train-toy --dataset pairs.parquet --out mine.pt --caption-column text
    """
    from ..models.build import load_clip  # lazy: keeps `neurolens --help` free of torch
    from ..toy.evaluate import zero_shot_accuracy  # lazy: keeps `neurolens --help` free of torch
    from ..toy.recipes import MultiConceptRecipe  # lazy: keeps `neurolens --help` free of torch
    from ..toy.store import toy_dataset  # lazy: keeps `neurolens --help` free of torch
    from ..toy.train import train_toy as train  # lazy: keeps `neurolens --help` free of torch

    if epochs < 1 or batch_size < 2 or lr <= 0:
        raise NeurolensError("--epochs must be >= 1, --batch-size >= 2 and --lr > 0")
    check_mode(concepts)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    generated = dataset is None
    settings = TrainSettings(model=model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    with stage_bars(not as_json) as progress:
        if generated:
            data = MultiConceptRecipe().data_settings(seed) if concepts == "multi" else ToySettings(seed=seed)
            dataset = str(toy_dataset(Path(cache) if cache else default_cache_root(), settings=data,
                                      progress=lambda d, t: progress("generate", d, t)))
        result = train(dataset, out, settings, image_column=image_column, caption_column=caption_column,
                       progress=lambda d, t: progress("train", d, t),
                       load_progress=lambda d, t: progress("load images", d, t))
    zero_shot = None
    manifest = Path(dataset).parent / "dataset.json"
    if manifest.is_file():   # a generated toy dataset: measure zero-shot accuracy on held-out pairs like it
        made = json.loads(manifest.read_text())
        made = ToySettings(**{k: v for k, v in made.items() if k in ToySettings.__dataclass_fields__})
        clip = load_clip(checkpoint=str(result.path), device="cpu")
        zero_shot = zero_shot_accuracy(clip, seed=made.seed, size=made.size, planted_share=made.planted_share,
                                       style=made.style, concepts=made.concepts,
                                       intersection_share=made.intersection_share).to_dict()
    summary = dict(checkpoint=str(result.path), model=result.model_name, dataset=dataset, pairs=result.pairs,
                   skipped=result.skipped, steps=result.steps, seconds=round(result.seconds, 1),
                   final_loss=round(result.final_loss, 4), fingerprint=result.fingerprint, zero_shot=zero_shot)
    if as_json:
        print_json(summary)
        return
    typer.echo(f"trained {result.model_name} on {result.pairs} pairs ({result.skipped} skipped) in "
               f"{result.seconds:.0f} s: {result.steps} steps, final loss {result.final_loss:.3f}")
    if zero_shot:
        typer.echo(f"zero-shot accuracy on {zero_shot['images']} held-out generated pairs: "
                   f"{zero_shot['accuracy']:.3f} (chance {zero_shot['chance']:.3f}); planted vs ordinary "
                   f"{zero_shot['planted_accuracy']:.3f} (chance 0.5); retrieval@1 {zero_shot['retrieval_at_1']:.3f}")
    typer.echo(f"checkpoint: {result.path}   (use it with --checkpoint {result.path})")


@app.command("demo", short_help="The offline end-to-end tour on a toy CLIP with a planted concept (minutes, CPU).")
@command
def demo(
    out: Annotated[str, typer.Option("--out", help="Folder for the demo's figures and index.md.")] = "outputs/demo",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated data and the training.")] = 0,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the toy model again even if it is cached.")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Instead of the tour: the dose-response experiment. Toys "
                                          "trained with the planted concept at several shares of their images (0 % "
                                          "first), compared on one probe set; report and plot in OUT/compare/.")] = False,
    concepts: Annotated[str, typer.Option(
        "--concepts", help="single: the tour on the one-concept toy; multi: the concept audit, descriptions and find "
                           "on the multi-concept toy against the generator's truth, written to "
                           "OUT/concepts/.")] = "single",
    device: DeviceOpt = "cpu",
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The offline end-to-end demo: generate a toy dataset with a planted concept, train a small CLIP on it
    (or reuse the cached one), then run visualize, scan, text, sweep, figure and grid on it, and write
    OUT/index.md listing what was made. No network, a few minutes on a laptop CPU.

    --compare runs the dose-response experiment instead (docs/compare.md): `neurolens compare` over toys trained
    on the same generator at several shares of the planted concept, written to OUT/compare/.

    --concepts multi proves the concept audit instead (docs/demo.md): the multi-concept toy (nsfw, violence,
    drugs, two of them together) audited on a probe set it never saw; per concept the units truly planted,
    flagged, precision, recall, descriptions right, and find's first unit; written to OUT/concepts/index.md.

    Example:  neurolens demo --out outputs/demo
    Example:  neurolens demo --compare
    Example:  neurolens demo --concepts multi
    """
    check_mode(concepts)
    if compare and concepts == "multi":
        raise NeurolensError("--compare and --concepts multi are two different experiments; run them one at a time")
    if compare:
        _dose_demo(Path(out) / "compare", seed, device, cache, as_json, retrain)
        return
    if concepts == "multi":
        _concepts_demo(Path(out) / "concepts", seed, device, cache, as_json, retrain)
        return
    from ..pipelines.demo import DemoSettings, run_demo  # lazy: keeps `neurolens --help` free of torch

    settings = DemoSettings(seed=seed, device=device)
    with stage_bars(not as_json) as progress:
        report = run_demo(out, settings, cache=cache, retrain=retrain, progress=progress)
    if as_json:
        print_json(report.to_dict())
    else:
        typer.echo(report.summary())
    if report.failed:
        typer.echo(f"error: demo stages failed: {', '.join(report.failed)} (see {report.index})", err=True)
        raise typer.Exit(1)


def _dose_demo(out: Path, seed: int, device: str, cache: Optional[str], as_json: bool, retrain: bool) -> None:
    from ..pipelines.dose import run_dose_demo  # lazy: keeps `neurolens --help` free of torch
    if retrain:
        raise NeurolensError("--retrain is for the tour; the dose-response toys are kept in the cache by their "
                             "settings (delete OUT's cache folder to train them again)")
    with stage_bars(not as_json) as progress:
        report = run_dose_demo(out, seed=seed, cache=cache, device=device, progress=progress)
    if as_json:
        print_json(report.to_dict())
        return
    for line in report.lines():
        typer.echo(line)
    typer.echo(f"report: {report.files.html}\nplot:   {report.plot}")


def _concepts_demo(out: Path, seed: int, device: str, cache: Optional[str], as_json: bool, retrain: bool) -> None:
    from ..pipelines.demo_concepts import run_concepts_demo  # lazy: keeps `neurolens --help` free of torch
    with stage_bars(not as_json) as progress:
        report = run_concepts_demo(out, seed, cache=cache, retrain=retrain, device=device, progress=progress)
    if as_json:
        print_json(report.to_dict())
        return
    for line in report.lines():
        typer.echo(line)
