"""Measured recipes on the toy CLIP: the ground truth that the concept audit and the cross-checkpoint report
are proven on. Each recipe is a frozen dataclass of settings; its functions generate the data, train the
models (or reuse them from the cache, neurolens.toy.store) and generate the probe set they are audited on.

- Multi-concept (`MultiConceptRecipe`, `multi_concept_model`, `multi_concept_probe`): a toy trained on
  multi-concept data (neurolens.toy.concepts: nsfw, violence, drugs, nsfw+violence together); the probe is
  generated the same way with another seed, its `planted_<concept>` columns are the truth.
- Dose-response (`DoseResponseRecipe`, `dose_response_models`, `dose_response_probe`): one planted concept
  at several training shares, same seed otherwise, small toys; all audited on ONE probe set with a fixed
  share of planted images and another seed. The planted pattern is the `camouflage` style's (a one-pixel
  checkerboard in the background's own greys, at a contrast near the grainy background's): it has no colour
  of its own, so random weights have no unit that separates it. A toy trained without it may still have
  such units (texture units learnt from the backgrounds; seed-dependent), which is why every count stands
  beside the 0 % model's and the random model's.

The figures measured with these recipes are in docs/toy-model.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import NeurolensError
from ..storage.cache import Cache
from .concepts import concept_set, planted_words
from .generate import ToySettings
from .store import toy_dataset, toy_model
from .settings import TrainSettings

Progress = Optional[Callable[[str, int, int], None]]


@dataclass
class ToyModel:
    """A trained toy in the cache: its checkpoint, its training data and training summary."""
    checkpoint: Path
    dataset: Path
    data: ToySettings
    train: TrainSettings
    summary: Dict = field(default_factory=dict)     # steps, seconds (wall), cpu_seconds, final_loss, zero_shot
    trained: bool = False                           # False: reused from the cache
    share: Optional[float] = None                   # dose-response: the planted share trained on


def concept_terms(name: str, mode: str = "multi") -> List[str]:
    """The caption lexicon of a planted concept (the terms to label probe captions with)."""
    for row in concept_set(mode):
        if row["name"] == name:
            return list(row["terms"])
    raise NeurolensError(f"no planted concept {name!r} in {mode}-concept mode; use one of "
                         f"{', '.join(r['name'] for r in concept_set(mode))}")


def _root(cache) -> Path:
    return cache.root if isinstance(cache, Cache) else Cache(cache).root


def _train(root: Path, data: ToySettings, train: TrainSettings, evaluate: bool, progress: Progress,
           stage: str, share: Optional[float] = None) -> ToyModel:
    step = (lambda done, total: progress(stage, done, total)) if progress else None
    dataset = toy_dataset(root, settings=data)
    checkpoint, summary, trained = toy_model(root, dataset, data, train, progress=step, evaluate=evaluate)
    return ToyModel(Path(checkpoint), Path(dataset), data, train, summary, trained, share)


# ------------------------------------------------------------------------------------------ multi-concept

@dataclass(frozen=True)
class MultiConceptRecipe:
    """A toy trained on multi-concept data, and the probe set it is audited on (another seed)."""
    images: int = 3000
    planted_share: float = 0.10              # each concept shown alone
    intersection_share: float = 0.05         # nsfw and violence shown together
    caption_words: int = 2
    train: TrainSettings = TrainSettings()   # the demo's training settings (the seed is the recipe's)
    probe_images: int = 1000
    probe_seed_offset: int = 5000            # the probe's seed: seed + this
    probe_caption_noise: float = 0.0         # share of the probe's planted images given ordinary captions
    layer: str = "image_block_4_0"

    def data_settings(self, seed: int) -> ToySettings:
        return ToySettings(n=self.images, seed=seed, concepts="multi", planted_share=self.planted_share,
                           intersection_share=self.intersection_share, caption_words=self.caption_words)

    def probe_settings(self, seed: int) -> ToySettings:
        return ToySettings(n=self.probe_images, seed=seed + self.probe_seed_offset, concepts="multi",
                           planted_share=self.planted_share, intersection_share=self.intersection_share,
                           caption_words=self.caption_words, caption_noise=self.probe_caption_noise)

    def train_settings(self, seed: int) -> TrainSettings:
        return TrainSettings(**{**asdict(self.train), "seed": seed})


def multi_concept_model(seed: int = 0, cache=None, recipe: MultiConceptRecipe = MultiConceptRecipe(),
                        evaluate: bool = True, progress: Progress = None) -> ToyModel:
    """The multi-concept toy of this seed (trained once, then read from the cache)."""
    return _train(_root(cache), recipe.data_settings(seed), recipe.train_settings(seed), evaluate, progress,
                  "train")


def multi_concept_probe(seed: int = 0, cache=None, recipe: MultiConceptRecipe = MultiConceptRecipe()) -> Path:
    """The probe set's parquet (columns of neurolens.toy.generate plus `planted_<concept>`)."""
    return toy_dataset(_root(cache), settings=recipe.probe_settings(seed))


# ------------------------------------------------------------------------------------------ dose-response

DOSE_SHARES = (0.0, 0.01, 0.04, 0.10, 0.25)


@dataclass(frozen=True)
class DoseResponseRecipe:
    """Small toys trained on one planted concept at several shares (same seed otherwise), audited on one probe."""
    shares: Tuple[float, ...] = DOSE_SHARES
    images: int = 1000
    style: str = "camouflage"                # the planted pattern (neurolens.toy.generate.STYLES)
    # 1000 images x 6 epochs in batches of 50: 120 steps, a lower peak rate than the demo's (learning is
    # then graded in the share instead of all-or-nothing)
    train: TrainSettings = TrainSettings(epochs=6, batch_size=50, lr=1e-3)
    probe_images: int = 1000
    probe_share: float = 0.15
    probe_seed_offset: int = 9000            # the probe's seed: seed + this
    layer: str = "image_block_4_0"
    concept: str = "nsfw"                    # the planted concept's name (its lexicon labels the captions)

    def data_settings(self, seed: int, share: float) -> ToySettings:
        return ToySettings(n=self.images, seed=seed, planted_share=share, style=self.style)

    def probe_settings(self, seed: int) -> ToySettings:
        return ToySettings(n=self.probe_images, seed=seed + self.probe_seed_offset, planted_share=self.probe_share,
                           style=self.style)

    def train_settings(self, seed: int) -> TrainSettings:
        return TrainSettings(**{**asdict(self.train), "seed": seed})

    @property
    def terms(self) -> List[str]:
        return planted_words()


def dose_response_models(shares: Optional[Sequence[float]] = None, seed: int = 0, cache=None,
                         recipe: DoseResponseRecipe = DoseResponseRecipe(), progress: Progress = None
                         ) -> List[ToyModel]:
    """One toy per training share (the recipe's shares by default), in order; each trained once, then read
    from the cache. No zero-shot evaluation (it would cost more than the training)."""
    root = _root(cache)
    chosen = tuple(recipe.shares if shares is None else shares)
    return [_train(root, recipe.data_settings(seed, share), recipe.train_settings(seed), False, progress,
                   f"train {share:.0%}", share) for share in chosen]


def dose_response_probe(seed: int = 0, cache=None, recipe: DoseResponseRecipe = DoseResponseRecipe()) -> Path:
    """The one probe set every dose-response model is audited on (its `planted` column is the truth)."""
    return toy_dataset(_root(cache), settings=recipe.probe_settings(seed))
