"""Benchmark of the concept audit's scoring after its one scan: every unit against K concepts in ONE stream over
the per-image maxima (neurolens.scoring.multilabel.MultiLabelStats), against the one-concept sweep scoring on
the same data: the same scorer with one label (what `sweep` runs now) and the single-label accumulator the
sweep ran before (scoring.statistics.UnitLabelStats, 5.83 s for 20,000 x 2,560 in docs/benchmarks.md). Each
path runs in its own process (its peak RSS is its own). Prints ONE JSON line.

    python scripts/bench_concepts.py                               # 10 concepts, 20,000 images x 2,560 units
    python scripts/bench_concepts.py --images 2000 --units 256     # a quick check

Activations are synthetic, as in scripts/bench_sweep.py: normal noise, ReLU'd (exact ties at 0), plus on each
concept's positive images a shift on that concept's own slice of the units; concept prevalences spread from 2 %
to 20 %. Generation time is not counted; `s` is wall time, `cpu_s` the process's CPU time (less sensitive to a
busy machine). The goal: `ratio` (10 concepts / one concept) at most 2.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def labels(args) -> np.ndarray:
    """(N, K) 0/1 labels, concept k with prevalence linspace(0.02, 0.2)[k]."""
    rng = np.random.default_rng([args.seed, 10 ** 6])
    prevalence = np.linspace(0.02, 0.2, args.concepts)
    return (rng.random((args.images, args.concepts)) < prevalence).astype(np.float32)


def blocks(args):
    """(rows, values (b, U) float32) blocks, the same in every process."""
    y = labels(args)
    effect = np.linspace(0.0, 2.5, args.units, dtype=np.float32)
    owner = np.arange(args.units) % args.concepts                 # each unit follows one concept
    for index, start in enumerate(range(0, args.images, args.block)):
        rng = np.random.default_rng([args.seed, index])
        rows = np.arange(start, min(args.images, start + args.block))
        shift = y[rows][:, owner] * effect
        values = rng.standard_normal((len(rows), args.units), dtype=np.float32) + shift
        yield rows, np.maximum(values, 0.0)


def run_path(args) -> dict:
    import torch
    from neurolens.scoring.multilabel import MultiLabelStats
    from neurolens.scoring.statistics import UnitLabelStats, quantile_edges
    torch.set_num_threads(args.threads)
    y = labels(args)
    edges = None
    if args.method == "binned":
        sample = np.concatenate([values for index, (_, values) in enumerate(blocks(args)) if index < 2])
        edges = quantile_edges(sample, 1024)
    if args.path == "audit":
        stats, wanted = MultiLabelStats(args.units, args.concepts, edges=edges), slice(None)
    elif args.path == "sweep":
        stats, wanted = MultiLabelStats(args.units, 1, edges=edges), slice(0, 1)
    else:
        stats, wanted = UnitLabelStats(args.units, edges=edges), 0
    generate_s, started, cpu_started = 0.0, time.perf_counter(), time.process_time()
    iterator = blocks(args)
    while True:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            rows, values = next(iterator)
        except StopIteration:
            break
        generate_s += time.perf_counter() - t0
        cpu_started += time.process_time() - c0
        stats.add(values, y[rows][:, wanted])
    result = stats.result()
    auc = np.asarray(result.auc)
    return {"path": args.path, "s": round(time.perf_counter() - started - generate_s, 3),
            "cpu_s": round(time.process_time() - cpu_started, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "finite": bool(np.isfinite(auc).all())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--units", type=int, default=2560)
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--block", type=int, default=4096)        # rows per scan chunk read
    parser.add_argument("--method", choices=["exact", "binned"], default="exact")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path", choices=["audit", "sweep", "unit_label_stats"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        print(json.dumps(run_path(args)))
        return
    out = {"benchmark": "concepts_scoring", "images": args.images, "units": args.units, "concepts": args.concepts,
           "method": args.method, "threads": args.threads, "load_avg_before": round(os.getloadavg()[0], 2)}
    for path in ("sweep", "unit_label_stats", "audit"):
        command = [sys.executable, os.path.abspath(__file__), "--path", path] + sys.argv[1:]
        line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        out[path] = json.loads(line)
    out["ratio"] = round(out["audit"]["s"] / out["sweep"]["s"], 3)
    out["ratio_cpu"] = round(out["audit"]["cpu_s"] / out["sweep"]["cpu_s"], 3)
    out["ratio_vs_unit_label_stats"] = round(out["audit"]["s"] / out["unit_label_stats"]["s"], 3)
    out["load_avg"] = round(os.getloadavg()[0], 2)
    out["cpus"] = os.cpu_count()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
