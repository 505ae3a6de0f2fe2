"""neurolens layers"""
from __future__ import annotations

import typer

from .app import app, command, print_json
from .options import MODEL, JsonOpt, ModelChoice, uses


@app.command("layers", short_help="A model's layer names, module paths, channels and spatial sizes.")
@command
@uses(model=MODEL.with_defaults(pretrained="none", device="cpu"))
def layers(
    model: ModelChoice = None,
    as_json: JsonOpt = False,
) -> None:
    """List a model's layers: name, aliases, module path, channels and spatial size at its input resolution.

    Layer names do not depend on the weights, so this uses random weights unless told otherwise.

    Example:  neurolens layers --model RN50x4
    """
    from ..models.layers import registry_for  # lazy: keeps `neurolens --help` free of torch
    clip = model.load(quiet=True, card=False)
    rows = [dict(name=s.name, aliases=list(s.aliases), module=s.module, channels=s.channels,
                 height=s.height, width=s.width) for s in registry_for(clip).layers]
    if as_json:
        print_json(rows)
        return
    typer.echo(f"{clip.name} ({clip.image_size} px input)")
    typer.echo(f"{'name':<26}{'module':<24}{'channels':>9}  {'size':<7} aliases")
    for row in rows:
        size = f"{row['height']}x{row['width']}"
        typer.echo(f"{row['name']:<26}{row['module']:<24}{row['channels']:>9}  {size:<7} {', '.join(row['aliases'])}")
