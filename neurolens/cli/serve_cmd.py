"""neurolens serve, neurolens site, neurolens maps"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from .app import CacheOpt, CheckpointOpt, DeviceOpt, JsonOpt, app, command, open_model, print_json, progress_bar

LayersOpt = Annotated[Optional[List[str]], typer.Option(
    "--layer", help="Only this layer (repeatable; a layer name, or a layer id from the home page). Default: all.")]


@app.command("serve")
@command
def serve(
    cache: CacheOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but 127.0.0.1 / localhost / "
                                                     "::1 needs a token (generated unless --token).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port; 0 picks a free one (printed).")] = 8765,
    token: Annotated[Optional[str], typer.Option("--token", help="Require this token (query ?token=, cookie or "
                                                                 "'Authorization: token ...').")] = None,
    no_token: Annotated[bool, typer.Option("--no-token", help="Serve a non-loopback --host without a token "
                                                              "(prints a warning).")] = False,
    no_reveal: Annotated[bool, typer.Option("--no-reveal", help="Turn off per-image reveals: raw pixels are "
                                                                "never sent.")] = False,
    layer: LayersOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Load this open_clip model for live probes "
                                                                 "(test an image on a unit).")] = None,
    pretrained: Annotated[str, typer.Option("--pretrained", help="Pretrained tag of --model ('none': random "
                                                                 "weights).")] = "openai",
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """A local web app over the cache: every layer, every unit (sorted by NSFW evidence), each unit's feature
    visualizations, top dataset examples with where the unit fired, activation histogram, top texts and
    NSFW evidence. Every image is blurred; one image at a time can be revealed on purpose (a click, then a
    confirmation) unless --no-reveal. With --model or --checkpoint it also answers live probes. Prints
    `serving http://...` once it accepts connections; Ctrl-C stops it.

    Example:  neurolens serve --cache outputs/cache
    Example:  neurolens serve --checkpoint toy.pt --port 0 --no-reveal
    """
    from ..serve.server import serve as run_server
    from ..store import Cache

    clip = open_model(model or "RN50x4", pretrained, checkpoint, device) if (model or checkpoint) else None
    run_server(Cache(cache), host=host, port=port, token=token, no_token=no_token, reveal=not no_reveal,
               clip=clip, layers=layer or (), announce=lambda line: typer.echo(line),
               warn=lambda line: typer.echo(line, err=True))


@app.command("site")
@command
def site(
    out: Annotated[str, typer.Option("--out", help="Folder to write the site into (index.html at its top).")] = "outputs/site",
    layer: LayersOpt = None,
    examples: Annotated[int, typer.Option("--examples", help="Dataset examples per unit page.")] = 16,
    force: Annotated[bool, typer.Option("--force", help="Write the site again even if it was made from the "
                                                        "same records.")] = False,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The web app's pages as static files, with blurred images only and no reveal: share them or host them
    anywhere; they open from file:// too.

    Example:  neurolens site --out outputs/site
    Example:  neurolens site --out site/ --layer image_block_4_5 --examples 32
    """
    from ..serve.site import write_site
    from ..store import Cache

    with progress_bar("site", enabled=not as_json) as progress:
        result = write_site(Cache(cache), out, layers=layer or (), examples=examples, progress=progress,
                            force=force)
    if as_json:
        print_json({"index": str(result.index), "layers": result.layers, "pages": result.pages,
                    "images": result.images, "cached": result.cached})
        return
    if result.cached:
        typer.echo(f"up to date (made from the same records; --force writes it again): {result.index}")
        return
    typer.echo(f"wrote {result.pages} pages and {result.images} blurred images for {result.layers} layer(s): "
               f"{result.index}")


@app.command("maps")
@command
def maps(
    layer: Annotated[str, typer.Option("--layer", help="Layer whose scan to complete.")] = "image_block_4_5",
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="The scanned dataset (default: the newest cached scan of the layer, whose images are "
                          "found again from its record).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="The scan's top-k (with --dataset).")] = 32,
    model: Annotated[str, typer.Option("--model", help="open_clip model name.")] = "RN50x4",
    pretrained: Annotated[str, typer.Option("--pretrained", help="open_clip pretrained tag, or 'none'.")] = "openai",
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "auto",
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store the activation maps of every unit's top-k dataset images (one forward per distinct image), so
    `serve` and `site` draw where each unit fired without a model.

    Example:  neurolens maps --layer image_block_4_5
    Example:  neurolens maps --checkpoint toy.pt --layer image_block_4_0 --dataset pairs.parquet
    """
    from ..pipelines.scan import find_scan
    from ..pipelines.topmaps import run_top_maps
    from ..errors import NeurolensError
    from ..store import Cache

    clip = open_model(model, pretrained, checkpoint, device, quiet=as_json)
    store = Cache(cache)
    scan = None
    if dataset is not None:
        scan = find_scan(clip, layer, dataset, top_k=top_k, cache=store)
        if scan is None:
            raise NeurolensError(f"no finished scan of {layer} over {dataset} (top-k {top_k}) with these weights; "
                                 f"run `neurolens scan` first")
    with progress_bar("maps", enabled=not as_json) as progress:
        result = run_top_maps(clip, layer, scan=scan, cache=store, progress=progress)
    summary = {"record": str(result.path), "images": result.images, "unreadable": result.unreadable,
               "mismatched": result.mismatched, "cached": result.cached}
    if as_json:
        print_json(summary)
        return
    typer.echo(f"{'cached' if result.cached else 'stored'}: activation maps of {result.images} images "
               f"-> {Path(result.path)}")
    if result.unreadable or result.mismatched:
        typer.echo(f"warning: {result.unreadable} image(s) unreadable and {result.mismatched} map(s) whose peak "
                   f"differs from the scan: the dataset changed since the scan; rerun the scan with --force",
                   err=True)
