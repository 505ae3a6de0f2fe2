"""The network probe before a download: which host it asks (proxy, HF_ENDPOINT, the hub) and what the user
gets when it fails, without HF_HUB_OFFLINE doing the work."""
import contextlib
import socket

import pytest

from neurolens.errors import WeightsUnavailableError
from neurolens.models import pretrained as pretrainedlib
from neurolens.models.build import load_clip

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy", "HF_ENDPOINT", "REQUEST_METHOD")


@pytest.fixture()
def probes(monkeypatch):
    """Clear every proxy/endpoint variable and record the (host, port) of each probe; connections fail."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def refuse(address, timeout=None, *args, **kwargs):
        calls.append(tuple(address))
        raise ConnectionRefusedError("refused (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


def test_probe_asks_the_hub_without_a_proxy(probes):
    assert pretrainedlib._network_reachable() is False
    assert probes == [("huggingface.co", 443)]


@pytest.mark.parametrize("endpoint, expected", [
    ("https://hf-mirror.example.org", ("hf-mirror.example.org", 443)),
    ("https://hf-mirror.example.org:8443/", ("hf-mirror.example.org", 8443)),
    ("http://10.1.2.3:8080", ("10.1.2.3", 8080)),
    ("http://mirror.lan", ("mirror.lan", 80)),
])
def test_probe_asks_hf_endpoint(probes, monkeypatch, endpoint, expected):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    pretrainedlib._network_reachable()
    assert probes == [expected]


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY"])
def test_probe_asks_the_proxy_when_one_is_set(probes, monkeypatch, variable):
    monkeypatch.setenv(variable, "http://proxy.corp.example:3128")
    pretrainedlib._network_reachable()
    assert probes == [("proxy.corp.example", 3128)]


def test_proxy_details(probes, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://upper.example:1111")
    monkeypatch.setenv("https_proxy", "http://user:secret@lower.example:2222")   # lower case wins, as in requests
    pretrainedlib._network_reachable()
    monkeypatch.setenv("https_proxy", "lower.example")                            # no scheme, no port
    pretrainedlib._network_reachable()
    monkeypatch.setenv("HF_ENDPOINT", "https://hf.internal.example")
    monkeypatch.setenv("NO_PROXY", "internal.example,localhost")                 # the hub bypasses the proxy
    pretrainedlib._network_reachable()
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HF_ENDPOINT", "http://plain.example")                    # http endpoint: http proxy only
    monkeypatch.setenv("http_proxy", "http://http-proxy.example:8000")
    pretrainedlib._network_reachable()
    assert probes == [("lower.example", 2222), ("lower.example", 80), ("hf.internal.example", 443),
                      ("http-proxy.example", 8000)]


def test_probe_says_reachable_when_the_connection_opens(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp.example:3128")
    calls = []

    def accept(address, timeout=None, *args, **kwargs):
        calls.append((tuple(address), timeout))
        return contextlib.nullcontext()

    monkeypatch.setattr(socket, "create_connection", accept)
    assert pretrainedlib._network_reachable(timeout=1.5) is True
    assert calls == [(("proxy.corp.example", 3128), 1.5)]


@pytest.fixture()
def no_cached_weights(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE, an empty Hugging Face cache and an empty ~/.cache/clip."""
    import huggingface_hub.constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_unreachable_network_fails_fast_through_the_probe(probes, no_cached_weights, monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.corp.example:3128")
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("RN50x4", "openai", device="cpu")
    assert probes == [("proxy.corp.example", 3128)]
    message = str(info.value)
    assert "network is unreachable" in message and "HF_HUB_OFFLINE" not in message
    assert "--checkpoint" in message and "--pretrained none" in message


def test_reachable_probe_but_failed_download_is_one_clear_error(no_cached_weights, monkeypatch):
    import huggingface_hub
    asked = []

    def fail_download(repo_id, filename, **kwargs):
        asked.append(filename)
        raise OSError("connection reset (test)")

    monkeypatch.setattr(pretrainedlib, "_network_reachable", lambda timeout=2.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail_download)
    with pytest.raises(WeightsUnavailableError, match="the download failed") as info:
        load_clip("RN50x4", "openai", device="cpu")
    assert asked[0] == "open_clip_model.safetensors" and "open_clip_pytorch_model.bin" in asked
    assert "\n" not in str(info.value)
