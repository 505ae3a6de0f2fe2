"""Synthetic image data for the dataset and scan tests (noise + shapes; nothing real, nothing explicit), and the
check that two scans are identical."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def synthetic_image(seed: int, size=(96, 80)) -> Image.Image:
    """Smooth noise plus a few coloured shapes: distinct images that different units respond to."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        x1, y1 = x0 + int(rng.integers(6, width // 2)), y0 + int(rng.integers(6, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return image


def photo_like(seed: int, size=(500, 400)) -> Image.Image:
    """A photo-like picture: smooth colour gradients, a low-frequency texture, grain, and a few soft-edged shapes
    (JPEG-compressible like a photo, unlike flat colour or white noise)."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    corners = rng.uniform(0, 255, (2, 2, 3)).astype(np.float32)
    u, v = (x / max(1, width - 1))[..., None], (y / max(1, height - 1))[..., None]
    pixels = (corners[0, 0] * (1 - u) * (1 - v) + corners[0, 1] * u * (1 - v) + corners[1, 0] * (1 - u) * v
              + corners[1, 1] * u * v)
    coarse = rng.normal(0, 40, (height // 24 + 2, width // 24 + 2, 3)).astype(np.float32)
    texture = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels += np.asarray(texture, np.float32) - 128 + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, max(1, width - 8))), int(rng.integers(0, max(1, height - 8)))
        x1 = x0 + int(rng.integers(4, max(5, width // 2)))
        y1 = y0 + int(rng.integers(4, max(5, height // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(0.8))


def write_images(folder: Path, count: int, start_seed: int = 0, fmt: str = "jpg", size=(96, 80)) -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:04d}.{fmt}"
        synthetic_image(start_seed + i, size).save(path, quality=90) if fmt == "jpg" else synthetic_image(start_seed + i, size).save(path)
        paths.append(path)
    return paths


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (2.5 GP): a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (width + 1))  # one row; the header alone is what gives it away
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def make_bad_corpus(folder: Path) -> Dict[str, List[str]]:
    """A folder with good images, readable odd modes, and bad items. Returns {'readable': names, 'bad': names}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = synthetic_image(100, (72, 64))
    readable = {
        "good_a.jpg": encoded(rgb, "JPEG"),
        "good_b.png": encoded(synthetic_image(101), "PNG"),
        "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "gray.png": encoded(rgb.convert("L"), "PNG"),
        "palette.gif": encoded(rgb.convert("P", palette=Image.ADAPTIVE), "GIF"),
        "palette.png": encoded(rgb.convert("P", palette=Image.ADAPTIVE), "PNG"),
        "rgba.png": encoded(rgb.convert("RGBA"), "PNG"),
        "la.png": encoded(rgb.convert("LA"), "PNG"),
        "deep16.png": encoded(Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257), "PNG"),
        "pic.tiff": encoded(rgb, "TIFF"),
        "pic.webp": encoded(rgb, "WEBP"),
        "pic.bmp": encoded(rgb, "BMP"),
    }
    jpeg, png = encoded(synthetic_image(102), "JPEG"), encoded(synthetic_image(103), "PNG")
    bad = {
        "zero.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "random.jpg": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "notes.png": b"this is a text file, not an image\n" * 20,
        "bomb.png": bomb_png(),
    }
    for name, data in {**readable, **bad}.items():
        (folder / name).write_bytes(data)
    (folder / "folder.jpg").mkdir()                      # unreadable: a directory with an image name
    os.symlink(folder / "does-not-exist.jpg", folder / "vanished.jpg")  # unreadable: the target is gone
    return {"readable": sorted(readable), "bad": sorted(list(bad) + ["folder.jpg", "vanished.jpg"])}


def _add_member(archive, name: str, data: bytes) -> None:
    import tarfile
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_img2dataset(folder: Path, rows_per_shard: List[int], start_seed: int = 0, size=(96, 80),
                      bad_every: int = 0, nsfw_every: int = 0) -> Dict[str, object]:
    """img2dataset's webdataset output: per shard NNNNN.tar (KEY.jpg, KEY.txt, KEY.json) and NNNNN.parquet
    (url, caption, key, status, error_message, width, height), keys NNNNNRRRR.

    In every shard, row 1 failed to download (no member, status failed_to_download). With bad_every=n, every
    n-th row (from row 2) is a bad member listed as success: a zero-byte file, a truncated JPEG, or text.
    With nsfw_every=n, every n-th image (by seed) has a caption with a lexicon word and the LAION-style
    column NSFW = "NSFW" (in the parquet and the .json), the others "UNLIKELY".
    Returns {'rows': total rows, 'failed': keys of failed rows, 'bad': keys of bad members}."""
    import json
    import tarfile
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True, exist_ok=True)
    failed, bad, seed = [], [], start_seed
    for shard, count in enumerate(rows_per_shard):
        table = {"url": [], "caption": [], "key": [], "status": [], "error_message": [], "width": [], "height": [],
                 "NSFW": []}
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for row in range(count):
                key = f"{shard:05d}{row:04d}"
                positive = bool(nsfw_every) and seed % nsfw_every == 0
                caption = f"{'a nude ' if positive else ''}synthetic picture {seed}"
                nsfw = "NSFW" if positive else "UNLIKELY"
                status, error = "success", None
                if row == 1:
                    status, error = "failed_to_download", "HTTP Error 404: Not Found"
                    failed.append(key)
                else:
                    image = synthetic_image(seed, size)
                    data = encoded(image, "JPEG", quality=90)
                    if bad_every and row >= 2 and (row - 2) % bad_every == 0:
                        data = [b"", data[: len(data) // 2], b"not an image\n" * 10][len(bad) % 3]
                        bad.append(key)
                    _add_member(archive, f"{key}.jpg", data)
                    _add_member(archive, f"{key}.txt", caption.encode())
                    _add_member(archive, f"{key}.json", json.dumps({"key": key, "caption": caption,
                                                                   "status": status, "NSFW": nsfw}).encode())
                for name, value in (("url", f"https://example.invalid/{key}.jpg"), ("caption", caption),
                                    ("key", key), ("status", status), ("error_message", error),
                                    ("width", size[0]), ("height", size[1]), ("NSFW", nsfw)):
                    table[name].append(value)
                seed += 1
        pq.write_table(pa.table(table), folder / f"{shard:05d}.parquet")
    (folder / "00000_stats.json").write_text("{}")
    return {"rows": sum(rows_per_shard), "failed": failed, "bad": bad}


def assert_identical(a, b) -> None:
    """Two scan results hold the same statistics, bit for bit, and skipped the same files."""
    for name in ("top_values", "top_indices", "top_cells", "mean", "var", "mean_map"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.per_image_max(), b.per_image_max())
    assert (a.count, a.skipped_paths, a.skipped_reasons) == (b.count, b.skipped_paths, b.skipped_reasons)
