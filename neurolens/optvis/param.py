"""Image parameterization: lucid's Fourier basis with decorrelated colour, batched and device-clean.

It computes the same images as torch-lucent 0.1.8's `fft_image` + `to_valid_rgb(decorrelate=True)` for the
same spectrum (tests/test_render.py checks this against lucent). We own it because lucent creates its
tensors on a module-level `cuda:0` device and draws its initialization from the global RNG; here every
image of the batch has its own seeded generator, so a unit's result does not depend on what else is in
the batch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# Square root of the colour correlation of ImageNet pixels (lucid's `color_correlation_svd_sqrt`),
# normalized by its largest column norm.
_COLOR_CORRELATION_SVD_SQRT = np.asarray(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32)
_COLOR_CORRELATION = _COLOR_CORRELATION_SVD_SQRT / np.max(np.linalg.norm(_COLOR_CORRELATION_SVD_SQRT, axis=0))

INIT_SD = 0.01
_FFT_MAGIC = 4.0  # lucid divides the inverse FFT by 4 so the initial image has a small contrast


def spectrum_scale(height: int, width: int, decay_power: float) -> torch.Tensor:
    """1 / max(|frequency|, 1/max(h, w)) ** decay_power on rfft2's frequency grid: a 1/f prior."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(width, height)) ** decay_power
    return torch.from_numpy(scale.astype(np.float32))[None, None, :, :, None]


class FourierImage(torch.nn.Module):
    """A batch of images parameterized by scaled Fourier coefficients; forward() gives RGB in (0, 1)."""

    def __init__(self, seeds: Sequence[int], height: int, width: int, decay_power: float = 1.0,
                 device: torch.device | str = "cpu"):
        super().__init__()
        shape = (3, height, width // 2 + 1, 2)
        spectra = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(int(seed))
            spectra.append(torch.randn(shape, generator=generator) * INIT_SD)
        self.spectrum = torch.nn.Parameter(torch.stack(spectra).to(device))
        self.register_buffer("scale", spectrum_scale(height, width, decay_power).to(device))
        self.register_buffer("color", torch.from_numpy(_COLOR_CORRELATION.T.copy()).to(device))
        self.height, self.width = height, width

    def forward(self) -> torch.Tensor:
        scaled = torch.view_as_complex((self.scale * self.spectrum).contiguous())
        linear = torch.fft.irfftn(scaled, s=(self.height, self.width), norm="ortho") / _FFT_MAGIC
        decorrelated = (linear.permute(0, 2, 3, 1) @ self.color).permute(0, 3, 1, 2)
        return torch.sigmoid(decorrelated)
