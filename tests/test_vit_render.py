"""ViT towers at sizes other than their own: resized position embeddings, and the default render on a ViT
at its own 224 px / patch 32 input, with the low-resolution steps really taken."""
import numpy as np
import pytest
import torch

from neurolens.activations.hooks import forward_to, hook_count
from neurolens.models.build import load_clip
from neurolens.models.layer_table import resolve_layer
from neurolens.models.resize import any_input_size, resize_positions
from neurolens.optvis.loop import evaluate, low_res_size, render
from neurolens.types import RenderSettings


@pytest.fixture(scope="module")
def vit224():
    """nl-tiny-ViT-224: the patch grid of ViT-B/32 (224 px, patch 32: 7x7 patches) in a 2-layer, 32-wide tower."""
    return load_clip("nl-tiny-ViT-224", "none", device="cpu")


def test_resize_positions_keeps_prefix_and_native_grid():
    table = torch.randn(1 + 7 * 7, 8, generator=torch.Generator().manual_seed(0))
    same = resize_positions(table, (7, 7), (7, 7))
    assert torch.allclose(same, table, atol=1e-5)
    smaller = resize_positions(table, (7, 7), (4, 4))
    assert smaller.shape == (1 + 16, 8) and torch.equal(smaller[0], table[0])
    flat = resize_positions(torch.ones(1 + 49, 3), (7, 7), (3, 3))
    assert torch.allclose(flat, torch.ones(1 + 9, 3), atol=1e-5)


def test_vit_runs_at_another_size_only_inside_the_block(vit224):
    visual = vit224.model.visual
    original = visual.positional_embedding
    spec = resolve_layer(vit224, "image_resblock_1")
    images = vit224.normalize(torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(RuntimeError):
        forward_to(vit224.model, images, [spec])
    with any_input_size(vit224.model):
        acts = forward_to(vit224.model, images, [spec])[spec.name]
        native = forward_to(vit224.model, vit224.normalize(torch.rand(1, 3, 224, 224)), [spec])[spec.name]
    assert acts.shape == (2, 32, 4, 4) and native.shape == (1, 32, 7, 7)
    assert torch.isfinite(acts).all()
    assert visual.positional_embedding is original and tuple(visual.grid_size) == (7, 7)
    assert hook_count(vit224.model) == 0


def test_resnet_attention_pool_runs_at_another_size(tiny_clip):
    """The embedding of a ResNet goes through its attention pool, whose positions are learned per cell too."""
    spec = resolve_layer(tiny_clip, "image_embedding")
    images = tiny_clip.normalize(torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2)))
    with any_input_size(tiny_clip.model):
        embedding = forward_to(tiny_clip.model, images, [spec])[spec.name]
    assert embedding.shape == (2, 32) and torch.isfinite(embedding).all()
    assert hook_count(tiny_clip.model) == 0


def test_default_render_on_a_vit_at_its_own_size_and_another(vit224, natural_images):
    """RenderSettings() as users get it, on a 224 px / patch 32 ViT (a 7x7 grid, which half resolution would
    make 4x4 or 3x3): ViTs take every step at full size (the low-resolution steps did not pay on ViT-B/32,
    see render.low_res_size), and the result beats natural images. At --size 128 the positions are resized."""
    settings = RenderSettings()
    spec = resolve_layer(vit224, "image_resblock_1")
    assert settings.low_res_fraction > 0 and low_res_size(vit224, spec, 224, settings.low_res_scale) == 0
    grids = []
    handle = vit224.model.visual.conv1.register_forward_hook(lambda m, a, out: grids.append(tuple(out.shape[-2:])))
    try:
        output = render(vit224, spec, [3, 17], settings)
        first = len(grids)
        small = render(vit224, spec, [3], RenderSettings(steps=4, size=128))
    finally:
        handle.remove()
    assert first >= settings.steps and set(grids[:first]) == {(7, 7)}
    assert set(grids[first:]) == {(4, 4)}
    natural = torch.nn.functional.interpolate(natural_images, size=(224, 224), mode="bilinear", align_corners=False)
    for index, unit in enumerate([3, 17]):
        best_natural = evaluate(vit224, spec, "channel", [unit] * len(natural), natural).max().item()
        assert output.activations[index] > best_natural, unit
    assert np.isfinite(output.curve).all() and output.images.shape == (2, 224, 224, 3)
    assert small.images.shape == (1, 128, 128, 3) and np.isfinite(small.activations).all()
    assert hook_count(vit224.model) == 0 and tuple(vit224.model.visual.grid_size) == (7, 7)
