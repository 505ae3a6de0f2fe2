"""Synthetic data for the sweep, label and panel tests: a captioned image table, a small vocabulary and a
known stand-in scorer (noise + shapes; nothing real, nothing explicit). The fixtures are in conftest.py."""
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LAYER = "image_block_4_0"

VOCAB_WORDS = ["cat", "dog", "car", "tree", "house", "moon", "circle", "square", "red", "blue", "green",
               "pattern", "texture", "noise", "ball", "sky", "water", "stone", "erotic pleasure", "nude", "sexy",
               "porn", "adult content", "a photo of shapes", "bicycle", "flower", "bird", "horse", "coffee", "book"]


def synthetic(seed, size=64):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(2):
        x0, y0 = rng.integers(0, size - 16, 2)
        draw.ellipse([x0, y0, x0 + 15, y0 + 15], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def write_table(root: Path) -> str:
    """36 synthetic images in a CSV table with captions; every 6th caption has a lexicon word."""
    rows = []
    for i in range(36):
        name = f"img_{i:03d}.png"
        synthetic(i).save(root / name)
        caption = f"adult content number {i}" if i % 6 == 0 else f"a photo of shapes number {i}"
        rows.append((name, caption))
    table = root / "data.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return str(table)


def write_vocab(path: Path) -> str:
    """A small vocabulary (the builtin one has ~47k entries: too slow to encode in every test)."""
    path.write_text("\n".join(VOCAB_WORDS) + "\n")
    return str(path)


def stub_scorer(clip, embeddings):
    """A known per-image score: a fixed function of the image embeddings (the logistic of the standardized
    first embedding coordinate; random tiny-model embeddings are close together, so it is standardized)."""
    first = np.asarray(embeddings, dtype=np.float64)[:, 0]
    return 1.0 / (1.0 + np.exp(-3.0 * (first - first.mean()) / (first.std() + 1e-12)))
