"""Frozen dataclasses shared by every module. No internal imports but neurolens.errors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .errors import NeurolensError

# Where on a module a layer is read.
CAPTURE_OUTPUT = "output"          # the module's return value
CAPTURE_INPUT = "input"            # the module's first positional input (pre-hook); cloned, as the module may be in place

PRECISIONS = ("fp32", "bf16")      # what a layer forward runs at (activations.forward)


@dataclass(frozen=True)
class LayerSpec:
    """One addressable layer of a model's image tower."""
    name: str                      # canonical name, e.g. image_block_4_5
    module: str                    # dotted path a user may type for it, e.g. visual.layer4.5
    hook_module: str               # module the hook sits on, e.g. visual.layer4.5.act3
    capture: str                   # CAPTURE_OUTPUT or CAPTURE_INPUT of hook_module
    channels: int
    height: int                    # spatial size at the model's input resolution (1 for vectors)
    width: int
    aliases: Tuple[str, ...] = ()
    description: str = ""
    order: int = 0                 # execution order in the forward; used to stop after the deepest layer


@dataclass(frozen=True)
class UnitRef:
    layer: str
    unit: int


@dataclass(frozen=True)
class RenderSettings:
    """Everything that determines a feature visualization; hashed into its cache key."""
    objective: str = "channel"     # channel | neuron
    steps: int = 256
    size: int = 0                  # 0: the model's input resolution
    seeds: Tuple[int, ...] = (0,)
    lr: float = 0.7                # Adam's peak lr (lucent uses 0.05); the fast defaults (lr, warm-up, decay, low-resolution
                                   # share, keep_best) were chosen on the TUNING units named in docs/visualize.md
    diversity: float = 0.0         # weight of the diversity term between seeds of one unit
    decay_power: float = 1.0       # Fourier spectrum scaling exponent (lucid's default)
    low_res_fraction: float = 0.6  # share of steps rendered at reduced resolution (the speed trick)
    low_res_scale: float = 0.5     # image size of those steps relative to the full size
    lr_warmup: float = 0.1         # share of steps over which the lr rises linearly to lr
    lr_decay_start: float = 0.75   # share of steps after which the lr decays (cosine) to lr * lr_final; 1: constant
    lr_final: float = 0.0
    precision: str = "auto"        # auto | fp32 | bf16
    transforms: str = "standard"   # standard | none
    keep_best: int = 16            # every this many steps the clean activation is checked and the best image kept
                                   # (render.BestImages); 0: the last image, as lucid/lucent return


# Named presets of RenderSettings (`visualize --quality`). fast: the defaults (see docs/visualize.md for
# what they were tuned on and the benchmark). microscope: as OpenAI Microscope / lucid rendered, i.e. lucid's
# Adam lr 0.05 at full resolution for 4096 steps, several seeds kept apart by the diversity term.
QUALITY_PRESETS = {
    "fast": {},
    "microscope": {"steps": 4096, "lr": 0.05, "low_res_fraction": 0.0, "lr_warmup": 0.0, "lr_decay_start": 1.0, "keep_best": 0,
                   "seeds": (0, 1, 2, 3), "diversity": 0.5},
}


# The short-budget rule (docs/visualize.md, "Short budgets"): the low-resolution phase leaves at least this many
# steps at full size; below MIN_FULL_RES_STEPS / (1 - low_res_fraction) steps it shrinks, and at or below this
# many steps it is off and the learning rate does not decay (a run that short has no steps to spare).
MIN_FULL_RES_STEPS = 64


def budget_settings(settings: RenderSettings) -> RenderSettings:
    """The settings a run of settings.steps uses: the low-resolution share cut so that at least
    MIN_FULL_RES_STEPS steps (all of them in a shorter run) are taken at full size. Settings the rule does not
    bind (the default 256 steps among them) come back unchanged, so their cache keys stay what they were; a
    bound run's record names the share it actually used. A run of at most MIN_FULL_RES_STEPS steps also keeps
    its peak learning rate to the end (lr_decay_start 1.0): the decay's last quarter cost more than it gave there
    (docs/visualize.md, measured on the tuning units)."""
    low = int(round(settings.steps * settings.low_res_fraction))
    allowed = max(0, settings.steps - MIN_FULL_RES_STEPS)
    if low > allowed:
        settings = dataclasses.replace(settings, low_res_fraction=allowed / settings.steps)
    if settings.steps <= MIN_FULL_RES_STEPS and settings.lr_decay_start < 1.0:
        settings = dataclasses.replace(settings, lr_decay_start=1.0)
    return settings


def quality_settings(quality: str = "fast", **overrides) -> RenderSettings:
    """The RenderSettings of a preset, with any field replaced by `overrides`."""
    if quality not in QUALITY_PRESETS:
        raise NeurolensError(f"unknown quality {quality!r}; use one of {', '.join(QUALITY_PRESETS)}")
    return RenderSettings(**{**QUALITY_PRESETS[quality], **overrides})


@dataclass
class RenderResult:
    """One unit's feature visualizations (one per seed)."""
    layer: str
    unit: int
    seeds: Tuple[int, ...]
    images: "object"               # uint8 array (seeds, H, W, 3)
    activations: "object"          # float32 (seeds,) objective value of each saved image, fp32, no transforms
    curve: "object"                # float32 (steps,) mean objective over seeds during optimization
    settings: RenderSettings
    fingerprint: str
    cached: bool = False
    paths: Tuple[str, ...] = field(default_factory=tuple)
    blurred: Tuple[Optional[str], ...] = field(default_factory=tuple)   # per written PNG: why blurred, or None
    maxima: "object" = None        # float32 (seeds,) the unit's highest activation over the cells of each saved image,
                                   # as a scan measures dataset images (optvis.loop.unit_maxima); None: a record
                                   # written before it was kept
