"""Sequence-first transformers: open_clip before 2.26 (and any transformer built with batch_first=False)
hands (L, N, D) tokens to its blocks, and before 2.26 the transformer itself takes and returns (L, N, D).
Feature maps, injections and truncated text encodings must not depend on that layout."""
import copy

import numpy as np
import torch

from neurolens.text import encode as textlib
from neurolens.activations.hooks import forward_to, inject, sequence_first
from neurolens.models.layers import registry_for


def _sequence_first_inside(model: torch.nn.Module, transformer_path: str) -> torch.nn.Module:
    """A copy of `model` whose transformer at `transformer_path` runs its blocks on (L, N, D), as open_clip
    does when built with batch_first=False (its interface stays batch-first)."""
    model = copy.deepcopy(model)
    transformer = model.get_submodule(transformer_path)
    transformer.batch_first = False
    for module in transformer.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.batch_first = False
    return model


class LegacyTransformer(torch.nn.Module):
    """open_clip < 2.26's Transformer: no batch_first attribute, takes and returns (L, N, D)."""

    def __init__(self, modern: torch.nn.Module):
        super().__init__()
        self.resblocks = modern.resblocks
        self.width, self.layers = modern.width, modern.layers
        for module in self.resblocks.modules():
            if isinstance(module, torch.nn.MultiheadAttention):
                module.batch_first = False

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


def test_layout_detection(tiny_vit):
    model = tiny_vit.model
    legacy_open_clip = not hasattr(model.visual.transformer, "batch_first")   # open_clip < 2.26
    assert sequence_first(model, "visual.transformer.resblocks.1") == legacy_open_clip
    assert not sequence_first(model, "visual.ln_pre")
    legacy = copy.deepcopy(model)
    legacy.visual.transformer = LegacyTransformer(legacy.visual.transformer)
    assert sequence_first(legacy, "visual.transformer.resblocks.0")
    assert sequence_first(legacy, "visual.transformer")          # takes and returns (L, N, D)
    if not legacy_open_clip:
        inner = _sequence_first_inside(model, "visual.transformer")
        assert sequence_first(inner, "visual.transformer.resblocks.1")
        assert not sequence_first(inner, "visual.transformer")   # its interface is still batch-first


def test_vit_feature_maps_and_injection_are_layout_independent(tiny_vit):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    spec = registry_for(tiny_vit).resolve("image_resblock_0")
    flipped = _sequence_first_inside(tiny_vit.model, "visual.transformer")
    with torch.no_grad():
        reference_embedding = tiny_vit.model.visual(images)
        assert torch.allclose(flipped.visual(images), reference_embedding, atol=1e-5)  # same network
        reference = forward_to(tiny_vit.model, images, [spec])[spec.name]
        ours = forward_to(flipped, images, [spec])[spec.name]
    assert ours.shape == (3, 32, 4, 4)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    # injecting a layer's own feature map back is a no-op; a changed map changes the output (noise, not a
    # scale: the next block's LayerNorm would hide a scale from the class token)
    with torch.no_grad(), inject(flipped, spec, ours):
        assert torch.allclose(flipped.visual(images), reference_embedding, atol=1e-5)
    with torch.no_grad(), inject(flipped, spec, ours + torch.randn_like(ours)):
        assert not torch.allclose(flipped.visual(images), reference_embedding, atol=1e-3)


def test_truncated_text_encoding_with_a_legacy_sequence_first_transformer(tiny_clip):
    texts = ["a photo of a dog", "red", "a very long caption " * 5]
    tokens = textlib.tokenize(tiny_clip, texts)
    positions = textlib.pool_positions(tiny_clip.model, tokens)
    legacy = copy.deepcopy(tiny_clip.model)
    legacy.transformer = LegacyTransformer(legacy.transformer)
    with torch.no_grad():
        reference = tiny_clip.model.encode_text(tokens)
        ours = textlib.encode_tokens_truncated(legacy, tokens, positions)
        modern = textlib.encode_tokens_truncated(tiny_clip.model, tokens, positions)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=1e-4)
    np.testing.assert_allclose(modern.numpy(), reference.numpy(), atol=1e-4)
