"""Benchmark of SAE training and of scanning SAE features: prints ONE JSON line per target.

  train_vectors_s     training vectors (cells / patch tokens) per second of the SAE training loop end to end:
                      images decoded, streamed through the model into the shuffled buffer, optimizer steps
                      (neurolens.sae.train.train_loop, one epoch over --train-n images)
  step_vectors_s      the same without the model: optimizer steps alone on vectors already in memory
  scan_neurons_s      seconds of `run_scan` of --scan-n images, neurons only (fresh cache)
  scan_both_s         seconds of `run_scan` with the SAE basis: neurons and features in the same pass, both
                      records written (fresh cache)
  scan_overhead       scan_both_s / scan_neurons_s, median over --repeats runs of each (goal <= 1.3)
Each timing runs the same images; the SAE has random weights (unit-norm decoder rows, encoder = their
transpose): its cost does not depend on what it learned. Images are synthetic JPEGs (bench_scan.write_jpegs).

Targets: toy = nl-toy-RN image_block_4_0 (random weights, 64 px, 2x2 cells, 512 channels);
         rn50x4 = RN50x4 image_block_4_5 (random weights, 288 px, 9x9 cells, 2560 channels);
         toy-quality = the quality bar's run: the demo's trained toy model and 3000 pairs (trained, or reused
         from --toy-root), an SAE with tests/test_sae_toy.py's settings (2x features, TopK k 16, 20 epochs, one
         thread): train_seconds (wall) and train_cpu_seconds (process time) of run_sae_train (training and
         quality report), and its quality report (goal: under 3 minutes on CPU).

  python scripts/bench_sae.py                         # toy and rn50x4, 8x features, k 32
  python scripts/bench_sae.py --targets toy-quality --toy-root /tmp/toy   # the toy quality bar's training time
  python scripts/bench_sae.py --quick                 # a small check that it runs (minutes on a laptop)
  python scripts/bench_sae.py --targets toy --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = {"toy": ("nl-toy-RN", "image_block_4_0"), "rn50x4": ("RN50x4", "image_block_4_5"),
           "toy-quality": ("nl-toy-RN", "image_block_4_0")}
TOY_QUALITY_SETTINGS = dict(features="2x", k=16, epochs=20, sparsity="topk")   # as tests/test_sae_toy.py


def bench_toy_quality(args) -> dict:
    import torch
    from neurolens.models.build import load_clip
    from neurolens.pipelines.demo import DemoSettings
    from neurolens.toy.store import toy_dataset, toy_model
    from neurolens.pipelines.sae import run_sae_train
    from neurolens.sae.train import SaeTrainSettings
    root = Path(args.toy_root or tempfile.mkdtemp(prefix="bench_sae_toy_"))
    demo = DemoSettings()
    data = toy_dataset(root, settings=demo.data_settings())
    checkpoint, _, _ = toy_model(root, data, demo.data_settings(), demo.train_settings())
    clip = load_clip(checkpoint=str(checkpoint), device="cpu")
    torch.set_num_threads(1)
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_sae_train(clip, "image_block_4_0", str(data), SaeTrainSettings(**TOY_QUALITY_SETTINGS),
                           name="bench", cache=root / f"cache-{time.time_ns()}", workers=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    summary = result.summary()
    return {"bench": "sae", "target": "toy-quality", "model": "nl-toy-RN (demo, trained)", "layer": "image_block_4_0",
            "threads": 1, **{k: summary[k] for k in ("features", "k", "epochs", "vectors", "explained_variance",
                                                     "l0", "dead_share", "embedding_cosine")},
            "train_seconds": round(wall, 2), "train_cpu_seconds": round(cpu, 2), "goal_seconds": 180,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def random_sae(d_in: int, d_sae: int, k: int, seed: int = 0):
    import torch
    import torch.nn.functional as F
    from neurolens.sae.model import SaeConfig, SparseAutoencoder
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_dec.copy_(F.normalize(torch.randn(d_sae, d_in, generator=generator), dim=1))
        sae.W_enc.copy_(sae.W_dec.t())
    return sae


def bench_target(name: str, args) -> dict:
    import numpy as np
    import torch
    from bench_scan import write_jpegs
    from neurolens.datasets.decode import resolve_decoder
    from neurolens.datasets.open import open_dataset
    from neurolens.models.build import load_clip
    from neurolens.models.layer_table import resolve_layer
    from neurolens.pipelines.scan import run_scan
    from neurolens.sae.basis import SaeBasis
    from neurolens.sae.buffer import ActivationStream
    from neurolens.sae.train import SaeTrainSettings, Trainer, resolve_features, train_loop

    model, layer = TARGETS[name]
    clip = load_clip(model, "none", device=args.device)
    spec = resolve_layer(clip, layer)
    d_sae = resolve_features(spec.channels, args.features)
    cells = spec.height * spec.width
    root = Path(tempfile.mkdtemp(prefix="bench_sae_"))
    train_n = args.train_n if args.train_n else (64 if args.quick else (2000 if name == "toy" else 64))
    scan_n = args.scan_n if args.scan_n else (16 if args.quick else (512 if name == "toy" else 32))
    if name == "rn50x4" and args.quick:
        train_n, scan_n = min(train_n, 8), min(scan_n, 4)
    write_jpegs(root / "train", train_n, clip.image_size, seed=1)
    write_jpegs(root / "scan", scan_n, clip.image_size, seed=2)
    train_set, scan_set = open_dataset(str(root / "train")), open_dataset(str(root / "scan"))

    # --- training throughput, end to end (one epoch) and optimizer steps alone
    settings = SaeTrainSettings(features=args.features, k=args.k, epochs=1, batch_size=args.batch_size, seed=0)
    stream = ActivationStream(clip, spec, train_set, np.arange(train_n), 256 * 2 ** 20 // (4 * spec.channels), 0,
                              images_per_forward=args.images_per_forward, workers=args.workers, decoder=args.decode)
    started = time.perf_counter()
    loop = train_loop(stream, settings, d_sae, "bench")
    train_seconds = time.perf_counter() - started
    vectors = loop.trainer.state.seen
    sample = next(stream.epoch(0))[1][: args.batch_size * 4]
    trainer = Trainer(spec.channels, d_sae, settings, 100, 10 ** 9, clip.device)
    trainer.start(sample)
    trainer.step(sample[: args.batch_size])   # warm-up
    started = time.perf_counter()
    steps = 0
    for batch in sample.split(args.batch_size):
        trainer.step(batch)
        steps += batch.shape[0]
    step_seconds = time.perf_counter() - started

    # --- scan overhead: neurons only vs neurons + features in one pass
    basis = SaeBasis(random_sae(spec.channels, d_sae, args.k).to(clip.device), "bench", spec)
    neurons_s, both_s = [], []
    for repeat in range(args.repeats):
        for with_features, times in ((False, neurons_s), (True, both_s)):
            started = time.perf_counter()
            run_scan(clip, layer, scan_set, top_k=args.top_k, batch_size=args.images_per_forward,
                     workers=args.workers, cache=root / f"cache-{repeat}-{with_features}", force=True,
                     basis=basis if with_features else None, decoder=args.decode)
            times.append(time.perf_counter() - started)
    neurons, both = statistics.median(neurons_s), statistics.median(both_s)
    return {"bench": "sae", "target": name, "model": model, "layer": layer, "device": str(clip.device),
            "decode": resolve_decoder(args.decode, clip.device),
            "threads": torch.get_num_threads(), "channels": spec.channels, "cells": cells, "features": d_sae,
            "k": args.k, "batch_size": args.batch_size, "train_images": train_n, "train_vectors": int(vectors),
            "train_seconds": round(train_seconds, 3), "train_vectors_s": round(vectors / train_seconds, 1),
            "step_vectors_s": round(steps / step_seconds, 1), "scan_images": scan_n, "repeats": args.repeats,
            "scan_neurons_s": round(neurons, 3), "scan_both_s": round(both, 3),
            "scan_overhead": round(both / neurons, 3), "goal_scan_overhead": 1.3,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="toy,rn50x4", help="comma-separated: toy, rn50x4")
    parser.add_argument("--features", default="8x")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024, help="vectors per optimizer step")
    parser.add_argument("--train-n", type=int, default=0, help="training images (default: toy 2000, rn50x4 64)")
    parser.add_argument("--scan-n", type=int, default=0, help="scanned images (default: toy 512, rn50x4 32)")
    parser.add_argument("--images-per-forward", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode", default="auto", help="auto, pil or torchvision (neurolens scan --decode)")
    parser.add_argument("--quick", action="store_true", help="small image counts and 1 repeat: checks that it runs")
    parser.add_argument("--toy-root", default=None, help="toy-quality: folder to keep (and reuse) the demo's toy "
                                                          "data and model in")
    args = parser.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 1
    for name in [t.strip() for t in args.targets.split(",") if t.strip()]:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}; use {', '.join(TARGETS)}")
        print(json.dumps(bench_toy_quality(args) if name == "toy-quality" else bench_target(name, args)), flush=True)


if __name__ == "__main__":
    main()
