"""neurolens maps, neurolens serve, neurolens site"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from ..errors import NeurolensError
from ..models.names import DEFAULT_MODEL
from ..storage.cache import Cache
from .app import app, command, open_basis, print_json, progress_bar
from .options import MODEL, CacheOpt, ForceOpt, JsonOpt, LayerOpt, ModelChoice, SaeOpt, TopKOpt, uses

LayersOpt = Annotated[Optional[List[str]], typer.Option(
    "--layer", help="Only this layer (repeatable; a layer name, or a layer id from the home page). Default: all.")]
BasesOpt = Annotated[Optional[List[str]], typer.Option(
    "--basis", help="Only this basis of each layer (repeatable): 'neurons', or the name of an SAE whose features "
                    "have cached results. Default: every basis.")]
# serve loads a model only when asked to (for live probes): --model has no default there
PROBE_MODEL = MODEL.replace(model=(Annotated[Optional[str], typer.Option(
    "--model", help="Load this open_clip model for live probes (test an image on a unit); with --checkpoint "
                    "alone, the checkpoint's model.")], None))


@app.command("maps", short_help="Store where each unit fired on its top-k images, for serve and site.")
@command
@uses(model=MODEL)
def maps(
    layer: LayerOpt = "image_block_4_5",
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="The scanned dataset (default: the newest cached scan of the layer, whose images are "
                          "found again from its record).")] = None,
    top_k: TopKOpt = 32,
    sae: SaeOpt = None,
    model: ModelChoice = None,
    force: ForceOpt = False,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store the activation maps of every unit's top-k dataset images (one forward per distinct image), so
    `serve` and `site` draw where each unit fired without a model. --top-k (with --dataset) names the scan.
    With --sae, the maps of that SAE's features on their own top images (the SAE applied to every cell),
    from the feature scan (`neurolens scan --sae`).

    Example:  neurolens maps --layer image_block_4_5
    Example:  neurolens maps --layer image_block_4_5 --sae rn8x
    Example:  neurolens maps --checkpoint toy.pt --layer image_block_4_0 --dataset pairs.parquet
    """
    from ..pipelines.scan_find import find_scan  # lazy: keeps `neurolens --help` free of torch
    from ..pipelines.topmaps import run_top_maps  # lazy: keeps `neurolens --help` free of torch

    clip = model.load(quiet=as_json, cache=cache)
    store = Cache(cache)
    basis = open_basis(clip, layer, sae, store)
    option = f" --sae {sae}" if sae else ""
    scan = None
    if dataset is not None:
        scan = find_scan(clip, layer, dataset, top_k=top_k, cache=store, basis=basis)
        if scan is None:
            raise NeurolensError(f"no finished scan of {layer}{option} over {dataset} (top-k {top_k}) with these "
                                 f"weights; run `neurolens scan --layer {layer}{option}` first")
    with progress_bar("maps", enabled=not as_json) as progress:
        result = run_top_maps(clip, layer, scan=scan, cache=store, force=force, progress=progress, basis=basis)
    summary = {"record": str(result.path), "images": result.images, "unreadable": result.unreadable,
               "mismatched": result.mismatched, "cached": result.cached, "basis": basis.id}
    if as_json:
        print_json(summary)
        return
    what = "units" if sae is None else f"features of SAE {basis.name}"
    typer.echo(f"{'cached' if result.cached else 'stored'}: activation maps of the {what}' top images "
               f"({result.images} images) -> {Path(result.path)}")
    if result.unreadable or result.mismatched:
        typer.echo(f"warning: {result.unreadable} image(s) unreadable and {result.mismatched} map(s) whose peak "
                   f"differs from the scan: the dataset changed since the scan; rerun the scan with --force",
                   err=True)


@app.command("serve", short_help="Browse the cache in a local web app: every unit, blurred, reveal on purpose.")
@command
@uses(model=PROBE_MODEL)
def serve(
    cache: CacheOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but 127.0.0.1 / localhost / "
                                                     "::1 needs a token (generated unless --token).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port; 0 picks a free one (printed).")] = 8765,
    token: Annotated[Optional[str], typer.Option("--token", help="Require this token (query ?token=, cookie or "
                                                                 "'Authorization: token ...').")] = None,
    no_token: Annotated[bool, typer.Option("--no-token", help="Serve a non-loopback --host without a token "
                                                              "(prints a warning; the Host check stays on).")] = False,
    require_token: Annotated[bool, typer.Option("--require-token", help="Generate a token even on 127.0.0.1: on a "
                                                "shared machine every local user can reach a loopback port "
                                                "(docs/security.md).")] = False,
    allow_host: Annotated[Optional[List[str]], typer.Option(
        "--allow-host", help="A host name requests may name besides IP addresses, loopback names and --host "
                             "(repeatable; the Host check stops DNS rebinding).")] = None,
    no_reveal: Annotated[bool, typer.Option("--no-reveal", help="Turn off per-image reveals: raw pixels are "
                                                                "never sent.")] = False,
    layer: LayersOpt = None,
    basis: BasesOpt = None,
    model: ModelChoice = None,
) -> None:
    """A local web app over the cache: every layer, every unit (sorted by NSFW evidence), each unit's feature
    visualizations, top dataset examples with where the unit fired, activation histogram, top texts and
    NSFW evidence. The features of every SAE with cached results (`neurolens sweep --sae NAME`) get the same
    pages, one basis switch away from the layer's neurons (--basis picks some). Every image is blurred; one
    image at a time can be revealed on purpose (a click, then a confirmation) unless --no-reveal. With
    --model or --checkpoint it also answers live probes (of features too: the SAE is loaded by its name).
    Prints `serving http://...` once it accepts connections; Ctrl-C stops it.

    Example:  neurolens serve --cache outputs/cache
    Example:  neurolens serve --checkpoint toy.pt --port 0 --no-reveal
    Example:  neurolens serve --layer image_block_4_5 --basis rn8x
    Example:  neurolens serve --require-token        (a shared machine: other local users get 403)
    """
    from ..serve.server import serve as run_server  # lazy: keeps `neurolens --help` free of torch

    clip = None
    if model.model or model.checkpoint:
        # the web app never writes to the cache (no model card either); probes need the whole model anyway
        clip = replace(model, model=model.model or DEFAULT_MODEL).load(card=False)
    run_server(Cache(cache), host=host, port=port, token=token, no_token=no_token, reveal=not no_reveal,
               clip=clip, layers=layer or (), bases=basis or (), announce=lambda line: typer.echo(line),
               warn=lambda line: typer.echo(line, err=True), require_token=require_token,
               allow_hosts=allow_host or ())


@app.command("site", short_help="The web app's pages as static files: blurred images only, opens from file://.")
@command
def site(
    out: Annotated[str, typer.Option("--out", help="Folder to write the site into (index.html at its top).")] = "outputs/site",
    layer: LayersOpt = None,
    basis: BasesOpt = None,
    examples: Annotated[int, typer.Option("--examples", help="Dataset examples per unit page.")] = 16,
    force: ForceOpt = False,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The web app's pages as static files, with blurred images only and no reveal: share them or host them
    anywhere; they open from file:// too. SAE features get pages as in `serve`; --basis picks the bases (a
    site of an 8x SAE on RN50x4's image_block_4_5 has 20480 feature pages). A site made from the same
    records is left as it is (--force).

    Example:  neurolens site --out outputs/site
    Example:  neurolens site --out site/ --layer image_block_4_5 --examples 32
    Example:  neurolens site --out site/ --layer image_block_4_5 --basis neurons --basis rn8x
    """
    from ..serve.site import write_site  # lazy: keeps `neurolens --help` free of torch

    with progress_bar("site", enabled=not as_json) as progress:
        result = write_site(Cache(cache), out, layers=layer or (), examples=examples, progress=progress,
                            force=force, bases=basis or ())
    if as_json:
        print_json({"index": str(result.index), "layers": result.layers, "pages": result.pages,
                    "images": result.images, "cached": result.cached})
        return
    if result.cached:
        typer.echo(f"up to date (made from the same records; --force writes it again): {result.index}")
        return
    typer.echo(f"wrote {result.pages} pages and {result.images} blurred images for {result.layers} layer(s): "
               f"{result.index}")

