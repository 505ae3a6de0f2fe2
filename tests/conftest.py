"""Shared fixtures: tiny open_clip models with random weights, built through the real loading code."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import sweep_data  # noqa: E402  (tests/: helper modules, never test modules, are imported)

# One thread: the test models are tiny, and with 2 threads beside DataLoader workers (or anything else on
# a 2-core machine) torch's thread pool oversubscribes the cores and runs many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_clip():
    """nl-tiny-RN: a 4-stage ModifiedResNet at 64 px with a 2-layer text tower, random (seeded) weights."""
    from neurolens.models.build import load_clip
    return load_clip("nl-tiny-RN", "none", device="cpu")


@pytest.fixture(scope="session")
def tiny_vit():
    from neurolens.models.build import load_clip
    return load_clip("nl-tiny-ViT", "none", device="cpu")


@pytest.fixture(scope="session")
def rn50x4():
    """RN50x4 at full size with random weights (the real layer layout and 12-layer text tower): built once, as its
    calibrated random initialization runs forward passes at 288 px (a minute on a busy 2-core machine)."""
    from neurolens.models.build import load_clip
    return load_clip("RN50x4", "none", device="cpu")


@pytest.fixture(scope="module")
def dataset_table(tmp_path_factory):
    """36 synthetic images in a CSV table with captions (tests/sweep_data.py); every 6th caption has a lexicon word."""
    return sweep_data.write_table(tmp_path_factory.mktemp("sweepdata"))


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    """A 30-entry vocabulary file (tests/sweep_data.py)."""
    return sweep_data.write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("NEUROLENS_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def natural_images():
    """scikit-image's bundled sample images (offline), as float (N,3,64,64) in [0,1]."""
    from neurolens.datasets.builtin import builtin_images
    import torch
    return torch.from_numpy(builtin_images(size=64))


class FakeNudeDetector:
    """Stands in for NudeNet's NudeDetector (we never make explicit imagery): `fires(rgb array)` decides
    whether an exposed region is reported. Like NudeNet it receives BGR arrays and also reports a covered
    class (which neurolens must ignore). `seen` keeps the arrays it was given."""

    def __init__(self, fires, score=0.93):
        self.fires, self.score, self.seen = fires, score, []

    def detect(self, bgr):
        self.seen.append(bgr)
        found = [{"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 4, 4]}]
        if self.fires(bgr[:, :, ::-1]):
            found.append({"class": "FEMALE_BREAST_EXPOSED", "score": self.score, "box": [1, 2, 8, 9]})
        return found


@pytest.fixture()
def fake_detector(monkeypatch):
    """install(fires, score=0.93) makes labels.nudenet use a FakeNudeDetector (as if NudeNet were installed)."""
    from neurolens.labels import nudenet

    def install(fires, score=0.93):
        fake = FakeNudeDetector(fires, score)
        monkeypatch.setattr(nudenet, "available", lambda: True)
        monkeypatch.setattr(nudenet, "_detector", lambda: fake)
        # detector scores are cached per detector version: each stand-in is a version of its own
        monkeypatch.setattr(nudenet, "version", lambda: f"fake-{id(fake)}")
        return fake
    return install


@pytest.fixture()
def no_detector(monkeypatch):
    """As if NudeNet were not installed."""
    from neurolens.labels import nudenet
    monkeypatch.setattr(nudenet, "available", lambda: False)


class FullDisk:
    """Files opened for writing ('wb'/'w') whose path matches `when` fail like a disk that fills up: after
    `skip` such files went through whole, every further write raises OSError(error) once `keep` bytes of the
    file were written. `failed` lists the paths that failed."""

    def __init__(self, when, skip=0, keep=64, error=None):
        import errno
        self.when, self.skip, self.keep = when, skip, keep
        self.error = errno.ENOSPC if error is None else error
        self.failed = []

    def wrap(self, handle, path):
        if not self.when(str(path)):
            return handle
        if self.skip > 0:
            self.skip -= 1
            return handle
        disk, written = self, [0]
        real_write = handle.write

        class Filling:
            def __getattr__(self, name):
                return getattr(handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, data):
                room = disk.keep - written[0]
                if len(data) > room:
                    real_write(data[:max(0, room)])
                    written[0] = disk.keep
                    disk.failed.append(str(path))
                    import os
                    raise OSError(disk.error, os.strerror(disk.error), str(path))
                written[0] += len(data)
                return real_write(data)
        return Filling()


@pytest.fixture()
def full_disk(monkeypatch):
    """install(when, skip=0, keep=64, error=ENOSPC) -> FullDisk; monkeypatch.undo() frees the space."""
    import builtins
    real_open = builtins.open

    def install(when=lambda path: True, skip=0, keep=64, error=None):
        disk = FullDisk(when, skip, keep, error)

        def filling_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return disk.wrap(handle, file) if ("w" in mode or "a" in mode) else handle
        monkeypatch.setattr(builtins, "open", filling_open)
        return disk
    return install


@pytest.fixture(scope="session")
def serve_cache(tmp_path_factory, tiny_clip):
    """The web app's test cache (tests/serve_fixture.py): scan, texts, sweep, visualizations, activation maps."""
    import serve_fixture
    return serve_fixture.build(tmp_path_factory.mktemp("serve"), tiny_clip)


@pytest.fixture(scope="session")
def toy_multi(tmp_path_factory):
    """The multi-concept toy of neurolens.toy.recipes (trained once per session), swept per concept on its probe
    set, with the same audit of random weights (tests/toy_fixture.py)."""
    import toy_fixture
    return toy_fixture.build_multi(tmp_path_factory.mktemp("toy_multi"))


@pytest.fixture(scope="session")
def toy_dose(tmp_path_factory):
    """The dose-response toys of neurolens.toy.recipes (trained once per session), all swept on one probe set,
    and random weights (tests/toy_fixture.py)."""
    import toy_fixture
    return toy_fixture.build_dose(tmp_path_factory.mktemp("toy_dose"))
