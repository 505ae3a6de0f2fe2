"""The visualize job and command: cache hits, --force, PNGs, JSON, errors, no hooks left."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.activations.hooks import hook_count
from neurolens.optvis import loop as optvis_loop
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
    monkeypatch.setattr(optvis_loop, "render", no_render)     # what run_visualize imports when it must render
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


def test_json_compares_the_visualization_with_the_newest_scans_top1(tiny_clip, dataset_table, tmp_path):
    """visualize --json adds the unit's max over the saved image's cells (measured as a scan measures a dataset
    image), the newest finished scan's top-1 of the unit, their ratio and which scan it is."""
    import os
    from PIL import Image
    import torch
    from neurolens.activations.forward import layer_forward
    from neurolens.models.layer_table import resolve_layer
    from neurolens.pipelines.scan import run_scan
    cache = Cache(tmp_path / "cache")
    builtin = run_scan(tiny_clip, "image_block_4_0", None, top_k=4, cache=cache)
    table = run_scan(tiny_clip, "image_block_4_0", dataset_table, top_k=4, cache=cache)
    os.utime(builtin.path, (1e9, 1e9))                      # the table's scan is the newer one
    args = ["visualize", *TINY, "--layer", "image_block_4_0", "--unit", "3", "--unit", "7", "--steps", "4",
            "--no-blur", "--out", str(tmp_path / "out"), "--cache", str(cache.root), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    spec = resolve_layer(tiny_clip, "image_block_4_0")
    for row in rows:
        unit = row["unit"]
        saved = np.asarray(Image.open(row["path"]).convert("RGB"), dtype=np.float32) / 255
        acts, _ = layer_forward(tiny_clip, spec, torch.from_numpy(saved).permute(2, 0, 1)[None])
        assert row["unit_max"] == pytest.approx(float(acts[0, unit].max()), rel=1e-5, abs=1e-6)
        assert row["dataset_top1"] == pytest.approx(float(table.top_values[unit, 0]))
        assert row["top1_scan"] == {"record": str(table.path), "dataset": table.description, "images": 36,
                                    "index": int(table.top_indices[unit, 0])}
        assert row["above_top1"] == (row["unit_max"] >= row["dataset_top1"])
        if row["dataset_top1"] > 0:
            assert row["top1_ratio"] == pytest.approx(row["unit_max"] / row["dataset_top1"])
    # cached: the same figures; without a scan of the layer they are null and the old keys are unchanged
    again = json.loads(CliRunner().invoke(app, args).stdout)["results"]
    assert [r["unit_max"] for r in again] == [r["unit_max"] for r in rows] and all(r["cached"] for r in again)
    empty = CliRunner().invoke(app, args[:-3] + ["--cache", str(tmp_path / "other"), "--json"])
    plain = json.loads(empty.stdout)["results"][0]
    assert plain["dataset_top1"] is None and plain["top1_scan"] is None and plain["top1_ratio"] is None
    assert plain["unit_max"] is not None and {"unit", "seed", "path", "activation", "cached", "blurred"} <= set(plain)


def test_cli_says_in_one_line_when_a_run_ends_below_the_datasets_top1(tiny_clip, tmp_path, monkeypatch):
    from neurolens.records.scan import DatasetTop
    top = DatasetTop(value=1e6, index=5, dataset="a test set (9 images)", images=9, record=tmp_path / "scan.h5")
    monkeypatch.setattr(job, "dataset_top1", lambda *args, **kwargs: top)
    args = ["visualize", *TINY, "--layer", "image_block_4_0", "--unit", "3", "--steps", "2", "--out",
            str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "top-1" in line]
    assert len(lines) == 1 and "below the dataset's top-1" in lines[0] and "image 5 of a test set" in lines[0]
    top = DatasetTop(value=-1e6, index=5, dataset="a test set (9 images)", images=9, record=tmp_path / "scan.h5")
    monkeypatch.setattr(job, "dataset_top1", lambda *args, **kwargs: top)
    lines = [line for line in CliRunner().invoke(app, args).stdout.splitlines() if "top-1" in line]
    assert len(lines) == 1 and ">= the dataset's top-1" in lines[0] and "below" not in lines[0]


def test_a_record_written_before_maxima_were_kept_still_reads(tiny_clip, tmp_path):
    cache = Cache(tmp_path / "cache")
    settings = RenderSettings(steps=2)
    [first] = job.run_visualize(tiny_clip, "image_block_4_0", [3], settings, cache=cache)
    path = job.record_path(cache, tiny_clip, "image_block_4_0", 3, job.resolved_settings(tiny_clip, settings))
    record = cache.read(path)
    del record.arrays["maxima"]
    cache.write(path, record)
    [old] = job.run_visualize(tiny_clip, "image_block_4_0", [3], settings, cache=cache)
    assert old.cached and old.maxima is None and first.maxima is not None
    comparison = job.top1_comparison(cache, tiny_clip.fingerprint, "image_block_4_0", 3, old.maxima)
    assert comparison["unit_max"] is None and comparison["above_top1"] is None and job.top1_line(comparison) is None
