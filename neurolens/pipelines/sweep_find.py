"""The sweep's job and its cached answer, without torch (pipelines.sweep computes; this module only names and
finds): `SweepJob` (the model, layer and settings every engine shares, with the label sources it chooses and
the record key), and `find_sweep`, the sweep run_sweep would return from the cache, or None. A cached
`neurolens sweep` answers through find_sweep before the sweep's compute modules (scan, scorers, engines) are
imported, so it needs neither the model nor torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..datasets.open import open_dataset
from ..datasets.types import ImageDataset
from ..labels.prompts import LOGIT_SCALE
from ..labels.sources import has_captions, resolve_specs
from ..labels.spec import LabelSpec, is_random
from ..records.keys import as_basis, as_cache
from ..records.sweep import SWEEP_KIND, SWEEP_VERSION, SweepResult, from_record, sweep_path
from ..scoring.flags import auc_method
from ..storage.cache import Cache, settings_key
from .scan_find import find_scan
from .settings import LabelSettings, SweepSettings, sweep_settings
from .text import find_text

Progress = Optional[Callable[[int, int], None]]


Scorer = Callable[[object, np.ndarray], np.ndarray]


@dataclass
class SweepJob:
    """What every engine shares: the model and layer, the settings with their prompts and terms read, and
    (once the engine has the dataset's keys and captions: `choose_sources`) the label sources to compute."""
    clip: object
    layer: str
    settings: SweepSettings
    cache: Cache
    force: bool = False
    progress: Progress = None
    scorer: Optional[Scorer] = None     # scorer(clip, embeddings) -> (N,) replaces the zero-shot score (tests)
    basis: object = None                # None: the neurons; else a basis of the layer (SAE features)
    specs: List[LabelSpec] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.prompts = self.settings.labels.prompts()
        self.terms = self.settings.labels.terms()

    @property
    def labels(self) -> LabelSettings:
        return self.settings.labels

    @property
    def scorer_name(self) -> Optional[str]:
        return None if self.scorer is None else f"custom:{getattr(self.scorer, '__qualname__', repr(self.scorer))}"

    @property
    def zero_shot_texts(self) -> bool:
        """Texts are marked by the model's zero-shot score too: asked, and the weights are trained (a random
        model's score is noise: its texts are judged by the lexicon alone)."""
        return self.settings.text_zero_shot and not is_random(self.clip)

    @property
    def needs_embeddings(self) -> bool:
        return any(spec.kind == "zero-shot" for spec in self.specs)

    def captions(self, dataset) -> Optional[Sequence[str]]:
        return dataset.captions if self.labels.caption_mode != "off" else None

    def choose_sources(self, keys: Sequence[str], captions: Optional[Sequence[str]]) -> None:
        named, auto = self.labels.requested()
        self.specs, self.notes = resolve_specs(named, auto, has_captions=has_captions(keys, captions), clip=self.clip,
                                               detector=self.labels.detector, scorer=self.scorer,
                                               auto_kinds=self.labels.auto_kinds)

    def key(self, scan, ranking, method: str) -> str:
        """The sweep record's key (SWEEP_VERSION 3: text marks changed; older records are read by pages, not
        by this job)."""
        s, labels = self.settings, self.labels
        return settings_key(SWEEP_KIND, SWEEP_VERSION, Path(scan.path).name if scan.path else None,
                            _text_identity(ranking), self.prompts.identity, self.terms, labels.caption_mode,
                            s.rule.as_dict(), s.top_k, self.zero_shot_texts, LOGIT_SCALE, self.scorer_name,
                            [(spec.name, spec.explicit) for spec in self.specs], float(labels.min_agreement),
                            method, *([] if self.basis is None else [self.basis.id]))


def find_sweep(clip, layer: str, dataset=None, settings: Optional[SweepSettings] = None, *, cache=None,
               scorer: Optional[Scorer] = None, basis=None, **options) -> Optional[SweepResult]:
    """The sweep run_sweep would return from the cache for these settings, or None when anything of it (the
    scan, the text ranking, the sweep record) is not cached. Computes nothing, so it needs no model."""
    settings = sweep_settings(settings, **options)
    job = SweepJob(clip, layer, settings, as_cache(cache), scorer=scorer, basis=as_basis(basis))
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    job.choose_sources(dataset.keys, job.captions(dataset))
    scan = find_scan(clip, layer, dataset, settings.top_k, "fp32", job.cache, embeddings=True, basis=job.basis)
    ranking = None if scan is None else find_text(clip, layer, settings.vocab, settings.text_top_k, scan, job.cache,
                                                  basis=job.basis)
    if ranking is None:
        return None
    method = auc_method(len(scan.keys), int(scan.channels), int(settings.auc_memory))   # the in-process engine's
    path = sweep_path(job.cache, clip.fingerprint, scan.layer, job.key(scan, ranking, method))
    record = job.cache.read(path)
    if record is None:
        return None
    result = from_record(record, scan, ranking, job.basis)
    result.path = path
    return result


def _text_identity(ranking) -> str:
    """The ranking's cache record name (it hashes vocabulary, reference and top-k), else its content."""
    path = getattr(ranking, "path", None)
    if path is not None:
        return Path(path).name
    return settings_key(ranking.layer, np.asarray(ranking.top_indices), len(ranking.entries))
