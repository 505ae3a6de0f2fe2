"""The typer app and what every command shares: model options, one-line errors, progress, JSON output."""
from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import typer
from typing_extensions import Annotated

from ..errors import NeurolensError

app = typer.Typer(
    name="neurolens",
    help="A Microscope for CLIP models you run yourself: feature visualizations, dataset samples, "
         "text, NSFW unit sweeps and blurred figures, cached in HDF5.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by every command that loads a model.
ModelOpt = Annotated[str, typer.Option("--model", help="Any open_clip model name (neurolens also ships nl-tiny-RN, nl-toy-RN).")]
PretrainedOpt = Annotated[str, typer.Option(
    "--pretrained",
    help="open_clip pretrained tag, or 'none' for random weights (seeded; a ResNet's BatchNorms are "
         "re-initialized to natural-image statistics, so activations are of order 1).")]
CheckpointOpt = Annotated[Optional[str], typer.Option(
    "--checkpoint", help="Local .pt/.bin/.safetensors weights (read with weights_only / safetensors). "
                         "A neurolens checkpoint carries its model config, so --model is not needed.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
CacheOpt = Annotated[Optional[str], typer.Option(
    "--cache", help="Folder of the HDF5 cache (default: $NEUROLENS_CACHE or outputs/cache).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text and progress.")]


def fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def command(func: Callable) -> Callable:
    """Turn user errors into one line and exit 2, and Ctrl-C into a short note (work already cached is kept)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NeurolensError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept in the cache; run the same command again to resume", err=True)
            raise typer.Exit(130)
    return wrapper


def open_model(model: str, pretrained: str, checkpoint: Optional[str], device: str, quiet: bool = False):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..models import load_clip
    clip = load_clip(model=model, pretrained=pretrained, checkpoint=checkpoint, device=device)
    if not quiet:
        for note in clip.notes:
            typer.echo(f"note: {note}", err=True)
    return clip


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=_to_builtin) + "\n")


def _to_builtin(value: Any) -> Any:
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yields a callback(done, total) for library loops; draws a rich bar on stderr when enabled."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@app.callback()
def _root() -> None:
    """neurolens: look inside CLIP models. Every command has --help with an example."""
