"""The typer app and what every command shares: one-line errors, progress, JSON output (options: options.py)."""
from __future__ import annotations

import functools
import json
import math
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import numpy as np
import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import NeurolensError
from ..sae.neurons import neuron_basis
from ..storage.files import WRITE_ERRNOS, write_error

# `neurolens --help` lists the commands in the order of a session's work; commands not named here (added
# later) come before train-toy, in the order they were registered.
WORKFLOW = ("demo", "visualize", "scan", "samples", "text", "sweep", "concepts", "describe", "find", "compare",
            "figure", "grid", "similarity", "audit-captions", "*", "train-toy", "layers")


class WorkflowGroup(typer.core.TyperGroup):
    def list_commands(self, ctx) -> list:
        names = list(self.commands)
        rest = [n for n in names if n not in WORKFLOW]
        ordered = []
        for name in WORKFLOW:
            ordered += rest if name == "*" else ([name] if name in self.commands else [])
        return ordered


app = typer.Typer(
    name="neurolens",
    cls=WorkflowGroup,
    help="A Microscope for CLIP models you run yourself: feature visualizations, dataset samples, "
         "text, NSFW unit sweeps and blurred figures, cached in HDF5.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)



def fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def command(func: Callable) -> Callable:
    """Turn user errors (a full or read-only disk included) into one line and exit 2, and Ctrl-C into a short
    note (work already cached is kept)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NeurolensError as exc:
            fail(str(exc))
        except OSError as exc:
            # a write that did not go through neurolens.storage.files (a library's own file I/O): still one line
            if exc.errno not in WRITE_ERRNOS:
                raise
            fail(str(write_error(exc.filename or "a file", exc, option=None)))
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept in the cache; run the same command again to resume", err=True)
            raise typer.Exit(130)
    return wrapper


def open_basis(clip, layer: str, sae: Optional[str], cache: Optional[str]):
    """The units of `layer` to work on: its neurons (sae None) or the features of the SAE `sae`."""
    if sae is None:
        return neuron_basis(clip, layer)
    from ..sae.basis import load_basis  # lazy: SAEs import torch; --help and a cached answer for neurons must not
    return load_basis(clip, layer, sae, cache=cache)


def print_json(value: Any) -> None:
    """One JSON document on stdout: numpy values as plain numbers and lists, NaN and infinities as null (so
    every --json output is valid JSON; docs/json.md)."""
    sys.stdout.write(json.dumps(_plain(value), indent=2, allow_nan=False) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yields a callback(done, total) for library loops; draws a rich bar on stderr when enabled.

    The callback's `note(text)` shows a line of detail after the description (e.g. a Ray scan's images/s,
    shards done and items skipped; NudeNet's scoring of a first sweep); note(None) clears it."""
    if not enabled:
        def ignore(done: int, total: int, description: Optional[str] = None) -> None:
            return None
        ignore.note = lambda text: None
        yield ignore
        return

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int, description: Optional[str] = None) -> None:
            """description: a new text before the bar (e.g. the latest training loss)."""
            if description is None:
                progress.update(task, completed=done, total=total)
            else:
                progress.update(task, completed=done, total=total, description=description)

        update.note = lambda text: progress.update(task, description=f"{description} ({text})" if text else description)
        yield update


@contextmanager
def stage_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """One rich bar per named stage, added when the stage first reports: progress(stage, done, total)."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    columns = (TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bars = Progress(*columns, console=Console(stderr=True))
    tasks: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if not tasks:
            bars.start()       # started on the first report: an error before any stage prints nothing else
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=None)
        bars.update(tasks[stage], completed=done, total=total)
    try:
        yield progress
    finally:
        if tasks:
            bars.stop()


@app.callback()
def _root() -> None:
    """neurolens: look inside CLIP models. Every command has --help with an example."""
