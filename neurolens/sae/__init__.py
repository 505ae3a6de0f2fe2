"""Sparse autoencoders over a CLIP layer: TopK and BatchTopK SAE training that streams activations from the model,
SAELens-layout I/O, and the "basis" that lets scan, visualize, text, sweep, figure, grid and serve treat
SAE features exactly like neurons.

    from neurolens.sae.basis import load_basis
    basis = load_basis(clip, "image_block_4_5", "my-sae")   # or a path, or None for the neurons
    run_scan(clip, layer, dataset, basis=basis)               # features' top images (neurons in the same pass)
"""
