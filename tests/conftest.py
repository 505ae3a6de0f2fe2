"""Shared fixtures: tiny open_clip models with random weights, built through the real loading code."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the test models are tiny, and with 2 threads beside DataLoader workers (or anything else on
# a 2-core machine) torch's thread pool oversubscribes the cores and runs many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_clip():
    """nl-tiny-RN: a 4-stage ModifiedResNet at 64 px with a 2-layer text tower, random (seeded) weights."""
    from neurolens.models import load_clip
    return load_clip("nl-tiny-RN", "none", device="cpu")


@pytest.fixture(scope="session")
def tiny_vit():
    from neurolens.models import load_clip
    return load_clip("nl-tiny-ViT", "none", device="cpu")


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("NEUROLENS_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def natural_images():
    """scikit-image's bundled sample images (offline), as float (N,3,64,64) in [0,1]."""
    from neurolens.builtin import builtin_images
    import torch
    return torch.from_numpy(builtin_images(size=64))


@pytest.fixture(scope="session")
def serve_cache(tmp_path_factory, tiny_clip):
    """The web app's test cache (tests/serve_fixture.py): scan, texts, sweep, visualizations, activation maps."""
    import serve_fixture
    return serve_fixture.build(tmp_path_factory.mktemp("serve"), tiny_clip)
