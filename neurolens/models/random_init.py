"""Random weights whose activations have a sane scale (`--pretrained none`).

open_clip's own initialization of a ModifiedResNet zero-initializes every bottleneck's last BatchNorm
(`bn3`) and leaves every BatchNorm's running statistics at mean 0 / variance 1. A trained network's
BatchNorms hold the statistics of real data instead; an untrained one in eval mode divides by 1, while
PyTorch's default convolution init shrinks the variance about 3x per convolution (and ReLU halves it), so
a random RN50x4's image_block_4_5 activations are about 1e-4, and its residual branches contribute
nothing.

The variance-preserving re-initialization here is data-dependent, like LSUV or a BatchNorm recalibration
after training: every BatchNorm of the image tower gets weight 1 and bias 0, and its running mean and
variance are set to the per-channel mean and variance of its own input over one fixed batch of natural
images (scikit-image's bundled samples, neurolens.builtin), in one forward in which the BatchNorms before
it are already re-initialized. On that batch every BatchNorm's output then has mean 0 and variance 1 per
channel, so each residual block adds a unit-variance branch to its input: a stage's residual stream has
variance 1 + (blocks so far), and a random RN50x4's units have activations of order 1. The convolution
weights keep open_clip's seeded init, so `none` still names one fixed set of weights.

Transformers (ViT towers, text towers) are left as open_clip initializes them: LayerNorm keeps their
residual stream at unit scale already.
"""
from __future__ import annotations

from typing import List

import torch

CALIBRATION_IMAGES = 20  # all of neurolens.builtin's samples


def _batch_norms(module: torch.nn.Module) -> List[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def calibration_batch(size: int) -> torch.Tensor:
    """The fixed natural images (float (N, 3, size, size) in [0, 1]) whose statistics the BatchNorms take."""
    from ..builtin import builtin_images
    return torch.from_numpy(builtin_images(size)[:CALIBRATION_IMAGES])


def recalibrate_batch_norms(model: torch.nn.Module) -> int:
    """Variance-preserving re-initialization of an open_clip model's image-tower BatchNorms (see the module
    docstring), at the model's input size and input normalization. Returns the number of BatchNorms
    re-initialized (0 for a tower without any, e.g. a ViT)."""
    import open_clip

    visual = model.visual
    norms = _batch_norms(visual)
    if not norms:
        return 0
    size = visual.image_size
    preprocess = open_clip.get_model_preprocess_cfg(model)
    mean = preprocess.get("mean") or open_clip.OPENAI_DATASET_MEAN
    std = preprocess.get("std") or open_clip.OPENAI_DATASET_STD
    images = calibration_batch(int(size[0] if isinstance(size, (tuple, list)) else size))
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    was_training = visual.training

    def take_statistics(norm, args):
        # a pre-hook: this BatchNorm's statistics are those of its input as the (already re-initialized)
        # BatchNorms before it produce it, so each one's output is exactly mean 0, variance 1 on the batch
        inputs = args[0]
        norm.running_mean.copy_(inputs.mean((0, 2, 3)))
        norm.running_var.copy_(inputs.var((0, 2, 3), unbiased=False))

    handles = [norm.register_forward_pre_hook(take_statistics) for norm in norms]
    try:
        with torch.no_grad():
            for norm in norms:
                norm.weight.fill_(1.0)
                norm.bias.zero_()
            visual.eval()
            visual((images - mean_t) / std_t)
    finally:
        for handle in handles:
            handle.remove()
        visual.train(was_training)
    return len(norms)
