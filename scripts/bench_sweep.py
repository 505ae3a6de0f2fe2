"""Benchmark of the sweep's scoring: zero-shot NSFW scores of N image embeddings, the streaming per-unit
correlation over an (N, U) activation matrix in chunk-sized blocks, and the top-k shares. Prints ONE JSON line.

    python scripts/bench_sweep.py                     # 100k images x 2560 units (RN50x4 image_block_4_5)
    python scripts/bench_sweep.py --images 20000      # smaller
"""
import argparse
import json
import time

import numpy as np

from neurolens.safety import zero_shot_scores
from neurolens.unit_scores import CorrelationAccumulator, top_share


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--units", type=int, default=2560)
    parser.add_argument("--dim", type=int, default=640)        # RN50x4 embedding width
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--block", type=int, default=4096)     # rows per scan chunk read
    parser.add_argument("--top-k", type=int, default=32)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    prompts = rng.normal(size=(args.prompts, args.dim)).astype(np.float32)
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    started = time.perf_counter()
    scores = np.empty(args.images, np.float32)
    for start in range(0, args.images, args.block):
        emb = rng.normal(size=(min(args.block, args.images - start), args.dim)).astype(np.float32)
        scores[start:start + len(emb)] = zero_shot_scores(emb, prompts, args.prompts // 3)
    zero_shot_s = time.perf_counter() - started

    acc = CorrelationAccumulator(scores, args.units)
    generate_s = 0.0
    started = time.perf_counter()
    for start in range(0, args.images, args.block):
        t0 = time.perf_counter()
        block = rng.random((min(args.block, args.images - start), args.units), dtype=np.float32)
        generate_s += time.perf_counter() - t0
        acc.add(np.arange(start, start + len(block)), block)
    corr = acc.correlation()
    correlation_s = time.perf_counter() - started - generate_s

    started = time.perf_counter()
    top = rng.integers(0, args.images, size=(args.units, args.top_k))
    top_share(top, scores, 0.5)
    share_s = time.perf_counter() - started
    print(json.dumps({"benchmark": "sweep_scoring", "images": args.images, "units": args.units, "dim": args.dim,
                      "zero_shot_s": round(zero_shot_s, 3), "correlation_s": round(correlation_s, 3),
                      "top_share_s": round(share_s, 4),
                      "images_per_s": round(args.images / (zero_shot_s + correlation_s + share_s)),
                      "finite": bool(np.isfinite(corr).all())}))


if __name__ == "__main__":
    main()
