"""One audit report across checkpoints: the concept audit (pipelines.concepts) of every model on the same probe
images, each beside the same audit of a random-weights model of its architecture (the calibration baseline),
with the concepts' prevalence in each model's training captions where they are given.

    1. every model loaded (labels unique: the checkpoint's file stem, or --label), and each requested layer
       matched in every model by name, else by relative depth (neurolens.models.match)
    2. per model and layer: run_concepts on the probe dataset (cache-or-compute: a second run reads the scan
       and concepts records), of the neurons or of an SAE's features (CompareModel.sae)
    3. per architecture: load_clip(name, "none") (seeded random weights) audited the same way on the same
       images; for SAE features an SAE trained with the same settings on the same data on the random model's
       layer (sae_baseline), or no baseline and a note saying why
    4. per model with training captions: each concept's share of caption rows matching its lexicon
       (audit.captions.concept_prevalence)
    5. the rows (ROW_KEYS, one per model x layer x concept, in that order) and the provenance

The report files (report.json, report.html, the CSV, the plots) are written by write_report.
"""
from __future__ import annotations

import json
import re
import time
from importlib import metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..audit.captions import concept_prevalence
from ..datasets.open import open_dataset
from ..datasets.types import ImageDataset
from ..display.charts import grouped_bars
from ..errors import NeurolensError
from ..models.build import load_clip
from ..models.layers import registry_for
from ..models.match import BY_NAME, LayerMatch, depth_chain, match_layers
from ..models.names import DEFAULT_MODEL, DEFAULT_PRETRAINED
from ..records.concepts import ConceptsResult
from ..records.keys import as_cache
from ..records.sae import read_config
from ..sae.basis import SaeBasis, load_basis
from ..sae.train import SaeTrainSettings
from ..serve.pages import public_text
from ..serve.images import encode
from ..serve.report import report_html
from ..storage.files import ensure_folder, write_bytes, write_csv, write_text
from .concepts import run_concepts
from .sae import run_sae_train
from .settings import ConceptSettings

StageProgress = Optional[Callable[[str, int, int], None]]
RANDOM = "none"
ROW_KEYS = ("model", "layer", "model_layer", "concept", "basis", "units", "n_flagged", "share_flagged", "best_auc",
            "n_auc_095", "baseline_n_flagged", "baseline_share_flagged", "baseline_best_auc", "baseline_n_auc_095",
            "concept_prevalence", "train_prevalence", "model_based")
STRONG_AUC = 0.95            # n_auc_095: units whose AUC reaches this


@dataclass(frozen=True)
class CompareModel:
    """One model of a comparison: its weights, its label in the report, and what is audited of it."""
    label: str
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    checkpoint: Optional[str] = None
    sae: Optional[str] = None               # an SAE (name or folder) whose features are audited; None: the neurons
    train_captions: Optional[str] = None    # its training captions: PATH (parquet/CSV) or PATH:COLUMN


@dataclass(frozen=True)
class CompareSettings:
    layers: Tuple[str, ...]
    concepts: ConceptSettings = field(default_factory=ConceptSettings)
    baseline: bool = True                   # audit a random-weights model of each architecture
    worst: int = 3                          # units per model, layer and concept shown side by side (report.html)
    crops: int = 4                          # top crops per unit shown
    sae_data: Optional[str] = None          # the dataset the SAEs were trained on (for the baseline SAE)


@dataclass
class LayerAudit:
    """One model's audit of one (matched) layer, and its baseline."""
    model: CompareModel
    match: LayerMatch
    audit: ConceptsResult
    baseline: Optional[ConceptsResult] = None
    baseline_note: str = ""
    seconds: float = 0.0


@dataclass
class CompareResult:
    models: List[CompareModel]
    layers: Tuple[str, ...]
    audits: List[LayerAudit]
    dataset: ImageDataset
    settings: CompareSettings
    train: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)   # label -> concept -> share
    provenance: dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def concepts(self) -> List[str]:
        return self.settings.concepts.concepts.names

    def rows(self) -> List[dict]:
        """One row per model x layer x concept (ROW_KEYS), models in the order given, then layers, then the
        concept set's order (docs/compare.md defines each key)."""
        out = []
        for item in self.audits:
            train = self.train.get(item.model.label)
            for k, scores in enumerate(item.audit.scores):
                base = item.baseline.scores[k] if item.baseline is not None else None
                units = len(scores.auc)
                row = {"model": item.model.label, "layer": item.match.requested, "model_layer": item.match.layer,
                       "concept": scores.name, "basis": item.audit.basis, "units": units,
                       **_counts(scores, units, ""), **_baseline(base),
                       "concept_prevalence": _number(scores.prevalence),
                       "train_prevalence": None if train is None else train.get(scores.name),
                       "model_based": bool(scores.model_based)}
                out.append({key: row[key] for key in ROW_KEYS})
        return out


def _counts(scores, units: int, prefix: str) -> dict:
    auc = np.asarray(scores.auc, dtype=np.float64)
    flagged = int(np.asarray(scores.flagged, dtype=bool).sum())
    finite = auc[np.isfinite(auc)]
    return {f"{prefix}n_flagged": flagged, f"{prefix}share_flagged": flagged / units if units else None,
            f"{prefix}best_auc": float(finite.max()) if finite.size else None,
            f"{prefix}n_auc_095": int((finite >= STRONG_AUC).sum())}


def _baseline(scores) -> dict:
    if scores is None:
        return {"baseline_n_flagged": None, "baseline_share_flagged": None, "baseline_best_auc": None,
                "baseline_n_auc_095": None}
    return _counts(scores, len(scores.auc), "baseline_")


def _number(value) -> Optional[float]:
    value = float(value)
    return value if np.isfinite(value) else None


# ------------------------------------------------------------------------------------------- the models

def default_label(model: CompareModel) -> str:
    """A checkpoint's file stem, else MODEL-PRETRAINED."""
    if model.checkpoint:
        return Path(model.checkpoint).stem
    return f"{model.model}-{model.pretrained}"


def check_labels(labels: Sequence[str]) -> None:
    """Labels name the models in every row: unique (case-sensitive), non-empty."""
    seen = set()
    for label in labels:
        if not str(label).strip():
            raise NeurolensError("a model label is empty; give every model a name with --label")
        if label in seen:
            raise NeurolensError(f"two models are labelled {label!r}; labels must be unique: give each model its own "
                                 f"--label (in the order of the models: --checkpoint ones first, then --model ones)")
        seen.add(label)


def _resolve_names(clip) -> Dict[str, str]:
    """Every name a model's registered layers answer to (name, aliases, module path) -> the canonical name."""
    names = {}
    for spec in registry_for(clip).layers:
        for name in (spec.name, *spec.aliases, spec.module):
            names.setdefault(name, spec.name)
    return names


def match_all(clips: Sequence, layers: Sequence[str]) -> Dict[str, List[LayerMatch]]:
    """requested layer -> one LayerMatch per model (neurolens.models.match: by name, else by relative depth)."""
    chains = [depth_chain(registry_for(clip).layers) for clip in clips]
    resolve = [_resolve_names(clip) for clip in clips]
    return {layer: match_layers(layer, chains, resolve) for layer in layers}


# ------------------------------------------------------------------------------------------- SAE baselines

def sae_baseline(basis, random_clip, layer: str, datasets: Sequence[ImageDataset], cache,
                 progress: StageProgress = None) -> Tuple[Optional[SaeBasis], str]:
    """The same SAE training on the random-weights model's layer: the SAE's settings from its cfg.json
    (metadata.neurolens) on the dataset it was trained on (one of `datasets`, recognised by its identity).
    (None, why) when the SAE was not made by neurolens or its training data is not at hand."""
    info = {}
    if getattr(basis, "path", None) is not None:
        info = (read_config(Path(basis.path)).get("metadata") or {}).get("neurolens") or {}
    if not info.get("settings"):
        return None, (f"SAE {basis.name}: no baseline (its cfg.json holds no neurolens training settings: it was not "
                      f"trained by `neurolens sae train`)")
    data = next((d for d in datasets if d.identity == info.get("dataset_identity")), None)
    if data is None:
        return None, (f"SAE {basis.name}: no baseline (it was trained on {public_text(info.get('dataset', '?'))}, "
                      f"which is not the probe dataset; give that dataset with --sae-data to train the baseline SAE)")
    try:
        settings = SaeTrainSettings(**info["settings"])
    except TypeError as exc:
        return None, f"SAE {basis.name}: no baseline (its training settings are not this version's: {exc})"
    step = (lambda done, total: progress(f"baseline SAE {layer}", done, total)) if progress else None
    trained = run_sae_train(random_clip, layer, data, settings, cache=cache, progress=step,
                            precision=info.get("precision", "fp32"))
    return load_basis(random_clip, layer, trained.name, cache=cache), ""


# ------------------------------------------------------------------------------------------- the run

def run_compare(models: Sequence[CompareModel], dataset, settings: CompareSettings, *, cache=None,
                device: str = "auto", force: bool = False, progress: StageProgress = None,
                batch_size: Optional[int] = None, workers: Optional[int] = None, scorer=None,
                clips: Optional[Sequence] = None, dataset_name: Optional[str] = None) -> CompareResult:
    """Audit every model (and a random-weights model of each architecture) on `dataset` (an ImageDataset or what
    open_dataset takes); see the module docstring. clips: the models already loaded, in the order of `models`;
    dataset_name: how report.json names the dataset (default: the last component of its path)."""
    started = time.perf_counter()
    if not models:
        raise NeurolensError("no model to compare; give --checkpoint PATH or --model NAME --pretrained TAG")
    if not settings.layers:
        raise NeurolensError("no layer to compare; give --layer")
    check_labels([m.label for m in models])
    cache = as_cache(cache)
    source = dataset_name or (Path(str(dataset)).name if isinstance(dataset, (str, Path)) else None)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    clips = list(clips) if clips is not None else \
        [load_clip(m.model, m.pretrained, checkpoint=m.checkpoint, device=device) for m in models]
    matches = match_all(clips, settings.layers)
    result = CompareResult(list(models), tuple(settings.layers), [], dataset, settings)
    randoms: Dict[str, object] = {}
    baselines: Dict[tuple, Tuple[Optional[ConceptsResult], str]] = {}
    sae_data = [dataset] + ([open_dataset(settings.sae_data)] if settings.sae_data else [])

    def audit(clip, layer: str, basis, stage: str) -> ConceptsResult:
        step = (lambda done, total: progress(stage, done, total)) if progress else None
        return run_concepts(clip, layer, dataset, settings.concepts, cache=cache, force=force, progress=step,
                            batch_size=batch_size, workers=workers, scorer=scorer, basis=basis)

    for m, (model, clip) in enumerate(zip(models, clips)):
        for layer in settings.layers:
            match = matches[layer][m]
            basis = load_basis(clip, match.layer, model.sae, cache=cache) if model.sae else None
            began = time.perf_counter()
            item = LayerAudit(model, match, audit(clip, match.layer, basis, f"{model.label} {match.layer}"))
            item.seconds = time.perf_counter() - began
            if settings.baseline:
                item.baseline, item.baseline_note = _baseline_audit(
                    clip, match.layer, basis, randoms, baselines, device, sae_data, cache, audit, progress)
            result.audits.append(item)
    for model in models:
        if model.train_captions:
            result.train[model.label] = train_prevalence(model.train_captions, settings.concepts)
    result.notes = [f"{model.label}: {layer} is {m.describe()}" for layer in settings.layers
                    for model, m in zip(models, matches[layer]) if m.how != BY_NAME]
    result.notes += sorted({item.baseline_note for item in result.audits if item.baseline_note})
    result.seconds = time.perf_counter() - started
    result.provenance = provenance(result, clips, randoms, source)
    return result


def _baseline_audit(clip, layer, basis, randoms, baselines, device, sae_data, cache, audit, progress):
    """The random-weights audit of clip's architecture at `layer` (of the neurons, or of a baseline SAE),
    made once per architecture, layer and SAE training."""
    if clip.name not in randoms:
        randoms[clip.name] = load_clip(clip.name, RANDOM, device=device)
    random = randoms[clip.name]
    sae_key = None if basis is None else getattr(basis, "id", None)
    key = (clip.name, layer, sae_key)
    if key not in baselines:
        random_basis, note = None, ""
        if basis is not None:
            random_basis, note = sae_baseline(basis, random, layer, sae_data, cache, progress)
        found = None if (basis is not None and random_basis is None) else \
            audit(random, layer, random_basis, f"random {clip.name} {layer}")
        baselines[key] = (found, note)
    return baselines[key]


def train_prevalence(spec: str, settings: ConceptSettings) -> Dict[str, Optional[float]]:
    """Each concept's share of the training caption rows (`PATH` or `PATH:COLUMN`) matching its lexicon; None
    for a concept without terms (a column or a detector cannot be read from captions)."""
    path, column = split_column(spec)
    lexicons = [(c.name, list(c.terms), c.match) for c in settings.concepts if c.terms]
    found = {p.concept: p.prevalence for p in concept_prevalence([path], lexicons, text_column=column)}
    return {c.name: found.get(c.name) for c in settings.concepts}


def split_column(spec: str) -> Tuple[str, Optional[str]]:
    """PATH or PATH:COLUMN (a path that exists as given wins, so C:\\x and names with ':' stay whole)."""
    if Path(spec).exists() or ":" not in spec:
        return spec, None
    path, _, column = spec.rpartition(":")
    return path, column or None


def provenance(result: CompareResult, clips, randoms, source) -> dict:
    """What report.json records besides the rows: versions, the dataset, the settings, every model's weights."""
    s = result.settings
    concepts = s.concepts
    data = result.dataset
    models = []
    for model, clip in zip(result.models, clips):
        audits = [a for a in result.audits if a.model.label == model.label]
        models.append({"label": model.label, "model": clip.name, "pretrained": public_text(clip.pretrained),
                       "checkpoint": Path(model.checkpoint).name if model.checkpoint else None,
                       "fingerprint": clip.fingerprint, "sae": public_text(model.sae) if model.sae else None,
                       "train_captions": Path(split_column(model.train_captions)[0]).name
                       if model.train_captions else None,
                       "layers": {a.match.requested: {"layer": a.match.layer, "matched_by": a.match.how,
                                                      "relative_depth": _number(a.match.depth),
                                                      "basis": a.audit.basis, "record": _record(a.audit),
                                                      "baseline_record": _record(a.baseline),
                                                      "cached": bool(a.audit.cached),
                                                      "seconds": round(a.seconds, 3)} for a in audits}})
    return {"neurolens": version(),
            "dataset": {"name": source or public_text(data.description), "identity": data.identity, "images": len(data),
                        "description": public_text(data.description)},
            "settings": {"layers": list(result.layers), "concept_set": {"name": concepts.concepts.name,
                                                                       "identity": concepts.concepts.identity,
                                                                       "concepts": concepts.concepts.names},
                         "rule": concepts.rule.as_dict(), "top_k": concepts.top_k,
                         "min_agreement": concepts.min_agreement, "detector": concepts.detector,
                         "strong_auc": STRONG_AUC, "baseline": s.baseline, "worst": s.worst, "crops": s.crops,
                         "layer_matching": "by name, else the nearest relative depth among the blocks "
                                           "(docs/compare.md)"},
            "models": models,
            "baselines": [{"model": name, "pretrained": RANDOM, "fingerprint": clip.fingerprint}
                          for name, clip in randoms.items()],
            "notes": list(result.notes), "seconds": round(result.seconds, 3)}


def version() -> str:
    """The installed neurolens version (the package metadata), or "unknown" when it is not installed."""
    try:
        return metadata.version("neurolens")
    except metadata.PackageNotFoundError:
        return "unknown"


def _record(audit: Optional[ConceptsResult]) -> Optional[str]:
    return None if audit is None or audit.path is None else Path(audit.path).name


# ------------------------------------------------------------------------------------------- the files

REPORT_HTML, REPORT_JSON, REPORT_CSV = "report.html", "report.json", "report.csv"


@dataclass
class ReportFiles:
    html: Path
    json: Path
    csv: Path
    charts: Dict[str, Path]


def share_chart(result: CompareResult, rows: List[dict], layer: str) -> bytes:
    """The PNG of one layer's flagged share per concept, one bar per model, its baseline as a tick."""
    concepts = result.concepts
    labels = [m.label for m in result.models]
    pick = {(r["model"], r["concept"]): r for r in rows if r["layer"] == layer}
    values = [[pick[(label, c)]["share_flagged"] for c in concepts] for label in labels]
    baselines = [[pick[(label, c)]["baseline_share_flagged"] for c in concepts] for label in labels] \
        if result.settings.baseline else None
    image = grouped_bars(concepts, labels, values, baselines, title=f"share of units flagged per concept: {layer}",
                         y_label="units flagged")
    return encode(image, "PNG")


def write_report(result: CompareResult, out) -> ReportFiles:
    """OUT/report.json (provenance and rows), OUT/report.csv (the rows, formula-safe), one flagged-share PNG
    per layer and OUT/report.html (self-contained, blurred images only: serve.report)."""
    out = ensure_folder(out)
    rows = result.rows()
    charts, paths = {}, {}
    for k, layer in enumerate(result.layers):
        charts[layer] = share_chart(result, rows, layer)
        paths[layer] = write_bytes(out / f"flagged_share_{k}_{safe_name(layer)}.png", charts[layer])
    document = {**result.provenance, "rows": rows}
    json_path = write_text(out / REPORT_JSON, json.dumps(plain(document), indent=2, allow_nan=False))
    csv_path = write_csv(out / REPORT_CSV, ROW_KEYS, ([row[key] for key in ROW_KEYS] for row in rows))
    html_path = write_text(out / REPORT_HTML, report_html(result, rows, charts))
    return ReportFiles(html_path, json_path, csv_path, paths)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "layer"


def plain(value):
    """JSON-able: numpy values as numbers, NaN and infinities as None (docs/json.md)."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
