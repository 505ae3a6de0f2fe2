"""A disk that fills up (ENOSPC) or refuses a write, in every kind of file neurolens writes: the command ends
with one line naming the path and what to do, exit 2, no traceback; the partial file is removed; finished
records stay readable; once there is space again the same command resumes and gives the result of an
uninterrupted run. Once on a real tiny filesystem (tmpfs), where the test may mount one."""
import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.datasets.open import open_dataset
from neurolens.pipelines.scan_find import find_scan
from neurolens.pipelines.scan import run_scan
from neurolens.storage.cache import Cache
from scan_data import assert_identical, write_images

LAYER = "image_block_4_0"
TINY = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu"]


def _one_line_error(result, path_part: str, option: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and path_part in lines[0] and option in lines[0], lines[0]
    return lines[0]


def _no_partial_files(root: Path):
    leftovers = [p for p in root.rglob("*") if p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp")]
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_images(folder, 24, start_seed=500, size=(72, 64))
    return folder


@pytest.fixture(scope="module")
def uninterrupted(tiny_clip, corpus, tmp_path_factory):
    return run_scan(tiny_clip, LAYER, open_dataset(str(corpus)), top_k=5, batch_size=4, workers=0,
                    cache=Cache(tmp_path_factory.mktemp("uninterrupted")))


@pytest.mark.parametrize("skip", [0, 5])
def test_scan_on_a_disk_that_fills_up_stops_with_one_line_and_resumes_to_the_same_result(
        tiny_clip, corpus, uninterrupted, tmp_path, full_disk, monkeypatch, skip):
    cache_root = tmp_path / "cache"
    args = ["scan", *TINY, "--layer", LAYER, "--dataset", str(corpus), "--top-k", "5", "--batch-size", "4",
            "--workers", "0", "--checkpoint-every", "1", "--cache", str(cache_root)]
    disk = full_disk(lambda path: path.endswith(".tmp") and ".h5." in path, skip=skip, keep=200)
    runner = CliRunner()
    failed = runner.invoke(app, args)
    line = _one_line_error(failed, str(cache_root), "--cache")
    assert "no space left" in line and "free some space" in line and disk.failed
    monkeypatch.undo()                                             # space is freed

    cache = Cache(cache_root)
    _no_partial_files(cache_root)
    records = list(cache.records())
    assert all(cache.read(path) is not None for path in records)  # what finished before the disk filled is whole
    checkpoints = list(cache.records("scan-checkpoint"))
    # writes in order: chunk 0-3, checkpoint (next 4), chunk 4-7, checkpoint (next 8), chunk 8-11, checkpoint...
    assert [cache.read(p).attrs["next_index"] for p in checkpoints] == ([8] if skip else [])
    dataset = open_dataset(str(corpus))
    assert find_scan(tiny_clip, LAYER, dataset, 5, cache=cache) is None

    resumed = runner.invoke(app, args + ["--json"])
    assert resumed.exit_code == 0, resumed.output
    result = find_scan(tiny_clip, LAYER, dataset, 5, cache=cache)
    assert_identical(result, uninterrupted)
    assert result.resumed_from == ([8] if skip else [])            # it went on from its last checkpoint


@pytest.mark.parametrize("error_number,words", [(errno.EDQUOT, "quota"), (errno.EROFS, "read-only"),
                                                (errno.EACCES, "permission denied")])
def test_other_write_failures_are_one_line_too(corpus, tmp_path, full_disk, error_number, words):
    full_disk(lambda path: ".h5." in path, error=error_number)
    result = CliRunner().invoke(app, ["scan", *TINY, "--layer", LAYER, "--dataset", str(corpus), "--workers", "0",
                                      "--cache", str(tmp_path / "c")])
    assert words in _one_line_error(result, str(tmp_path / "c"), "--cache")
    _no_partial_files(tmp_path)


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_png_writers_on_a_full_disk(tmp_path, full_disk, monkeypatch, fake_detector):
    """visualize and samples: the PNG write fails, the cached work is kept, the rerun writes the same PNG."""
    fake_detector(lambda rgb: False)
    runner = CliRunner()
    cache = ["--cache", str(tmp_path / "cache")]
    commands = {
        "fv": ["visualize", *TINY, "--layer", LAYER, "--unit", "3", "--steps", "3", "--seed", "0",
               "--out", str(tmp_path / "fv"), *cache],
        "samples": ["samples", *TINY, "--layer", LAYER, "--unit", "3", "--top-k", "4", "--workers", "0",
                    "--out", str(tmp_path / "samples" / "grid.png"), *cache],
    }
    for folder, args in commands.items():
        full_disk(lambda path: ".png." in path and path.endswith(".tmp"))
        _one_line_error(runner.invoke(app, args), str(tmp_path / folder), "--out")
        monkeypatch.undo()
        fake_detector(lambda rgb: False)
        _no_partial_files(tmp_path)
        assert not list((tmp_path / folder).glob("*.png")), folder
        again = runner.invoke(app, args)
        assert again.exit_code == 0, again.output
        assert len(list((tmp_path / folder).glob("*.png"))) == 1
    rerun = runner.invoke(app, commands["fv"])
    assert "(cache)" in rerun.output                                 # the render itself was kept in the cache
    fresh = tmp_path / "fresh"
    assert runner.invoke(app, commands["fv"][:-4] + ["--out", str(fresh), "--cache", str(fresh / "c")]).exit_code == 0
    assert np.array_equal(_png(next((tmp_path / "fv").glob("*.png"))), _png(next(fresh.glob("*.png"))))


def test_sweep_csv_figure_and_grid_on_a_full_disk(dataset_table, vocab_file, tmp_path, full_disk,  # noqa: F811
                                                  monkeypatch):
    runner = CliRunner()
    base = [*TINY, "--layer", LAYER, "--dataset", dataset_table, "--top-k", "8", "--vocab", vocab_file,
            "--cache", str(tmp_path / "cache")]
    commands = [(["sweep", *base, "--out", str(tmp_path / "flags.csv")], "flags.csv"),
                (["figure", *base, "--unit", "3", "--no-fv", "--out", str(tmp_path / "fig")], ".png."),
                (["grid", *base, "--units", "1,2", "--out", str(tmp_path / "grid")], ".png.")]
    for args, target in commands:
        full_disk(lambda path: target in path and path.endswith(".tmp"))
        _one_line_error(runner.invoke(app, args), str(tmp_path), "--out")
        monkeypatch.undo()
        _no_partial_files(tmp_path)
        again = runner.invoke(app, args)
        assert again.exit_code == 0, again.output
    rows = [line for line in (tmp_path / "flags.csv").read_text().splitlines() if not line.startswith("#")]
    assert rows[0].startswith("rank,unit,") and len(rows) == 513       # '#' lines first: the label sources
    assert len(list((tmp_path / "fig").glob("*.png"))) == 1 and len(list((tmp_path / "grid").glob("*.png"))) == 1


def test_checkpoint_on_a_full_disk(tmp_path, full_disk, monkeypatch):
    table = tmp_path / "pairs.csv"
    write_images(tmp_path / "img", 8, size=(48, 48))
    table.write_text("image,caption\n" + "".join(f"img/img_{i:04d}.jpg,a photo number {i}\n" for i in range(8)))
    args = ["train-toy", "--dataset", str(table), "--out", str(tmp_path / "out" / "toy.pt"), "--epochs", "1",
            "--batch-size", "4", "--cache", str(tmp_path / "cache")]
    full_disk(lambda path: "toy.pt" in path, keep=4096)
    line = _one_line_error(CliRunner().invoke(app, args), "toy.pt", "--out")
    assert "no space left" in line
    monkeypatch.undo()
    assert list((tmp_path / "out").iterdir()) == []
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    from neurolens.models.build import load_clip
    assert load_clip(checkpoint=str(tmp_path / "out" / "toy.pt"), device="cpu").name == "nl-toy-RN"


# ------------------------------------------------------------------------------ a real tiny filesystem

def _mount_tmpfs(folder: Path, size: str) -> str:
    """'' when mounted, else why it could not be (then the test is skipped with that reason)."""
    if sys.platform != "linux" or not shutil.which("mount"):
        return "mount(8) is not available on this platform"
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"nl-{uuid.uuid4().hex[:6]}", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root or CAP_SYS_ADMIN"
    return ""


@pytest.fixture()
def tiny_filesystem(tmp_path):
    folder = tmp_path / "tiny"
    why = _mount_tmpfs(folder, "96k")
    if why:
        pytest.skip(why)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.integration   # mounts a real tmpfs and runs the CLI twice in subprocesses
def test_scan_on_a_real_full_filesystem_ends_with_one_line_and_resumes(tiny_clip, corpus, uninterrupted,
                                                                       tiny_filesystem):
    cache_root = tiny_filesystem / "cache"
    command = [sys.executable, "-m", "neurolens", "scan", *TINY, "--layer", LAYER, "--dataset", str(corpus),
               "--top-k", "5", "--batch-size", "4", "--workers", "0", "--checkpoint-every", "1",
               "--cache", str(cache_root), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode == 2, (full.returncode, full.stderr[-2000:])     # not 139 (a crash), not 1
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and str(cache_root) in errors[0], full.stderr
    assert "Traceback" not in full.stderr
    _no_partial_files(tiny_filesystem)
    cache = Cache(cache_root)
    finished = list(cache.records())
    assert all(cache.read(path) is not None for path in finished)

    grown = subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_filesystem)], capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr                             # space is freed
    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = find_scan(tiny_clip, LAYER, open_dataset(str(corpus)), 5, cache=cache)
    assert_identical(result, uninterrupted)
