"""The NSFW sweep of a whole layer: scan (with image embeddings) + text ranking + labels + per-unit
statistics, cached.

ONE code path (`sweep`) for both engines. Shared set-up: the settings (pipelines.settings.SweepSettings:
prompts, caption terms, label sources asked), the dataset's keys and captions, the label sources to compute
(labels.sources.resolve_specs). Shared ending: the text ranking (run_text), the texts' NSFW marks (the
lexicon; the model's zero-shot score only where the reliability check kept it), every unit's UnitScores by
the flag rule (scoring.units.score_units), the sweep record (records.sweep) and
flags.csv (pipelines.flags). The engines differ only in how the scan and the units' label statistics (a
scoring.statistics.UnitStatsResult) are produced:

    LocalEngine   in this process: run_scan (resumable, image embeddings kept), the label sources over the
                  whole dataset and their reliability check, then the statistics streamed over the scan's
                  per-image maxima chunks (scoring.units.unit_statistics: the one-label case of the concept
                  audit's scorer, scoring.multilabel; exact AUC within `auc_memory` bytes, else binned)
    RayEngine     on Ray Data: ONE fused pass (engines.ray.fused) computes the scan, the label sources and
                  the statistics together, so no per-image value of any unit is stored; its label results
                  are the `sweep-fused` record (records.sweep)

Every step is cache-or-compute: the scan is resumable (pipelines/scan.py), the text ranking is cached by
run_text, NudeNet's per-image scores are cached per dataset (neurolens.labels.sources.nudenet_scores), and
the result lands in one sweep record whose key (`SweepJob.key`) hashes the scan record, the text ranking,
the label sources and their settings, the prompts, the caption terms, the rule and the engine's AUC method.
A sweep of a swept layer therefore does no model forward; flags.csv is (re)written from the record every
time.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from ..datasets.decode import resolve_decoder
from ..datasets.open import open_dataset
from ..datasets.types import ImageDataset
from ..engines.ray.fused import FUSED_BINS, LabelPlan, fused_pass
from ..engines.ray.session import RayOptions, ray_session
from ..engines.ray.shards import plan_dataset
from ..errors import NeurolensError
from ..labels import zero_shot as safety
from ..labels.prompts import TEXT_NSFW_THRESHOLD
from ..labels.reliability import LabelSet, check_reliability
from ..labels.sources import compute_sources
from ..models.layer_table import resolve_layer
from ..records.keys import as_basis, as_cache
from ..records.scan import scan_key
from ..records.sweep import (FUSED_KIND, MARK_LEXICON, MARK_NONE, MARK_ZERO_SHOT, SWEEP_VERSION, SweepResult,
                             basis_fields, from_record, fused_path, fused_record, label_set_from_record, ranked_texts,
                             statistics_from_record, sweep_path, to_record)
from ..scoring.flags import UnitStatsResult, auc_method
from ..scoring.units import EDGE_SAMPLE_ROWS, score_units, unit_statistics
from ..storage.cache import settings_key
from ..text.vocab import load_vocab
from .flags import flags_path, write_flags_csv
from .scan import run_scan, write_ray_scan
from .scan_find import find_scan
from .settings import LabelSettings, SweepSettings, sweep_settings
from .sweep_find import Progress, Scorer, SweepJob
from .text import run_text, text_embeddings

__all__ = ["run_sweep", "run_ray_sweep", "sweep", "LocalEngine", "RayEngine", "SweepResult",
           "SweepSettings", "LabelSettings", "flags_path", "write_flags_csv"]


# ------------------------------------------------------------------------------------------- the engines

class LocalEngine:
    """The sweep in this process (module docstring): scan, then labels, then statistics from the scan."""

    def __init__(self, batch_size: Optional[int] = None, workers: Optional[int] = None, decoder: str = "auto"):
        self.batch_size, self.workers, self.decoder = batch_size, workers, decoder

    @contextmanager
    def open(self, job: SweepJob, dataset) -> Iterator["_LocalPass"]:
        dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
        job.choose_sources(dataset.keys, job.captions(dataset))
        yield _LocalPass(self, job, dataset)


class _LocalPass:
    def __init__(self, engine: LocalEngine, job: SweepJob, dataset: ImageDataset):
        self.engine, self.job, self.dataset = engine, job, dataset
        self.attrs: dict = {}

    def scan(self):
        job = self.job
        return run_scan(job.clip, job.layer, self.dataset, top_k=job.settings.top_k, batch_size=self.engine.batch_size,
                        workers=self.engine.workers, cache=job.cache, force=job.force, embeddings=True,
                        progress=job.progress, basis=job.basis, decoder=self.engine.decoder)

    def method(self, scan) -> str:
        """exact, or binned:<bytes> when the scan's rows do not fit the settings' auc_memory."""
        return auc_method(len(scan.keys), int(scan.channels), int(self.job.settings.auc_memory))

    def labels(self, scan) -> Tuple[LabelSet, UnitStatsResult]:
        job = self.job
        label_set = label_set_of(job, self.dataset, scan)
        statistics = unit_statistics(scan, label_set.labels, int(job.settings.auc_memory), progress=job.progress)
        return label_set, statistics


def label_set_of(job: SweepJob, dataset: ImageDataset, scan) -> LabelSet:
    """The job's label sources over the scanned images, checked against each other and combined (a sweep's
    labels; a concept audit's labels of one concept)."""
    sources = compute_sources(job.specs, dataset=dataset, keys=scan.keys, captions=job.captions(dataset),
                              clip=job.clip, embeddings=scan.embeddings if job.needs_embeddings else None,
                              prompts=job.prompts, terms=job.terms, caption_mode=job.labels.caption_mode,
                              scorer=job.scorer, cache=job.cache, progress=job.progress, skip=~scan.valid)
    return check_reliability(sources, job.labels.min_agreement, job.notes)


class RayEngine:
    """The sweep fused into one pass on Ray (module docstring).

    ray: engines.ray.scan.RayOptions; warmup: items of the first shards on which the label sources, doubt
    thresholds and AUC edges are decided (default scoring.units.EDGE_SAMPLE_ROWS; a dataset no larger gets
    the exact AUC and exactly the in-process decisions); bins: binned-AUC edges beyond it (FUSED_BINS); decoder:
    the image decoder (datasets.decode.resolve_decoder for the actors' device)."""

    def __init__(self, ray: Optional[RayOptions] = None, device: str = "auto", warmup: Optional[int] = None,
                 bins: Optional[int] = None, image_column: str = "image", caption_column: str = "caption",
                 report: Optional[Callable] = None, decoder: str = "auto"):
        self.options = ray if ray is not None else RayOptions()
        self.warmup = int(EDGE_SAMPLE_ROWS if warmup is None else warmup)
        self.bins = int(FUSED_BINS if bins is None else bins)
        if self.warmup < 1 or self.bins < 1:
            raise NeurolensError(f"warmup and bins must be at least 1, got {self.warmup} and {self.bins}")
        self.device, self.report, self.decoder = device, report, decoder
        self.image_column, self.caption_column = image_column, caption_column

    @contextmanager
    def open(self, job: SweepJob, dataset) -> Iterator["_RayPass"]:
        if job.basis is not None or job.scorer is not None:
            raise NeurolensError("a sweep on Ray sweeps the neurons with the built-in label sources; sweep an "
                                 "SAE's features (or with a custom scorer) with --engine process")
        spec = resolve_layer(job.clip, job.layer)
        with ray_session(self.options) as session:
            plan = plan_dataset(dataset, job.cache, self.options.shard_size, session.map, self.image_column,
                                self.caption_column)
            view = plan.dataset_view()
            job.choose_sources(view.keys, job.captions(view))
            yield _RayPass(self, job, session, spec, plan, view)


class _RayPass:
    def __init__(self, engine: RayEngine, job: SweepJob, session, spec, plan, view):
        self.engine, self.job, self.session, self.spec, self.plan, self.view = engine, job, session, spec, plan, view
        self.fused = None
        self.attrs: dict = {}

    def scan(self):
        engine, job, spec, plan = self.engine, self.job, self.spec, self.plan
        clip, cache, settings, labels = job.clip, job.cache, job.settings, job.labels
        decoder = resolve_decoder(engine.decoder, self.session.actor_device(engine.device))
        key = scan_key(clip, spec, plan, settings.top_k, "fp32", False, decoder=decoder)
        fused_key = settings_key(FUSED_KIND, SWEEP_VERSION, key, [(s.name, s.explicit) for s in job.specs], job.terms,
                                 labels.caption_mode, job.prompts.identity, float(labels.min_agreement),
                                 engine.warmup, engine.bins)
        self.path = fused_path(cache, clip.fingerprint, spec.name, fused_key)
        self.attrs = {"fused_record": str(self.path)}
        scan = None if job.force else find_scan(clip, spec.name, self.view, settings.top_k, "fp32", cache,
                                                decoder=decoder)
        self.fused = None if job.force or scan is None else cache.read(self.path)
        if self.fused is None:
            plan_labels = LabelPlan(
                specs=tuple(job.specs), terms=tuple(job.terms), caption_mode=labels.caption_mode,
                unsafe_count=len(job.prompts.unsafe),
                prompt_embeddings=safety.prompt_embeddings(clip, job.prompts) if job.needs_embeddings else None,
                slice_scores=_slice_label_scores(job, plan.dataset))
            outcome = fused_pass(self.session, clip, spec, plan, cache, fused_key, plan_labels, top_k=settings.top_k,
                                 min_agreement=labels.min_agreement, notes=job.notes, warmup=engine.warmup,
                                 bins=engine.bins, device=engine.device, progress=job.progress, report=engine.report,
                                 decoder=decoder)
            options = engine.options
            scan = write_ray_scan(cache, clip, spec, plan, key, outcome.stats, settings.top_k, "fp32", [],
                                  outcome.resumed,
                                  {"per_image": False, "forwarded": int(outcome.forwarded),
                                   "actors": int(options.actors), "actor_peak_rss": int(outcome.actor_peak_rss)},
                                  decoder)
            self.fused = fused_record(outcome, engine.warmup, engine.bins)
            cache.write(self.path, self.fused)
            outcome.remove_records()
        return scan

    def method(self, scan) -> str:
        return f"fused:{Path(self.path).name}"

    def labels(self, scan) -> Tuple[LabelSet, UnitStatsResult]:
        return label_set_from_record(self.fused), statistics_from_record(self.fused)


def _slice_label_scores(job: SweepJob, dataset) -> Optional[np.ndarray]:
    """(N, S) captions and column scores of a folder or table dataset (opened whole on the driver anyway);
    None for tar shards, whose decode tasks compute them shard by shard."""
    if dataset is None:
        return None
    wanted = [s for s in job.specs if s.kind in ("captions", "column")]
    computed = {source.name: source.scores for source in
                compute_sources(wanted, dataset=dataset, keys=dataset.keys, captions=job.captions(dataset),
                                terms=job.terms, caption_mode=job.labels.caption_mode)} if wanted else {}
    out = np.full((len(dataset), len(job.specs)), np.nan, dtype=np.float32)
    for column, spec in enumerate(job.specs):
        if spec.name in computed:
            out[:, column] = computed[spec.name]
    return out


# ------------------------------------------------------------------------------------------- the sweep

def sweep(clip, layer: str, dataset, settings: SweepSettings, engine, *, cache=None, force: bool = False,
          progress: Progress = None, out: Optional[str | os.PathLike] = None, write_csv: bool = True,
          scorer: Optional[Scorer] = None, basis=None) -> SweepResult:
    """The sweep on `engine` (LocalEngine or RayEngine): the one code path of run_sweep and run_ray_sweep."""
    job = SweepJob(clip, layer, settings, as_cache(cache), force=force, progress=progress, scorer=scorer,
                   basis=as_basis(basis))
    with engine.open(job, dataset) as run:
        scan = run.scan()
    ranking = run_text(clip, layer, vocab=settings.vocab, top_k=settings.text_top_k, scan=scan, cache=job.cache,
                       force=force, progress=progress, basis=job.basis)
    path = sweep_path(job.cache, clip.fingerprint, scan.layer, job.key(scan, ranking, run.method(scan)))
    record = None if force else job.cache.read(path)
    if record is not None:
        result = from_record(record, scan, ranking, job.basis)
    else:
        label_set, statistics = run.labels(scan)
        texts, text_scores, marks = _text_part(job, ranking, "zero-shot" in label_set.used)
        text_nsfw = marks != MARK_NONE
        units = score_units(scan, label_set.labels, text_nsfw, settings.rule, top_k=settings.top_k,
                            sources=label_set.used, statistics=statistics, text_scores=text_scores)
        result = SweepResult(layer=scan.layer, scores=units, labels=label_set, text_entries=texts,
                             text_scores=text_scores, text_nsfw=text_nsfw, text_mark_source=marks, scan=scan,
                             text=ranking, **basis_fields(job.basis))
        job.cache.write(path, to_record(result, clip, job.prompts, job.terms, job.labels.caption_mode,
                                        job.scorer_name))
    result.path = path
    result.attrs = dict(result.attrs, **run.attrs)
    if write_csv:
        result.flags_csv = write_flags_csv(result, flags_path(scan.layer, out, job.basis))
    return result



def run_sweep(clip, layer: str, dataset=None, settings: Optional[SweepSettings] = None, *, cache=None,
              force: bool = False, progress: Progress = None, out: Optional[str | os.PathLike] = None,
              write_csv: bool = True, batch_size: Optional[int] = None, workers: Optional[int] = None,
              scorer: Optional[Scorer] = None, basis=None, decoder: str = "auto", **options) -> SweepResult:
    """Sweep every unit of `layer` for NSFW content in this process (see neurolens.scoring.units for the
    statistics and neurolens.labels for the label sources).

    settings: a SweepSettings (vocabulary, top-k, flag rule, labels, AUC memory); options: the older keyword
    arguments (vocab, top_k, text_top_k, rule, labels, min_agreement, detector, caption_terms, caption_mode,
    text_zero_shot, prompts, auc_memory), applied over `settings` (SweepSettings.updated).
    scorer(clip, embeddings) -> (N,) replaces the zero-shot score (tests inject known scores).
    basis: None for the neurons, or a basis of the layer (neurolens.sae.basis.load_basis): its units (SAE features)
    are swept, from a scan of the same pass as the neurons' and the decoder directions' texts; the record says
    which basis it holds, flags.csv goes to outputs/sweep/<layer>_sae-<name>/ by default. decoder: the scan's
    image decoder (run_scan)."""
    return sweep(clip, layer, dataset, sweep_settings(settings, **options), LocalEngine(batch_size, workers, decoder),
                 cache=cache, force=force, progress=progress, out=out, write_csv=write_csv, scorer=scorer, basis=basis)


def run_ray_sweep(clip, layer: str, dataset=None, settings: Optional[SweepSettings] = None, *, cache=None,
                  force: bool = False, progress: Progress = None, out: Optional[str | os.PathLike] = None,
                  write_csv: bool = True, ray: Optional[RayOptions] = None, device: str = "auto",
                  warmup: Optional[int] = None, bins: Optional[int] = None, image_column: str = "image",
                  caption_column: str = "caption", report: Optional[Callable] = None, decoder: str = "auto",
                  **options) -> SweepResult:
    """The sweep of run_sweep, fused into one pass on Ray (neurolens.engines.ray.fused): each image's label
    sources and the units' label statistics are computed while the layer is scanned, so no per-image value
    of any unit is stored. Writes the scan record, a `sweep-fused` record (the label results) and the usual
    sweep record and flags.csv. settings / options: as run_sweep; ray, warmup, bins, decoder: RayEngine."""
    engine = RayEngine(ray, device, warmup, bins, image_column, caption_column, report, decoder)
    return sweep(clip, layer, dataset, sweep_settings(settings, **options), engine, cache=cache, force=force,
                 progress=progress, out=out, write_csv=write_csv)


# ------------------------------------------------------------------------------------------- texts

def _text_part(job: SweepJob, ranking, zero_shot_kept: bool) -> Tuple[List[List[str]], np.ndarray, np.ndarray]:
    """Per unit: its ranked top texts, their cosines, and why each is marked NSFW (records.sweep MARK_*): the
    NSFW lexicon (word match), else the model's zero-shot score of the text, but only when job.zero_shot_texts
    (asked, trained weights) AND the reliability check kept the zero-shot image source against the independent
    ones (zero_shot_kept): the model never grades its own texts unchecked."""
    entries = list(ranking.entries)
    indices = np.asarray(ranking.top_indices)
    unique = sorted({int(i) for row in indices for i in row if i >= 0})
    code_by_index = {}
    if unique:
        texts = [entries[i] for i in unique]
        codes = np.where(safety.text_nsfw_scores(job.clip, texts, zero_shot=False) >= TEXT_NSFW_THRESHOLD,
                         MARK_LEXICON, MARK_NONE)
        if job.zero_shot_texts and zero_shot_kept:
            embeddings = None     # the vocabulary's embeddings are cached by the text job: no text forward here
            vocab = job.settings.vocab
            all_embeddings, _, _ = text_embeddings(job.clip, load_vocab(vocab) if isinstance(vocab, str) else vocab,
                                                   job.cache)
            if len(all_embeddings) == len(entries):
                embeddings = np.asarray(all_embeddings)[unique]
            scores = safety.text_nsfw_scores(job.clip, texts, embeddings=embeddings, prompts=job.prompts)
            codes = np.where((codes == MARK_NONE) & (scores >= TEXT_NSFW_THRESHOLD), MARK_ZERO_SHOT, codes)
        code_by_index = dict(zip(unique, codes.tolist()))
    marks = np.array([[code_by_index.get(int(i), MARK_NONE) if i >= 0 else MARK_NONE for i in row] for row in indices],
                     dtype=np.uint8).reshape(indices.shape)
    return ranked_texts(ranking), np.asarray(ranking.top_scores, dtype=np.float32), marks


