"""Benchmark: generate the toy dataset, train the toy CLIP, measure its zero-shot accuracy. Prints ONE JSON line.

    python scripts/bench_toy.py                          # the demo's defaults (3000 pairs, 6 epochs)
    python scripts/bench_toy.py --images 600 --epochs 1  # a quick run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    from neurolens.toy.settings import TrainSettings

    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from neurolens.models.build import load_clip
    from neurolens.toy.evaluate import zero_shot_accuracy
    from neurolens.toy.generate import ToySettings, write_dataset
    from neurolens.toy.train import train_toy

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        parquet = write_dataset(Path(tmp) / "data", ToySettings(n=args.images, seed=args.seed))
        generate_s = time.perf_counter() - started
        settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, threads=args.threads)
        cpu = time.process_time()
        result = train_toy(str(parquet), Path(tmp) / "toy.pt", settings)
        train_cpu_s = time.process_time() - cpu
        started = time.perf_counter()
        report = zero_shot_accuracy(load_clip(checkpoint=str(result.path), device="cpu"), seed=args.seed)
        eval_s = time.perf_counter() - started
    print(json.dumps(dict(
        benchmark="toy", images=args.images, epochs=args.epochs, batch_size=args.batch_size, threads=args.threads,
        steps=result.steps, generate_s=round(generate_s, 2), train_s=round(result.seconds, 2),
        train_cpu_s=round(train_cpu_s, 2), steps_per_s=round(result.steps / result.seconds, 3),
        eval_s=round(eval_s, 2), zero_shot_accuracy=round(report.accuracy, 4), chance=round(report.chance, 4),
        planted_accuracy=round(report.planted_accuracy, 4), retrieval_at_1=round(report.retrieval_at_1, 4),
        final_loss=round(result.final_loss, 4), torch=torch.__version__, cpus=os.cpu_count(),
        machine=platform.machine(), load_avg=round(os.getloadavg()[0], 2))))


if __name__ == "__main__":
    main()
