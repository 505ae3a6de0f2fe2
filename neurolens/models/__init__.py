"""Model loading and layer names."""
from .layers import LayerRegistry, check_unit, registry_for, resolve_layer
from .load import DEFAULT_MODEL, DEFAULT_PRETRAINED, LoadedClip, load_clip, read_checkpoint, save_checkpoint

__all__ = ["LayerRegistry", "check_unit", "registry_for", "resolve_layer", "DEFAULT_MODEL",
           "DEFAULT_PRETRAINED", "LoadedClip", "load_clip", "read_checkpoint", "save_checkpoint"]
