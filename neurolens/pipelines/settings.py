"""The settings of a sweep, as frozen values carried whole from the CLI (cli/options.py's SWEEP set) to
run_sweep, run_ray_sweep, run_figure and run_grid.

    SweepSettings   what is ranked and how units are flagged: vocabulary, top images and texts, the flag
                    rule, the AUC's memory budget, and the labels
    LabelSettings   how every image gets its label for ONE concept (the sweep's: NSFW): the label sources
                    (`--labels`), their reliability check, the caption lexicon and match mode, the zero-shot
                    prompts
    ConceptSettings a concept audit (`neurolens concepts`): a concept set (labels.concepts) and the options it
                    shares with the sweep (top-k, flag rule, agreement bar, NudeNet, AUC memory); each concept's
                    LabelSettings is `label_settings(concept)`, its one-concept sweep `sweep_settings(concept)`
    DescribeSettings what a unit's description is made of (`neurolens describe`): top images per half, caption
                    n-grams and concepts shown, the prior, the split's seed

Both validate on construction: a bad value is one NeurolensError line naming the CLI option. They hold
values, not files (the CLI reads the prompt and term files), so equal settings make equal cache keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, List, Optional, Tuple

from ..errors import NeurolensError
from ..labels.lexicon import MATCH_MODES, lexicon_terms
from ..labels.prompts import Prompts, load_prompts
from ..labels.concepts import Concept, ConceptSet, read_concept_set
from ..labels.spec import AUTO_KINDS, DEFAULT_MIN_AGREEMENT, LabelSpec, parse_labels
from ..scoring.flags import DEFAULT_AUC_MEMORY, FlagRule

CAPTION_MODES = MATCH_MODES + ("off",)


def _texts(values) -> Optional[Tuple[str, ...]]:
    return None if values is None else tuple(str(v) for v in values)


@dataclass(frozen=True)
class LabelSettings:
    """Where the per-image labels come from (neurolens.labels.sources) and how they are checked."""
    sources: Tuple[str, ...] = ("auto",)             # --labels values: auto, captions, column:NAME[=V1,V2], ...
    min_agreement: float = DEFAULT_MIN_AGREEMENT      # the reliability check's AUC bar
    detector: Optional[bool] = None                   # NudeNet in `auto`: None where installed, False off
    caption_terms: Optional[Tuple[str, ...]] = None   # the captions source's terms; None: the NSFW lexicon
    caption_mode: str = "word"                        # word | substring | off
    unsafe_prompts: Optional[Tuple[str, ...]] = None  # zero-shot prompts; None: the shipped lists
    safe_prompts: Optional[Tuple[str, ...]] = None
    auto_kinds: Tuple[str, ...] = AUTO_KINDS          # the kinds `auto` may add (a concept's own sources)

    def __post_init__(self):
        sources = self.sources
        sources = ("auto",) if not sources else (sources,) if isinstance(sources, str) else tuple(map(str, sources))
        object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "caption_terms", _texts(self.caption_terms))
        object.__setattr__(self, "unsafe_prompts", _texts(self.unsafe_prompts))
        object.__setattr__(self, "safe_prompts", _texts(self.safe_prompts))
        object.__setattr__(self, "auto_kinds", tuple(self.auto_kinds))
        if set(self.auto_kinds) - set(AUTO_KINDS):
            raise NeurolensError(f"auto label kinds must be among {', '.join(AUTO_KINDS)}, got {self.auto_kinds}")
        if self.caption_mode not in CAPTION_MODES:
            raise NeurolensError(f"unknown --caption-match {self.caption_mode!r}; use word, exact, substring or off")
        if not 0.5 <= float(self.min_agreement) <= 1.0:
            raise NeurolensError(f"--min-agreement must be an AUC between 0.5 and 1, got {self.min_agreement}")
        self.requested()                                  # an unknown source: one line now
        if self.unsafe_prompts is not None or self.safe_prompts is not None:
            self.prompts()                                # an empty list: one line now

    def requested(self) -> Tuple[List[LabelSpec], bool]:
        """(the sources named explicitly, whether `auto` was asked): labels.sources.parse_labels."""
        return parse_labels(list(self.sources))

    def prompts(self) -> Prompts:
        """The zero-shot prompt lists (each the shipped one unless given)."""
        shipped = load_prompts() if self.unsafe_prompts is None or self.safe_prompts is None else None
        return Prompts(self.unsafe_prompts if self.unsafe_prompts is not None else shipped.unsafe,
                              self.safe_prompts if self.safe_prompts is not None else shipped.safe)

    def terms(self) -> List[str]:
        """The captions source's terms: the given ones, else the whole NSFW lexicon."""
        return list(self.caption_terms) if self.caption_terms is not None else lexicon_terms()


@dataclass(frozen=True)
class SweepSettings:
    """Every option of a sweep (and of the figures and grids drawn from one); hashed into its cache key."""
    vocab: Any = "builtin"             # the unit texts' vocabulary: builtin, a .txt, file.parquet:column, a Vocabulary
    top_k: int = 32                    # top images kept per unit by the scan (top_nsfw_share counts them all)
    text_top_k: int = 30               # top texts ranked per unit
    rule: FlagRule = field(default_factory=FlagRule)
    labels: LabelSettings = field(default_factory=LabelSettings)
    text_zero_shot: bool = True        # mark texts by the model's zero-shot score too (never on random weights)
    auc_memory: int = DEFAULT_AUC_MEMORY   # bytes the exact AUC may keep; beyond: the binned estimate

    def __post_init__(self):
        rule = self.rule
        if not 0.0 <= rule.min_text_share <= 1.0:
            raise NeurolensError(f"--min-text-share must be a share between 0 and 1, got {rule.min_text_share}")
        if not 0.0 < rule.max_q <= 1.0:
            raise NeurolensError(f"--max-q must be a q-value in (0, 1], got {rule.max_q}")
        if not 0.5 <= rule.min_auc <= 1.0:
            raise NeurolensError(f"--min-auc must be an AUC between 0.5 and 1, got {rule.min_auc}")
        if int(self.auc_memory) < 0:
            raise NeurolensError(f"--auc-memory must be a number of MB >= 0, got {int(self.auc_memory) // 2 ** 20}")
        if int(self.top_k) < 1 or int(self.text_top_k) < 1:
            raise NeurolensError(f"--top-k and --text-top-k must be at least 1, got {self.top_k} and "
                                 f"{self.text_top_k}")

    def updated(self, **options) -> "SweepSettings":
        """These settings with keyword arguments of the older API applied (run_sweep / run_figure / run_grid
        before SweepSettings): vocab, top_k, text_top_k, rule, text_zero_shot, auc_memory, and for the labels
        labels (the --labels values), min_agreement, detector, caption_terms, caption_mode and prompts (a
        labels.prompts.Prompts; None: the shipped lists). An unknown name is a TypeError."""
        own = {f.name for f in fields(self)} - {"labels"}
        label_names = {f.name for f in fields(LabelSettings)} - {"sources", "unsafe_prompts", "safe_prompts",
                                                                 "auto_kinds"}
        unknown = set(options) - own - label_names - {"labels", "prompts"}
        if unknown:
            raise TypeError(f"unknown sweep options: {', '.join(sorted(unknown))}")
        labels = {name: options[name] for name in label_names if name in options}
        if "labels" in options:
            labels["sources"] = options["labels"]
        if "prompts" in options:
            prompts = options["prompts"]
            labels["unsafe_prompts"] = None if prompts is None else prompts.unsafe
            labels["safe_prompts"] = None if prompts is None else prompts.safe
        ours = {name: options[name] for name in own if name in options}
        return replace(self, labels=replace(self.labels, **labels) if labels else self.labels, **ours)


def sweep_settings(settings: Optional[SweepSettings] = None, **options) -> SweepSettings:
    """`settings` (default: SweepSettings()) with the older API's keyword arguments applied (SweepSettings.updated)."""
    if settings is not None and not isinstance(settings, SweepSettings):
        raise TypeError(f"settings must be a SweepSettings, got {type(settings).__name__}; pass vocab=... by keyword")
    settings = settings if settings is not None else SweepSettings()
    return settings.updated(**options) if options else settings



@dataclass(frozen=True)
class ConceptSettings:
    """Every option of a concept audit: the concept set and the options it shares with the sweep; hashed into
    the concepts record's key with each concept's label settings."""
    concepts: ConceptSet = field(default_factory=read_concept_set)      # default: the built-in set
    top_k: int = 32                    # top images kept per unit by the scan (top_share counts them all)
    rule: FlagRule = field(default_factory=FlagRule)
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    detector: Optional[bool] = None    # NudeNet where a concept asks for it: None where installed, False off
    auc_memory: int = DEFAULT_AUC_MEMORY

    def __post_init__(self):
        if not isinstance(self.concepts, ConceptSet):
            raise TypeError(f"concepts must be a labels.concepts.ConceptSet, got {type(self.concepts).__name__}")
        SweepSettings(top_k=self.top_k, rule=self.rule, auc_memory=self.auc_memory)      # the sweep's checks
        for concept in self.concepts:
            self.label_settings(concept)

    @classmethod
    def from_sweep(cls, settings: SweepSettings, concepts: Optional[ConceptSet] = None) -> "ConceptSettings":
        """The concept audit that shares `settings`'s top-k, rule, agreement bar, NudeNet and AUC memory."""
        return cls(concepts=concepts if concepts is not None else read_concept_set(), top_k=settings.top_k,
                   rule=settings.rule, min_agreement=settings.labels.min_agreement,
                   detector=settings.labels.detector, auc_memory=settings.auc_memory)

    def label_settings(self, concept: Concept) -> LabelSettings:
        """The concept's label sources as the sweep's LabelSettings: its `labels` when given (the built-in nsfw:
        [auto], the sweep's default), else captions for terms, column:NAME=V for a column and nudenet for the
        detector (named: never dropped, their agreement still measured), plus `auto` limited to zero-shot
        for prompts (kept only where it agrees with them, never on random weights)."""
        off = self.detector is False
        kinds = tuple(kind for kind, wanted in (("captions", concept.terms), ("nudenet", concept.detector),
                                                ("zero-shot", concept.prompts)) if wanted)
        if concept.labels:
            sources = concept.labels
        else:
            column = None if concept.column is None else \
                f"column:{concept.column}" + (f"={','.join(concept.values)}" if concept.values else "")
            named = (["captions"] if concept.terms else []) + ([column] if column else []) + \
                (["nudenet"] if concept.detector and not off else [])
            sources = tuple(named + (["auto"] if concept.prompts else []))
            kinds = ("zero-shot",) if concept.prompts else ()
        return LabelSettings(sources=sources, min_agreement=self.min_agreement,
                             detector=False if off or not concept.detector else None,
                             caption_terms=concept.terms, caption_mode=concept.match if concept.terms else "off",
                             unsafe_prompts=concept.prompts or None, safe_prompts=concept.negative_prompts or None,
                             auto_kinds=kinds)

    def sweep_settings(self, concept: Concept) -> SweepSettings:
        """The one-concept sweep of `concept` with these shared options (its label part: label_settings)."""
        return SweepSettings(top_k=self.top_k, rule=self.rule, labels=self.label_settings(concept),
                             auc_memory=self.auc_memory)


@dataclass(frozen=True)
class DescribeSettings:
    """What a description is made of (neurolens.scoring.enrichment defines each); hashed into its record's key."""
    top_k: int = 32                    # top images per half that choose (half A) and score (half B) the n-grams
    ngrams: int = 5                    # caption n-grams kept per unit
    concepts: int = 3                  # best concepts shown per unit (every flagged one, at least)
    prior: float = 1.0                 # the Dirichlet prior's weight, relative to each group's own size
    seed: int = 0                      # the split into halves

    def __post_init__(self):
        if int(self.top_k) < 2:
            raise NeurolensError(f"--half-top must be at least 2, got {self.top_k}")
        if int(self.ngrams) < 1 or int(self.concepts) < 1:
            raise NeurolensError(f"--ngrams and --concepts-shown must be at least 1, got {self.ngrams} and "
                                 f"{self.concepts}")
        if not float(self.prior) > 0:
            raise NeurolensError(f"the prior's weight must be positive, got {self.prior}")
