"""What identifies a model's weights without building the model (light: no torch, no open_clip).

A model card (neurolens.records.models) remembers what a full load found out about a request (the weights
fingerprint, image size, mean/std, the layer table) and is trusted only while the weights' identity is
unchanged:

  a weights file     (a checkpoint, a file given as --pretrained, a tag's hub file): its absolute path, size,
                     mtime_ns and a partial hash (sha1 of the size, the first MiB and the last MiB), checked
                     with one stat and at most 2 MiB read
  random weights     (--pretrained none): the model name, the seed, the digest of a bundled config
                     (neurolens/data/model_configs) when the model is one of them, and the versions of the
                     packages that draw them: torch, open_clip and scikit-image (the calibration images of
                     neurolens.models.random_init)
Every identity also holds the torch and open_clip versions, since they build the network.
"""
from __future__ import annotations

import hashlib
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, Optional

from ..data import MODEL_CONFIGS
from .names import RANDOM_SEED, RANDOM_WEIGHTS

PARTIAL_BYTES = 2 ** 20          # bytes hashed at each end of a weights file
BUILDERS = ("torch", "open_clip_torch")
RANDOM_INIT_PACKAGES = BUILDERS + ("scikit-image",)


def package_versions(names=BUILDERS) -> Dict[str, str]:
    """{distribution: installed version ('none' when absent)}, from the packages' metadata (no import)."""
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "none"
    return found


def file_identity(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """{path, size, mtime_ns, partial_sha1} of a weights file, or None when it is not a readable file."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
        digest = hashlib.sha1(str(stat.st_size).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(PARTIAL_BYTES))
            if stat.st_size > PARTIAL_BYTES:
                handle.seek(max(PARTIAL_BYTES, stat.st_size - PARTIAL_BYTES))
                digest.update(handle.read(PARTIAL_BYTES))
    except OSError:
        return None
    return {"path": str(path), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns),
            "partial_sha1": digest.hexdigest()}


def bundled_config_digest(model: str) -> Optional[str]:
    """sha1 of the bundled open_clip config of `model` (the tiny and toy models), None for any other model."""
    path = MODEL_CONFIGS / f"{model}.json"
    if "/" in model or not path.is_file():
        return None
    return hashlib.sha1(path.read_bytes()).hexdigest()


def model_request(model: str, pretrained: str, checkpoint: Optional[str] = None) -> Dict[str, Optional[str]]:
    """What was asked for, with files as absolute paths (the same file asked for from another folder is the
    same request): the key of a model card."""
    if checkpoint:
        checkpoint = str(Path(checkpoint).resolve())
    elif pretrained.lower() != RANDOM_WEIGHTS and os.path.isfile(pretrained):
        pretrained = str(Path(pretrained).resolve())
    return {"model": model, "pretrained": pretrained, "checkpoint": checkpoint or None}


def weights_identity(model: str, weights_file: Optional[str], source: Optional[Dict[str, str]] = None
                     ) -> Dict[str, Any]:
    """The identity of loaded weights (module docstring): their file's, or that of seeded random weights."""
    if weights_file is None:
        return {"kind": RANDOM_WEIGHTS, "model": model, "seed": RANDOM_SEED,
                "config": bundled_config_digest(model), "packages": package_versions(RANDOM_INIT_PACKAGES)}
    return {"kind": "file", "file": file_identity(weights_file), "source": dict(source or {}),
            "packages": package_versions()}
