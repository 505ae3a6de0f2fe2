"""The neurolens command line. Each command is a thin wrapper around one library call."""
from .app import app
from . import layers_cmd  # noqa: F401  (registers commands)

__all__ = ["app", "main"]


def main() -> None:
    app()
