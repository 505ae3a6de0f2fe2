"""`--pretrained none`: the variance-preserving re-initialization gives activations of order 1.

open_clip's own random ResNet (bn3 zeroed, BatchNorm statistics at 0/1) gives image_block_4_0 activations
of about 1e-3 on the tiny model and 1e-4 on RN50x4; every BatchNorm is recalibrated to natural images."""
import numpy as np
import pytest
import torch

from neurolens.activations.hooks import forward_to
from neurolens.models.build import load_clip
from neurolens.models.layer_table import resolve_layer
from neurolens.models.random_init import calibration_batch


def _batch_norm_outputs(clip, images):
    outputs = {}  # cloned: an in-place ReLU overwrites a BatchNorm output after the hook
    handles = [module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().clone()))
               for name, module in clip.model.visual.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            clip.model.visual(clip.normalize(images))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.mark.parametrize("name", ["nl-tiny-RN", "nl-toy-RN"])
def test_every_batch_norm_normalizes_the_calibration_images(name):
    clip = load_clip(name, "none", device="cpu")
    assert any("BatchNorm" in note for note in clip.notes)
    outputs = _batch_norm_outputs(clip, calibration_batch(clip.image_size))
    assert len(outputs) >= 19
    stages = {f"layer{i}": len(getattr(clip.model.visual, f"layer{i}")) for i in range(1, 5)}
    for module, out in outputs.items():
        mean, var = out.mean((0, 2, 3)), out.var((0, 2, 3), unbiased=False)
        # the last BatchNorm of a residual branch is scaled by 1/sqrt(blocks in its stage), all others by 1
        expected = 1 / stages[module.split(".")[0]] if module.endswith("bn3") and module.startswith("layer") else 1
        assert mean.abs().max() < 1e-4, module
        assert (var - expected).abs().max() < 1e-3, module   # BatchNorm's eps (1e-5) keeps it just below


def test_random_resnet_activations_have_unit_scale_on_unseen_images(tiny_clip):
    """On images the calibration never saw (uniform noise, and smooth noise) every layer's activations have a
    standard deviation between 0.3 and 10, and a unit's channel mean differs from image to image."""
    generator = torch.Generator().manual_seed(11)
    noise = torch.rand(6, 3, 64, 64, generator=generator)
    smooth = torch.nn.functional.interpolate(torch.rand(6, 3, 8, 8, generator=generator), size=(64, 64),
                                             mode="bilinear", align_corners=False)
    specs = [resolve_layer(tiny_clip, name) for name in
             ["image_stem", "image_block_1_0", "image_block_2_0", "image_block_3_0", "image_block_4_0"]]
    for images in (noise, smooth):
        with torch.no_grad():
            acts = forward_to(tiny_clip.model, tiny_clip.normalize(images), specs)
        for spec in specs:
            act = acts[spec.name]
            assert 0.3 < act.std().item() < 10, spec.name
            assert act.mean((2, 3)).std(0).mean().item() > 0.01, spec.name


def test_residual_branches_respond_with_stage_scaled_weights():
    """open_clip zero-initializes bn3; re-initialized, every residual branch adds a non-zero signal, weighted
    1/sqrt(n) in a stage of n blocks (nl-toy-RN's stages have 1, 1, 2 and 1 blocks)."""
    clip = load_clip("nl-toy-RN", "none", device="cpu")
    weights = {n: m.weight for n, m in clip.model.visual.named_modules() if n.endswith("bn3") and n.startswith("layer")}
    assert sorted(weights) == ["layer1.0.bn3", "layer2.0.bn3", "layer3.0.bn3", "layer3.1.bn3", "layer4.0.bn3"]
    for name, weight in weights.items():
        assert torch.allclose(weight, torch.full_like(weight, 2 ** -0.5 if name.startswith("layer3") else 1.0)), name
    outputs = _batch_norm_outputs(clip, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    for name in weights:
        assert outputs[name].std().item() > 0.2, name


def test_vit_keeps_open_clip_init_at_unit_scale(tiny_vit):
    """A ViT has no BatchNorm: nothing is re-initialized, and LayerNorm keeps its tokens at unit scale."""
    assert not any("BatchNorm" in note for note in tiny_vit.notes)
    spec = resolve_layer(tiny_vit, "image_resblock_1")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        act = forward_to(tiny_vit.model, tiny_vit.normalize(images), [spec])[spec.name]
    assert 0.3 < act.std().item() < 10
    assert np.isfinite(act.numpy()).all()
