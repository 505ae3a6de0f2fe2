"""Models: build (LoadedClip, load_clip), pretrained (hub cache, download, offline checks), checkpoint (the one
reader and writer of weights files), layers (Microscope's layer names), random_init, resize, embed."""
