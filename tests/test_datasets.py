"""Datasets: folders, tables, tar shards, the built-in set; bad items; RGB conversion; CLIP preprocessing;
and the figure primitives that map a layer cell back onto the preprocessed image."""
import csv
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neurolens.datasets.decode import BadImage, MAX_IMAGE_PIXELS, decode_image, preprocess, to_rgb
from neurolens.datasets.open import open_dataset
from neurolens.errors import DatasetError
from neurolens.display.figures import cell_center, crop_around_cell, tile_grid
from scan_data import bomb_png, encoded, make_bad_corpus, synthetic_image, write_images


def test_folder_is_recursive_sorted_and_identity_tracks_changes(tmp_path):
    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "b" / "deep", 2, start_seed=10, fmt="png")
    (tmp_path / "readme.txt").write_text("not listed")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    ds = open_dataset(str(tmp_path))
    assert len(ds) == 4
    assert ds.keys == sorted(ds.keys) and all(Path(k).is_absolute() for k in ds.keys)
    assert [Path(k).parent.name for k in ds.keys] == ["a", "a", "deep", "deep"]
    assert ds.captions is None
    assert open_dataset(str(tmp_path)).identity == ds.identity           # stable
    target = Path(ds.keys[0])
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))    # touched: a different dataset
    assert open_dataset(str(tmp_path)).identity != ds.identity
    assert ds.load(0).mode == "RGB"


def test_bad_items_raise_badimage_and_odd_modes_convert(tmp_path):
    info = make_bad_corpus(tmp_path / "corpus")
    ds = open_dataset(str(tmp_path / "corpus"))
    assert len(ds) == len(info["readable"]) + len(info["bad"])
    reasons = {}
    for i, key in enumerate(ds.keys):
        name = Path(key).name
        if name in info["bad"]:
            with pytest.raises(BadImage) as err:
                ds.load(i)
            reasons[name] = str(err.value)
        else:
            image = ds.load(i)
            assert image.mode == "RGB" and image.size[0] > 0
    assert reasons["zero.jpg"] == "zero-byte file"
    assert "truncated" in reasons["truncated.jpg"] and "truncated" in reasons["truncated.png"]
    assert "not an image" in reasons["notes.png"] and "not an image" in reasons["random.jpg"]
    assert "decompression bomb" in reasons["bomb.png"]
    assert reasons["folder.jpg"] == "is a directory"
    assert "not found" in reasons["vanished.jpg"]


def test_bomb_between_limit_and_twice_limit_is_refused():
    # PIL only warns for 1x-2x its limit; neurolens treats that warning as a bad item too
    side = int((MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_image(bomb_png(side, side))


def test_rgb_conversion_is_faithful():
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))                    # fully transparent -> white background
    out = np.asarray(to_rgb(rgba))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[1, 1]) == (10, 200, 30)
    deep = Image.fromarray(np.full((3, 3), 65535, np.uint16))
    assert deep.mode.startswith("I")
    assert np.asarray(decode_image(encoded(deep, "PNG"))).min() == 255   # 16-bit white stays white
    half = Image.fromarray(np.full((3, 3), 32896, np.uint16))            # 128 * 257
    assert np.asarray(decode_image(encoded(half, "PNG")))[0, 0, 0] == 128
    gray = Image.new("L", (3, 3), 77)
    assert tuple(np.asarray(to_rgb(gray))[0, 0]) == (77, 77, 77)
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))                   # pure red in CMYK
    r, g, b = np.asarray(decode_image(encoded(cmyk, "JPEG")))[1, 1]
    assert r > 200 and g < 60 and b < 60


def test_preprocess_equals_open_clip_eval_transform():
    import open_clip
    transform = open_clip.image_transform(64, is_train=False)
    for size in [(96, 80), (50, 120), (64, 64)]:
        image = synthetic_image(7, size)
        ours = torch.from_numpy(np.asarray(preprocess(image, 64), np.float32).transpose(2, 0, 1) / 255.0)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
        assert torch.allclose((ours - mean) / std, transform(image), atol=1e-5)


def test_table_datasets_csv_and_parquet(tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    rows = [("imgs/" + p.name, f"caption {i}") for i, p in enumerate(paths)]
    rows.append((str(tmp_path / "missing.jpg"), "gone"))                   # absolute path that does not exist
    with open(tmp_path / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "text"])
        writer.writerows(rows)
    ds = open_dataset(str(tmp_path / "data.csv"), image_column="file", caption_column="text")
    assert ds.keys[:3] == [str(p.resolve()) for p in paths]
    assert ds.captions == ["caption 0", "caption 1", "caption 2", "gone"]
    assert ds.load(1).size == (96, 80)
    with pytest.raises(BadImage):
        ds.load(3)
    with pytest.raises(DatasetError, match="no column 'image'"):
        open_dataset(str(tmp_path / "data.csv"))

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"image": [r[0] for r in rows[:3]]}), tmp_path / "data.parquet")
    table = open_dataset(str(tmp_path / "data.parquet"))
    assert table.keys == ds.keys[:3] and table.captions is None


def _write_shard(path: Path, start: int, count: int) -> None:
    with tarfile.open(path, "w") as archive:
        for i in range(start, start + count):
            for name, data in ((f"sample{i:03d}.jpg", encoded(synthetic_image(i), "JPEG")),
                               (f"sample{i:03d}.txt", f"a caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def test_tar_shards_with_brace_ranges(tmp_path):
    for shard in range(3):
        _write_shard(tmp_path / f"shard-{shard:03d}.tar", shard * 2, 2)
    ds = open_dataset(str(tmp_path / "shard-{000..002}.tar"))
    assert len(ds) == 6
    assert ds.keys[0].endswith("shard-000.tar:sample000.jpg")
    assert ds.captions == [f"a caption {i}" for i in range(6)]
    expected = decode_image(encoded(synthetic_image(3), "JPEG"))
    assert np.array_equal(np.asarray(ds.load(3)), np.asarray(expected))
    assert open_dataset(str(tmp_path / "*.tar")).identity == ds.identity
    assert open_dataset(str(tmp_path)).keys == ds.keys                      # a folder of shards


def test_builtin_and_missing_sources(tmp_path):
    ds = open_dataset(None)
    assert len(ds) == 20 and ds.keys[0] == "builtin:astronaut" and len(ds.captions) == 20
    assert ds.load(0).mode == "RGB"
    with pytest.raises(DatasetError):
        open_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(str(tmp_path / "empty"))


def test_crop_around_cell_centres_the_cell():
    image = Image.new("RGB", (90, 90), (0, 0, 0))
    # cell (4, 6) of a 9x9 grid covers x in [60, 70), y in [40, 50)
    image.paste((255, 0, 0), (60, 40, 70, 50))
    assert cell_center((4, 6), (9, 9), (90, 90)) == (65.0, 45.0)
    crop = np.asarray(crop_around_cell(image, (4, 6), (9, 9), 44, window=0.4))  # 36 px window, 44 px out
    red = np.argwhere(crop[..., 0] > 128)
    assert abs(red.mean(0) - 21.5).max() < 1.5                            # the cell sits in the middle
    corner = np.asarray(crop_around_cell(image, (0, 0), (9, 9), 45))       # shifted inside, not padded
    assert corner.shape == (45, 45, 3)


def test_tile_grid_layout():
    tiles = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(5)]
    grid = tile_grid(tiles, [f"#{i}" for i in range(5)], columns=3, title="unit 7")
    assert grid.width == 4 + 3 * 36
    assert grid.height > 2 * 32
    with pytest.raises(ValueError):
        tile_grid(tiles, ["x"], columns=2)


def test_img2dataset_output_folder(tmp_path):
    from scan_data import write_img2dataset
    made = write_img2dataset(tmp_path / "laion", [5, 4], bad_every=2)
    ds = open_dataset(str(tmp_path / "laion"))
    assert len(ds) == made["rows"] == 9                       # every parquet row is an item, in row order
    names = [key.rsplit(":", 1)[1] for key in ds.keys]
    assert names[:3] == ["000000000.jpg", "000000001", "000000002.jpg"] and names[5] == "000010000.jpg"
    assert ds.captions[1] == "synthetic picture 1"            # a failed row keeps its parquet caption
    reasons = {}
    for i in range(len(ds)):
        try:
            ds.load(i)
        except BadImage as exc:
            reasons[names[i].split(".")[0]] = str(exc)
    assert set(reasons) == set(made["failed"]) | set(made["bad"])
    assert reasons["000000001"] == "img2dataset status failed_to_download: HTTP Error 404: Not Found"
    # the parquet's statuses are part of the identity: the same tars without it are another dataset
    plain = open_dataset(str(tmp_path / "laion" / "*.tar"))
    assert plain.identity == ds.identity
    (tmp_path / "laion" / "00001.parquet").unlink()
    assert open_dataset(str(tmp_path / "laion")).identity != ds.identity
