"""Benchmark of the sweep's scoring after the scan: zero-shot NSFW scores of N image embeddings, then the
per-unit statistics (AUC, Mann-Whitney p, BH q, correlation; neurolens.scoring.statistics) over an (N, U) activation
matrix read in chunk-sized blocks, on the exact path (every row kept, ranked per unit) and on the streaming
binned path (histograms over quantile edges from a sample of rows), each in its own process so that its
peak RSS is its own. Prints ONE JSON line.

    python scripts/bench_sweep.py                      # 20,000 images x 2560 units (RN50x4 image_block_4_5)
    python scripts/bench_sweep.py --images 2000 --units 256     # a quick check

Activations are synthetic: each unit's values are normal noise plus a unit-specific shift on the positive
images (12 %), so AUCs spread from 0.5 to about 1; generation time is not counted.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def blocks(args):
    """(rows, values (b, U) float32) blocks, the same in every process."""
    effect = np.linspace(0.0, 2.5, args.units, dtype=np.float32)
    for index, start in enumerate(range(0, args.images, args.block)):
        rng = np.random.default_rng([args.seed, index])
        rows = np.arange(start, min(args.images, start + args.block))
        positive = labels(args)[rows]
        values = rng.standard_normal((len(rows), args.units), dtype=np.float32) + positive[:, None] * effect
        yield rows, np.maximum(values, 0.0)            # ReLU-like: exact ties at 0, as real activations have


def labels(args):
    return (np.random.default_rng([args.seed, 10**6]).random(args.images) < args.positive_share).astype(np.float32)


def run_path(args) -> dict:
    """One path in this process: generate blocks, accumulate, compute the result; time and peak RSS."""
    import torch
    from neurolens.scoring.statistics import UnitLabelStats, quantile_edges
    torch.set_num_threads(args.threads)
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    generate_s = 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    edges = None
    if args.path == "binned":
        t0 = time.perf_counter()
        sample = np.concatenate([values for _, values in _first_blocks(args)])
        generate_s += time.perf_counter() - t0
        edges = quantile_edges(sample, args.bins)
    stats = UnitLabelStats(args.units, edges=edges)
    y = labels(args)
    iterator = blocks(args)
    while True:
        t0 = time.perf_counter()
        try:
            rows, values = next(iterator)
        except StopIteration:
            break
        generate_s += time.perf_counter() - t0
        stats.add(values, y[rows])
    result = stats.result()
    seconds = time.perf_counter() - started - generate_s
    cpu = time.process_time() - cpu_started
    if args.save:
        np.save(args.save, result.auc)
    return {"path": args.path, "s": round(seconds, 3), "cpu_s_incl_generation": round(cpu, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_after_imports_mb": round(baseline_mb), "finite": bool(np.isfinite(result.auc).all())}


def _first_blocks(args):
    """Evenly spaced blocks (about 8192 rows) for the binned path's edges, as the sweep samples chunks."""
    count = -(-args.images // args.block)
    wanted = set(np.unique(np.linspace(0, count - 1, max(1, min(count, -(-8192 // args.block)))).round().astype(int)))
    for index, block in enumerate(blocks(args)):
        if index in wanted:
            yield block


def zero_shot(args) -> float:
    from neurolens.labels.zero_shot import zero_shot_scores
    rng = np.random.default_rng(0)
    prompts = rng.normal(size=(args.prompts, args.dim)).astype(np.float32)
    prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
    spent = 0.0
    for start in range(0, args.images, args.block):
        emb = rng.normal(size=(min(args.block, args.images - start), args.dim)).astype(np.float32)
        t0 = time.perf_counter()
        zero_shot_scores(emb, prompts, args.prompts // 3)
        spent += time.perf_counter() - t0
    return spent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--units", type=int, default=2560)
    parser.add_argument("--dim", type=int, default=640)        # RN50x4 embedding width
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--block", type=int, default=4096)     # rows per scan chunk read
    parser.add_argument("--bins", type=int, default=1024)
    parser.add_argument("--positive-share", type=float, default=0.12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", choices=["exact", "binned"], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        print(json.dumps(run_path(args)))
        return

    out = {"benchmark": "sweep_scoring", "images": args.images, "units": args.units, "dim": args.dim,
           "threads": args.threads, "zero_shot_s": round(zero_shot(args), 3)}
    with tempfile.TemporaryDirectory() as tmp:
        aucs = {}
        for path in ("exact", "binned"):
            saved = os.path.join(tmp, f"{path}.npy")
            command = [sys.executable, os.path.abspath(__file__), "--path", path, "--save", saved] + sys.argv[1:]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            out[path] = json.loads(line)
            aucs[path] = np.load(saved)
        out["max_auc_difference"] = round(float(np.abs(aucs["exact"] - aucs["binned"]).max()), 6)
    out["total_exact_s"] = round(out["zero_shot_s"] + out["exact"]["s"], 3)
    out["total_binned_s"] = round(out["zero_shot_s"] + out["binned"]["s"], 3)
    out["load_avg"] = round(os.getloadavg()[0], 2)
    out["cpus"] = os.cpu_count()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
