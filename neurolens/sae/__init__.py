"""Sparse autoencoders over a CLIP layer: TopK and BatchTopK SAE training that streams activations from the model,
SAELens-layout I/O, and the "basis" that lets scan, visualize, text, sweep, figure, grid and serve treat
SAE features exactly like neurons.

    from neurolens.sae import load_basis
    basis = load_basis(clip, "image_block_4_5", "my-sae")   # or a path, or None for the neurons
    run_scan(clip, layer, dataset, basis=basis)               # features' top images (neurons in the same pass)
"""
from .basis import NeuronBasis, SaeBasis, available_bases, is_neurons, load_basis
from .io import load_sae, save_sae
from .model import SaeConfig, SparseAutoencoder
from .registry import list_saes, locate
from .train import SaeTrainSettings

__all__ = ["load_basis", "available_bases", "NeuronBasis", "SaeBasis", "is_neurons", "load_sae", "save_sae", "SaeConfig",
           "SparseAutoencoder", "list_saes", "locate", "SaeTrainSettings"]
