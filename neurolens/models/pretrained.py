"""Where a pretrained tag's weights file comes from: the local hub / ~/.cache/clip copy, else a download, and
the checks that make the loader fail within seconds offline (HF_HUB_OFFLINE, one TCP probe of the proxy or
hub) instead of open_clip's ~46 s of retries. The file found is read by checkpoint.read_checkpoint like any
other; nothing here loads weights."""
from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import huggingface_hub  # its functions load on first use (attribute access), so this import costs nothing

from ..errors import WeightsUnavailableError

HF_DEFAULT_ENDPOINT = "https://huggingface.co"


def pretrained_weights_file(tag_cfg: Dict[str, Any], model_name: str, pretrained: str) -> str:
    """The local weights file of a pretrained tag: the cached copy, else a download; fails fast with a
    WeightsUnavailableError when it is not cached and HF_HUB_OFFLINE is set or the network is unreachable."""
    weights_file = _cached_pretrained_file(tag_cfg)
    if weights_file is None:
        if _offline_env():
            raise weights_unavailable(model_name, pretrained, "they are not cached and HF_HUB_OFFLINE is set")
        if not _network_reachable():
            raise weights_unavailable(model_name, pretrained, "they are not cached and the network is unreachable")
        weights_file = _download_pretrained(tag_cfg, model_name, pretrained)
    return weights_file


def _host_port(url: str, default_scheme: str) -> Optional[Tuple[str, int]]:
    """(host, port) of a URL; a bare 'host:port' counts as default_scheme://host:port."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"{default_scheme}://{url}")
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _probe_target() -> Tuple[str, int]:
    """Where a download would connect first: the proxy that requests/httpx would use for the hub
    (HTTPS_PROXY / https_proxy, ALL_PROXY, honouring NO_PROXY), else the hub itself (HF_ENDPOINT or
    huggingface.co)."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or HF_DEFAULT_ENDPOINT
    scheme = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}").scheme or "https"
    hub = _host_port(endpoint, "https") or _host_port(HF_DEFAULT_ENDPOINT, "https")
    proxies = urllib.request.getproxies_environment()   # lower-case names win, as in requests and httpx
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass_environment(hub[0], proxies):
        target = _host_port(proxy, "http")
        if target is not None:
            return target
    return hub


def _network_reachable(timeout: float = 2.0) -> bool:
    """One TCP connection to the proxy or hub host (see _probe_target), within `timeout` seconds."""
    host, port = _probe_target()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_file_names(hub: str) -> Tuple[str, List[str]]:
    """(repo id, file names to try) for a tag's 'org/repo/[file]': safetensors first, as open_clip does."""
    repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = ["open_clip_model.safetensors"]
    if filename:
        stem, suffix = os.path.splitext(filename)
        names = ([f"{stem}.safetensors"] if suffix != ".safetensors" else []) + [filename]
    return repo_id, names + ["open_clip_pytorch_model.bin"]


def _cached_pretrained_file(pretrained_cfg: Dict[str, Any]) -> Optional[str]:
    """The local file of a pretrained tag's weights, if open_clip or huggingface_hub cached it before."""
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        repo_id, names = _hub_file_names(hub)
        for name in names:
            found = huggingface_hub.try_to_load_from_cache(repo_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = pretrained_cfg.get("url", "")
    if url:
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file() and not is_torchscript_archive(candidate):
            return str(candidate)
    return None


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's original CLIP .pt files are TorchScript archives (code + constants), not state dicts."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def cached_tag_file(source: Dict[str, str]) -> Optional[str]:
    """The local file that a tag's source ({hf_hub, url}, as open_clip's tag config names them) resolves to
    now, without a download or open_clip: a model card checks that its tag still means the same file."""
    return _cached_pretrained_file(source)


def _download_pretrained(pretrained_cfg: Dict[str, Any], model_name: str, pretrained: str) -> str:
    """Fetch a tag's weights file (the hub copy when there is one) without loading it: the file is then read
    by read_checkpoint like any other."""
    failures = []
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        repo_id, names = _hub_file_names(hub)
        for name in names:
            try:
                return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=name)
            except Exception as exc:  # a missing file, an HTTP error, no network: try the next name
                failures.append(f"{repo_id}/{name}: {type(exc).__name__}")
    url = pretrained_cfg.get("url", "")
    if url:
        from open_clip.pretrained import download_pretrained_from_url  # lazy: open_clip takes seconds to import
        try:
            return download_pretrained_from_url(url)
        except Exception as exc:
            failures.append(f"{url}: {type(exc).__name__}")
    raise weights_unavailable(model_name, pretrained, f"the download failed ({'; '.join(failures) or 'no source'})")


def weights_unavailable(model_name: str, pretrained: str, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"cannot load {model_name} weights '{pretrained}': {why}; "
        f"pass --checkpoint PATH to load a local .pt/.bin/.safetensors file, or --pretrained none for random weights"
    )
