"""A cache from a stranger is data, never pointers (issue 20, docs/security.md): HDF5 records built here by hand
keep a text ranking's `texts` in another file (external storage, a virtual dataset, an external link, a soft link
through an external link) or declare a dataset far larger than the file. Every reader treats such a record as
missing with one warning line; the marker string held by the outside file never reaches what a reader returns, a
page, or the static site. Also: the size limit and its override, and hostile SAE configs (one line from the CLI,
listed as unreadable by `sae list`, the home page and the site instead of a 500)."""
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.errors import NeurolensError
from neurolens.serve.pages import Pages
from neurolens.serve.server import select_layers
from neurolens.serve.site import write_site
from neurolens.storage.cache import Cache, Record, read_attrs, written_at

MARKER = "MARKER-7f3a-secret-of-the-neighbour"
FP = "ab" * 20
LAYER = "image_block_4_0"
HOSTILE = ("external-storage", "virtual-dataset", "external-link", "soft-link-out", "declared-huge")


def ranking_folder(root: Path) -> Path:
    return root / "text-rankings" / FP[:16] / LAYER


def write_legit_ranking(cache: Cache) -> Path:
    """A genuine ranking of 2 units (texts cat/dog, sun/sea), written first: the older record."""
    path = cache.path("text-rankings", FP, LAYER, "legit")
    cache.write(path, Record(arrays={"top_indices": np.array([[0, 1], [2, 3]], np.int64),
                                     "top_scores": np.array([[0.5, 0.4], [0.3, 0.2]], np.float32),
                                     "texts": np.array([["cat", "dog"], ["sun", "sea"]], dtype=object)},
                             attrs={"layer": LAYER, "vocab_source": "words.txt", "reference": "neutral-grey-0.5"}))
    return path


def marker_source(folder: Path) -> Path:
    """An HDF5 file outside the cache whose `texts` hold the marker (what a hostile record points at)."""
    source = folder / "neighbour.h5"
    with h5py.File(source, "w") as handle:
        handle.create_dataset("texts", data=np.array([[MARKER] * 2] * 2, dtype="S40"))
    return source


def write_hostile_ranking(path: Path, kind: str, outside: Path) -> Path:
    """A text-ranking record, newer than the legit one, whose `texts` are not plain data of the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = outside / "marker.bin"
    raw.write_bytes((MARKER.encode().ljust(40, b"\0")) * 4)
    source = marker_source(outside)
    with h5py.File(path, "w") as handle:
        handle.attrs["schema_version"] = 1
        handle.attrs["written_at"] = time.time() + 60
        handle.attrs["attrs_json"] = json.dumps({"layer": LAYER, "vocab_source": "hostile.txt",
                                                 "reference": "neutral-grey-0.5"})
        handle.create_dataset("top_indices", data=np.array([[0, 1], [2, 3]], np.int64))
        handle.create_dataset("top_scores", data=np.array([[0.9, 0.8], [0.7, 0.6]], np.float32))
        if kind == "external-storage":        # the dataset's bytes live in an outside file
            handle.create_dataset("texts", shape=(2, 2), dtype="S40", external=[(str(raw), 0, 160)])
        elif kind == "virtual-dataset":
            layout = h5py.VirtualLayout(shape=(2, 2), dtype="S40")
            layout[:] = h5py.VirtualSource(str(source), "texts", shape=(2, 2))
            handle.create_virtual_dataset("texts", layout)
        elif kind == "external-link":
            handle["texts"] = h5py.ExternalLink(str(source), "/texts")
        elif kind == "soft-link-out":          # a soft link whose path leaves the file through an external link
            handle["outside"] = h5py.ExternalLink(str(source), "/")
            handle["texts"] = h5py.SoftLink("/outside/texts")
        elif kind == "declared-huge":          # a few KB declaring 1.4 TB (chunked, nothing written)
            handle.create_dataset("texts", shape=(200_000, 200_000), dtype="S36", chunks=(1, 1024))
    return path


@pytest.fixture(params=HOSTILE)
def hostile_cache(request, tmp_path):
    cache = Cache(tmp_path / "cache")
    outside = tmp_path / "outside"
    outside.mkdir()
    legit = write_legit_ranking(cache)
    hostile = write_hostile_ranking(ranking_folder(cache.root) / "hostile.h5", request.param, outside)
    assert os.path.getsize(hostile) < 64 * 1024
    return cache, legit, hostile, request.param


def everything_under(folder: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file())


def test_hostile_record_is_missing_for_every_reader_page_and_the_site(hostile_cache, tmp_path, capsys):
    cache, legit, hostile, kind = hostile_cache
    for _ in range(3):
        assert cache.read(hostile) is None
        assert cache.read(hostile, names=["texts"]) is None
        with pytest.raises(OSError):
            read_attrs(hostile)
        assert written_at(hostile) == 0.0
    assert cache.read(legit).arrays["texts"][0, 0] == "cat"

    layers = select_layers(cache)
    pages = Pages(layers, mode="serve")
    (layer_id,) = layers
    shown = pages.home() + pages.layer(layer_id) + pages.unit(layer_id, 0) + pages.unit(layer_id, 1)
    assert MARKER not in shown
    assert "cat" in pages.unit(layer_id, 0)            # the genuine (older) ranking is shown instead
    result = write_site(cache, tmp_path / "site")
    assert result.pages >= 3
    site = everything_under(tmp_path / "site")
    assert MARKER.encode() not in site and b"cat" in site

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if str(hostile) in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "Traceback" not in err     # once per record
    assert MARKER not in err


def test_record_size_limit_is_documented_and_overridable(tmp_path, monkeypatch, capsys):
    cache = Cache(tmp_path)
    path = cache.path("kind", FP, LAYER, "big")
    cache.write(path, Record(arrays={"a": np.random.default_rng(0).random(300_000)}, attrs={}))   # 2.4 MB
    assert cache.read(path) is not None
    monkeypatch.setenv("NEUROLENS_MAX_RECORD_BYTES", "1M")
    assert cache.read(path) is None
    line = [x for x in capsys.readouterr().err.splitlines() if str(path) in x]
    assert len(line) == 1 and "NEUROLENS_MAX_RECORD_BYTES" in line[0] and "1 MiB" in line[0]
    monkeypatch.setenv("NEUROLENS_MAX_RECORD_BYTES", "4G")
    assert cache.read(path).arrays["a"].shape == (300_000,)
    monkeypatch.setenv("NEUROLENS_MAX_RECORD_BYTES", "lots")
    with pytest.raises(NeurolensError, match="NEUROLENS_MAX_RECORD_BYTES='lots' is not a size"):
        cache.read(path)


def test_a_forged_size_is_refused_whatever_the_limit(tmp_path, monkeypatch, capsys):
    """2 GB declared in a 6 KB file: refused even with the limit raised (no allocation ever happens)."""
    path = tmp_path / "forged.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["schema_version"] = 1
        handle.attrs["attrs_json"] = "{}"
        handle.create_dataset("a", shape=(500_000_000,), dtype="f4", chunks=(4096,))
    monkeypatch.setenv("NEUROLENS_MAX_RECORD_BYTES", "64G")
    assert Cache(tmp_path).read(path) is None
    assert "stores 0 bytes" in capsys.readouterr().err


def test_record_that_is_a_fifo_or_a_symlink_is_refused(tmp_path, capsys):
    cache = Cache(tmp_path)
    real = cache.path("kind", FP, LAYER, "real")
    cache.write(real, Record(arrays={"a": np.arange(3)}, attrs={}))
    link = real.with_name("link.h5")
    link.symlink_to(real)
    fifo = real.with_name("fifo.h5")
    os.mkfifo(fifo)
    assert cache.read(real) is not None
    assert cache.read(link) is None and cache.read(fifo) is None      # a FIFO never blocks the reader
    err = capsys.readouterr().err
    assert "symbolic link" in err and "not a regular file" in err


# ------------------------------------------------------------------------------------------- SAE configs

BAD_CONFIGS = {
    "k-nan": ({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": float("nan")}, "k is NaN"),
    "k-infinity": ({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": float("inf")}, "k is Infinity"),
    "d_in-four": ({"architecture": "topk", "d_in": "four", "d_sae": 8, "k": 2}, 'd_in is "four"'),
    "metadata-x": ({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2, "metadata": "x"}, 'metadata is "x"'),
    "negative": ({"architecture": "topk", "d_in": 4, "d_sae": -8, "k": 2}, "d_sae is -8"),
    "quality-text": ({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2,
                      "metadata": {"neurolens": {"quality": {"explained_variance": "high"}}}},
                     'quality.explained_variance is "high"'),
}


def write_sae_folder(folder: Path, cfg: dict, d_in: int = 4, d_sae: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_file({"W_enc": rng.standard_normal((d_in, d_sae)).astype(np.float32),
               "b_enc": np.zeros(d_sae, np.float32),
               "W_dec": rng.standard_normal((d_sae, d_in)).astype(np.float32),
               "b_dec": np.zeros(d_in, np.float32)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))      # Python's json writes NaN and Infinity as JS does
    return folder


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_hostile_sae_config_is_one_line(name, tmp_path):
    from neurolens.sae.io import load_sae
    cfg, words = BAD_CONFIGS[name]
    folder = write_sae_folder(tmp_path / name, cfg)
    with pytest.raises(NeurolensError) as caught:
        load_sae(folder)
    message = str(caught.value)
    assert "\n" not in message and words in message and str(folder / "cfg.json") in message


def test_hostile_sae_config_from_the_cli_is_one_line(tmp_path):
    folder = write_sae_folder(tmp_path / "bad", BAD_CONFIGS["k-infinity"][0], d_in=64)
    out = CliRunner().invoke(app, ["text", "--model", "nl-tiny-RN", "--pretrained", "none", "--layer",
                                   "image_block_4_0", "--sae", str(folder), "--unit", "0",
                                   "--cache", str(tmp_path / "c")])
    assert out.exit_code == 2, out.output
    lines = [line for line in out.stderr.splitlines() if not line.startswith("note: ")]   # the model's notes
    assert len(lines) == 1 and lines[0].startswith("error: ") and "k is Infinity" in lines[0]
    assert "Traceback" not in out.output


def test_home_page_site_and_sae_list_survive_bad_saes(tmp_path, tiny_clip):
    """Every hostile config beside a good SAE in the cache's registry: the home page lists each as unreadable
    (no 500), the site is written, `sae list` lists them too; none of it shows an absolute path."""
    cache = Cache(tmp_path / "cache")
    write_legit_ranking(cache)
    registry = cache.folder("sae", FP, LAYER)
    write_sae_folder(registry / "good", {"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2,
                                         "metadata": {"neurolens": {"quality": {"explained_variance": 0.5}}}})
    for name, (cfg, _) in BAD_CONFIGS.items():
        write_sae_folder(registry / name, cfg)
    pages = Pages(select_layers(cache), mode="serve")
    home = pages.home()
    assert home.count('data-unreadable="1"') == len(BAD_CONFIGS)
    assert "0.500" in home                                         # the good one's quality report
    assert str(tmp_path) not in home
    result = write_site(cache, tmp_path / "site")
    assert result.pages >= 3 and str(tmp_path).encode() not in everything_under(tmp_path / "site")
    assert (tmp_path / "site" / "index.html").read_text().count('data-unreadable="1"') == len(BAD_CONFIGS)

    from neurolens.sae.basis import available_bases
    from neurolens.models.layer_table import resolve_layer
    spec = resolve_layer(tiny_clip, "image_block_4_0")
    real = Cache(tmp_path / "real")
    for name, (cfg, _) in BAD_CONFIGS.items():
        write_sae_folder(real.folder("sae", tiny_clip.fingerprint, spec.name) / name, cfg, d_in=spec.channels)
    rows = available_bases(tiny_clip, spec.name, real)
    assert sum(1 for row in rows if row.get("unreadable")) == len(BAD_CONFIGS)
    out = CliRunner().invoke(app, ["sae", "list", "--model", "nl-tiny-RN", "--pretrained", "none", "--layer",
                                   spec.name, "--cache", str(real.root)])
    assert out.exit_code == 0, out.output
    assert out.stdout.count(": unreadable: ") == len(BAD_CONFIGS)
