"""Sparse autoencoders over a CLIP layer: TopK SAE training that streams activations from the model,
SAELens-layout I/O, and the "basis" that lets scan, visualize, text, sweep, figure, grid and serve treat
SAE features exactly like neurons."""
