"""The zero-shot NSFW prompts and the thresholds of the zero-shot scores (light: no model, no torch);
neurolens.labels.zero_shot computes the scores."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List, Optional, Sequence

from ..data import NSFW_PROMPTS_SAFE, NSFW_PROMPTS_UNSAFE
from ..errors import NeurolensError
from .lexicon import read_list


LOGIT_SCALE = 100.0
IMAGE_NSFW_THRESHOLD = 0.5
TEXT_NSFW_THRESHOLD = 0.5
UNSAFE_PROMPTS_FILE = NSFW_PROMPTS_UNSAFE
SAFE_PROMPTS_FILE = NSFW_PROMPTS_SAFE


class Prompts:
    """The unsafe and safe prompt lists used by the zero-shot scores."""

    def __init__(self, unsafe: Sequence[str], safe: Sequence[str]):
        if not unsafe or not safe:
            raise NeurolensError("the NSFW prompt lists need at least one unsafe and one safe prompt; "
                                 "check --unsafe-prompts / --safe-prompts")
        self.unsafe = list(unsafe)
        self.safe = list(safe)

    @property
    def all(self) -> List[str]:
        return self.unsafe + self.safe

    @property
    def identity(self) -> str:
        text = "\n".join(self.unsafe) + "\n--\n" + "\n".join(self.safe)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_prompts(unsafe_file: Optional[str | Path] = None, safe_file: Optional[str | Path] = None) -> Prompts:
    """The shipped prompt lists, or the user's files (--unsafe-prompts / --safe-prompts)."""
    return Prompts(read_list(unsafe_file or UNSAFE_PROMPTS_FILE), read_list(safe_file or SAFE_PROMPTS_FILE))
