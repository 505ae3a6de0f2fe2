"""The concept audit of a whole layer: every unit (or SAE feature) against every concept of a concept set
(neurolens.labels.concepts), from ONE scan pass, cached.

    1. the label sources of every concept (each concept's LabelSettings, pipelines.settings.ConceptSettings;
       chosen by pipelines.sweep_find.SweepJob as in a sweep)
    2. ONE scan of the layer (pipelines.scan.run_scan, resumable; with image embeddings only when a concept's
       zero-shot prompts can be used: a trained model)
    3. per concept: its sources computed, checked against each other and combined (pipelines.sweep.label_set_of,
       the sweep's labels)
    4. ONE stream over the scan's per-image maxima chunks for all concepts (scoring.units.label_statistics:
       AUC, AUPRC, correlation, Mann-Whitney p, and BH q within each concept over the layer's units), flags by
       the sweep's rule (scoring.flags.apply_rule), none for a concept with fewer than 10 images in a class
    5. the concepts record (records.concepts), keyed by the scan record, the concept set's identity, every
       concept's sources, the agreement bar, the rule, top-k and the AUC method

A second run reads the record (no model forward); an interrupted run resumes its scan, and the scoring is
recomputed from the scan's chunks. `sweep` is this audit's one-concept case: the same labels (label_set_of),
the same scorer (scoring.units.unit_statistics is label_statistics with one label), so the built-in nsfw
concept's numbers equal the sweep's. On Ray (`RayConceptEngine`) the scan is the Ray scan with per-image
maxima kept (float16 shard chunks), then the same scoring over its chunks; only caption and column sources are
computed there (NudeNet and zero-shot need the in-process pass).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np

from ..datasets.open import open_dataset
from ..datasets.types import ImageDataset
from ..engines.ray.session import RayOptions
from ..errors import NeurolensError
from ..labels.prompts import LOGIT_SCALE
from ..labels.reliability import LabelSet
from ..records.concepts import (CONCEPTS_KIND, CONCEPTS_VERSION, ROW_KEYS, ConceptScores, ConceptsResult, concepts_path,
                                from_record, to_record)
from ..records.keys import as_basis, as_cache, basis_id
from ..scoring.flags import WEAK_CLASS, apply_rule, auc_method
from ..scoring.units import label_statistics, top_share
from ..storage.cache import Cache, settings_key
from ..storage.files import write_csv
from .scan import run_ray_scan, run_scan
from .settings import ConceptSettings
from .sweep import label_set_of
from .sweep_find import Progress, Scorer, SweepJob

RAY_KINDS = ("captions", "column")        # the label sources a concept audit on Ray computes


@dataclass
class ConceptJob:
    """What every engine shares: the model and layer, the settings, and one SweepJob per concept (its label
    part); `failed` holds why a concept has no label source."""
    clip: object
    layer: str
    settings: ConceptSettings
    cache: Cache
    force: bool = False
    progress: Progress = None
    scorer: Optional[Scorer] = None     # scorer(clip, embeddings) -> (N,) replaces the zero-shot score (tests)
    basis: object = None
    failed: Dict[int, str] = field(default_factory=dict)

    def __post_init__(self):
        self.jobs = [SweepJob(self.clip, self.layer, self.settings.sweep_settings(concept), self.cache, force=self.force,
                              progress=self.progress, scorer=self.scorer, basis=self.basis)
                     for concept in self.settings.concepts]

    def choose_sources(self, dataset: ImageDataset, kinds=None) -> None:
        """Every concept's label sources (kinds: the only kinds computed; others are left out with a note)."""
        for k, job in enumerate(self.jobs):
            try:
                job.choose_sources(dataset.keys, job.captions(dataset))
            except NeurolensError as exc:
                self.failed[k] = str(exc)
                continue
            if kinds is not None:
                left = [spec.name for spec in job.specs if spec.kind not in kinds]
                job.specs = [spec for spec in job.specs if spec.kind in kinds]
                job.notes += [f"{name}: not used (--engine ray computes {' and '.join(kinds)} sources only; use "
                              f"--engine process)" for name in left]
                if not job.specs:
                    self.failed[k] = f"its sources ({', '.join(left)}) need --engine process"

    @property
    def needs_embeddings(self) -> bool:
        return any(job.needs_embeddings for k, job in enumerate(self.jobs) if k not in self.failed)

    def key(self, scan, method: str) -> str:
        s = self.settings
        sources = [None if k in self.failed else [(spec.name, spec.explicit) for spec in job.specs]
                   for k, job in enumerate(self.jobs)]
        return settings_key(CONCEPTS_KIND, CONCEPTS_VERSION, Path(scan.path).name if scan.path else None,
                            s.concepts.identity, sources, float(s.min_agreement), s.rule.as_dict(), s.top_k,
                            LOGIT_SCALE, self.jobs[0].scorer_name if self.jobs else None, method,
                            *([] if self.basis is None else [self.basis.id]))


# ------------------------------------------------------------------------------------------- the engines

class LocalConceptEngine:
    """The audit in this process: sources chosen from the dataset, then run_scan, then every concept's labels."""

    def __init__(self, batch_size: Optional[int] = None, workers: Optional[int] = None, decoder: str = "auto"):
        self.batch_size, self.workers, self.decoder = batch_size, workers, decoder

    @contextmanager
    def open(self, job: ConceptJob, dataset) -> Iterator["_LocalPass"]:
        dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
        job.choose_sources(dataset)
        yield _LocalPass(self, job, dataset)


class _LocalPass:
    def __init__(self, engine: LocalConceptEngine, job: ConceptJob, dataset: ImageDataset):
        self.engine, self.job, self.dataset = engine, job, dataset

    def scan(self):
        job = self.job
        return run_scan(job.clip, job.layer, self.dataset, top_k=job.settings.top_k, batch_size=self.engine.batch_size,
                        workers=self.engine.workers, cache=job.cache, force=job.force,
                        embeddings=job.needs_embeddings, progress=job.progress, basis=job.basis,
                        decoder=self.engine.decoder)

    def labels(self, scan) -> List[Optional[LabelSet]]:
        return _label_sets(self.job, self.dataset, scan)


class RayConceptEngine:
    """The audit with the Ray scan (per-image maxima kept), then the same labels and scoring in this process.
    ray: engines.ray.session.RayOptions."""

    def __init__(self, ray: Optional[RayOptions] = None, device: str = "auto", image_column: str = "image",
                 caption_column: str = "caption", report: Optional[Callable] = None, decoder: str = "auto"):
        self.options = ray if ray is not None else RayOptions()
        self.device, self.report, self.decoder = device, report, decoder
        self.image_column, self.caption_column = image_column, caption_column

    @contextmanager
    def open(self, job: ConceptJob, dataset) -> Iterator["_RayPass"]:
        if job.basis is not None or job.scorer is not None:
            raise NeurolensError("a concept audit on Ray audits the neurons with caption and column sources; audit "
                                 "an SAE's features with --engine process")
        yield _RayPass(self, job, dataset)


class _RayPass:
    def __init__(self, engine: RayConceptEngine, job: ConceptJob, dataset):
        self.engine, self.job, self.source = engine, job, dataset

    def scan(self):
        engine, job = self.engine, self.job
        scan = run_ray_scan(job.clip, job.layer, self.source, top_k=job.settings.top_k, cache=job.cache,
                            force=job.force, keep_per_image=True, ray=engine.options, device=engine.device,
                            image_column=engine.image_column, caption_column=engine.caption_column,
                            progress=job.progress, report=engine.report, decoder=engine.decoder)
        job.choose_sources(ImageDataset(keys=scan.keys, identity="", description=scan.description,
                                        captions=scan.captions), kinds=RAY_KINDS)
        return scan

    def labels(self, scan) -> List[Optional[LabelSet]]:
        job, engine = self.job, self.engine
        columns = any(spec.kind == "column" for k, j in enumerate(job.jobs) if k not in job.failed for spec in j.specs)
        if columns:        # a column is read from the table or the shards' .json members, in this process
            dataset = self.source if isinstance(self.source, ImageDataset) else \
                open_dataset(self.source, image_column=engine.image_column, caption_column=engine.caption_column)
        else:
            dataset = ImageDataset(keys=scan.keys, identity="", description=scan.description, captions=scan.captions)
        return _label_sets(job, dataset, scan)


def _label_sets(job: ConceptJob, dataset: ImageDataset, scan) -> List[Optional[LabelSet]]:
    out: List[Optional[LabelSet]] = []
    for k, concept_job in enumerate(job.jobs):
        if k in job.failed:
            out.append(None)
            continue
        try:
            out.append(label_set_of(concept_job, dataset, scan))
        except NeurolensError as exc:     # e.g. a column this dataset does not have: that concept only
            job.failed[k] = str(exc)
            out.append(None)
    return out


# ------------------------------------------------------------------------------------------- the audit

def score_concepts(job: ConceptJob, scan, label_sets: List[Optional[LabelSet]]) -> ConceptsResult:
    """Every unit of the scan against every concept's combined label, in one stream (module docstring)."""
    settings = job.settings
    size = len(scan.keys)
    labels = np.full((size, len(label_sets)), np.nan, dtype=np.float32)
    for k, label_set in enumerate(label_sets):
        if label_set is not None:
            labels[:, k] = label_set.labels
    stats = label_statistics(scan, labels, int(settings.auc_memory), progress=job.progress)
    scores = []
    for k, concept in enumerate(settings.concepts):
        n_pos, n_neg = int(stats.n_pos[k]), int(stats.n_neg[k])
        flagged = apply_rule(stats.auc[k], stats.q[k], settings.rule) & (min(n_pos, n_neg) >= WEAK_CLASS)
        scores.append(ConceptScores(concept, auc=stats.auc[k], auprc=stats.auprc[k], p=stats.p[k], q=stats.q[k],
                                    correlation=stats.correlation[k],
                                    top_share=top_share(scan.top_indices, labels[:, k], settings.top_k),
                                    flagged=flagged, n_pos=n_pos, n_neg=n_neg, labels=label_sets[k],
                                    note=job.failed.get(k, "")))
    basis = job.basis
    return ConceptsResult(layer=scan.layer, concept_set=settings.concepts, scores=scores, rule=settings.rule,
                          method=stats.method, basis=basis_id(basis), basis_name=basis.name if basis is not None else "",
                          scan=scan)


def audit(clip, layer: str, dataset, settings: ConceptSettings, engine, *, cache=None, force: bool = False,
          progress: Progress = None, scorer: Optional[Scorer] = None, basis=None) -> ConceptsResult:
    """The concept audit on `engine` (LocalConceptEngine or RayConceptEngine): the one code path of run_concepts
    and run_ray_concepts."""
    job = ConceptJob(clip, layer, settings, as_cache(cache), force=force, progress=progress, scorer=scorer,
                     basis=as_basis(basis))
    with engine.open(job, dataset) as run:
        scan = run.scan()
        method = auc_method(len(scan.keys), int(scan.channels), int(settings.auc_memory), len(settings.concepts))
        path = concepts_path(job.cache, clip.fingerprint, scan.layer, job.key(scan, method))
        record = None if force else job.cache.read(path)
        if record is not None:
            result = from_record(record, scan)
        else:
            result = score_concepts(job, scan, run.labels(scan))
            job.cache.write(path, to_record(result, clip))
    result.path = path
    return result


def run_concepts(clip, layer: str, dataset=None, settings: Optional[ConceptSettings] = None, *, cache=None,
                 force: bool = False, progress: Progress = None, batch_size: Optional[int] = None,
                 workers: Optional[int] = None, scorer: Optional[Scorer] = None, basis=None,
                 decoder: str = "auto") -> ConceptsResult:
    """Audit every unit of `layer` (or, with basis, every feature of an SAE: neurolens.sae.basis.load_basis)
    against every concept of settings.concepts (default: the built-in set) in this process.
    scorer(clip, embeddings) -> (N,) replaces the zero-shot score (tests inject known scores); decoder: the image
    decoder (auto, pil or torchvision: datasets.decode.resolve_decoder)."""
    settings = settings if settings is not None else ConceptSettings()
    return audit(clip, layer, dataset, settings, LocalConceptEngine(batch_size, workers, decoder), cache=cache,
                 force=force, progress=progress, scorer=scorer, basis=basis)


def run_ray_concepts(clip, layer: str, dataset=None, settings: Optional[ConceptSettings] = None, *, cache=None,
                     force: bool = False, progress: Progress = None, ray: Optional[RayOptions] = None,
                     device: str = "auto", image_column: str = "image", caption_column: str = "caption",
                     report: Optional[Callable] = None, decoder: str = "auto") -> ConceptsResult:
    """run_concepts with the scan on Ray (the Ray scan, per-image maxima kept), then the same scoring."""
    settings = settings if settings is not None else ConceptSettings()
    engine = RayConceptEngine(ray, device, image_column, caption_column, report, decoder)
    return audit(clip, layer, dataset, settings, engine, cache=cache, force=force, progress=progress)


def write_concepts_csv(result: ConceptsResult, path, pairs: bool = False) -> Path:
    """The `--json` rows as a CSV (columns ROW_KEYS), every cell formula-safe (storage.files.write_csv)."""
    return write_csv(path, ROW_KEYS, ([row[key] for key in ROW_KEYS] for row in result.rows(pairs=pairs)))
