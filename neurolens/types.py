"""Frozen dataclasses shared by every module. No internal imports."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

# Where on a module a layer is read.
CAPTURE_OUTPUT = "output"          # the module's return value
CAPTURE_INPUT = "input"            # the module's first positional input (pre-hook); cloned, as the module may be in place


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
    lr: float = 0.35               # Adam; lucent uses 0.05. Measured on RN50x4 unit 1543 (256 steps): 0.1 never reached
                                   # lucent's 512-step activation, 0.2 did at step ~224, 0.35 at step ~176
    diversity: float = 0.0         # weight of the diversity term between seeds of one unit
    decay_power: float = 1.0       # Fourier spectrum scaling exponent (lucid's default)
    low_res_fraction: float = 0.5  # share of steps rendered at half resolution (the speed trick)
    precision: str = "auto"        # auto | fp32 | bf16
    transforms: str = "standard"   # standard | none


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
