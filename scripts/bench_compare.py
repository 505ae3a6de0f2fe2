"""Benchmark of `neurolens compare` over 4 checkpoints: the whole comparison with every audit cached (seconds),
and without a cache, against the scans alone (the one pass per model that every audit needs). Prints ONE
JSON line.

    python scripts/bench_compare.py                                         # small: 4 tiny ResNets, 240 images
    python scripts/bench_compare.py --model RN50x4 --images 2000 --device cuda   # the lead's final figures
    python scripts/bench_compare.py --checkpoint a.pt --checkpoint b.pt --checkpoint c.pt --checkpoint d.pt \\
        --dataset probe/ --layer image_block_4_5

Without --checkpoint, 4 checkpoints are made from the seeded random weights of --model, each nudged with its own
seed (their audits are as costly as trained weights'). Without --dataset, --images synthetic captioned images
(noise and discs; a fifth of the captions carry a lexicon word) are written to a temporary folder.

Phases, each in a fresh cache (temporary folder) of its own:
  scans_s   run_scan of the 5 models the comparison audits (the 4 checkpoints and the random-weights model of
            their architecture), models already loaded: the forward passes alone
  cold_s    run_compare + write_report with an empty cache: loading, the 5 scans, the labels and scoring of
            every concept, the report (crops, plot, HTML)
  warm_s    the same again: every scan and audit read from the cache (models are still loaded: their
            fingerprints are the cache keys), the report written again
ratio_cold_to_scans = cold_s / scans_s. The concept set is the built-in one without NudeNet (its detector would
dominate a CPU run) unless --concepts names a file.
"""
import argparse
import copy
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def synthetic_probe(root: Path, count: int, size: int) -> str:
    rng = np.random.default_rng(0)
    with open(root / "probe.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i in range(count):
            base = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize((size, size), Image.BILINEAR)
            draw = ImageDraw.Draw(image)
            x0, y0 = rng.integers(0, size // 2, 2)
            draw.ellipse([x0, y0, x0 + size // 3, y0 + size // 3], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            image.save(root / f"img_{i:05d}.png")
            words = ["adult content" if i % 5 == 0 else "a photo", "of a dog" if i % 3 == 0 else "of shapes",
                     "with text" if i % 7 == 0 else "outdoors"]
            writer.writerow([f"img_{i:05d}.png", " ".join(words)])
    return str(root / "probe.csv")


def nudged_checkpoints(root: Path, model: str, device: str) -> list:
    from neurolens.models.build import load_clip
    from neurolens.models.checkpoint import save_checkpoint
    import open_clip
    base = load_clip(model, "none", device="cpu")
    config = open_clip.get_model_config(model)
    paths = []
    for seed in range(4):
        nudged = copy.deepcopy(base.model)
        generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for param in nudged.parameters():
                param.add_(0.2 * param.std(correction=0) * torch.randn(param.shape, generator=generator))
        paths.append(str(save_checkpoint(nudged, root / f"model{seed}.pt", model, model_config=config)))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[])
    parser.add_argument("--model", default="nl-tiny-RN", help="architecture of the made checkpoints")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--layer", default="image_block_4_0")
    parser.add_argument("--concepts", default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    from neurolens.labels.concepts import read_concept_set
    from neurolens.models.build import load_clip
    from neurolens.pipelines.compare import CompareModel, CompareSettings, run_compare, write_report
    from neurolens.pipelines.scan import run_scan
    from neurolens.pipelines.settings import ConceptSettings
    from neurolens.storage.cache import Cache

    work = Path(tempfile.mkdtemp(prefix="bench_compare_"))
    checkpoints = args.checkpoint or nudged_checkpoints(work, args.model, args.device)
    if len(checkpoints) != 4:
        sys.exit("give 4 --checkpoint (or none: 4 are made)")
    size = load_clip(checkpoint=checkpoints[0], device="cpu").image_size
    dataset = args.dataset or synthetic_probe(work, args.images, size)
    settings = CompareSettings(layers=(args.layer,), concepts=ConceptSettings(
        concepts=read_concept_set(args.concepts), detector=False))
    models = [CompareModel(f"model{k}", checkpoint=path) for k, path in enumerate(checkpoints)]

    started = time.perf_counter()
    clips = [load_clip(checkpoint=path, device=args.device) for path in checkpoints]
    clips.append(load_clip(clips[0].name, "none", device=args.device))
    load_s = time.perf_counter() - started
    cache = Cache(work / "scans")
    started = time.perf_counter()
    for clip in clips:
        run_scan(clip, args.layer, dataset, top_k=settings.concepts.top_k, cache=cache, batch_size=args.batch_size,
                 workers=args.workers)
    scans_s = time.perf_counter() - started

    timings = {}
    for phase in ("cold", "warm"):
        started = time.perf_counter()
        result = run_compare(models, dataset, settings, cache=work / "compare", device=args.device,
                             batch_size=args.batch_size, workers=args.workers)
        write_report(result, work / f"out_{phase}")
        timings[phase] = time.perf_counter() - started
    cached = all(item.audit.cached and item.baseline.cached for item in result.audits)
    print(json.dumps({"checkpoints": 4, "model": clips[0].name, "layer": args.layer,
                      "images": len(result.dataset), "concepts": len(result.concepts), "device": args.device,
                      "load_s": round(load_s, 2), "scans_s": round(scans_s, 2), "cold_s": round(timings["cold"], 2),
                      "warm_s": round(timings["warm"], 2), "warm_all_cached": cached,
                      "ratio_cold_to_scans": round(timings["cold"] / scans_s, 2),
                      "threads": torch.get_num_threads(), "load": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
