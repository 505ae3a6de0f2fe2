"""The cached scan of a request, and the checks of a scan's options (light: no torch, so that a cached answer
imports none; neurolens.pipelines.scan computes what the cache lacks)."""
from __future__ import annotations

from typing import Optional, Union

from ..datasets.decode import resolve_decoder
from ..datasets.open import open_dataset
from ..datasets.types import ImageDataset
from ..errors import NeurolensError
from ..models.layer_table import resolve_layer
from ..records import scan as scan_records
from ..records.keys import as_basis, as_cache
from ..records.scan import ScanResult
from ..types import PRECISIONS


def check_scan_options(precision: str, top_k: int, batch_size: Optional[int] = None,
                       workers: Optional[int] = None) -> None:
    """One line (NeurolensError) for a scan option out of range, before anything is read or computed."""
    if precision not in PRECISIONS:
        raise NeurolensError(f"unknown precision {precision!r}; use fp32 or bf16")
    if int(top_k) < 1:
        raise NeurolensError(f"--top-k must be at least 1, got {top_k}")
    if batch_size is not None and int(batch_size) < 1:
        raise NeurolensError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and int(workers) < 0:
        raise NeurolensError(f"--workers must be 0 or more, got {workers}")


def find_scan(clip, layer: str, dataset: Union[ImageDataset, str, None] = None, top_k: int = 32,
              precision: str = "fp32", cache=None, embeddings: bool = False, basis=None,
              decoder: str = "auto") -> Optional[ScanResult]:
    """The cached finished scan, or None. A scan with embeddings also answers a request without them.
    basis: None for the neurons, or a basis of the layer (neurolens.sae.basis.load_basis) for its units.
    decoder: the scan's image decoder (auto: what run_scan would use on the model's device)."""
    spec = resolve_layer(clip, layer)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    return scan_records.find_result(as_cache(cache), clip, spec, dataset, top_k, precision, embeddings, as_basis(basis),
                                    decoder=resolve_decoder(decoder, clip.device_type))
