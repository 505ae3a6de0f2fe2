"""Layer names <-> module paths, capture points and the early stop."""
import pytest
import torch

from neurolens.errors import UnitOutOfRangeError, UnknownLayerError
from neurolens.activations.hooks import capture, forward_to, hook_count
from neurolens.models.layer_table import check_unit
from neurolens.models.layers import registry_for


def test_rn50x4_image_block_4_5_is_the_pre_relu_sum(rn50x4):
    registry = registry_for(rn50x4)
    spec = registry.resolve("image_block_4_5")
    assert (spec.channels, spec.height, spec.width) == (2560, 9, 9)
    assert spec.module == "visual.layer4.5"
    stages = [len(getattr(rn50x4.model.visual, f"layer{s}")) for s in range(1, 5)]
    assert stages == [4, 6, 10, 6] and rn50x4.image_size == 288
    x = rn50x4.normalize(torch.rand(1, 3, 288, 288))
    pre = forward_to(rn50x4.model, x, [spec])["image_block_4_5"]
    assert pre.shape == (1, 2560, 9, 9)
    assert (pre < 0).any(), "pre-ReLU values must include negatives"
    post = forward_to(rn50x4.model, x, [registry.resolve("image_block_4_5_relu")])["image_block_4_5_relu"]
    assert torch.allclose(post, pre.clamp(min=0), atol=1e-5)
    for alias in ("image_block_4_5_Add_6_0", "visual.layer4.5"):
        assert registry.resolve(alias) == spec
        same = forward_to(rn50x4.model, x, [registry.resolve(alias)])[spec.name]
        assert torch.equal(same, pre)
    assert hook_count(rn50x4.model) == 0


def test_forward_stops_after_deepest_layer(tiny_clip):
    registry = registry_for(tiny_clip)
    calls = []
    handle = tiny_clip.model.visual.attnpool.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = forward_to(tiny_clip.model, torch.rand(1, 3, 64, 64),
                         [registry.resolve("image_block_2_0"), registry.resolve("image_block_4_0")])
    finally:
        handle.remove()
    assert set(out) == {"image_block_2_0", "image_block_4_0"} and not calls
    assert hook_count(tiny_clip.model) == 0


def test_hooks_removed_on_error(tiny_clip):
    spec = registry_for(tiny_clip).resolve("image_block_3_0")
    with pytest.raises(RuntimeError):
        with capture(tiny_clip.model, [spec]):
            tiny_clip.model.visual(torch.rand(1, 5, 64, 64))  # wrong channel count
    assert hook_count(tiny_clip.model) == 0


def test_unknown_layer_names_closest(tiny_clip):
    with pytest.raises(UnknownLayerError, match="image_block_4_0"):
        registry_for(tiny_clip).resolve("image_block_4_1")


def test_unit_out_of_range_gives_range(tiny_clip):
    spec = registry_for(tiny_clip).resolve("image_block_4_0")
    check_unit(spec, spec.channels - 1)
    with pytest.raises(UnitOutOfRangeError, match=f"0 to {spec.channels - 1}"):
        check_unit(spec, spec.channels)


def test_dotted_path_and_embedding(tiny_clip):
    registry = registry_for(tiny_clip)
    conv = registry.resolve("visual.layer2.0.conv1")
    assert conv.channels == 32
    emb = registry.resolve("image_embedding")
    x = tiny_clip.normalize(torch.rand(2, 3, 64, 64))
    out = forward_to(tiny_clip.model, x, [emb])["image_embedding"]
    assert torch.allclose(out, tiny_clip.model.encode_image(x), atol=1e-5)


def test_vit_tokens_become_a_grid(tiny_vit):
    spec = registry_for(tiny_vit).resolve("image_resblock_1")
    assert (spec.channels, spec.height, spec.width) == (32, 4, 4)
    out = forward_to(tiny_vit.model, torch.rand(1, 3, 32, 32), [spec])[spec.name]
    assert out.shape == (1, 32, 4, 4)
