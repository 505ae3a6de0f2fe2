"""neurolens layers"""
from __future__ import annotations

import typer

from .app import CheckpointOpt, DeviceOpt, JsonOpt, ModelOpt, PretrainedOpt, app, command, open_model, print_json
from ..models import DEFAULT_MODEL, registry_for


@app.command("layers")
@command
def layers(
    model: ModelOpt = DEFAULT_MODEL,
    pretrained: PretrainedOpt = "none",
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """List a model's layers: name, aliases, module path, channels and spatial size at its input resolution.

    Layer names do not depend on the weights, so this uses random weights unless told otherwise.

    Example:  neurolens layers --model RN50x4
    """
    clip = open_model(model, pretrained, checkpoint, device, quiet=True)
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
