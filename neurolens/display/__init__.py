"""Drawing: Microscope-style unit panels, grids and the helpers they share (crops, tiles, text)."""
