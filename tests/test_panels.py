"""Unit panels and grids: blurred by default (measured), unflagged images pixel-identical, no model forward
when everything is cached, and the figure/grid/sweep commands."""
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from neurolens.labels import blur, zero_shot as safety
from neurolens.datasets.open import open_dataset
from neurolens.datasets.decode import preprocess
from neurolens.display.figures import crop_around_cell
from neurolens.display.panels import units_grid
from neurolens.labels.policy import BlurPolicy
from neurolens.pipelines.figures import run_figure, run_grid
from neurolens.pipelines.sweep import run_sweep
from neurolens.storage.cache import Cache
from neurolens.types import RenderSettings
from neurolens.scoring.flags import FlagRule

from sweep_data import LAYER, stub_scorer

# The labels stand in for NSFW labels: a column of the table that marks the 12 images on which one unit of the
# random model (PLANTED_UNIT) responds most, so that unit follows the labels by construction and is flagged;
# 36 images give large q-values, so the bar is q <= 0.2
RULE = FlagRule(max_q=0.2, min_auc=0.8)
RENDER = RenderSettings(steps=3, seeds=(0, 1))
PLANTED_UNIT = 7
PANEL_KW = dict(top_k=8, text_top_k=10, rule=RULE, labels=["column:nsfw=1"])


@pytest.fixture(scope="module")
def panel_table(tiny_clip, dataset_table, tmp_path_factory):  # noqa: F811
    """dataset_table with an `nsfw` column: 1 on the 12 images where PLANTED_UNIT's spatial maximum is highest."""
    import csv
    import shutil

    import torch
    from neurolens.activations.hooks import forward_to
    from neurolens.models.layer_table import resolve_layer
    root = tmp_path_factory.mktemp("paneldata")
    source = open_dataset(dataset_table)
    pixels = torch.stack([torch.from_numpy(np.asarray(preprocess(source.load(i), tiny_clip.image_size), dtype=np.float32))
                          for i in range(len(source))]).permute(0, 3, 1, 2) / 255
    spec = resolve_layer(tiny_clip, LAYER)
    with torch.no_grad():
        acts = forward_to(tiny_clip.model, tiny_clip.normalize(pixels), [spec])[spec.name]
    strongest = set(np.argsort(-acts[:, PLANTED_UNIT].amax(dim=(1, 2)).numpy())[:12].tolist())
    with open(dataset_table, newline="") as handle:
        rows = list(csv.reader(handle))
    with open(root / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(rows[0] + ["nsfw"])
        for index, row in enumerate(rows[1:]):
            shutil.copy(Path(dataset_table).parent / row[0], root / row[0])
            writer.writerow(row + [int(index in strongest)])
    return str(root / "data.csv")


@contextmanager
def count_forwards(model):
    """Counts calls of every module of the model (any forward, truncated or full, image or text tower)."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.append(mod)) for m in model.modules()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def swept(tiny_clip, panel_table, vocab_file, tmp_path_factory):  # noqa: F811
    cache = Cache(tmp_path_factory.mktemp("panelcache"))
    PANEL_KW["vocab"] = vocab_file
    result = run_sweep(tiny_clip, LAYER, panel_table, cache=cache, scorer=stub_scorer, write_csv=False, **PANEL_KW)
    flagged = result.flagged_units
    unflagged = [int(u) for u in result.scores.ranking()[::-1] if not result.scores.flagged[u]]
    assert PLANTED_UNIT in flagged and unflagged
    return result, cache, flagged, unflagged


def _expected_crop(tiny_clip, dataset, sweep, unit, index, pixels):
    rank = list(sweep.scan.top_indices[unit]).index(index)
    source = preprocess(dataset.load(index), tiny_clip.image_size)
    return crop_around_cell(source, sweep.scan.top_cells[unit, rank], sweep.scan.grid, pixels)


def _check_written(tiny_clip, dataset, sweep, path, figure, fvs, blur_on, pixels):
    written = Image.open(path).convert("RGB")
    assert written.size == figure.image.size
    for placed in figure.placed:
        tile = written.crop(placed.box)
        if placed.kind == "crop":
            original = _expected_crop(tiny_clip, dataset, sweep, placed.unit, placed.source_index, tile.width)
            score = float(sweep.image_scores[placed.source_index])
        else:
            original = Image.fromarray(fvs[placed.unit][placed.source_index]).resize(tile.size, Image.BICUBIC)
            score = None
        flagged = bool(sweep.scores.flagged[placed.unit])
        # the column labels are the sweep's image scores (0 or 1): 0.5 and above is a positive label
        must_blur = blur_on and (flagged or (score is not None and score >= 0.5))
        if must_blur:
            assert placed.reason is not None
        if placed.reason is None:
            assert np.array_equal(np.asarray(tile), np.asarray(original)), placed   # unchanged pixels
        else:
            keep = tile.height - blur.label_band_height(tile.height)
            top = (0, 0, tile.width, keep)
            assert blur.detail_retained(original.crop(top), tile.crop(top)) < 0.05
            assert blur.edge_correlation(original.crop(top), tile.crop(top)) < 0.6
            band = np.asarray(tile)[keep:]
            assert (band < 10).all(axis=-1).mean() > 0.5        # the black label band is there


def _fvs(tiny_clip, cache, units):
    from neurolens.pipelines.visualize import run_visualize
    return {r.unit: np.asarray(r.images) for r in run_visualize(tiny_clip, LAYER, units, RENDER, cache=cache)}


def test_figure_blurs_flagged_units_and_nsfw_images_and_leaves_the_rest_unchanged(tiny_clip, swept, panel_table, tmp_path):  # noqa: F811
    sweep, cache, flagged, unflagged = swept
    # an unflagged unit that has both NSFW and clean top images
    mixed = next(u for u in unflagged if 0 < sweep.scores.top_nsfw_share[u] < 1)
    units = [flagged[0], mixed]
    written = run_figure(tiny_clip, LAYER, units, panel_table, out=tmp_path, render_settings=RENDER, cache=cache,
                         scorer=stub_scorer, **PANEL_KW)
    dataset = open_dataset(panel_table)
    fvs = _fvs(tiny_clip, cache, units)
    for (path, figure), unit in zip(written, units):
        assert path.parent == tmp_path and path.name.endswith(f"unit{unit}.png")
        kinds = [p.kind for p in figure.placed]
        assert kinds.count("fv") == 2 and kinds.count("crop") == 8
        _check_written(tiny_clip, dataset, sweep, path, figure, fvs, True, None)
    flagged_fig, mixed_fig = written[0][1], written[1][1]
    assert all(p.reason == "flagged unit" for p in flagged_fig.placed)
    crop_reasons = [p.reason for p in mixed_fig.placed if p.kind == "crop"]
    assert any(r is None for r in crop_reasons) and any(r is not None for r in crop_reasons)


def test_no_blur_writes_raw_pixels_to_a_separate_file(tiny_clip, swept, panel_table, tmp_path):  # noqa: F811
    sweep, cache, flagged, _ = swept
    [(path, figure)] = run_figure(tiny_clip, LAYER, [flagged[0]], panel_table, out=tmp_path, blur=False,
                                  render_settings=RENDER, cache=cache, scorer=stub_scorer, **PANEL_KW)
    assert path.name.endswith("_noblur.png") and "NOT BLURRED" in figure.note
    kinds = [p.kind for p in figure.placed]
    assert kinds.count("fv") == 2 and kinds.count("crop") == 8     # the same panel as with blur, so the next check counts
    assert all(p.reason is None for p in figure.placed)
    _check_written(tiny_clip, open_dataset(panel_table), sweep, path, figure,
                   _fvs(tiny_clip, cache, [flagged[0]]), False, None)


def test_grid_of_flagged_units_and_chosen_units(tiny_clip, swept, panel_table, tmp_path):  # noqa: F811
    sweep, cache, flagged, unflagged = swept
    path, figure, shown = run_grid(tiny_clip, LAYER, flagged=True, top=3, dataset=panel_table, out=tmp_path,
                                   cache=cache, scorer=stub_scorer, **PANEL_KW)
    assert shown == flagged[:3]
    assert figure.placed and all(p.reason == "flagged unit" for p in figure.placed)
    _check_written(tiny_clip, open_dataset(panel_table), sweep, path, figure, {}, True, None)
    path, figure, shown = run_grid(tiny_clip, LAYER, units=[unflagged[0], flagged[0]], dataset=panel_table,
                                   out=tmp_path, cache=cache, render_fv=True, render_settings=RENDER,
                                   scorer=stub_scorer, **PANEL_KW)
    assert shown == [unflagged[0], flagged[0]]
    assert {p.kind for p in figure.placed} == {"fv", "crop"}
    _check_written(tiny_clip, open_dataset(panel_table), sweep, path, figure,
                   _fvs(tiny_clip, cache, shown), True, None)


def test_grid_columns_line_up_when_a_unit_has_no_feature_visualization(swept, panel_table):  # noqa: F811
    sweep, _, flagged, unflagged = swept
    with_fv, without = flagged[0], unflagged[0]
    fv = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)   # synthetic, stands in for a render
    policy = BlurPolicy(blur=False, detector=False, zero_shot=False)
    dataset = open_dataset(panel_table)

    def lefts(figure, unit, kind):
        return [p.box[0] for p in figure.placed if p.unit == unit and p.kind == kind]

    figure = units_grid(sweep, dataset, [without, with_fv, without], "grid", 64, policy, fvs={with_fv: fv})
    crops = lefts(figure, with_fv, "crop")
    assert len(crops) == 6 and lefts(figure, without, "crop") == crops + crops   # the same columns in every row
    assert lefts(figure, with_fv, "fv")[0] < crops[0] and lefts(figure, without, "fv") == []
    # the empty tile is where the feature visualization would be: light grey, not a placed image
    top = min(p.box[1] for p in figure.placed if p.unit == without)
    x = lefts(figure, with_fv, "fv")[0]
    empty = np.asarray(figure.image.crop((x, top, x + 80, top + 80)))
    assert (empty == 235).all(axis=-1).mean() > 0.8 and (empty >= 100).all()    # grey, with a short grey note
    # no unit with a visualization: no empty column at all
    plain = units_grid(sweep, dataset, [without, with_fv], "grid", 64, policy, fvs={})
    assert lefts(plain, without, "crop") == lefts(plain, with_fv, "crop") and lefts(plain, without, "crop")[0] < crops[0]


def test_drawing_a_swept_layer_runs_no_forward(tiny_clip, swept, panel_table, tmp_path):  # noqa: F811
    sweep, cache, flagged, unflagged = swept
    units = [flagged[0], unflagged[0]]
    # right after the sweep, a figure without feature visualization needs nothing but the cache
    with count_forwards(tiny_clip.model) as calls:
        run_figure(tiny_clip, LAYER, units, panel_table, out=tmp_path, fv=False, cache=cache, scorer=stub_scorer,
                   **PANEL_KW)
        run_grid(tiny_clip, LAYER, flagged=True, dataset=panel_table, out=tmp_path, cache=cache,
                 scorer=stub_scorer, **PANEL_KW)
    assert calls == []
    # once the feature visualizations are rendered (and scored), the full figure is forward-free too
    run_figure(tiny_clip, LAYER, units, panel_table, out=tmp_path, render_settings=RENDER, cache=cache,
               scorer=stub_scorer, **PANEL_KW)
    with count_forwards(tiny_clip.model) as calls:
        run_figure(tiny_clip, LAYER, units, panel_table, out=tmp_path, render_settings=RENDER, cache=cache,
                   scorer=stub_scorer, **PANEL_KW)
    assert calls == []
    # the counter does see forwards
    with count_forwards(tiny_clip.model) as calls:
        safety.nsfw_scores_for_images(tiny_clip, [Image.new("RGB", (64, 64))])
    assert calls


CLI_MODEL = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu", "--layer", LAYER]


def test_cli_sweep_json_figure_and_grid(dataset_table, vocab_file, tmp_path):  # noqa: F811
    from neurolens.cli import app
    runner = CliRunner()
    cache = ["--cache", str(tmp_path / "cache")]
    data = ["--dataset", dataset_table, "--top-k", "8", "--vocab", vocab_file]
    result = runner.invoke(app, ["sweep", *CLI_MODEL, *cache, *data, "--json", "--out", str(tmp_path / "flags.csv")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 512 and all(set(r) == {"unit", "correlation", "top_nsfw_share", "text_nsfw_share", "flagged",
                                               "auc", "p", "q", "text_flag", "why"} for r in rows)
    auc = [r["auc"] for r in rows]
    assert auc == sorted(auc, reverse=True)
    # random weights: the zero-shot score is never a label source; the sources used are printed (stderr)
    assert "zero-shot: not used (random weights" in result.stderr and "used: captions" in result.stderr
    lines = (tmp_path / "flags.csv").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert any("used: captions" in line for line in lines[:header])
    assert lines[header].startswith("rank,unit,auc,p,q,correlation")

    result = runner.invoke(app, ["sweep", *CLI_MODEL, *cache, *data, "--out", str(tmp_path / "flags.csv")])
    assert result.exit_code == 0 and "rank" in result.output and "flags:" in result.output
    assert "labels: captions: 6 positive, 30 negative" in result.output
    assert "statistics are weak" in result.output                      # 6 positives: fewer than 10
    result = runner.invoke(app, ["sweep", *CLI_MODEL, *cache, *data, "--labels", "zero-shot"])
    assert result.exit_code == 2 and "random-weights" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["sweep", *CLI_MODEL, *cache, *data, "--labels", "column:nope"])
    assert result.exit_code == 2 and "no column 'nope'" in result.output
    result = runner.invoke(app, ["sweep", *CLI_MODEL, *cache, *data, "--min-auc", "0.3"])
    assert result.exit_code == 2 and "--min-auc" in result.output

    result = runner.invoke(app, ["figure", *CLI_MODEL, *cache, *data, "--unit", "3", "--steps", "2",
                                 "--out", str(tmp_path / "fig"), "--no-blur"])
    assert result.exit_code == 0, result.output
    assert "--no-blur" in result.output and "NOT BLURRED" in result.output
    assert [p.name for p in (tmp_path / "fig").iterdir()] == ["nl-tiny-RN_image_block_4_0_unit3_noblur.png"]

    result = runner.invoke(app, ["grid", *CLI_MODEL, *cache, *data, "--units", "1,2,3", "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "g").glob("*.png"))

    result = runner.invoke(app, ["figure", *CLI_MODEL, *cache, *data, "--unit", "999"])
    assert result.exit_code == 2 and "error:" in result.output
    result = runner.invoke(app, ["grid", *CLI_MODEL, *cache, *data, "--units", "a,b"])
    assert result.exit_code == 2 and "--units" in result.output


def test_visualize_blurs_units_flagged_in_a_cached_sweep_of_the_layer(tiny_clip, swept, tmp_path, no_detector):
    """No detector and random weights: the cached sweep's flag is the only reason to blur, and it does."""
    from neurolens.pipelines.visualize import run_visualize
    sweep, cache, flagged, unflagged = swept
    results = run_visualize(tiny_clip, LAYER, [flagged[0], unflagged[0]], RENDER, cache=cache, out_dir=tmp_path)
    assert results[0].blurred == ("flagged unit", "flagged unit") and results[1].blurred == (None, None)
    assert [len(r.paths) for r in results] == [2, 2]      # the pixel checks below zip over the written files
    for result in results:
        for path, image, reason in zip(result.paths, result.images, result.blurred):
            written = Image.open(path).convert("RGB")
            if reason is None:
                assert np.array_equal(np.asarray(written), image)
            else:
                keep = (0, 0, written.width, written.height - blur.label_band_height(written.height))
                original = Image.fromarray(image)
                assert blur.detail_retained(original.crop(keep), written.crop(keep)) < 0.05
    # a layer alias finds the same cached sweep
    from neurolens.labels.policy import BlurPolicy
    assert set(flagged) <= BlurPolicy.for_layer(tiny_clip, "image_block_4_0_Add_6_0", cache).flagged
