"""The NSFW sweep of a whole layer: scan (with image embeddings) + text ranking + labels + per-unit
statistics, cached.

Every step is cache-or-compute: the scan is resumable (pipelines/scan.py), the text ranking is cached by
run_text, NudeNet's per-image scores are cached per dataset (neurolens.labels.sources.nudenet_scores), and
the result lands in one record

    sweep/<model fingerprint[:16]>/<layer>/<key>.h5
        auc, p, q, correlation, top_nsfw_share, text_nsfw_share (U,) float; flagged, text_flag (U,) bool
        image_labels (N,) float32 the combined label (1 positive, 0 negative, NaN unknown or skipped)
        source_scores (S, N) float32 each label source's per-image score (NaN unknown), in attrs' order
        text_scores (U, k_text) float32, text_nsfw (U, k_text) bool   (the unit's ranked top texts)
        attrs: layer, rule, n_pos, n_neg, method (exact | binned), labels (every source: kind, threshold,
               counts, agreement, kept or dropped and why; the agreement matrix; the sources used), prompts,
               caption terms and mode, scan record, model

whose key hashes the scan record, the text ranking, the label sources and their settings, the prompts,
the caption terms and the rule. A sweep of a swept layer therefore does no model forward; `flags.csv` is
(re)written from the record every time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..labels import zero_shot as safety
from ..errors import NeurolensError
from ..labels.policy import is_random
from ..labels.reliability import DEFAULT_MIN_AGREEMENT, LabelSet, check_reliability
from ..labels.sources import (LabelSource, LabelSpec, compute_sources, has_captions, parse_labels,
                              resolve_specs)
from ..storage.cache import Cache, Record, settings_key
from ..scoring.units import DEFAULT_AUC_MEMORY, FlagRule, UnitScores, apply_rule, score_units

SWEEP_VERSION = 2
DEFAULT_OUT = Path("outputs") / "sweep"
Progress = Optional[Callable[[int, int], None]]
Scorer = Callable[[object, np.ndarray], np.ndarray]


@dataclass
class SweepResult:
    layer: str
    scores: UnitScores
    labels: LabelSet                    # the label sources, their agreement, the combined label
    text_entries: List[List[str]]       # per unit: its ranked top texts
    text_scores: np.ndarray             # (U, k_text) cosines of those texts
    text_nsfw: np.ndarray               # (U, k_text) bool
    scan: object = None                 # the ScanResult (keys, captions, top images and cells)
    text: object = None                 # the TextRanking
    path: Optional[Path] = None         # the sweep record
    flags_csv: Optional[Path] = None
    cached: bool = False
    attrs: dict = field(default_factory=dict)
    basis: str = "neurons"              # whose units: "neurons" or an SAE basis id (neurolens.sae.basis)
    basis_name: str = ""                # the SAE's name for an SAE basis

    @property
    def unit_word(self) -> str:
        return "unit" if self.basis == "neurons" else "feature"

    @property
    def image_labels(self) -> np.ndarray:
        """(N,) the combined per-image label: 1 positive, 0 negative, NaN unknown (or a skipped item)."""
        return self.labels.labels

    @property
    def image_scores(self) -> np.ndarray:
        """The combined label (1/0/NaN), under the name the figure code reads."""
        return self.labels.labels

    @property
    def flagged_units(self) -> List[int]:
        return [int(u) for u in self.scores.ranking() if self.scores.flagged[u]]

    def source_scores(self, name: str) -> Optional[np.ndarray]:
        """(N,) per-image scores of one label source (e.g. "nudenet"), or None when it was not computed."""
        for source in self.labels.sources:
            if source.name == name:
                return source.scores
        return None

    def top_texts(self, unit: int, n: int = 5) -> List[Tuple[str, float, bool]]:
        return [(t, float(s), bool(f)) for t, s, f in
                zip(self.text_entries[unit][:n], self.text_scores[unit][:n], self.text_nsfw[unit][:n])]

    def ranking(self, limit: Optional[int] = None, texts: int = 0) -> List[dict]:
        """The `sweep --json` rows, ranked by AUC: unit, correlation, top_nsfw_share, text_nsfw_share,
        flagged, auc, p, q, text_flag, why (and top_texts when texts > 0)."""
        rows = self.scores.rows(limit)
        if texts:
            for row in rows:
                row["top_texts"] = [t for t, _, _ in self.top_texts(row["unit"], texts)]
        return rows

    def lines(self) -> List[str]:
        """What the sweep tells the user about its labels and its statistics (sources, agreement, what was
        dropped, and the warnings about weak or missing positives)."""
        out = [f"labels: {line}" for line in self.labels.lines()]
        s = self.scores
        if s.n_pos == 0:
            out.append(f"no image is labelled positive by {' + '.join(s.sources) or 'any source'}: nothing can be "
                       f"flagged; sweep a dataset with NSFW content, or give labels with --labels "
                       f"column:NAME[=V1,V2]")
        elif s.weak:
            out.append(f"warning: only {s.n_pos} positive and {s.n_neg} negative images: the statistics are weak "
                       f"(fewer than 10 in a class); sweep more images")
        return out


def _text_part(clip, ranking, prompts, zero_shot: bool, vocab, cache: Cache
               ) -> Tuple[List[List[str]], np.ndarray, np.ndarray]:
    entries = list(ranking.entries)
    indices = np.asarray(ranking.top_indices)
    texts = [[entries[i] for i in row if i >= 0] for row in indices]
    unique = sorted({int(i) for row in indices for i in row if i >= 0})
    nsfw_by_index = {}
    if unique:
        embeddings = None
        if zero_shot:
            try:  # the vocabulary's embeddings are cached by the text job: no text forward here
                from ..text.vocab import load_vocab
                from .text import text_embeddings
                all_embeddings, _, _ = text_embeddings(clip, load_vocab(vocab) if isinstance(vocab, str) else vocab,
                                                       cache)
                if len(all_embeddings) == len(entries):
                    embeddings = np.asarray(all_embeddings)[unique]
            except ImportError:
                embeddings = None
        scores = safety.text_nsfw_scores(clip, [entries[i] for i in unique], embeddings=embeddings,
                                         prompts=prompts, zero_shot=zero_shot)
        nsfw_by_index = dict(zip(unique, scores >= safety.TEXT_NSFW_THRESHOLD))
    flags = np.array([[bool(nsfw_by_index.get(i, False)) if i >= 0 else False for i in row] for row in indices],
                     dtype=bool).reshape(indices.shape)
    return texts, np.asarray(ranking.top_scores, dtype=np.float32), flags


def run_sweep(clip, layer: str, dataset=None, vocab: str = "builtin", top_k: int = 32, text_top_k: int = 30,
              cache=None, force: bool = False, progress: Progress = None, out: Optional[str | os.PathLike] = None,
              rule: FlagRule = FlagRule(), prompts: Optional[safety.Prompts] = None,
              caption_terms: Optional[Sequence[str]] = None, caption_mode: str = "word",
              text_zero_shot: bool = True, scorer: Optional[Scorer] = None, batch_size: Optional[int] = None,
              workers: Optional[int] = None, write_csv: bool = True, labels: Sequence[str] | str = "auto",
              min_agreement: float = DEFAULT_MIN_AGREEMENT, detector: Optional[bool] = None,
              auc_memory: int = DEFAULT_AUC_MEMORY, basis=None) -> SweepResult:
    """Sweep every unit of `layer` for NSFW content (see neurolens.scoring.units for the statistics and
    neurolens.labels for the label sources).

    labels: `--labels` values ("auto", "captions", "column:NAME[=V1,V2]", "nudenet", "zero-shot");
    min_agreement: the reliability check's AUC bar; detector: NudeNet in `auto` (None: where installed,
    False: off); auc_memory: bytes the exact AUC may use (beyond: the binned estimate); caption_terms:
    the captions source's terms (default: the whole NSFW lexicon, neurolens/data/nsfw_terms.txt);
    scorer(clip, embeddings) -> (N,) replaces the zero-shot score (tests inject known scores).
    basis: None for the neurons, or a basis of the layer (neurolens.sae.load_basis): its units (SAE features)
    are swept, from a scan of the same pass as the neurons' and the decoder directions' texts; the record says
    which basis it holds, flags.csv goes to outputs/sweep/<layer>_sae-<name>/ by default."""
    from ..datasets.types import ImageDataset
    from ..datasets.open import open_dataset
    from .scan import run_scan
    from .text import run_text

    if caption_mode not in ("word", "substring", "off"):
        raise NeurolensError(f"unknown --caption-match {caption_mode!r}; use word, substring or off")
    if not 0.5 <= float(min_agreement) <= 1.0:
        raise NeurolensError(f"--min-agreement must be an AUC between 0.5 and 1, got {min_agreement}")
    named, auto = parse_labels(labels)
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    prompts = prompts or safety.load_prompts()
    terms = list(caption_terms) if caption_terms is not None else safety.lexicon_terms()
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    captions = dataset.captions if caption_mode != "off" else None
    specs, notes = resolve_specs(named, auto, has_captions=has_captions(dataset.keys, captions), clip=clip,
                                 detector=detector, scorer=scorer)

    basis = _as_basis(basis)
    scan = run_scan(clip, layer, dataset, top_k=top_k, batch_size=batch_size, workers=workers, cache=cache,
                    force=force, embeddings=True, progress=progress, basis=basis)
    ranking = run_text(clip, layer, vocab=vocab, top_k=text_top_k, scan=scan, cache=cache, force=force,
                       progress=progress, basis=basis)
    scorer_name = None if scorer is None else f"custom:{getattr(scorer, '__qualname__', repr(scorer))}"
    method_budget = "exact" if auc_memory >= _exact_bytes(scan) else f"binned:{auc_memory}"
    key = settings_key("sweep", SWEEP_VERSION, Path(scan.path).name if scan.path else None,
                       _text_identity(ranking), prompts.identity, terms, caption_mode, rule.as_dict(), top_k,
                       text_zero_shot and not is_random(clip), safety.LOGIT_SCALE, scorer_name,
                       [(s.name, s.explicit) for s in specs],
                       float(min_agreement), method_budget, *([] if basis is None else [basis.id]))
    path = cache.path("sweep", clip.fingerprint, scan.layer, key)
    record = None if force else cache.read(path)
    if record is not None:
        result = _from_record(record, scan, ranking, basis)
    else:
        sources = compute_sources(specs, dataset=dataset, keys=scan.keys, captions=captions, clip=clip,
                                  embeddings=scan.embeddings if any(s.kind == "zero-shot" for s in specs) else None,
                                  prompts=prompts, terms=terms, caption_mode=caption_mode, scorer=scorer,
                                  cache=cache, progress=progress, skip=~scan.valid)
        label_set = check_reliability(sources, min_agreement, notes)
        # a random-weights model's zero-shot score is noise: its texts are judged by the lexicon alone
        texts, text_scores, text_nsfw = _text_part(clip, ranking, prompts, text_zero_shot and not is_random(clip),
                                                   vocab, cache)
        units = score_units(scan, label_set.labels, text_nsfw, rule, top_k=top_k, progress=progress,
                            memory=auc_memory, sources=label_set.used)
        result = SweepResult(layer=scan.layer, scores=units, labels=label_set, text_entries=texts,
                             text_scores=text_scores, text_nsfw=text_nsfw, scan=scan, text=ranking,
                             **_basis_fields(basis))
        cache.write(path, _to_record(result, clip, prompts, terms, caption_mode, scorer_name))
    result.path = path
    if write_csv:
        result.flags_csv = write_flags_csv(result, flags_path(scan.layer, out, basis))
    return result


def run_ray_sweep(clip, layer: str, dataset=None, vocab: str = "builtin", top_k: int = 32, text_top_k: int = 30,
                  cache=None, force: bool = False, progress: Progress = None, out: Optional[str | os.PathLike] = None,
                  rule: FlagRule = FlagRule(), prompts: Optional[safety.Prompts] = None,
                  caption_terms: Optional[Sequence[str]] = None, caption_mode: str = "word",
                  text_zero_shot: bool = True, write_csv: bool = True, labels: Sequence[str] | str = "auto",
                  min_agreement: float = DEFAULT_MIN_AGREEMENT, detector: Optional[bool] = None, ray=None,
                  device: str = "auto", warmup: Optional[int] = None, bins: Optional[int] = None,
                  image_column: str = "image", caption_column: str = "caption",
                  report: Optional[Callable] = None) -> SweepResult:
    """The sweep of run_sweep, fused into one pass on Ray (neurolens.engines.ray.fused): each image's label
    sources and the units' label statistics are computed while the layer is scanned, so no per-image value
    of any unit is stored. Writes the scan record, a `sweep-fused` record (the label results) and the usual
    sweep record and flags.csv.

    ray: engines.ray_scan.RayOptions; warmup: items of the first shards on which the label sources, doubt
    thresholds and AUC edges are decided (default unit_scores.EDGE_SAMPLE_ROWS; a dataset no larger gets the
    exact AUC and exactly the in-process decisions); bins: binned-AUC edges beyond it (fused.FUSED_BINS)."""
    from ..engines.ray.fused import FUSED_BINS, LabelPlan, fused_pass
    from ..engines.ray.session import RayOptions, ray_session
    from ..engines.ray.shards import plan_dataset
    from ..models import resolve_layer
    from ..scoring.units import EDGE_SAMPLE_ROWS
    from .scan import find_scan, write_ray_scan
    from ..records.scan import scan_key
    from .text import run_text

    if caption_mode not in ("word", "substring", "off"):
        raise NeurolensError(f"unknown --caption-match {caption_mode!r}; use word, substring or off")
    if not 0.5 <= float(min_agreement) <= 1.0:
        raise NeurolensError(f"--min-agreement must be an AUC between 0.5 and 1, got {min_agreement}")
    warmup = int(EDGE_SAMPLE_ROWS if warmup is None else warmup)
    bins = int(FUSED_BINS if bins is None else bins)
    if warmup < 1 or bins < 1:
        raise NeurolensError(f"warmup and bins must be at least 1, got {warmup} and {bins}")
    named, auto = parse_labels(labels)
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    prompts = prompts or safety.load_prompts()
    terms = list(caption_terms) if caption_terms is not None else safety.lexicon_terms()
    spec = resolve_layer(clip, layer)
    options = ray if ray is not None else RayOptions()
    with ray_session(options) as session:
        plan = plan_dataset(dataset, cache, options.shard_size, session.map, image_column, caption_column)
        view = plan.dataset_view()
        captions = view.captions if caption_mode != "off" else None
        specs, notes = resolve_specs(named, auto, has_captions=has_captions(view.keys, captions), clip=clip,
                                     detector=detector)
        fused_key = settings_key("sweep-fused", SWEEP_VERSION, scan_key(clip, spec, plan, top_k, "fp32", False),
                                 [(s.name, s.explicit) for s in specs], terms, caption_mode, prompts.identity,
                                 float(min_agreement), warmup, bins)
        fused_path = cache.path("sweep-fused", clip.fingerprint, spec.name, fused_key)
        scan = None if force else find_scan(clip, spec.name, view, top_k, "fp32", cache)
        fused = None if force or scan is None else cache.read(fused_path)
        if fused is None:
            plan_labels = LabelPlan(
                specs=tuple(specs), terms=tuple(terms), caption_mode=caption_mode, unsafe_count=len(prompts.unsafe),
                prompt_embeddings=safety.prompt_embeddings(clip, prompts)
                if any(s.kind == "zero-shot" for s in specs) else None,
                slice_scores=_slice_label_scores(specs, plan.dataset, terms, caption_mode))
            outcome = fused_pass(session, clip, spec, plan, cache, fused_key, plan_labels, top_k=top_k,
                                 min_agreement=min_agreement, notes=notes, warmup=warmup, bins=bins, device=device,
                                 progress=progress, report=report)
            scan = write_ray_scan(cache, clip, spec, plan, scan_key(clip, spec, plan, top_k, "fp32", False),
                                  outcome.stats, top_k, "fp32", [], outcome.resumed,
                                  {"per_image": False, "forwarded": int(outcome.forwarded),
                                   "actors": int(options.actors), "actor_peak_rss": int(outcome.actor_peak_rss)})
            fused = _fused_record(outcome, warmup, bins)
            cache.write(fused_path, fused)
            outcome.remove_records()
    label_set = _label_set_from_record(fused)
    statistics = _statistics_from_record(fused)
    ranking = run_text(clip, layer, vocab=vocab, top_k=text_top_k, scan=scan, cache=cache, force=force,
                       progress=progress)
    key = settings_key("sweep", SWEEP_VERSION, Path(scan.path).name, _text_identity(ranking), prompts.identity,
                       terms, caption_mode, rule.as_dict(), top_k, text_zero_shot and not is_random(clip),
                       safety.LOGIT_SCALE, None, [(s.name, s.explicit) for s in specs], float(min_agreement),
                       f"fused:{Path(fused_path).name}")
    path = cache.path("sweep", clip.fingerprint, scan.layer, key)
    record = None if force else cache.read(path)
    if record is not None:
        result = _from_record(record, scan, ranking)
    else:
        texts, text_scores, text_nsfw = _text_part(clip, ranking, prompts, text_zero_shot and not is_random(clip),
                                                   vocab, cache)
        units = score_units(scan, label_set.labels, text_nsfw, rule, top_k=top_k, sources=label_set.used,
                            statistics=statistics)
        result = SweepResult(layer=scan.layer, scores=units, labels=label_set, text_entries=texts,
                             text_scores=text_scores, text_nsfw=text_nsfw, scan=scan, text=ranking)
        cache.write(path, _to_record(result, clip, prompts, terms, caption_mode, None))
    result.path = path
    result.attrs = dict(result.attrs, fused_record=str(fused_path))
    if write_csv:
        result.flags_csv = write_flags_csv(result, flags_path(scan.layer, out))
    return result


def _slice_label_scores(specs, dataset, terms, caption_mode) -> Optional[np.ndarray]:
    """(N, S) captions and column scores of a folder or table dataset (opened whole on the driver anyway);
    None for tar shards, whose decode tasks compute them shard by shard."""
    if dataset is None:
        return None
    wanted = [s for s in specs if s.kind in ("captions", "column")]
    captions = dataset.captions if caption_mode != "off" else None
    computed = {source.name: source.scores for source in
                compute_sources(wanted, dataset=dataset, keys=dataset.keys, captions=captions, terms=terms,
                                caption_mode=caption_mode)} if wanted else {}
    out = np.full((len(dataset), len(specs)), np.nan, dtype=np.float32)
    for column, spec in enumerate(specs):
        if spec.name in computed:
            out[:, column] = computed[spec.name]
    return out


def _fused_record(outcome, warmup: int, bins: int) -> Record:
    """The label results of a fused sweep: what _label_set_from_record and _statistics_from_record read."""
    result, label_set = outcome.statistics, outcome.label_set
    arrays = {"auc": result.auc, "p": result.p, "q": result.q, "correlation": result.correlation,
              "image_labels": label_set.labels.astype(np.float32),
              "source_scores": np.stack([s.scores for s in label_set.sources]).astype(np.float32)}
    if outcome.counts is not None:
        arrays["counts/pos"], arrays["counts/neg"] = outcome.counts
    return Record(arrays=arrays, attrs={"n_pos": int(result.n_pos), "n_neg": int(result.n_neg),
                                        "method": result.method, "labels": label_set.as_attrs(),
                                        "warmup_items": int(outcome.warmup_images), "warmup": warmup,
                                        "bins": bins})


def _statistics_from_record(record: Record):
    from ..scoring.statistics import UnitStatsResult
    a, attrs = record.arrays, record.attrs
    return UnitStatsResult(auc=a["auc"], p=a["p"], q=a["q"], correlation=a["correlation"], n_pos=int(attrs["n_pos"]),
                           n_neg=int(attrs["n_neg"]), method=attrs["method"])


def _as_basis(basis):
    """None for the neurons (or a neuron basis), else the basis object."""
    return None if basis is None or getattr(basis, "id", "neurons") == "neurons" else basis


def _basis_fields(basis) -> dict:
    return {} if basis is None else {"basis": basis.id, "basis_name": basis.name}


def _exact_bytes(scan) -> int:
    from ..scoring.statistics import ExactAUC
    return ExactAUC.bytes_needed(len(scan.keys), int(scan.channels))


def _text_identity(ranking) -> str:
    """The ranking's cache record name (it hashes vocabulary, reference and top-k), else its content."""
    path = getattr(ranking, "path", None)
    if path is not None:
        return Path(path).name
    return settings_key(ranking.layer, np.asarray(ranking.top_indices), len(ranking.entries))


def _to_record(result: SweepResult, clip, prompts, terms, caption_mode, scorer_name) -> Record:
    s = result.scores
    sources = result.labels.sources
    scores = np.stack([src.scores for src in sources]).astype(np.float32) if sources else \
        np.zeros((0, len(result.image_labels)), np.float32)
    arrays = {"auc": s.auc, "p": s.p, "q": s.q, "correlation": s.correlation, "top_nsfw_share": s.top_nsfw_share,
              "text_nsfw_share": s.text_nsfw_share, "flagged": s.flagged.astype(bool),
              "text_flag": s.text_flag.astype(bool), "image_labels": result.image_labels.astype(np.float32),
              "source_scores": scores, "text_scores": result.text_scores, "text_nsfw": result.text_nsfw}
    attrs = {"layer": result.layer, "rule": s.rule.as_dict(), "n_pos": int(s.n_pos), "n_neg": int(s.n_neg),
             "method": s.method, "labels": result.labels.as_attrs(), "prompts_unsafe": prompts.unsafe,
             "prompts_safe": prompts.safe, "caption_terms": list(terms), "caption_mode": caption_mode,
             "logit_scale": safety.LOGIT_SCALE, "text_threshold": safety.TEXT_NSFW_THRESHOLD,
             "scorer": scorer_name, "scan_record": str(result.scan.path) if result.scan is not None else None,
             "model": clip.name, "pretrained": clip.pretrained, "fingerprint": clip.fingerprint,
             "basis": result.basis, "basis_name": result.basis_name}
    return Record(arrays=arrays, attrs=attrs)


def _label_set_from_record(record: Record) -> LabelSet:
    """The LabelSet a sweep (or fused-label) record stores: source_scores, image_labels, attrs' labels."""
    from ..labels.reliability import Agreement
    a, info = record.arrays, record.attrs["labels"]
    sources, agreements = [], {}
    for row, scores in zip(info["sources"], np.asarray(a["source_scores"])):
        spec = _spec_from_name(row["name"], row["kind"], row["explicit"])
        sources.append(LabelSource(spec, np.asarray(scores, np.float32), row["threshold"], row.get("detail", "")))
        agreements[row["name"]] = Agreement(row["name"], list(row["reference"]),
                                            float("nan") if row["auc"] is None else float(row["auc"]),
                                            bool(row["kept"]), row["note"])
    return LabelSet(sources=sources, agreements=agreements, pairwise=info["pairwise"],
                    labels=np.asarray(a["image_labels"], np.float32), min_agreement=info["min_agreement"],
                    notes=list(info.get("notes", [])))


def _from_record(record: Record, scan, ranking, basis=None) -> SweepResult:
    a, attrs = record.arrays, record.attrs
    rule = FlagRule(**attrs["rule"])
    info = attrs["labels"]
    label_set = _label_set_from_record(record)
    scores = UnitScores(auc=a["auc"], p=a["p"], q=a["q"], correlation=a["correlation"],
                        top_nsfw_share=a["top_nsfw_share"], text_nsfw_share=a["text_nsfw_share"],
                        flagged=apply_rule(a["auc"], a["q"], rule), text_flag=a["text_flag"].astype(bool),
                        n_pos=int(attrs["n_pos"]), n_neg=int(attrs["n_neg"]), rule=rule, method=attrs["method"],
                        sources=tuple(info["used"]))
    entries = list(ranking.entries)
    texts = [[entries[i] for i in row if i >= 0] for row in np.asarray(ranking.top_indices)]
    return SweepResult(layer=attrs["layer"], scores=scores, labels=label_set, text_entries=texts,
                       text_scores=a["text_scores"], text_nsfw=a["text_nsfw"].astype(bool), scan=scan, text=ranking,
                       path=record.path, cached=True, attrs=attrs, **_basis_fields(basis))


def _spec_from_name(name: str, kind: str, explicit: bool) -> LabelSpec:
    from ..labels.sources import _parse_one
    spec = _parse_one(name)
    return LabelSpec(kind, spec.column, spec.values, bool(explicit))


def flags_path(layer: str, out: Optional[str | os.PathLike] = None, basis=None) -> Path:
    """--out FILE.csv, --out DIR (DIR/flags.csv), or outputs/sweep/<layer>/flags.csv (an SAE basis:
    outputs/sweep/<layer>_sae-<name>/flags.csv)."""
    if out is None:
        folder = layer if _as_basis(basis) is None else f"{layer}_sae-{basis.name}"
        return DEFAULT_OUT / folder / "flags.csv"
    out = Path(out)
    return out if out.suffix.lower() == ".csv" else out / "flags.csv"


FLAGS_COLUMNS = ("rank", "unit", "auc", "p", "q", "correlation", "top_nsfw_share", "text_nsfw_share", "flagged",
                 "text_flag", "why", "top_texts")


def _rounded(value: Optional[float], digits: int, significant: bool = False) -> Optional[float]:
    """A number for flags.csv (None -> empty cell): `digits` decimals, or 4 significant digits."""
    if value is None or not np.isfinite(value):
        return None
    return float(f"{value:.4g}") if significant else round(float(value), digits)


def flags_header(result: SweepResult) -> List[str]:
    """The comment lines at the top of flags.csv (each starts with '#'): the label sources and the rule."""
    s = result.scores
    what = result.layer if result.basis == "neurons" else \
        f"the features of SAE {result.basis_name} on {result.layer} (basis {result.basis}; unit = feature)"
    lines = [f"# neurolens sweep of {what}: {s.n_pos} positive and {s.n_neg} negative images, "
             f"AUC {s.method}; flagged when {s.rule.describe()}"]
    lines += [f"# {line}" for line in result.lines()]
    # one unquoted cell per line: no comma, quote or line break (a spreadsheet shows it as text after '#')
    return [line.replace("\n", " ").replace("\r", " ").replace(",", ";").replace('"', "'") for line in lines]


def write_flags_csv(result: SweepResult, path: Path, texts: int = 3) -> Path:
    """One row per unit, ranked by AUC, after '#' comment lines naming the label sources and the rule (skip
    lines starting with '#' to read it, e.g. pandas.read_csv(path, skiprows=<their count>)). Written
    atomically; every cell goes through neurolens.storage.files.csv_cell (no spreadsheet formula can run)."""
    import io
    from ..storage.files import CsvWriter, csv_cell, write_text
    buffer = io.StringIO(newline="")
    for line in flags_header(result):
        buffer.write(line + "\n")
    writer = CsvWriter(buffer)
    writer.writerow(FLAGS_COLUMNS)
    for rank, row in enumerate(result.ranking(), start=1):
        top = " | ".join(t for t, _, _ in result.top_texts(row["unit"], texts))
        writer.writerow([csv_cell(v) for v in (
            rank, row["unit"], _rounded(row["auc"], 6), _rounded(row["p"], 300, significant=True),
            _rounded(row["q"], 300, significant=True), round(row["correlation"], 6), round(row["top_nsfw_share"], 4),
            round(row["text_nsfw_share"], 4), int(row["flagged"]), int(row["text_flag"]), row["why"], top)])
    return write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------- figure and grid

DEFAULT_FIGURES = Path("outputs") / "figures"


def _feature_visualizations(clip, layer: str, units: Sequence[int], settings, cache: Cache, render: bool,
                            progress: Progress, basis=None) -> dict:
    """{unit: (seeds,H,W,3) uint8}: rendered/cached by run_visualize when render=True, else only those
    already in the cache (no model forward)."""
    from . import visualize
    if not units:
        return {}
    if render:
        return {r.unit: np.asarray(r.images) for r in
                visualize.run_visualize(clip, layer, units, settings, cache=cache, progress=progress, basis=basis)}
    resolved = visualize.resolved_settings(clip, settings)
    found = {}
    for unit in units:
        record = cache.read(visualize.record_path(cache, clip, layer, int(unit), resolved, basis))
        if record is not None:
            found[int(unit)] = np.asarray(record.arrays["images"])
    return found


def blur_policy(clip, sweep: SweepResult, cache: Cache, blur: bool = True, prompts=None,
                scorer: Optional[Scorer] = None, basis=None):
    """The BlurPolicy of a figure or grid drawn from `sweep`: its flagged units (and those of every cached
    sweep of the layer) and its combined per-image labels (1 positive, 0 negative, NaN unknown or doubtful:
    the policy then asks the detector, or blurs the image as not judged). A random-weights model's zero-shot
    score is never a label source (neurolens.labels.sources), so it never reaches these labels."""
    from ..labels.policy import BlurPolicy
    return BlurPolicy.for_layer(clip, sweep.layer, cache, blur=blur, flagged=sweep.flagged_units,
                                image_labels=np.asarray(sweep.image_labels, dtype=np.float64), prompts=prompts,
                                basis=basis)


def _check_units(clip, layer: str, units: Sequence[int], basis=None) -> List[int]:
    from ..models import check_unit, resolve_layer
    spec = resolve_layer(clip, layer)
    for unit in units:
        if basis is None:
            check_unit(spec, int(unit))
        else:
            basis.check_unit(int(unit))
    return [int(u) for u in dict.fromkeys(units)]


def _tag(unit: int, basis) -> str:
    return f"unit{int(unit)}" if basis is None else basis.tag(unit)


def _label(unit: int, basis) -> str:
    return f"unit {int(unit)}" if basis is None else basis.label(unit)


def run_figure(clip, layer: str, units: Sequence[int], dataset=None, vocab: str = "builtin", top_k: int = 32,
               text_top_k: int = 30, out: Optional[str | os.PathLike] = None, blur: bool = True, fv: bool = True,
               render_settings=None, cache=None, progress: Progress = None, options=None,
               prompts: Optional[safety.Prompts] = None, rule: FlagRule = FlagRule(),
               caption_mode: str = "word", caption_terms: Optional[Sequence[str]] = None,
               scorer: Optional[Scorer] = None, labels: Sequence[str] | str = "auto",
               min_agreement: float = DEFAULT_MIN_AGREEMENT, detector: Optional[bool] = None, basis=None
               ) -> List[Tuple[Path, object]]:
    """One PNG panel per unit under `out` (default outputs/figures/), from the cached sweep (swept first if
    needed). Returns (path, panels.Figure) per unit. Blurred as blur_policy() says; raw pixels (blur=False)
    go to *_noblur.png. basis: an SAE basis draws its features (files ..._sae-<name>_feature<F>.png)."""
    from ..datasets.types import ImageDataset
    from ..datasets.open import open_dataset
    from ..storage.files import save_png
    from ..display.panels import PanelOptions, unit_panel
    from ..types import RenderSettings

    cache = cache if isinstance(cache, Cache) else Cache(cache)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    basis = _as_basis(basis)
    units = _check_units(clip, layer, units, basis)
    sweep = run_sweep(clip, layer, dataset, vocab=vocab, top_k=top_k, text_top_k=text_top_k, cache=cache,
                      progress=progress, rule=rule, prompts=prompts, caption_mode=caption_mode,
                      caption_terms=caption_terms, scorer=scorer, write_csv=False, labels=labels,
                      min_agreement=min_agreement, detector=detector, basis=basis)
    fvs = _feature_visualizations(clip, sweep.layer, units, render_settings or RenderSettings(), cache, True,
                                  progress, basis) if fv else {}
    policy = blur_policy(clip, sweep, cache, blur, prompts, scorer, basis)
    folder = Path(out) if out else DEFAULT_FIGURES
    written = []
    for unit in units:
        title = f"{clip.name} ({clip.pretrained})  {sweep.layer}  {_label(unit, basis)}"
        figure = unit_panel(sweep, dataset, unit, title, clip.image_size, policy, fv_images=fvs.get(unit),
                            options=options or PanelOptions())
        path = policy.output_path(folder / f"{_safe(clip.name)}_{sweep.layer}_{_tag(unit, basis)}.png")
        written.append((save_png(figure.image, path), figure))
    return written


def run_grid(clip, layer: str, units: Optional[Sequence[int]] = None, flagged: bool = False, top: int = 64,
             dataset=None, vocab: str = "builtin", top_k: int = 32, text_top_k: int = 30,
             out: Optional[str | os.PathLike] = None, blur: bool = True, render_fv: bool = False,
             render_settings=None, cache=None, progress: Progress = None, options=None,
             prompts: Optional[safety.Prompts] = None, rule: FlagRule = FlagRule(),
             caption_mode: str = "word", caption_terms: Optional[Sequence[str]] = None,
             scorer: Optional[Scorer] = None, labels: Sequence[str] | str = "auto",
             min_agreement: float = DEFAULT_MIN_AGREEMENT, detector: Optional[bool] = None, basis=None
             ) -> Tuple[Path, object, List[int]]:
    """Many units in one PNG: `units`, else the sweep's flagged units (flagged=True), else the `top` units by
    AUC; at most `top`. Feature visualizations are shown when cached (render_fv renders them). basis: an SAE
    basis draws its features (file ..._sae-<name>_grid_...png)."""
    from ..datasets.types import ImageDataset
    from ..datasets.open import open_dataset
    from ..storage.files import save_png
    from ..display.panels import PanelOptions, units_grid
    from ..types import RenderSettings

    if int(top) < 1:
        raise NeurolensError(f"--top must be at least 1, got {top}")
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    basis = _as_basis(basis)
    if units:
        units = _check_units(clip, layer, units, basis)
    sweep = run_sweep(clip, layer, dataset, vocab=vocab, top_k=top_k, text_top_k=text_top_k, cache=cache,
                      progress=progress, rule=rule, prompts=prompts, caption_mode=caption_mode,
                      caption_terms=caption_terms, scorer=scorer, write_csv=False, labels=labels,
                      min_agreement=min_agreement, detector=detector, basis=basis)
    if units:
        chosen, what = list(units)[:top], "selected units"
    elif flagged:
        chosen, what = sweep.flagged_units[:top], "flagged units"
        if not chosen:
            raise NeurolensError(f"no unit of {sweep.layer} is flagged ({sweep.scores.rule.describe()} against "
                                 f"{' + '.join(sweep.scores.sources) or 'no labels'}); omit --flagged to show the "
                                 f"top units by AUC, or pass --units")
    else:
        chosen, what = [int(u) for u in sweep.scores.ranking()[:top]], "units by AUC"
    fvs = _feature_visualizations(clip, sweep.layer, chosen, render_settings or RenderSettings(), cache, render_fv,
                                  progress, basis)
    policy = blur_policy(clip, sweep, cache, blur, prompts, scorer, basis)
    if basis is not None:
        what = what.replace("units", f"features of SAE {basis.name}")
    title = f"{clip.name} ({clip.pretrained})  {sweep.layer}: {len(chosen)} {what}"
    figure = units_grid(sweep, dataset, chosen, title, clip.image_size, policy, fvs=fvs,
                        options=options or PanelOptions())
    kind = "flagged" if flagged and not units else ("units" if units else "top")
    folder = Path(out) if out else DEFAULT_FIGURES
    basis_part = "" if basis is None else f"_sae-{basis.name}"
    path = policy.output_path(folder / f"{_safe(clip.name)}_{sweep.layer}{basis_part}_grid_{kind}{len(chosen)}.png")
    return save_png(figure.image, path), figure, chosen


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
