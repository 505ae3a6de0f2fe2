"""Model cards: a cached answer needs no model. The card is trusted only while the weights' identity matches
(a rewritten checkpoint, a tag that now resolves to another file, other package versions), and a cached CLI
answer neither imports open_clip nor builds the model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.models.layers import registry_for
from neurolens.models.layer_table import resolve_layer
from neurolens.pipelines.model import LazyClip, load_model
from neurolens.records.models import card_path, read_card
from neurolens.models.identity import model_request
from neurolens.storage.cache import Cache

from cached_answers import cached_requests, tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_a_card_answers_without_loading_the_model(tiny_clip, tmp_path):
    path = tiny_checkpoint(tiny_clip, tmp_path / "w.pt")
    first = load_model(checkpoint=path, device="cpu", cache=tmp_path / "cache")
    assert not isinstance(first, LazyClip)                        # no card yet: loaded, and the card written
    assert card_path(Cache(tmp_path / "cache"), model_request("RN50x4", "openai", path)).is_file()
    lazy = load_model(checkpoint=path, device="cpu", cache=tmp_path / "cache")
    assert isinstance(lazy, LazyClip) and not lazy.loaded
    for name in ("fingerprint", "name", "pretrained", "image_size", "mean", "std", "notes", "weights_file"):
        assert getattr(lazy, name) == getattr(first, name), name
    assert lazy.fingerprint == tiny_clip.fingerprint
    assert registry_for(lazy).layers == registry_for(first).layers
    assert resolve_layer(lazy, "visual.layer4.0") == resolve_layer(first, "image_block_4_0")
    assert resolve_layer(lazy, "image_block_4_0_Add_6_0").name == "image_block_4_0"
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(lazy.normalize(images), first.normalize(images))
    assert not lazy.loaded                                         # none of that needed the model
    # a module path the card's table lacks: measured on the model, loaded now
    assert resolve_layer(lazy, "visual.layer4.0.conv1").channels == resolve_layer(first, "visual.layer4.0.conv1").channels
    assert lazy.loaded and lazy.model is lazy.load().model


def test_the_same_file_asked_from_another_folder_is_the_same_card(tiny_clip, tmp_path, monkeypatch):
    path = tiny_checkpoint(tiny_clip, tmp_path / "w.pt")
    load_model(checkpoint=path, device="cpu", cache=tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    assert isinstance(load_model(checkpoint="w.pt", device="cpu", cache=tmp_path / "cache"), LazyClip)


def test_a_rewritten_checkpoint_is_detected_and_reloaded(tiny_clip, tmp_path):
    """Other weights at the same path, even with the old size and mtime: the partial hash differs."""
    path = tiny_checkpoint(tiny_clip, tmp_path / "w.pt")
    cache = tmp_path / "cache"
    old = load_model(checkpoint=path, device="cpu", cache=cache)
    stat = os.stat(path)
    tiny_checkpoint(tiny_clip, path, shift=0.01)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    assert read_card(Cache(cache), model_request("RN50x4", "openai", path)) is None
    new = load_model(checkpoint=path, device="cpu", cache=cache)
    assert not isinstance(new, LazyClip) and new.fingerprint != old.fingerprint
    again = load_model(checkpoint=path, device="cpu", cache=cache)   # the card was rewritten for the new weights
    assert isinstance(again, LazyClip) and again.fingerprint == new.fingerprint


def test_a_lazy_clip_whose_weights_changed_under_it_refuses(tiny_clip, tmp_path):
    from neurolens.errors import NeurolensError
    path = tiny_checkpoint(tiny_clip, tmp_path / "w.pt")
    load_model(checkpoint=path, device="cpu", cache=tmp_path / "cache")
    lazy = load_model(checkpoint=path, device="cpu", cache=tmp_path / "cache")
    tiny_checkpoint(tiny_clip, path, shift=0.01)
    with pytest.raises(NeurolensError, match="changed while neurolens was using them"):
        lazy.model


def test_random_weights_cards_follow_the_package_versions(tmp_path, monkeypatch):
    from neurolens.models import identity
    cache = tmp_path / "cache"
    first = load_model("nl-tiny-RN", "none", device="cpu", cache=cache)
    lazy = load_model("nl-tiny-RN", "none", device="cpu", cache=cache)
    assert isinstance(lazy, LazyClip) and lazy.fingerprint == first.fingerprint and lazy.notes == first.notes
    real = identity.package_versions
    monkeypatch.setattr(identity, "package_versions",
                        lambda names=identity.BUILDERS: {**real(names), "torch": "0.0-other"})
    assert not isinstance(load_model("nl-tiny-RN", "none", device="cpu", cache=cache), LazyClip)


def _hub_snapshot(root, repo_id, revision, data):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    (snapshot / "open_clip_model.safetensors").write_bytes(data)


def test_a_tag_card_follows_where_the_tag_resolves(tiny_clip, tmp_path, monkeypatch):
    """A pretrained tag's card names the hub file it was read from; a newer snapshot of the tag is another file."""
    import huggingface_hub.constants
    import open_clip
    from safetensors.torch import save
    state = {k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}
    _hub_snapshot(tmp_path / "hub", "test-org/nl-tiny-card", "1" * 40, save(state))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, tag: {"hf_hub": "test-org/nl-tiny-card/"}
                        if (model, tag) == ("nl-tiny-RN", "card-tag") else real(model, tag))
    cache = tmp_path / "cache"
    first = load_model("nl-tiny-RN", "card-tag", device="cpu", cache=cache)
    assert isinstance(load_model("nl-tiny-RN", "card-tag", device="cpu", cache=cache), LazyClip)
    shifted = {k: (v + 0.01 if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    _hub_snapshot(tmp_path / "hub", "test-org/nl-tiny-card", "2" * 40, save(shifted))
    new = load_model("nl-tiny-RN", "card-tag", device="cpu", cache=cache)
    assert not isinstance(new, LazyClip) and new.fingerprint != first.fingerprint


# a cached CLI answer in a fresh interpreter: count model loads, and say whether open_clip was imported
RUNNER = """
import json, sys
from neurolens.labels import nudenet
nudenet.available = lambda: False          # as in the run that filled the cache (no NudeNet in tests)
import neurolens.models.build as build
loads = []
real = build.load_clip
build.load_clip = lambda *a, **k: loads.append(a) or real(*a, **k)
from typer.testing import CliRunner
from neurolens.cli import app
outputs = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    outputs.append([result.exit_code, result.stdout])
print(json.dumps({"outputs": outputs, "loads": len(loads), "open_clip": "open_clip" in sys.modules}))
"""


def test_cached_cli_answers_need_neither_open_clip_nor_the_model(tiny_clip, tmp_path, no_detector):
    path = tiny_checkpoint(tiny_clip, tmp_path / "w.pt")
    commands = list(cached_requests(tmp_path, path).values())     # samples, sweep, visualize, text
    first = []
    for args in commands:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        first.append(result.stdout)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)], env=env, capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [code for code, _ in report["outputs"]] == [0, 0, 0, 0], report
    assert report["loads"] == 0 and report["open_clip"] is False
    visualized = json.loads(report["outputs"][2][1])
    assert [row["cached"] for row in visualized["results"]] == [True]
    before = json.loads(first[2])
    for row in before["results"]:
        row["cached"] = True
    assert visualized["results"][0]["dataset_top1"] is not None    # the scan of samples was found
    assert visualized == before
    others = [0, 1, 3]
    assert [json.loads(report["outputs"][i][1]) for i in others] == [json.loads(first[i]) for i in others]


def test_the_builtin_vocabulary_is_kept_in_the_cache(tmp_path, monkeypatch):
    from neurolens.pipelines import text as textpipe
    from neurolens.text.vocab import builtin_vocab
    built = textpipe.vocabulary("builtin", tmp_path / "cache")
    assert built == builtin_vocab() and len(built) > 20000
    monkeypatch.setattr(textpipe, "builtin_vocab", lambda: pytest.fail("rebuilt although the cache holds it"))
    again = textpipe.vocabulary("builtin", tmp_path / "cache")
    assert again == built
    # another version of a source file (here: its identity) is another list: built again
    monkeypatch.setattr(textpipe, "builtin_identity", lambda: {"version": -1, "files": []})
    with pytest.raises(pytest.fail.Exception):
        textpipe.vocabulary("builtin", tmp_path / "cache")
