"""The NSFW sweep of a whole layer: scan (with image embeddings) + text ranking + per-unit scores, cached.

Every step is cache-or-compute: the scan is resumable (pipelines/scan.py), the text ranking is cached by
run_text, and the scores land in one record

    sweep/<model fingerprint[:16]>/<layer>/<key>.h5
        correlation, top_nsfw_share, text_nsfw_share (U,) float32; flagged (U,) bool
        image_scores, clip_scores (N,) float32 (NaN: skipped item); caption_match (N,) bool
        text_scores (U, k_text) float32, text_nsfw (U, k_text) bool   (the unit's ranked top texts)
        attrs: layer, rule (the flag thresholds), n_images, prompts (both lists), caption terms and mode,
               logit scale, scan record, text identity

whose key hashes the scan record, the text ranking, the prompts, the caption terms and the rule. A sweep
of a swept layer therefore does no model forward; `flags.csv` is (re)written from the record every time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .. import safety
from ..errors import NeurolensError
from ..files import write_csv
from ..store import Cache, Record, settings_key
from ..unit_scores import FlagRule, UnitScores, apply_rule, combine_image_scores, score_units

SWEEP_VERSION = 1
DEFAULT_OUT = Path("outputs") / "sweep"
Progress = Optional[Callable[[int, int], None]]
Scorer = Callable[[object, np.ndarray], np.ndarray]


@dataclass
class SweepResult:
    layer: str
    scores: UnitScores
    image_scores: np.ndarray            # (N,) combined per-image NSFW score (NaN: skipped item)
    clip_scores: np.ndarray             # (N,) CLIP zero-shot part
    caption_match: np.ndarray           # (N,) bool caption/URL string match
    text_entries: List[List[str]]       # per unit: its ranked top texts
    text_scores: np.ndarray             # (U, k_text) cosines of those texts
    text_nsfw: np.ndarray               # (U, k_text) bool
    scan: object = None                 # the ScanResult (keys, captions, top images and cells)
    text: object = None                 # the TextRanking
    path: Optional[Path] = None         # the sweep record
    flags_csv: Optional[Path] = None
    cached: bool = False
    attrs: dict = field(default_factory=dict)

    @property
    def flagged_units(self) -> List[int]:
        return [int(u) for u in self.scores.ranking() if self.scores.flagged[u]]

    def top_texts(self, unit: int, n: int = 5) -> List[Tuple[str, float, bool]]:
        return [(t, float(s), bool(f)) for t, s, f in
                zip(self.text_entries[unit][:n], self.text_scores[unit][:n], self.text_nsfw[unit][:n])]

    def ranking(self, limit: Optional[int] = None, texts: int = 0) -> List[dict]:
        """The `sweep --json` rows (unit, correlation, top_nsfw_share, text_nsfw_share, flagged), by correlation."""
        rows = self.scores.rows(limit)
        if texts:
            for row in rows:
                row["top_texts"] = [t for t, _, _ in self.top_texts(row["unit"], texts)]
        return rows


def caption_matches(keys: Sequence[str], captions: Optional[Sequence[str]], terms: Optional[Sequence[str]],
                    mode: str = "word") -> np.ndarray:
    """(N,) the paper's filter on captions (in `mode`) and on keys that are URLs (always substring: URLs run
    words together, 'freexxxvideos.com')."""
    keys = list(keys)
    matched = np.zeros(len(keys), dtype=bool)
    if captions is not None and mode != "off":
        matched |= safety.caption_nsfw_matches(captions, terms, mode=mode)
    urls = [k if str(k).lower().startswith(("http://", "https://")) else None for k in keys]
    if any(urls):
        matched |= safety.caption_nsfw_matches(urls, terms, mode="substring")
    return matched


def clip_image_scores(clip, embeddings: Optional[np.ndarray], count: int, scorer: Scorer) -> np.ndarray:
    """(N,) scorer(clip, embeddings) on the readable rows; NaN on skipped ones."""
    out = np.full(count, np.nan, dtype=np.float32)
    if embeddings is None:
        raise NeurolensError("the scan has no image embeddings; rerun the sweep with --force")
    rows = np.flatnonzero(np.isfinite(embeddings).all(axis=1))
    if len(rows):
        out[rows] = np.asarray(scorer(clip, embeddings[rows]), dtype=np.float32)
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
                from ..vocab import load_vocab
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
              workers: Optional[int] = None, write_csv: bool = True) -> SweepResult:
    """Sweep every unit of `layer` for NSFW correlation (see neurolens.unit_scores for the definitions).

    scorer(clip, embeddings) -> (N,) replaces the CLIP zero-shot image score (tests inject known scores)."""
    from ..datasets import ImageDataset, open_dataset
    from .scan import run_scan
    from .text import run_text

    if caption_mode not in ("word", "substring", "off"):
        raise NeurolensError(f"unknown --caption-match {caption_mode!r}; use word, substring or off")
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    prompts = prompts or safety.load_prompts()
    terms = list(caption_terms) if caption_terms is not None else safety.default_terms()
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)

    scan = run_scan(clip, layer, dataset, top_k=top_k, batch_size=batch_size, workers=workers, cache=cache,
                    force=force, embeddings=True, progress=progress)
    ranking = run_text(clip, layer, vocab=vocab, top_k=text_top_k, scan=scan, cache=cache, force=force,
                       progress=progress)
    scorer_name = "clip-zero-shot" if scorer is None else f"custom:{getattr(scorer, '__qualname__', repr(scorer))}"
    key = settings_key("sweep", SWEEP_VERSION, Path(scan.path).name if scan.path else None,
                       _text_identity(ranking), prompts.identity, terms, caption_mode, rule.as_dict(), top_k,
                       text_zero_shot, safety.LOGIT_SCALE, scorer_name)
    path = cache.path("sweep", clip.fingerprint, scan.layer, key)
    record = None if force else cache.read(path)
    if record is not None:
        result = _from_record(record, scan, ranking)
    else:
        result = _compute(clip, scan, ranking, prompts, terms, caption_mode, rule, top_k, text_zero_shot,
                          scorer, progress, vocab, cache)
        cache.write(path, _to_record(result, clip, prompts, terms, caption_mode, scorer_name, ranking))
    result.path = path
    if write_csv:
        result.flags_csv = write_flags_csv(result, flags_path(scan.layer, out))
    return result


def _text_identity(ranking) -> str:
    """The ranking's cache record name (it hashes vocabulary, reference and top-k), else its content."""
    path = getattr(ranking, "path", None)
    if path is not None:
        return Path(path).name
    return settings_key(ranking.layer, np.asarray(ranking.top_indices), len(ranking.entries))


def _compute(clip, scan, ranking, prompts, terms, caption_mode, rule, top_k, text_zero_shot, scorer,
             progress, vocab, cache) -> SweepResult:
    if scorer is None:
        def scorer(model, embeddings):
            return safety.nsfw_scores_for_embeddings(model, embeddings, prompts)
    clip_scores = clip_image_scores(clip, scan.embeddings, len(scan.keys), scorer)
    matched = caption_matches(scan.keys, scan.captions, terms, caption_mode)
    image_scores = combine_image_scores(clip_scores, matched)
    texts, text_scores, text_nsfw = _text_part(clip, ranking, prompts, text_zero_shot, vocab, cache)
    units = score_units(scan, image_scores, text_nsfw, rule, top_k=top_k, progress=progress)
    return SweepResult(layer=scan.layer, scores=units, image_scores=image_scores, clip_scores=clip_scores,
                       caption_match=matched, text_entries=texts, text_scores=text_scores, text_nsfw=text_nsfw,
                       scan=scan, text=ranking)


def _to_record(result: SweepResult, clip, prompts, terms, caption_mode, scorer_name, ranking) -> Record:
    s = result.scores
    arrays = {"correlation": s.correlation, "top_nsfw_share": s.top_nsfw_share,
              "text_nsfw_share": s.text_nsfw_share, "flagged": s.flagged.astype(bool),
              "image_scores": result.image_scores, "clip_scores": result.clip_scores,
              "caption_match": result.caption_match, "text_scores": result.text_scores,
              "text_nsfw": result.text_nsfw}
    attrs = {"layer": result.layer, "rule": s.rule.as_dict(), "n_images": int(s.n_images),
             "correlation_bar": float(s.correlation_bar), "prompts_unsafe": prompts.unsafe,
             "prompts_safe": prompts.safe, "caption_terms": list(terms), "caption_mode": caption_mode,
             "logit_scale": safety.LOGIT_SCALE, "image_threshold": s.rule.image_threshold,
             "text_threshold": safety.TEXT_NSFW_THRESHOLD, "scorer": scorer_name,
             "scan_record": str(result.scan.path) if result.scan is not None else None,
             "model": clip.name, "pretrained": clip.pretrained, "fingerprint": clip.fingerprint}
    return Record(arrays=arrays, attrs=attrs)


def _from_record(record: Record, scan, ranking) -> SweepResult:
    a, attrs = record.arrays, record.attrs
    rule = FlagRule(**attrs["rule"])
    n = int(attrs["n_images"])
    scores = UnitScores(correlation=a["correlation"], top_nsfw_share=a["top_nsfw_share"],
                        text_nsfw_share=a["text_nsfw_share"],
                        flagged=apply_rule(a["correlation"], a["top_nsfw_share"], a["text_nsfw_share"], n, rule),
                        n_images=n, rule=rule)
    entries = list(ranking.entries)
    texts = [[entries[i] for i in row if i >= 0] for row in np.asarray(ranking.top_indices)]
    return SweepResult(layer=attrs["layer"], scores=scores, image_scores=a["image_scores"],
                       clip_scores=a["clip_scores"], caption_match=a["caption_match"].astype(bool),
                       text_entries=texts, text_scores=a["text_scores"], text_nsfw=a["text_nsfw"].astype(bool),
                       scan=scan, text=ranking, path=record.path, cached=True, attrs=attrs)


def flags_path(layer: str, out: Optional[str | os.PathLike] = None) -> Path:
    """--out FILE.csv, --out DIR (DIR/flags.csv), or outputs/sweep/<layer>/flags.csv."""
    if out is None:
        return DEFAULT_OUT / layer / "flags.csv"
    out = Path(out)
    return out if out.suffix.lower() == ".csv" else out / "flags.csv"


def write_flags_csv(result: SweepResult, path: Path, texts: int = 3) -> Path:
    """One row per unit, ranked by correlation; written atomically, text cells escaped (neurolens.files)."""
    rows = ([rank, row["unit"], round(float(row["correlation"]), 6), round(float(row["top_nsfw_share"]), 4),
             round(float(row["text_nsfw_share"]), 4), int(row["flagged"]),
             " | ".join(t for t, _, _ in result.top_texts(row["unit"], texts))]
            for rank, row in enumerate(result.ranking(), start=1))
    return write_csv(path, ["rank", "unit", "correlation", "top_nsfw_share", "text_nsfw_share", "flagged", "top_texts"],
                     rows)


# ------------------------------------------------------------------------------------- figure and grid

DEFAULT_FIGURES = Path("outputs") / "figures"


def _feature_visualizations(clip, layer: str, units: Sequence[int], settings, cache: Cache, render: bool,
                            progress: Progress) -> dict:
    """{unit: (seeds,H,W,3) uint8}: rendered/cached by run_visualize when render=True, else only those
    already in the cache (no model forward)."""
    from . import visualize
    if not units:
        return {}
    if render:
        return {r.unit: np.asarray(r.images) for r in
                visualize.run_visualize(clip, layer, units, settings, cache=cache, progress=progress)}
    resolved = visualize.resolved_settings(clip, settings)
    found = {}
    for unit in units:
        record = cache.read(visualize.record_path(cache, clip, layer, int(unit), resolved))
        if record is not None:
            found[int(unit)] = np.asarray(record.arrays["images"])
    return found


def _fv_scores(clip, cache: Cache, fvs: dict, sweep: SweepResult, blur: bool, prompts) -> dict:
    """NSFW scores of the feature visualizations that could be shown raw (unflagged units, blur on)."""
    if not blur:
        return {}
    from ..panels import FvScores
    scorer = FvScores(clip, cache, prompts)
    return {unit: scorer.scores(list(images)) for unit, images in fvs.items() if not sweep.scores.flagged[unit]}


def _check_units(clip, layer: str, units: Sequence[int]) -> List[int]:
    from ..models import check_unit, resolve_layer
    spec = resolve_layer(clip, layer)
    for unit in units:
        check_unit(spec, int(unit))
    return [int(u) for u in dict.fromkeys(units)]


def run_figure(clip, layer: str, units: Sequence[int], dataset=None, vocab: str = "builtin", top_k: int = 32,
               text_top_k: int = 30, out: Optional[str | os.PathLike] = None, blur: bool = True, fv: bool = True,
               render_settings=None, cache=None, progress: Progress = None, options=None,
               prompts: Optional[safety.Prompts] = None, rule: FlagRule = FlagRule(),
               caption_mode: str = "word", caption_terms: Optional[Sequence[str]] = None,
               scorer: Optional[Scorer] = None) -> List[Tuple[Path, object]]:
    """One PNG panel per unit under `out` (default outputs/figures/), from the cached sweep (swept first if
    needed). Returns (path, panels.Figure) per unit. Raw pixels (blur=False) go to *_noblur.png."""
    from ..datasets import ImageDataset, open_dataset
    from ..files import save_png
    from ..panels import PanelOptions, unit_panel
    from ..types import RenderSettings

    cache = cache if isinstance(cache, Cache) else Cache(cache)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    units = _check_units(clip, layer, units)
    sweep = run_sweep(clip, layer, dataset, vocab=vocab, top_k=top_k, text_top_k=text_top_k, cache=cache,
                      progress=progress, rule=rule, prompts=prompts, caption_mode=caption_mode,
                      caption_terms=caption_terms, scorer=scorer, write_csv=False)
    fvs = _feature_visualizations(clip, sweep.layer, units, render_settings or RenderSettings(), cache, True,
                                  progress) if fv else {}
    fv_scores = _fv_scores(clip, cache, fvs, sweep, blur, prompts)
    folder = Path(out) if out else DEFAULT_FIGURES
    written = []
    for unit in units:
        title = f"{clip.name} ({clip.pretrained})  {sweep.layer}  unit {unit}"
        figure = unit_panel(sweep, dataset, unit, title, clip.image_size, blur=blur, fv_images=fvs.get(unit),
                            fv_scores=fv_scores.get(unit), options=options or PanelOptions())
        name = f"{_safe(clip.name)}_{sweep.layer}_unit{unit}{'' if blur else '_noblur'}.png"
        written.append((save_png(figure.image, folder / name), figure))
    return written


def run_grid(clip, layer: str, units: Optional[Sequence[int]] = None, flagged: bool = False, top: int = 64,
             dataset=None, vocab: str = "builtin", top_k: int = 32, text_top_k: int = 30,
             out: Optional[str | os.PathLike] = None, blur: bool = True, render_fv: bool = False,
             render_settings=None, cache=None, progress: Progress = None, options=None,
             prompts: Optional[safety.Prompts] = None, rule: FlagRule = FlagRule(),
             caption_mode: str = "word", caption_terms: Optional[Sequence[str]] = None,
             scorer: Optional[Scorer] = None) -> Tuple[Path, object, List[int]]:
    """Many units in one PNG: `units`, else the sweep's flagged units (flagged=True), else the `top` units by
    NSFW correlation; at most `top`. Feature visualizations are shown when cached (render_fv renders them)."""
    from ..datasets import ImageDataset, open_dataset
    from ..files import save_png
    from ..panels import PanelOptions, units_grid
    from ..types import RenderSettings

    if int(top) < 1:
        raise NeurolensError(f"--top must be at least 1, got {top}")
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    if units:
        units = _check_units(clip, layer, units)
    sweep = run_sweep(clip, layer, dataset, vocab=vocab, top_k=top_k, text_top_k=text_top_k, cache=cache,
                      progress=progress, rule=rule, prompts=prompts, caption_mode=caption_mode,
                      caption_terms=caption_terms, scorer=scorer, write_csv=False)
    if units:
        chosen, what = list(units)[:top], "selected units"
    elif flagged:
        chosen, what = sweep.flagged_units[:top], "flagged units"
        if not chosen:
            raise NeurolensError(f"no unit of {sweep.layer} is flagged (flag bar: correlation >= "
                                 f"{sweep.scores.correlation_bar:.2f}); omit --flagged to show the top units by "
                                 f"NSFW correlation, or pass --units")
    else:
        chosen, what = [int(u) for u in sweep.scores.ranking()[:top]], "units by NSFW correlation"
    fvs = _feature_visualizations(clip, sweep.layer, chosen, render_settings or RenderSettings(), cache, render_fv,
                                  progress)
    fv_scores = _fv_scores(clip, cache, fvs, sweep, blur, prompts)
    title = f"{clip.name} ({clip.pretrained})  {sweep.layer}: {len(chosen)} {what}"
    figure = units_grid(sweep, dataset, chosen, title, clip.image_size, blur=blur, fvs=fvs, fv_scores=fv_scores,
                        options=options or PanelOptions())
    kind = "flagged" if flagged and not units else ("units" if units else "top")
    name = f"{_safe(clip.name)}_{sweep.layer}_grid_{kind}{len(chosen)}{'' if blur else '_noblur'}.png"
    folder = Path(out) if out else DEFAULT_FIGURES
    return save_png(figure.image, folder / name), figure, chosen


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
