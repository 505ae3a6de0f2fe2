"""Size limits a user can override through the environment (docs/security.md): how their values are read.

A value is a number of bytes, or a number with K, M, G or T (binary units: 16G = 16 x 2^30 bytes); a malformed
or zero value is one clear error (a NeurolensError), never a silently disabled limit."""
from __future__ import annotations

import os
import re

from ..errors import NeurolensError

_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", flags=re.IGNORECASE)


def env_size(name: str, default: int) -> int:
    """The size in bytes that $name gives, or `default` when it is unset or empty."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    match = _SIZE.fullmatch(text)
    if match is None or int(match.group(1)) == 0:
        raise NeurolensError(f"{name}={text!r} is not a size; give bytes or a number with K, M, G or T (e.g. 16G), "
                             f"or unset it for the default of {describe(default)}")
    return int(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper())


def describe(size: int) -> str:
    """A size for messages: '8 GiB', '128 MiB', '1.5 KiB'."""
    for unit, power in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 2 ** power:
            value = size / 2 ** power
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"
