"""Dataset samples of one unit: its top images from the cached scan (scanning first if needed) and a PNG
grid of crops centred on the cell where the unit fired hardest, labelled with rank and activation.

Blur: the blur policy (neurolens.labels.policy) judges each crop's whole source image and blurs the crop
before it is tiled: the unit is flagged in a cached sweep of the layer, NudeNet fires, or a trained model's
zero-shot score passes the threshold; an image nothing could judge is blurred too. blur=False writes raw
pixels to a *_noblur.png file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

from ..datasets.decode import BadImage, preprocess
from ..datasets.open import open_dataset
from ..datasets.types import ImageDataset
from ..display.figures import crop_around_cell, tile_grid
from ..errors import NeurolensError
from ..labels.policy import BlurPolicy, blur_note
from ..models.layer_table import check_unit, resolve_layer
from ..records.keys import as_basis
from ..records.scan import ScanResult
from ..records.visualize import unit_tag
from ..storage.files import save_png
from .scan_find import check_scan_options, find_scan

CROP_PIXELS = 128
GRID_COLUMNS = 8


@dataclass
class UnitSamples:
    layer: str
    unit: int
    rows: List[dict]                   # {unit, rank, score, path, cell: [row, col]} best first
    scan: ScanResult
    image_path: Optional[Path] = None
    blurred: List[bool] = field(default_factory=list)
    blur_note: str = ""


def unit_rows(scan: ScanResult, unit: int, count: Optional[int] = None) -> List[dict]:
    """The unit's top images as JSON-able rows (rank 1 = highest spatial-max activation)."""
    rows = []
    limit = scan.top_k if count is None else min(int(count), scan.top_k)
    for rank in range(limit):
        index = int(scan.top_indices[unit, rank])
        if index < 0:
            break
        row, col = (int(v) for v in scan.top_cells[unit, rank])
        rows.append({"unit": int(unit), "rank": rank + 1, "score": float(scan.top_values[unit, rank]),
                     "path": scan.keys[index], "cell": [row, col], "index": index})
    return rows


def unit_crops(clip, dataset: ImageDataset, scan: ScanResult, rows: List[dict], crop_pixels: int = CROP_PIXELS
               ) -> "tuple[List, List]":
    """(the model's view of each row's image, the crop centred on the row's cell) for unit_rows' rows."""
    sources, crops = [], []
    for row in rows:
        try:
            source = preprocess(dataset.load(row["index"]), clip.image_size)
        except BadImage as exc:  # changed on disk since the scan (the identity check makes this rare)
            raise NeurolensError(f"{row['path']} can no longer be read ({exc}); rerun the scan with --force") from None
        sources.append(source)
        crops.append(crop_around_cell(source, row["cell"], scan.grid, crop_pixels))
    return sources, crops


def run_samples(clip, layer: str, unit: int, dataset: Union[ImageDataset, str, None] = None, top_k: int = 32,
                show: Optional[int] = None, out: Union[str, Path, None] = None, blur: bool = True,
                figure: bool = True, cache=None, batch_size: Optional[int] = None, workers: Optional[int] = None,
                precision: str = "fp32", progress: Optional[Callable[[int, int], None]] = None,
                crop_pixels: int = CROP_PIXELS, policy: Optional[BlurPolicy] = None, basis=None,
                decoder: str = "auto") -> UnitSamples:
    """The unit's top images (scanning the dataset first if the scan is not cached) and, with figure=True,
    a PNG grid at `out` (default outputs/samples/<layer>_unit<u>.png; with blur=False *_noblur.png).
    `policy` replaces the default BlurPolicy.for_layer(clip, layer, cache, blur).

    basis: None for neurons, or a basis of the layer (neurolens.sae.basis.load_basis): `unit` is then a feature, its
    crops are centred on the cell where the feature fired hardest, and the default file is
    outputs/samples/<layer>_sae-<name>_feature<F>.png. decoder: the scan's image decoder (run_scan)."""
    spec = resolve_layer(clip, layer)
    basis = as_basis(basis)
    if basis is None:
        check_unit(spec, unit)
    else:
        basis.check_unit(unit)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    check_scan_options(precision, top_k, batch_size, workers)
    scan = find_scan(clip, spec.name, dataset, top_k, precision, cache, basis=basis, decoder=decoder)
    if scan is None:
        from .scan import run_scan  # lazy: torch only to scan; a cached answer imports none
        scan = run_scan(clip, spec.name, dataset, top_k=top_k, batch_size=batch_size, workers=workers, cache=cache,
                        precision=precision, progress=progress, basis=basis, decoder=decoder)
    elif progress:
        progress(len(dataset), len(dataset))
    rows = unit_rows(scan, unit, show)
    result = UnitSamples(spec.name, int(unit), rows, scan)
    if not figure or not rows:
        return result

    sources, crops = unit_crops(clip, dataset, scan, rows, crop_pixels)
    policy = policy or BlurPolicy.for_layer(clip, spec.name, cache, blur=blur, basis=basis)
    reasons = [policy.reason_image(unit, row["index"], source) for row, source in zip(rows, sources)]
    crops = [policy.apply(crop, reason) for crop, reason in zip(crops, reasons)]
    result.blurred = [reason is not None for reason in reasons]
    result.blur_note = blur_note(reasons, policy.blur)
    labels = [f"#{r['rank']}  {r['score']:.3g}" for r in rows]
    label = f"unit {unit}" if basis is None else basis.label(unit)
    tag = unit_tag(unit, basis)
    title = f"{clip.name} {spec.name} {label}: top {len(rows)} of {scan.count} images"
    grid = tile_grid(crops, labels, columns=min(GRID_COLUMNS, len(crops)), title=title)
    path = Path(out) if out else Path("outputs") / "samples" / f"{spec.name}_{tag}.png"
    result.image_path = save_png(grid, policy.output_path(path))
    return result
