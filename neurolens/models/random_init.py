"""Random weights whose activations have a sane scale (`--pretrained none`).

open_clip's own initialization of a ModifiedResNet zero-initializes every bottleneck's last BatchNorm
(`bn3`) and leaves every BatchNorm's running statistics at mean 0 / variance 1. A trained network's
BatchNorms hold the statistics of real data instead; an untrained one in eval mode divides by 1, while
PyTorch's default convolution init shrinks the variance about 3x per convolution (and ReLU halves it), so
a random RN50x4's image_block_4_5 activations are about 1e-4, and its residual branches contribute
nothing.

The variance-preserving re-initialization here is data-dependent, like LSUV or a BatchNorm recalibration
after training: every BatchNorm of the image tower gets bias 0 and weight 1, except the last BatchNorm of
each residual branch (a bottleneck's `bn3`), whose weight is 1/sqrt(n) for the n blocks of its stage; and
its running mean and variance are set to the per-channel mean and variance of its own input over one fixed
batch of natural images (scikit-image's bundled samples, neurolens.datasets.builtin), in one forward in which the
BatchNorms before it are already re-initialized. On that batch every BatchNorm's output then has mean 0 and
variance weight^2 per channel: each stage starts from a unit-variance shortcut and its n branches add 1/n
each, so the residual stream's variance stays between 1 and 2 at every block, and a random RN50x4's units
have activations of order 1. The convolution weights keep open_clip's seeded init, so `none` still names
one fixed set of weights.

Why 1/sqrt(n) and not 1 for the branches: with unit-variance branches a random RN50x4 is chaotic. The
gradient of an image_block_4_5 unit with respect to the image, taken under two random jitter/scale/rotate
views of the same grey start, had a cosine similarity of about 0.05 (6 pairs, unit 1543), and Adam at
lucent's lr 0.05 left the unit's activation at its starting value (about -0.1) for 96 steps (torch-lucent
itself: 0.14 after 512 steps). With 1/sqrt(n) the cosine was about 0.45 and the same 96 steps raised
the activation steadily, as on trained weights.

Transformers (ViT towers, text towers) are left as open_clip initializes them: LayerNorm keeps their
residual stream at unit scale already.
"""
from __future__ import annotations

import math
from typing import List

import torch

from ..datasets.builtin import builtin_images

CALIBRATION_IMAGES = 20  # all of neurolens.datasets.builtin's samples


def _batch_norms(module: torch.nn.Module) -> List[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def calibration_batch(size: int) -> torch.Tensor:
    """The fixed natural images (float (N, 3, size, size) in [0, 1]) whose statistics the BatchNorms take."""
    return torch.from_numpy(builtin_images(size)[:CALIBRATION_IMAGES])


def _residual_branch_ends(visual: torch.nn.Module) -> dict:
    """{id(BatchNorm): 1/sqrt(blocks in its stage)} for the last BatchNorm of every bottleneck of a
    ModifiedResNet (open_clip's CLIP ResNets); empty for other towers."""
    scales = {}
    for index in range(1, 5):
        stage = getattr(visual, f"layer{index}", None)
        if not isinstance(stage, torch.nn.Sequential):
            continue
        for block in stage:
            norm = getattr(block, "bn3", None)
            if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                scales[id(norm)] = 1.0 / math.sqrt(len(stage))
    return scales


def recalibrate_batch_norms(model: torch.nn.Module) -> int:
    """Variance-preserving re-initialization of an open_clip model's image-tower BatchNorms (see the module
    docstring), at the model's input size and input normalization. Returns the number of BatchNorms
    re-initialized (0 for a tower without any, e.g. a ViT)."""
    import open_clip  # lazy: open_clip takes seconds to import

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
        # BatchNorms before it produce it, so each one's output is exactly mean 0, variance weight^2 on the batch
        inputs = args[0]
        norm.running_mean.copy_(inputs.mean((0, 2, 3)))
        norm.running_var.copy_(inputs.var((0, 2, 3), unbiased=False))

    handles = [norm.register_forward_pre_hook(take_statistics) for norm in norms]
    try:
        with torch.no_grad():
            branch_ends = _residual_branch_ends(visual)
            for norm in norms:
                norm.weight.fill_(branch_ends.get(id(norm), 1.0))
                norm.bias.zero_()
            visual.eval()
            visual((images - mean_t) / std_t)
    finally:
        for handle in handles:
            handle.remove()
        visual.train(was_training)
    return len(norms)
