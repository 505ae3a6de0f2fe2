"""Model names every part of neurolens agrees on (light: no torch import), the one home of the defaults."""

DEFAULT_MODEL = "RN50x4"
DEFAULT_PRETRAINED = "openai"
RANDOM_WEIGHTS = "none"
RANDOM_SEED = 0
