"""No hook is left on the model after any model command, whether it succeeds or fails. The cache's model cards
are removed before each command, so that every command loads its model (a card would answer without one)."""
import shutil

import pytest
from typer.testing import CliRunner

import neurolens.models.build
from neurolens.cli import app
from neurolens.activations.hooks import hook_count

TINY = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu"]


@pytest.fixture()
def loaded(monkeypatch):
    """Record every model the CLI loads."""
    models = []
    real = neurolens.models.build.load_clip

    def recording_load(*args, **kwargs):
        clip = real(*args, **kwargs)
        models.append(clip)
        return clip
    monkeypatch.setattr(neurolens.models.build, "load_clip", recording_load)
    return models


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks")
    vocab = root / "vocab.txt"
    vocab.write_text("a red circle\na photo of a cat\nan astronaut\na page of text\ncoins on a table\n")
    return root, vocab


def _commands(root, vocab):
    cache = ["--cache", str(root / "cache")]
    layer = ["--layer", "image_block_3_0"]
    return [
        ["layers", *TINY],
        ["visualize", *TINY, *cache, *layer, "--unit", "1", "--steps", "3", "--out", str(root / "vis")],
        ["scan", *TINY, *cache, *layer, "--workers", "0"],
        ["samples", *TINY, *cache, *layer, "--unit", "1", "--workers", "0", "--out", str(root / "samples.png")],
        ["text", *TINY, *cache, *layer, "--unit", "1", "--vocab", str(vocab)],
        ["sweep", *TINY, *cache, *layer, "--vocab", str(vocab), "--workers", "0", "--out", str(root / "sweep")],
        ["figure", *TINY, *cache, *layer, "--unit", "1", "--vocab", str(vocab), "--steps", "3",
         "--out", str(root / "fig")],
        ["similarity", *TINY, "--image", "sample:astronaut", "--text", "an astronaut"],
    ]


@pytest.mark.integration
def test_no_hook_left_after_any_command(loaded, workspace):
    root, vocab = workspace
    runner = CliRunner()
    for args in _commands(root, vocab):
        loaded.clear()
        shutil.rmtree(root / "cache" / "model-card", ignore_errors=True)
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output)
        assert loaded, args[0]
        assert all(hook_count(clip.model) == 0 for clip in loaded), args[0]


def test_no_hook_left_after_a_failing_command(loaded, workspace):
    root, vocab = workspace
    runner = CliRunner()
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    for args in _commands(root, vocab)[1:7]:
        if "--unit" in args:
            bad = [value if value != "1" else "99999" for value in args]  # unit out of range
        else:
            bad = [*args, "--dataset", str(empty), "--force"]  # a dataset with no readable image
        loaded.clear()
        shutil.rmtree(root / "cache" / "model-card", ignore_errors=True)
        result = runner.invoke(app, bad)
        assert result.exit_code == 2, (args[0], result.output)
        assert loaded, (args[0], "failed before loading a model: no hook could have been left")
        assert all(hook_count(clip.model) == 0 for clip in loaded), args[0]
