"""The static site: the web app's pages as files, with blurred images only and no reveal, to share or host
anywhere. Links are relative and data sits inside the pages, so it opens from file:// as well. Nothing in it
names an absolute local path: pages name datasets and vocabularies by their last component (pages.public_text),
and site.json names the records it was made from by their path inside the cache."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import NeurolensError
from ..storage.cache import Cache
from ..storage.files import OUT_OPTION, write_bytes
from .images import LayerImages
from .layer import sae_candidates
from .pages import STATIC, Pages
from .server import select_layers

DEFAULT_EXAMPLES = 16
SITE_VERSION = 1
STAMP = "site.json"          # what the site was made from; an unchanged cache is not written again


@dataclass
class SiteResult:
    out: Path
    index: Path
    layers: int
    pages: int
    images: int
    cached: bool = False


def write_site(cache: Cache, out: str | os.PathLike, layers: Sequence[str] = (), examples: int = DEFAULT_EXAMPLES,
               progress: Optional[Callable[[int, int], None]] = None, force: bool = False,
               bases: Sequence[str] = ()) -> SiteResult:
    """Write every page of the chosen layers (default: all in the cache) and bases ("neurons" or SAE names;
    default: all) under `out`; returns what was written.

    examples: dataset examples per unit page (the layer's scan may hold more). A site made from the same
    records with the same settings (OUT/site.json) is left as it is unless force=True."""
    if examples < 1:
        raise NeurolensError(f"--examples must be at least 1, got {examples}")
    out = Path(out)
    chosen = select_layers(cache, layers, bases)
    stamp = _stamp(chosen, examples)
    previous = _read_stamp(out)
    if not force and previous is not None and previous.get("inputs") == stamp and (out / "index.html").is_file():
        total = sum(len(data.listed_units()) for data in chosen.values())
        if progress:
            progress(total, total)
        return SiteResult(out=out, index=out / "index.html", layers=len(chosen), pages=int(previous["pages"]),
                          images=int(previous["images"]), cached=True)
    images = {layer_id: LayerImages(data) for layer_id, data in chosen.items()}
    pages = Pages(chosen, mode="site", reveal=False, examples=examples, images=images)
    writer = _Writer(out)
    try:
        (out / STAMP).unlink(missing_ok=True)     # the site is complete again only when site.json is rewritten
    except OSError:
        pass
    for name, body in STATIC.items():
        writer.write(f"static/{name}", body)
    writer.write("index.html", pages.home().encode())
    writer.write("find.html", pages.find().encode())
    total = sum(len(data.listed_units()) for data in chosen.values())
    done = 0
    if progress:
        progress(0, total)
    for layer_id, data in chosen.items():
        layer_images = images[layer_id]
        writer.write(f"L/{layer_id}/index.html", pages.layer(layer_id).encode())
        index = pages.find_index(layer_id)
        if index is not None:
            writer.write(f"L/{layer_id}/find-index.js", index.encode())
        for unit in data.listed_units():
            writer.write(f"L/{layer_id}/u/{unit}.html", pages.unit(layer_id, unit).encode())
            writer.image(f"img/{layer_id}/tile/{unit}.jpg", layer_images.shown("tile", unit))
            for example in data.top_examples(unit, examples):
                rank = example["rank"]
                writer.image(f"img/{layer_id}/crop/{unit}-{rank}.jpg", layer_images.shown("crop", unit, rank))
            for number in range(len(data.visualizations(unit))):
                writer.image(f"img/{layer_id}/fv/{unit}-{number}.jpg", layer_images.shown("fv", unit, number))
            done += 1
            if progress:
                progress(done, total)
    writer.write(STAMP, json.dumps({"inputs": stamp, "pages": writer.pages, "images": writer.images}).encode(),
                 durable=True)
    return SiteResult(out=out, index=out / "index.html", layers=len(chosen), pages=writer.pages, images=writer.images)


def _stamp(chosen, examples: int) -> dict:
    """Every record the pages are made from (path, size, mtime), the SAE files whose decoders link features and
    neurons, the settings, and the package files."""
    inputs = [path for data in chosen.values() for paths in data.entry.paths.values() for path in paths]
    for data in chosen.values():
        for found in sae_candidates(data.cache, data.entry):
            inputs.extend(sorted(p for p in found.iterdir() if not p.name.startswith(".")) if found.is_dir()
                          else [found])
    root = Path(next(iter(chosen.values())).cache.root) if chosen else Path(".")
    records = sorted((_site_name(path, root), path.stat().st_size, path.stat().st_mtime_ns)
                     for path in inputs if path.is_file())
    package = resources.files("neurolens.serve")
    files = sorted((p.name, hashlib.sha1(p.read_bytes()).hexdigest()) for folder in ("templates", "static")
                   for p in (package / folder).iterdir())
    stamp = {"version": SITE_VERSION, "examples": int(examples), "layers": sorted(chosen), "records": records,
             "files": files}
    return json.loads(json.dumps(stamp))     # as it reads back from site.json (lists, not tuples)


def _site_name(path: Path, root: Path) -> str:
    """How site.json names an input: its path inside the cache, else its last two components (an SAE folder
    made elsewhere), never an absolute local path (the site is published)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(Path(path).parent.name) / Path(path).name)


def _read_stamp(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return None


class _Writer:
    """Writes the site's files whole (neurolens.storage.files: a full disk is one line, never half a file); the many
    pages and images skip fsync, site.json (written last) is durable and marks the site complete."""

    def __init__(self, out: Path):
        self.out, self.pages, self.images = out, 0, 0

    def write(self, relative: str, body: bytes, durable: bool = False) -> None:
        write_bytes(self.out / relative, body, OUT_OPTION, durable=durable)
        if relative.endswith(".html"):
            self.pages += 1

    def image(self, relative: str, body: Optional[bytes]) -> None:
        if body is not None:
            self.write(relative, body)
            self.images += 1
