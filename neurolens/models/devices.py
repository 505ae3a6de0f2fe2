"""Whether a GPU can exist on this machine, answered without torch (light: the cached answers use it).

`--device auto` means CUDA when torch sees a GPU, else the CPU. Asking torch costs its import (1.3 s or more),
which a cached answer does not otherwise need, so the question is first answered from the device files: on
Linux a CUDA (NVIDIA) or ROCm (AMD) GPU is reachable only through /dev/nvidiactl, /dev/nvidia<N>,
/proc/driver/nvidia or /dev/kfd. Where none exists, torch cannot see a GPU and "auto" is the CPU. Where one
exists, or on another system, torch is asked (models.build.resolve_device).
"""
from __future__ import annotations

import glob
import os
import sys

GPU_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")


def no_gpu_possible() -> bool:
    """True when this is Linux and no GPU device file exists (torch.cuda.is_available() is then False)."""
    if not sys.platform.startswith("linux"):
        return False
    return not any(os.path.exists(path) for path in GPU_FILES) and not glob.glob("/dev/nvidia[0-9]*")


def auto_device_name(device: str) -> str:
    """"cpu" for --device auto where no GPU can exist; otherwise the name as given (torch decides later)."""
    return "cpu" if device == "auto" and no_gpu_possible() else device
