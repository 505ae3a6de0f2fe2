"""The visualize job and command: cache hits, --force, PNGs, JSON, errors, no hooks left."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.activations.hooks import hook_count
from neurolens.pipelines import visualize as job
from neurolens.storage.cache import Cache
from neurolens.types import RenderSettings

SETTINGS = RenderSettings(steps=6, seeds=(0, 1))
TINY = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu"]


def test_second_request_reads_the_cache(tiny_clip, tmp_path, monkeypatch):
    cache = Cache(tmp_path / "cache")
    first = job.run_visualize(tiny_clip, "image_block_4_0", [3, 5], SETTINGS, cache=cache, out_dir=tmp_path / "png")
    assert [r.cached for r in first] == [False, False]
    record = cache.read(job.record_path(cache, tiny_clip, "image_block_4_0", 3, job.resolved_settings(tiny_clip, SETTINGS)))
    assert record.arrays["images"].shape == (2, 64, 64, 3) and record.arrays["curve"].shape == (6, 2)
    assert record.attrs["fingerprint"] == tiny_clip.fingerprint and record.attrs["settings"]["steps"] == 6

    def no_render(*args, **kwargs):
        raise AssertionError("a cached request must not render")
    monkeypatch.setattr(job, "render", no_render)
    again = job.run_visualize(tiny_clip, "image_block_4_0", [5, 3], SETTINGS, cache=cache, out_dir=tmp_path / "png")
    assert [r.cached for r in again] == [True, True]
    assert np.array_equal(again[1].images, first[0].images)
    assert [len(r.paths) for r in again] == [2, 2] and all(p.endswith(".png") for r in again for p in r.paths)


def test_force_recomputes_and_other_settings_miss(tiny_clip, tmp_path):
    cache = Cache(tmp_path / "cache")
    job.run_visualize(tiny_clip, "image_block_4_0", [3], SETTINGS, cache=cache)
    forced = job.run_visualize(tiny_clip, "image_block_4_0", [3], SETTINGS, cache=cache, force=True)
    other = job.run_visualize(tiny_clip, "image_block_4_0", [3], RenderSettings(steps=7, seeds=(0, 1)), cache=cache)
    assert not forced[0].cached and not other[0].cached
    assert hook_count(tiny_clip.model) == 0


def test_interrupted_run_keeps_finished_batches(tiny_clip, tmp_path, monkeypatch):
    cache = Cache(tmp_path / "cache")
    monkeypatch.setattr(job, "MAX_BATCH_IMAGES", 2)  # one unit (2 seeds) per batch

    def stop_in_second_batch(done, total):
        if done > SETTINGS.steps + 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        job.run_visualize(tiny_clip, "image_block_4_0", [3, 5], SETTINGS, cache=cache, progress=stop_in_second_batch)
    assert hook_count(tiny_clip.model) == 0
    resumed = job.run_visualize(tiny_clip, "image_block_4_0", [3, 5], SETTINGS, cache=cache)
    assert [r.cached for r in resumed] == [True, False]


def test_cli_visualize_json_and_cache(tmp_path):
    runner = CliRunner()
    args = ["visualize", *TINY, "--layer", "image_block_4_0", "--unit", "3", "--unit", "7", "--steps", "5",
            "--seed", "0", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    rows = payload["results"]
    assert [(r["unit"], r["seed"]) for r in rows] == [(3, 0), (7, 0)]
    assert set(rows[0]) >= {"unit", "seed", "path", "activation"}
    assert all((tmp_path / "out").joinpath(r["path"].split("/")[-1]).is_file() for r in rows)
    again = json.loads(runner.invoke(app, args).stdout)
    assert [(r["unit"], r["cached"]) for r in again["results"]] == [(3, True), (7, True)]
    assert [r["activation"] for r in again["results"]] == [r["activation"] for r in rows]


def test_cli_visualize_microscope_preset_with_an_override(tmp_path):
    """--quality microscope renders every seed of the preset (kept apart by diversity); --steps overrides it."""
    from neurolens.types import quality_settings
    seeds = quality_settings("microscope").seeds
    args = ["visualize", *TINY, "--layer", "image_block_4_0", "--unit", "3", "--quality", "microscope",
            "--steps", "2", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [r["seed"] for r in rows] == list(seeds) and len(rows) >= 2
    bad = CliRunner().invoke(app, ["visualize", *TINY, "--layer", "image_block_4_0", "--unit", "3", "--quality",
                                   "best", "--cache", str(tmp_path / "cache")])
    assert bad.exit_code == 2 and "unknown quality" in bad.output


@pytest.mark.parametrize("extra, message", [
    (["--layer", "image_block_4_9", "--unit", "1"], "closest"),
    (["--layer", "image_block_4_0", "--unit", "512"], "0 to 511"),
    (["--layer", "image_block_4_0", "--unit", "1", "--objective", "spatial"], "unknown objective"),
])
def test_cli_visualize_bad_input_is_one_line_exit_2(tmp_path, extra, message):
    result = CliRunner().invoke(app, ["visualize", *TINY, "--cache", str(tmp_path), "--steps", "2", *extra])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
