"""The precision a feature visualization runs at (light: a cached answer's key needs it without torch)."""
from __future__ import annotations

from ..errors import NeurolensError


def resolve_precision(precision: str, device) -> str:
    """'auto' is bf16 on CUDA and fp32 on CPU: measured on a 2-core avx512_bf16 CPU, bf16 autocast made
    RN50x4's forward+backward many times slower, not faster (see README benchmarks). device: a torch.device or
    its type ("cpu", "cuda")."""
    if precision == "auto":
        if str(getattr(device, "type", device)) != "cuda":
            return "fp32"
        import torch  # lazy: only a CUDA device asks (torch is imported already to have one); the CPU needs none
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise NeurolensError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    return precision
