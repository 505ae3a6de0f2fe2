"""The settings of a sweep, as frozen values carried whole from the CLI (cli/options.py's SWEEP set) to
run_sweep, run_ray_sweep, run_figure and run_grid.

    SweepSettings   what is ranked and how units are flagged: vocabulary, top images and texts, the flag
                    rule, the AUC's memory budget, and the labels
    LabelSettings   how every image gets its label for ONE concept (today: NSFW): the label sources
                    (`--labels`), their reliability check, the caption lexicon and match mode, the zero-shot
                    prompts. A concept audit gives each concept its own LabelSettings and shares the rest.

Both validate on construction: a bad value is one NeurolensError line naming the CLI option. They hold
values, not files (the CLI reads the prompt and term files), so equal settings make equal cache keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, List, Optional, Tuple

from ..errors import NeurolensError
from ..labels.lexicon import lexicon_terms
from ..labels.prompts import Prompts, load_prompts
from ..labels.spec import DEFAULT_MIN_AGREEMENT, LabelSpec, parse_labels
from ..scoring.flags import DEFAULT_AUC_MEMORY, FlagRule

CAPTION_MODES = ("word", "substring", "off")


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

    def __post_init__(self):
        sources = self.sources
        sources = ("auto",) if not sources else (sources,) if isinstance(sources, str) else tuple(map(str, sources))
        object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "caption_terms", _texts(self.caption_terms))
        object.__setattr__(self, "unsafe_prompts", _texts(self.unsafe_prompts))
        object.__setattr__(self, "safe_prompts", _texts(self.safe_prompts))
        if self.caption_mode not in CAPTION_MODES:
            raise NeurolensError(f"unknown --caption-match {self.caption_mode!r}; use word, substring or off")
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
        label_names = {f.name for f in fields(LabelSettings)} - {"sources", "unsafe_prompts", "safe_prompts"}
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

