"""Starting the web app: which layers, which host and token, and one line with the URL once it listens."""
from __future__ import annotations

import ipaddress
import socket
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import NeurolensError
from ..records.index import LayerEntry, index_cache
from ..storage.cache import Cache
from .access import access_for, cookie_name
from .layer import LayerData
from .probe import Prober

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def select_layers(cache: Cache, names: Sequence[str] = (), bases: Sequence[str] = ()) -> Dict[str, LayerData]:
    """The cache's layers (all, or those whose layer name or id is in `names`), each in the bases named in
    `bases` ("neurons" or an SAE's name; default: every basis), or one clear error."""
    entries: List[LayerEntry] = index_cache(cache)
    if not entries:
        raise NeurolensError(f"nothing to show in the cache at {cache.root}: it has no scan, sweep, text or "
                             f"feature-visualization records; run `neurolens demo` (or scan a layer) first, or "
                             f"pass --cache PATH")
    if names:
        wanted = set(names)
        chosen = [e for e in entries if e.layer in wanted or e.id in wanted]
        if not chosen:
            known = ", ".join(sorted({e.layer for e in entries}))
            raise NeurolensError(f"no layer named {', '.join(names)} in the cache at {cache.root}; it has: {known}")
        entries = chosen
    if bases:
        wanted = set(bases)
        chosen = [e for e in entries if e.basis_name in wanted]
        if not chosen:
            known = ", ".join(sorted({e.basis_name for e in entries}))
            raise NeurolensError(f"no basis named {', '.join(bases)} in the chosen layers; they have: {known}")
        entries = chosen
    return {entry.id: LayerData(cache, entry) for entry in entries}


def open_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or one clear error."""
    try:
        family = socket.AF_INET6 if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address) else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    try:
        return socket.create_server((host, int(port)), family=family)
    except OSError as exc:
        hint = "pass --port 0 for a free port" if exc.errno in (98, 48) else "check --host"
        raise NeurolensError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); {hint}") from None


def url_for(host: str, port: int, token: Optional[str]) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(cache: Cache, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: Optional[str] = None,
          no_token: bool = False, reveal: bool = True, clip=None, layers: Sequence[str] = (),
          bases: Sequence[str] = (), announce: Callable[[str], None] = print, warn: Callable[[str], None] = print,
          require_token: bool = False, allow_hosts: Sequence[str] = ()) -> None:
    """Serve the cache until interrupted. Prints `serving <url>` once connections are accepted."""
    try:
        import uvicorn  # lazy: the web server's packages are needed only here; the static site works without them
        from .app import ServeState, build_app  # lazy: imports starlette (same reason)
    except ImportError as exc:
        missing = (exc.name or "starlette").split(".")[0]
        raise NeurolensError(f"neurolens serve needs {missing}, which is missing: "
                             f"pip install 'neurolens[serve]' (starlette, uvicorn, httptools, uvloop)") from None

    access = access_for(host, token, no_token, require_token, allow_hosts)
    chosen = select_layers(cache, layers, bases)
    prober = Prober(clip, cache) if clip is not None else None
    note = f"Probes use {clip.name} ({clip.pretrained})." if clip is not None else ""
    sock = open_socket(host, port)
    bound_port = sock.getsockname()[1]
    try:
        state = ServeState(chosen, reveal=reveal, prober=prober, token=access.token,
                           allowed_hosts=access.allowed_hosts, cookie=cookie_name(bound_port), model_note=note)
        if clip is not None and not state.probe_layers:
            warn(f"note: the loaded model ({clip.name}) made none of the cached layers: probes are off")
        app = build_app(state)
        if access.warning:
            warn(access.warning)

        class _Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if not self.should_exit:
                    announce(f"serving {url_for(host, bound_port, access.token)}")

        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        _Server(config).run(sockets=[sock])
    finally:
        sock.close()
