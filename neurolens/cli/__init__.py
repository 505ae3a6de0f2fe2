"""The neurolens command line. Each command is a thin wrapper around one library call."""
from .app import app
from . import layers_cmd  # noqa: F401  (registers commands)
from . import visualize_cmd  # noqa: F401
from . import audit_cmd  # noqa: F401
from . import scan_cmd  # noqa: F401
from . import sweep_cmd  # noqa: F401
from . import concepts_cmd  # noqa: F401
from . import toy_cmd  # noqa: F401
from . import text_cmd  # noqa: F401
from . import sae_cmd  # noqa: F401
from . import serve_cmd  # noqa: F401

__all__ = ["app", "main"]


def main() -> None:
    app()
