"""The neurolens command line. Each command is a thin wrapper around one library call; importing a command
module registers its commands (`neurolens --help` lists them in the order of app.WORKFLOW)."""
from . import audit_cmd  # noqa: F401
from . import compare_cmd  # noqa: F401
from . import concepts_cmd  # noqa: F401
from . import find_cmd  # noqa: F401
from . import layers_cmd  # noqa: F401
from . import sae_cmd  # noqa: F401
from . import scan_cmd  # noqa: F401
from . import serve_cmd  # noqa: F401
from . import sweep_cmd  # noqa: F401
from . import text_cmd  # noqa: F401
from . import toy_cmd  # noqa: F401
from . import visualize_cmd  # noqa: F401
from .app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
