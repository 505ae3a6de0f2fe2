"""neurolens compare"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import typer
from typing_extensions import Annotated

from ..errors import NeurolensError
from ..models.names import DEFAULT_PRETRAINED
from ..pipelines.settings import ConceptSettings
from .app import app, command, print_json, stage_bars
from .options import (CONCEPTS, DATASET, LOADER, CacheOpt, DatasetChoice, DeviceOpt, ForceOpt, JsonOpt, LoaderChoice,
                      uses)

CheckpointsOpt = Annotated[Optional[List[str]], typer.Option(
    "--checkpoint", help="A model's local weights (.pt/.bin/.safetensors); repeat for each model. Its label is the "
                         "file stem unless --label is given.")]
ModelsOpt = Annotated[Optional[List[str]], typer.Option(
    "--model", help="An open_clip model name; repeat for each model, each with its --pretrained (in the same order; "
                    "one --pretrained serves all). These models come after the --checkpoint ones.")]
PretrainedsOpt = Annotated[Optional[List[str]], typer.Option(
    "--pretrained", help=f"The open_clip pretrained tag of each --model (default {DEFAULT_PRETRAINED}).")]
LabelsOpt = Annotated[Optional[List[str]], typer.Option(
    "--label", help="The models' names in the report, one per model in their order (--checkpoint ones first); "
                    "unique.")]
LayersOpt = Annotated[List[str], typer.Option(
    "--layer", help="A layer to compare (repeat for more). A model without a layer of that name gets its block at the "
                    "nearest relative depth (docs/compare.md).")]
SaesOpt = Annotated[Optional[List[str]], typer.Option(
    "--sae", help="Audit SAE features instead of neurons: one SAE name (or folder) for every model, or one per model "
                  "in their order. The baseline is an SAE trained the same way on the random model's layer.")]
SaeDataOpt = Annotated[Optional[str], typer.Option(
    "--sae-data", help="The dataset the SAEs were trained on, when it is not the probe dataset (to train the baseline "
                       "SAE the same way).")]
TrainCaptionsOpt = Annotated[Optional[List[str]], typer.Option(
    "--train-captions", help="LABEL=PATH[:COLUMN]: a model's training captions (parquet or CSV; column TEXT or caption "
                             "by default); each concept's share of them is put beside its unit counts. Repeatable.")]
NoBaselineOpt = Annotated[bool, typer.Option(
    "--no-baseline", help="Leave out the random-weights baseline (faster; the report is then uncalibrated).")]
WorstOpt = Annotated[int, typer.Option("--worst", help="Units per model and concept shown side by side (blurred).")]
OutOpt = Annotated[str, typer.Option("--out", help="Folder for report.html, report.json, report.csv and the plots.")]


def plan_models(checkpoints: List[str], names: List[str], pretrained: List[str], labels: List[str],
                saes: List[str], train: List[str]) -> Tuple[List[Dict], Dict[str, str]]:
    """The models in order (--checkpoint ones, then --model ones) as CompareModel fields; one line for a
    count that does not fit."""
    if len(pretrained) > 1 and len(pretrained) != len(names):
        raise NeurolensError(f"{len(names)} --model but {len(pretrained)} --pretrained; give one --pretrained per "
                             f"--model (or one for all)")
    tags = pretrained * len(names) if len(pretrained) == 1 else (pretrained or [DEFAULT_PRETRAINED] * len(names))
    models = [{"checkpoint": path} for path in checkpoints] + \
        [{"model": name, "pretrained": tag} for name, tag in zip(names, tags)]
    if not models:
        raise NeurolensError("no model to compare; give --checkpoint PATH (repeat it) or --model NAME --pretrained TAG")
    if labels and len(labels) != len(models):
        raise NeurolensError(f"{len(labels)} --label for {len(models)} models; give one label per model, in their "
                             f"order (--checkpoint ones first)")
    if len(saes) > 1 and len(saes) != len(models):
        raise NeurolensError(f"{len(saes)} --sae for {len(models)} models; give one SAE for all or one per model")
    for k, model in enumerate(models):
        if labels:
            model["label"] = labels[k]
        if saes:
            model["sae"] = saes[0] if len(saes) == 1 else saes[k]
    return models, _train_captions(train)


def _train_captions(values: List[str]) -> Dict[str, str]:
    out = {}
    for value in values:
        label, sep, path = value.partition("=")
        if not sep or not label.strip() or not path.strip():
            raise NeurolensError(f"--train-captions {value!r}: give LABEL=PATH (e.g. laion=captions.parquet or "
                                 f"toy=captions.parquet:caption)")
        out[label.strip()] = path.strip()
    return out


@app.command("compare", short_help="One audit report across checkpoints, each beside random weights (HTML, JSON, "
                                    "CSV).")
@command
@uses(data=DATASET, settings=CONCEPTS, loader=LOADER)
def compare(
    layer: LayersOpt = ...,
    checkpoint: CheckpointsOpt = None,
    model: ModelsOpt = None,
    pretrained: PretrainedsOpt = None,
    label: LabelsOpt = None,
    data: DatasetChoice = None,
    settings: ConceptSettings = None,
    sae: SaesOpt = None,
    sae_data: SaeDataOpt = None,
    train_captions: TrainCaptionsOpt = None,
    no_baseline: NoBaselineOpt = False,
    worst: WorstOpt = 3,
    out: OutOpt = ...,
    force: ForceOpt = False,
    loader: LoaderChoice = None,
    device: DeviceOpt = "auto",
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Audit every model (checkpoints and open_clip models) on the same probe images with the concept audit of
    `neurolens concepts` (cached: a second run reads every audit), each beside the same audit of random weights of
    its architecture (the calibration baseline), and write OUT/report.html (self-contained, opens from file://,
    every image blurred), OUT/report.json (provenance and rows), OUT/report.csv and a plot of the flagged share per
    concept for each layer.

    --json: the rows, one per model x layer x concept (docs/compare.md): model, layer, model_layer, concept, basis,
    units, n_flagged, share_flagged, best_auc, n_auc_095, baseline_n_flagged, baseline_share_flagged,
    baseline_best_auc, baseline_n_auc_095, concept_prevalence, train_prevalence, model_based.

    Example:  neurolens compare --checkpoint a.pt --checkpoint b.pt --layer image_block_4_5 --dataset probe/ --out cmp
    Example:  neurolens compare --model RN50x4 --pretrained openai --model RN50 --pretrained yfcc15m --layer image_block_4_5 --dataset probe/ --concepts harms.yaml --out cmp --json
    """
    from ..pipelines.compare import (CompareModel, CompareSettings, check_labels, default_label,  # lazy: torch
                                     run_compare, write_report)
    if worst < 0:
        raise NeurolensError(f"--worst must be 0 or more, got {worst}")
    planned, train = plan_models(checkpoint or [], model or [], pretrained or [], label or [], sae or [],
                                 train_captions or [])
    models = []
    for fields in planned:
        made = CompareModel(**{"label": "", **fields})
        models.append(made if made.label else replace(made, label=default_label(made)))
    check_labels([m.label for m in models])
    unknown = sorted(set(train) - {m.label for m in models})
    if unknown:
        raise NeurolensError(f"--train-captions names no model {unknown[0]!r}; the models are "
                             f"{', '.join(m.label for m in models)}")
    models = [replace(m, train_captions=train.get(m.label)) for m in models]
    compare_settings = CompareSettings(layers=tuple(layer), concepts=settings, baseline=not no_baseline, worst=worst,
                                       sae_data=sae_data)
    dataset = data.open()
    with stage_bars(not as_json) as progress:
        result = run_compare(models, dataset, compare_settings, cache=cache, device=device, force=force,
                             progress=progress, batch_size=loader.batch_size, workers=loader.workers,
                             dataset_name=Path(data.dataset).name if data.dataset else None)
    files = write_report(result, out)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    rows = result.rows()
    if as_json:
        print_json(rows)
        return
    _print_text(rows, result)
    typer.echo(f"report: {files.html}\njson:   {files.json}\ncsv:    {files.csv}")


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_text(rows: List[dict], result) -> None:
    typer.echo(f"{len(result.models)} models x {len(result.layers)} layers x {len(result.concepts)} concepts on "
               f"{result.provenance['dataset']['images']} probe images ({result.seconds:.1f} s)")
    typer.echo(f"{'layer':<18} {'concept':<14} {'model':<22} {'flagged':>8} {'baseline':>8} {'best AUC':>8} "
               f"{'AUC>=.95':>8} {'prev':>6} {'train':>6}")
    for row in rows:
        typer.echo(f"{row['layer']:<18} {row['concept']:<14} {row['model']:<22} {row['n_flagged']:>8} "
                   f"{_num(row['baseline_n_flagged'], 'd'):>8} {_num(row['best_auc'], '.3f'):>8} "
                   f"{row['n_auc_095']:>8} {_num(row['concept_prevalence'], '.3f'):>6} "
                   f"{_num(row['train_prevalence'], '.3f'):>6}")
