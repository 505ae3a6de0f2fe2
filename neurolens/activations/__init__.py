"""Activations of a layer: hooks that capture them, the truncated forward, and the streaming statistics of a scan."""
