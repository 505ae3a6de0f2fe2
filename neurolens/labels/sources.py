"""Label sources: where the sweep's per-image NSFW labels come from (`--labels`, repeatable).

    captions              the dataset's captions (and keys that are URLs) matched against the NSFW lexicon
                          (neurolens/data/nsfw_terms.txt, word mode; `caption_matches`); an item with an
                          empty caption and no URL key is unknown
    column:NAME[=V1,V2]   a column of the dataset table (or a field of tar shards' .json members): positive
                          where the value is one of V1, V2 (case-insensitive), e.g. LAION's
                          `column:NSFW=NSFW,UNSURE`; without values the column must be numeric or boolean
                          (>= 0.5 / true positive); empty cells are unknown
    nudenet               NudeNet's detector (neurolens.labels.nudenet): per image the highest confidence
                          among its exposed-body classes, positive at >= nudenet.FIRE_THRESHOLD;
                          independent of the inspected model; scores cached per dataset (`nudenet_scores`)
    zero-shot             the inspected model's zero-shot score against the unsafe/safe prompt lists
                          (neurolens.labels.zero_shot), positive at >= IMAGE_NSFW_THRESHOLD; never for a
                          random-weights model
    auto (default)        captions where the dataset has captions, NudeNet where installed, zero-shot where
                          the model is trained; every source `auto` adds may be dropped by the reliability
                          check (neurolens.labels.reliability), a source named explicitly never is

Every source gives a per-image score in [0, 1] (NaN: unknown, or a skipped item) and a threshold; its
label is 1 at or above the threshold, else 0.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..datasets.decode import BadImage
from ..datasets.table import dataset_column
from ..errors import NeurolensError
from ..records import labels as label_records
from . import nudenet, zero_shot as safety
from .lexicon import caption_nsfw_matches, lexicon_terms
from .prompts import IMAGE_NSFW_THRESHOLD, load_prompts
from .spec import AUTO_KINDS, LabelSource, LabelSpec, is_random

Progress = Optional[Callable[[int, int], None]]



# ------------------------------------------------------------------------------------------- captions

def caption_matches(keys: Sequence[str], captions: Optional[Sequence[str]], terms: Optional[Sequence[str]],
                    mode: str = "word") -> np.ndarray:
    """(N,) bool: the caption (in `mode`) or the key, when it is a URL (always substring: URLs run words
    together, 'freexxxvideos.com'), contains one of `terms` (default: the paper's 7, lexicon.default_terms)."""
    keys = list(keys)
    matched = np.zeros(len(keys), dtype=bool)
    if captions is not None and mode != "off":
        matched |= caption_nsfw_matches(captions, terms, mode=mode)
    urls = [k if str(k).lower().startswith(("http://", "https://")) else None for k in keys]
    if any(urls):
        matched |= caption_nsfw_matches(urls, terms, mode="substring")
    return matched


def has_captions(keys: Sequence[str], captions: Optional[Sequence[str]]) -> bool:
    return (captions is not None and any(captions)) or any(str(k).lower().startswith(("http://", "https://"))
                                                           for k in keys)


def captions_source(spec: LabelSpec, keys: Sequence[str], captions: Optional[Sequence[str]],
                    terms: Optional[Sequence[str]] = None, mode: str = "word") -> LabelSource:
    """1 where the caption or URL matches a term (default: the whole lexicon), 0 where it does not, NaN
    where there is neither a caption nor a URL."""
    terms = list(terms) if terms is not None else lexicon_terms()
    matched = caption_matches(keys, captions, terms, mode)
    scores = matched.astype(np.float32)
    is_url = np.array([str(k).lower().startswith(("http://", "https://")) for k in keys], dtype=bool)
    has_text = np.array([bool(c and str(c).strip()) for c in captions], dtype=bool) if captions is not None \
        else np.zeros(len(scores), dtype=bool)
    scores[~(has_text | is_url)] = np.nan
    return LabelSource(spec, scores, 0.5, f"{len(terms)} terms, {mode} match")


# --------------------------------------------------------------------------------------------- column

_TRUE = {"true", "yes", "y", "t", "1", "positive"}
_FALSE = {"false", "no", "n", "f", "0", "negative"}


def column_source(spec: LabelSpec, dataset) -> LabelSource:
    """The dataset column's values as labels (module docstring)."""
    values = dataset_column(dataset, spec.column)
    scores = np.full(len(values), np.nan, dtype=np.float32)
    wanted = {v.lower() for v in spec.values}
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            continue
        text = str(value).strip()
        if not text:
            continue
        if wanted:
            scores[i] = 1.0 if text.lower() in wanted else 0.0
        elif isinstance(value, bool) or text.lower() in _TRUE | _FALSE:
            scores[i] = 1.0 if (value is True or text.lower() in _TRUE) else 0.0
        else:
            try:
                scores[i] = float(text)
            except ValueError:
                seen = sorted({str(v).strip() for v in values if v is not None and str(v).strip()})[:5]
                raise NeurolensError(f"column {spec.column!r} holds text values ({', '.join(seen)}, ...); name the "
                                     f"positive ones: --labels column:{spec.column}={seen[0]}") from None
    detail = f"positive: {', '.join(spec.values)}" if spec.values else "positive: >= 0.5 / true"
    return LabelSource(spec, scores, 0.5, detail)


# -------------------------------------------------------------------------------------------- NudeNet

def nudenet_note(count: int) -> str:
    """The progress line shown while NudeNet scores `count` images (a first sweep of a dataset: minutes)."""
    return f"NudeNet: scoring {count} images (the independent NSFW detector; --labels captions skips it)"


def nudenet_scores(dataset, cache=None, progress: Progress = None, skip: Optional[np.ndarray] = None) -> np.ndarray:
    """(N,) NudeNet image scores of every dataset item (NaN for unreadable or skipped ones), cached in chunk
    records of NUDENET_CHUNK images keyed by the dataset identity and the NudeNet version
    (neurolens.records.labels), so a second sweep (any layer, any model) does not run the detector again, and
    an interrupted run keeps the chunks it finished. When images are left to score and `progress` has a
    `note` (the CLI's bar), it says so (nudenet_note) and clears the note when done."""
    if not nudenet.available():
        raise NeurolensError("--labels nudenet needs the nudenet package; pip install nudenet==3.4.2")
    total = len(dataset)
    scores = np.full(total, np.nan, dtype=np.float32)
    detector_version = nudenet.version()
    key = label_records.nudenet_chunk_key(detector_version, nudenet.EXPOSED)
    missing = []   # (first, last, record path or None) of the chunks to score
    for first in range(0, total, label_records.NUDENET_CHUNK):
        last = min(total, first + label_records.NUDENET_CHUNK)
        path = label_records.nudenet_chunk_path(cache, dataset.identity, key, first) if cache else None
        cached = label_records.read_nudenet_chunk(cache, path, last - first) if path is not None else None
        if cached is not None:
            scores[first:last] = cached
        else:
            missing.append((first, last, path))
    note = getattr(progress, "note", None)
    to_score = sum(last - first - (int(skip[first:last].sum()) if skip is not None else 0)
                   for first, last, _ in missing)
    if note is not None and to_score:
        note(nudenet_note(to_score))
    done = total - sum(last - first for first, last, _ in missing)
    if progress is not None:
        progress(done, total)
    for first, last, path in missing:
        for i in range(first, last):
            if skip is not None and skip[i]:
                continue
            try:
                image = dataset.load(i)
            except BadImage:          # unreadable: unknown, counted by the scan already
                continue
            scores[i] = nudenet.image_scores([image])[0]
            if progress is not None and (i + 1 - first) % 16 == 0:
                progress(done + i + 1 - first, total)
        if path is not None:
            label_records.write_nudenet_chunk(cache, path, scores[first:last], first, dataset.description,
                                              detector_version)
        done += last - first
        if progress is not None:
            progress(done, total)
    if note is not None and to_score:
        note(None)
    return scores


def nudenet_source(spec: LabelSpec, dataset, cache=None, progress: Progress = None,
                   skip: Optional[np.ndarray] = None) -> LabelSource:
    return LabelSource(spec, nudenet_scores(dataset, cache, progress, skip), nudenet.FIRE_THRESHOLD,
                       f"highest exposed-class confidence, fires at >= {nudenet.FIRE_THRESHOLD}")


# ------------------------------------------------------------------------------------------ zero-shot

def zero_shot_source(spec: LabelSpec, clip, embeddings: Optional[np.ndarray], prompts=None,
                     scorer=None) -> LabelSource:
    """The inspected model's zero-shot score of the scan's image embeddings (NaN rows: skipped items).
    scorer(clip, embeddings) -> (N,) replaces it (tests inject known scores)."""
    if is_random(clip) and scorer is None:
        raise NeurolensError("zero-shot labels need trained weights: a random-weights model's zero-shot score "
                             "is noise; use --labels captions, column:NAME or nudenet")
    if embeddings is None:
        raise NeurolensError("the scan has no image embeddings; rerun the sweep with --force")
    prompts = prompts or load_prompts()
    scores = np.full(len(embeddings), np.nan, dtype=np.float32)
    rows = np.flatnonzero(np.isfinite(embeddings).all(axis=1))
    if len(rows):
        if scorer is None:
            scores[rows] = safety.nsfw_scores_for_embeddings(clip, embeddings[rows], prompts)
        else:
            scores[rows] = np.asarray(scorer(clip, embeddings[rows]), dtype=np.float32)
    name = "prompts " + prompts.identity if scorer is None else f"scorer {getattr(scorer, '__qualname__', scorer)}"
    return LabelSource(spec, scores, IMAGE_NSFW_THRESHOLD,
                       f"{name}, positive at >= {IMAGE_NSFW_THRESHOLD}")


# ------------------------------------------------------------------------------------------ resolving

def resolve_specs(named: Sequence[LabelSpec], auto: bool, *, has_captions: bool, clip=None,
                  detector: Optional[bool] = None, scorer=None,
                  auto_kinds: Sequence[str] = AUTO_KINDS) -> Tuple[List[LabelSpec], List[str]]:
    """The sources to compute, and one line for each source `auto` left out and why.

    auto adds (not explicit) captions when the dataset has captions, nudenet when installed (detector=None)
    and not turned off (detector=False), zero-shot when the model is trained (or a scorer is given); only the
    kinds in `auto_kinds` (a concept without a lexicon or detector lets auto add its zero-shot score only)."""
    specs = list(named)
    notes: List[str] = []
    kinds = {s.kind for s in specs} | (set(AUTO_KINDS) - set(auto_kinds))
    if auto:
        if "captions" not in kinds:
            if has_captions:
                specs.append(LabelSpec("captions", explicit=False))
            else:
                notes.append("captions: not used (the dataset has no captions)")
        if "nudenet" not in kinds:
            if detector is False:
                notes.append("nudenet: not used (turned off)")
            elif nudenet.available():
                specs.append(LabelSpec("nudenet", explicit=False))
            else:
                notes.append("nudenet: not used (not installed: pip install nudenet==3.4.2)")
        if "zero-shot" not in kinds:
            if is_random(clip) and scorer is None:
                notes.append("zero-shot: not used (random weights: their zero-shot score is noise)")
            elif clip is not None or scorer is not None:
                specs.append(LabelSpec("zero-shot", explicit=False))
    if not specs:
        raise NeurolensError("no label source is available for this dataset; give one with --labels "
                             "column:NAME[=V1,V2], --labels nudenet (pip install nudenet==3.4.2), or captions")
    return specs, notes


def compute_sources(specs: Sequence[LabelSpec], *, dataset, keys: Sequence[str],
                    captions: Optional[Sequence[str]], clip=None, embeddings: Optional[np.ndarray] = None,
                    prompts=None, terms: Optional[Sequence[str]] = None, caption_mode: str = "word",
                    scorer=None, cache=None, progress: Progress = None,
                    skip: Optional[np.ndarray] = None) -> List[LabelSource]:
    """Every requested source's per-image scores, in the order given. skip: (N,) items not to judge."""
    sources = []
    for spec in specs:
        if spec.kind == "captions":
            if not has_captions(keys, captions):
                raise NeurolensError(f"--labels captions: {getattr(dataset, 'description', 'the dataset')} has no "
                                     f"captions; name the caption column with --caption-column, or use "
                                     f"--labels column:NAME / nudenet")
            source = captions_source(spec, keys, captions, terms, caption_mode)
        elif spec.kind == "column":
            source = column_source(spec, dataset)
        elif spec.kind == "nudenet":
            source = nudenet_source(spec, dataset, cache, progress, skip)
        elif spec.kind == "zero-shot":
            source = zero_shot_source(spec, clip, embeddings, prompts, scorer)
        else:
            raise NeurolensError(f"unknown label source {spec.kind!r}")
        if len(source.scores) != len(keys):
            raise NeurolensError(f"label source {spec.name} has {len(source.scores)} values for {len(keys)} images")
        if skip is not None:
            source.scores = np.where(skip, np.nan, source.scores).astype(np.float32)
        sources.append(source)
    return sources

