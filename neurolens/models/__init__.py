"""Models: build (LoadedClip, load_clip), pretrained (hub cache, download, offline checks), checkpoint (the one
reader and writer of weights files), layers (Microscope's layer names), random_init, resize, embed."""
from .build import DEFAULT_MODEL, DEFAULT_PRETRAINED, LoadedClip, load_clip
from .checkpoint import read_checkpoint, save_checkpoint
from .layers import LayerRegistry, check_unit, registry_for, resolve_layer

__all__ = ["LayerRegistry", "check_unit", "registry_for", "resolve_layer", "DEFAULT_MODEL",
           "DEFAULT_PRETRAINED", "LoadedClip", "load_clip", "read_checkpoint", "save_checkpoint"]
